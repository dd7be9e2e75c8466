"""Run the authors' research script (``perpeft_lora_ia3.py`` of github.com/kswoo97/PerPEFT) on a shop.

The script is run from its own clone, which stays outside this project (nothing of it is copied here):
it reads ``./dataset/PREFIX_*`` and ``openai/clip-vit-base-patch32`` relative to its working directory,
so this module lays out a work directory with links to the shop's release files and to a local CLIP
directory, runs the script there, and returns its wall time and the test metrics at its best
validation-HR@30 epoch (the script prints every PerPEFT epoch's validation and test metrics but selects
nothing itself).

    python benchmarks/peers/research_scripts.py --clone ../PerPEFT --release DIR --clip DIR --work DIR

The script hard-codes E1 = 10 Global epochs; ``--num_epochs`` is E2, and C, rank, batch size, lr and
weight decay are passed as the engine's job uses them. Images are decoded and preprocessed by
``CLIPProcessor`` at every step, as the script does.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = "perpeft_lora_ia3.py"
METRICS = ("NDCG@10", "NDCG@20", "NDCG@30", "HR@10", "HR@20", "HR@30")
EPOCH_LINE = re.compile(r"epoch:(\d+), .*valid \((.*?)\), test \((.*?)\)")


def prepare_work_directory(work: Path, release: Path, clip: Path, prefix: str) -> None:
    """``work/dataset`` links the release's files (the script also writes per-group files there);
    ``work/openai/clip-vit-base-patch32`` links the CLIP directory."""
    dataset = work / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    for name in (
        f"{prefix}_final.txt",
        f"{prefix}_item2id_final.pickle",
        f"{prefix}_texts_final.pickle",
        f"{prefix}_images",
    ):
        link = dataset / name
        if not link.exists():
            link.symlink_to((release / name).resolve())
    model = work / "openai" / "clip-vit-base-patch32"
    model.parent.mkdir(parents=True, exist_ok=True)
    if not model.exists():
        model.symlink_to(clip.resolve())


def parse_metrics(line: str) -> dict[str, float]:
    return {name.strip(): float(value) for name, value in (part.split(":") for part in line.split(","))}


def best_epoch(log: str) -> dict[str, object]:
    """The PerPEFT epoch with the best validation HR@30 (first on ties, as the engine) and its metrics."""
    epochs = []
    for line in log.splitlines():
        match = EPOCH_LINE.search(line)
        if match:
            epochs.append((int(match.group(1)), parse_metrics(match.group(2)), parse_metrics(match.group(3))))
    if not epochs:
        raise RuntimeError("the research script printed no epoch line")
    epoch, valid, test = max(epochs, key=lambda entry: (entry[1]["HR@30"], -entry[0]))
    return {"best_epoch": epoch, "epochs": len(epochs), "valid": valid, "test": test}


def run_research_script(
    clone: Path,
    release: Path,
    clip: Path,
    work: Path,
    prefix: str = "arts",
    peft: str = "lora",
    epochs_perpeft: int = 20,
    groups: int = 8,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
) -> dict[str, object]:
    """Run the script to completion; its log goes to ``work/research.log``. Returns wall seconds and metrics."""
    script = clone / SCRIPT
    if not script.is_file():
        raise FileNotFoundError(f"{clone}: no {SCRIPT} (give a clone of kswoo97/PerPEFT)")
    prepare_work_directory(work, release, clip, prefix)
    command = [
        sys.executable,
        str(script.resolve()),
        *("--dataset", prefix, "--device", "cpu", "--peft_type", peft),
        *("--lr", str(lr), "--wdecay", str(weight_decay), "--num_epochs", str(epochs_perpeft)),
        *("--C", str(groups), "--rank", "4", "--batch_size", "16"),
    ]
    started = time.perf_counter()
    with open(work / "research.log", "w") as log:
        completed = subprocess.run(command, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    text = (work / "research.log").read_text()
    if completed.returncode != 0:
        raise RuntimeError(f"the research script failed ({completed.returncode}); see {work / 'research.log'}")
    return {"wall_seconds": wall, "command": command, **best_epoch(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clone", type=Path, required=True, help="a clone of kswoo97/PerPEFT")
    parser.add_argument("--release", type=Path, required=True, help="the shop in the authors' release format")
    parser.add_argument("--clip", type=Path, required=True, help="a local CLIP directory")
    parser.add_argument("--work", type=Path, required=True, help="the script's working directory")
    parser.add_argument("--prefix", default="arts")
    parser.add_argument("--peft", default="lora", choices=["lora", "ia3"])
    parser.add_argument("--epochs-perpeft", type=int, default=20)
    args = parser.parse_args()
    result = run_research_script(
        args.clone, args.release, args.clip, args.work, args.prefix, args.peft, args.epochs_perpeft
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
