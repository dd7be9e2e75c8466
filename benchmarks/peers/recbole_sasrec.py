"""Peer run: RecBole 1.2.1's SASRec on MovieLens-100k under the engine's leave-one-out protocol.

RecBole lives in its own virtual environment outside this repository (it needs numpy < 1.24 and
imports tensorboard); nothing of it is imported by the engine or its tests. Create the environment once:

    python -m venv /work/peers/recbole-venv
    /work/peers/recbole-venv/bin/pip install torch==2.13.0        # first: the CPU build, from local disk
    /work/peers/recbole-venv/bin/pip install "numpy<1.24" recbole==1.2.1 --no-deps
    /work/peers/recbole-venv/bin/pip install "numpy<1.24" scipy pandas tqdm colorlog==4.7.2 \\
        colorama==0.4.4 scikit-learn pyyaml tensorboard texttable tabulate

``--no-deps`` skips ``ray`` (pinned <= 2.6.3 by RecBole's metadata, imported only by
``recbole.quick_start``, which this script does not use); ``thop``, ``plotly``, ``psutil``, ``hyperopt``
and ``kmeans_pytorch`` are imported lazily by code paths not taken here (pip then warns that
recbole's declared ray, thop, plotly and psutil are missing; that is expected). ``tensorboard`` is needed at
import time (``recbole.utils`` imports ``torch.utils.tensorboard``). Then run, from the repository root:

    OMP_NUM_THREADS=1 /work/peers/recbole-venv/bin/python benchmarks/peers/recbole_sasrec.py \\
        --out /tmp/recbole_sasrec.json [--seed 0] [--epochs 300] [--dump-split /tmp/split.json] [--work DIR]

The JSON printed on stdout (and written to ``--out``) holds valid and test HR@10/20/30 and NDCG@10/20/30
at the best epoch, the best epoch (1-based), the epochs run, wall seconds (from the start of ``main``:
config, data loading, training and the final test evaluation; not the interpreter's imports), mean
train and validation seconds per epoch, seed, threads, versions and the split's size and timestamp ties.
RecBole's scratch files (its log, tensorboard events, ``saved/``) go to ``--work`` (default: a new
temporary directory), which is also the working directory during the run; nothing is written to the repo.

Protocol (RecBole config keys in brackets)
- Data: ``recbole/dataset_example/ml-100k/ml-100k.inter`` of the installed package (``--data-dir`` to
  override; files there must be named ``DIRNAME.inter``); only user, item and timestamp are loaded; no
  user/item filtering, no duplicate removal [user/item_inter_num_interval "[0,inf)", rm_dup_inter None,
  val_interval None]. The item file is not loaded: the 1682 items of the interactions are ranked.
- Order and split: chronological leave-one-out [eval_args: split LS valid_and_test, order TO, group_by
  user, mode full]. RecBole sorts by timestamp with a stable sort, so ties keep file order. The sort key
  is the timestamp as RecBole stores it: min-max normalised to [0, 1] in float64 (RecBole's ml-100k.yaml
  sets normalize_all: True; this script sets it explicitly so ``--data-dir`` behaves the same), then
  cast to float32. Two timestamps a second apart can therefore tie. The JSON's ``split.last3_ties``
  counts users whose three latest timestamps hold a tie under float64, raw float32 and RecBole's key.
  RecBole makes one sample per prefix (its sequential augmentation): a user with n interactions gives
  n - 1 samples; the last is test, the one before valid, the rest train (a user with 3 interactions gets
  no valid sample and one with 2 is train-only; ML-100k's users all have >= 20).
- Model: SASRec [MAX_ITEM_LIST_LENGTH 10, hidden_size 32, n_layers 2, n_heads 4, hidden_dropout_prob
  0.3, attn_dropout_prob 0.3; hidden_act gelu, layer_norm_eps 1e-12, initializer_range 0.02 as RecBole].
  inner_size is RecBole's default 256 (``--inner-size`` to change it). The engine's point-wise FFN is
  hidden → hidden (32, as Kang & McAuley's SASRec); 256 is kept because this script runs RecBole's model
  as RecBole configures it, and RecBole's SASRec differs from the engine's in other ways anyway
  (post-LN BERT-style blocks, GELU, LayerNorm + dropout on the input embeddings, no √d scaling).
- Training: loss BCE with one uniform negative per sample [loss_type BCE, train_neg_sample_args
  uniform / sample_num 1]; RecBole's sequential sampler is the repeatable one (a negative differs only
  from that sample's target, and is redrawn every epoch). Adam, learning_rate 1e-3, train_batch_size 256,
  weight_decay 0, shuffled every epoch [shuffle True].
- Selection: evaluate on valid after every epoch [eval_step 1]; early stopping on valid Hit@30
  [valid_metric hit@30, stopping_step 10]: RecBole keeps an epoch whose score is >= the best so far (a
  tie moves the best epoch to the later one) and stops after 11 epochs in a row below it.
- Metrics: Hit (= HR) and NDCG at 10, 20, 30, full ranking over all items [metrics, topk], reported
  with 6 decimals [metric_decimal_place 6]. Each user's history is excluded from the ranking (see below).
- Seeds: ``--seed`` (default 0) [seed, reproducibility True]; ``init_seed`` is called before the data
  and again before the model, as ``recbole.quick_start.run_recbole`` does. CPU only [use_gpu False];
  torch threads from ``--threads`` (default 1; also set OMP_NUM_THREADS as above).

What this script changes in RecBole, and why
1. History excluded from the full ranking. RecBole's full-sort loader gives sequential models no
   history index (only item 0 is masked), so items a user already consumed stay ranked.
   ``HistoryMaskedLoader`` (a ``FullSortEvalDataLoader`` subclass, built on RecBole's own valid and test
   datasets) returns, per sample, every item of the user before the target (all of them, not only the
   10 in the input window: train items for valid, train + the valid target for test), except the target
   itself, which stays ranked; RecBole's trainer then sets those scores to -inf.
2. BCE loss. RecBole 1.2.1's SASRec accepts only loss_type BPR or CE. ``SASRecBCE`` subclasses it:
   pair-wise input (so the train loader adds one negative per sample), loss = mean softplus(-s_pos) +
   mean softplus(s_neg), i.e. BCE-with-logits on the target (label 1) plus on the negative (label 0).
   Its constructor passes loss_type BPR to ``SASRec.__init__`` (which would reject BCE) and restores it.
   The config is given RecBole's own ``properties/model/SASRec.yaml`` explicitly, since the model
   defaults are looked up by class name.
3. Checkpoints kept in memory. RecBole saves the best epoch with ``torch.save`` of its whole config and
   reloads it with ``torch.load``, which under torch >= 2.6 defaults to weights_only=True and refuses
   that pickle. ``InMemoryTrainer`` overrides ``_save_checkpoint`` to keep a copy of the best
   ``state_dict`` in memory (and the epoch), and ``evaluate(load_best_model=True)`` to load that copy:
   no file, no ``torch.load``, the same weights.
4. Autograd anomaly detection off. ``recbole/model/sequential_recommender/sine.py`` calls
   ``torch.autograd.set_detect_anomaly(True)`` at import, and importing any sequential model imports it,
   so stock RecBole trains SASRec in anomaly mode: every op records a Python stack trace and every
   backward checks for NaN. Results are identical; an epoch here took 53 s instead of 24 s. The
   script turns it off after importing RecBole (``--stock-anomaly-detection`` keeps it on).
5. Command line hidden from RecBole. ``Config`` parses ``sys.argv`` for ``--key=value`` overrides; the
   script's own arguments are hidden from it while it is built.
"""

import argparse
import contextlib
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import recbole
import torch
import torch.nn.functional as F
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.data.dataset import Dataset
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import InputType, init_logger, init_seed

KS = (10, 20, 30)
RECBOLE_DIR = Path(recbole.__file__).resolve().parent
DEFAULT_DATA_DIR = RECBOLE_DIR / "dataset_example" / "ml-100k"
SASREC_YAML = RECBOLE_DIR / "properties" / "model" / "SASRec.yaml"


class SASRecBCE(SASRec):
    """RecBole's SASRec trained with binary cross-entropy on the target and one sampled negative."""

    input_type = InputType.PAIRWISE

    def __init__(self, config: Config, dataset: Dataset) -> None:
        loss_type = config["loss_type"]
        config["loss_type"] = "BPR"  # SASRec.__init__ accepts BPR or CE only; BPRLoss has no parameters
        try:
            super().__init__(config, dataset)
        finally:
            config["loss_type"] = loss_type
        self.loss_type = loss_type
        self.loss_fct = None

    def calculate_loss(self, interaction: Any) -> torch.Tensor:
        output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        pos = (output * self.item_embedding(interaction[self.POS_ITEM_ID])).sum(-1)
        neg = (output * self.item_embedding(interaction[self.NEG_ITEM_ID])).sum(-1)
        return F.softplus(-pos).mean() + F.softplus(neg).mean()


class HistoryMaskedLoader(FullSortEvalDataLoader):
    """Full-sort loader that also returns each sample's history (items to exclude from its ranking)."""

    def __init__(self, config: Config, dataset: Dataset, sampler: Any, histories: list[torch.Tensor]) -> None:
        if len(histories) != len(dataset):
            raise ValueError(f"{len(histories)} histories for {len(dataset)} samples")
        self.histories = histories
        super().__init__(config, dataset, sampler, shuffle=False)

    def collate_fn(self, index: Any) -> tuple:
        interaction, _, positive_u, positive_i = super().collate_fn(index)
        rows = [self.histories[row] for row in np.asarray(index)]
        history_u = torch.cat([torch.full_like(items, offset) for offset, items in enumerate(rows)])
        return interaction, (history_u, torch.cat(rows)), positive_u, positive_i


class InMemoryTrainer(Trainer):
    """RecBole's trainer with the best epoch's weights kept in memory instead of a torch.save file,
    and per-epoch timings recorded."""

    def __init__(self, config: Config, model: SASRec) -> None:
        super().__init__(config, model)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None
        self.train_seconds: list[float] = []
        self.valid_seconds: list[float] = []

    def _save_checkpoint(self, epoch: int, verbose: bool = True, **kwargs: Any) -> None:
        self.best_state = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        self.best_epoch = epoch

    def _train_epoch(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        loss = super()._train_epoch(*args, **kwargs)
        self.train_seconds.append(time.perf_counter() - start)
        return loss

    def _valid_epoch(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = super()._valid_epoch(*args, **kwargs)
        self.valid_seconds.append(time.perf_counter() - start)
        return result

    def evaluate(self, eval_data: Any, load_best_model: bool = True, model_file: Any = None, **kwargs: Any) -> Any:
        if load_best_model:
            if self.best_state is None:
                raise RuntimeError("no best epoch was recorded")
            self.model.load_state_dict(self.best_state)
        return super().evaluate(eval_data, load_best_model=False, **kwargs)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the block in ``path`` (``contextlib.chdir`` needs Python 3.11)."""
    saved = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


@contextlib.contextmanager
def hidden_argv() -> Iterator[None]:
    """Hide this script's arguments from RecBole's ``Config`` (it reads ``--key=value`` from sys.argv)."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def recbole_config(args: argparse.Namespace, work: Path) -> Config:
    """The protocol as a RecBole ``Config`` (see the module docstring)."""
    params = {
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "state": "INFO",
        "show_progress": False,
        "checkpoint_dir": str(work / "saved"),
        "save_dataset": False,
        "save_dataloaders": False,
        "log_wandb": False,
        "worker": 0,
        # data
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "rm_dup_inter": None,
        "val_interval": None,
        "filter_inter_by_user_or_item": True,
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "normalize_all": True,
        "MAX_ITEM_LIST_LENGTH": 10,
        # model
        "hidden_size": 32,
        "inner_size": args.inner_size,
        "n_layers": 2,
        "n_heads": 4,
        "hidden_dropout_prob": 0.3,
        "attn_dropout_prob": 0.3,
        "loss_type": "BCE",
        # training
        "epochs": args.epochs,
        "learner": "adam",
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "train_batch_size": 256,
        "shuffle": True,
        "train_neg_sample_args": {
            "distribution": "uniform",
            "sample_num": 1,
            "alpha": 1.0,
            "dynamic": False,
            "candidate_num": 0,
        },
        "eval_step": 1,
        "stopping_step": 10,
        # evaluation
        "eval_args": {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": "full"},
        "repeatable": True,
        "metrics": ["Hit", "NDCG"],
        "topk": list(KS),
        "valid_metric": "Hit@30",
        "metric_decimal_place": 6,
        "eval_batch_size": 4096,
    }
    with hidden_argv():
        config = Config(
            model=SASRecBCE,
            dataset=args.data_dir.name,
            config_file_list=[str(SASREC_YAML)],
            config_dict=params,
        )
    config["data_path"] = str(args.data_dir)  # Config points "ml-100k" at the package copy, others at ./dataset
    return config


def user_sequences(dataset: Dataset) -> dict[int, list[int]]:
    """Each user's whole item sequence in RecBole's order, from the built (augmented, time-sorted) dataset:
    the first sample's one-item input, then every sample's target."""
    feat = dataset.inter_feat
    users = feat[dataset.uid_field].tolist()
    targets = feat[dataset.iid_field].tolist()
    lengths = feat[dataset.item_list_length_field].tolist()
    first_items = feat[dataset.item_id_list_field][:, 0].tolist()
    sequences: dict[int, list[int]] = {}
    for user, target, length, first in zip(users, targets, lengths, first_items, strict=True):
        if user not in sequences:
            if length != 1:
                raise RuntimeError(f"user {user}'s first sample has an input of {length} items")
            sequences[user] = [first]
        sequences[user].append(target)
    return sequences


def sample_histories(split: Dataset, sequences: dict[int, list[int]], from_end: int) -> list[torch.Tensor]:
    """Per sample of ``split`` (the target ``from_end`` items before the end of its user's sequence): every
    item before the target, less the target itself. Checks the target and the input window against it."""
    users = split.inter_feat[split.uid_field].tolist()
    targets = split.inter_feat[split.iid_field].tolist()
    lengths = split.inter_feat[split.item_list_length_field].tolist()
    windows = split.inter_feat[split.item_id_list_field].tolist()
    histories = []
    for user, target, length, window in zip(users, targets, lengths, windows, strict=True):
        sequence = sequences[user]
        position = len(sequence) - from_end
        if sequence[position] != target or sequence[:position][-length:] != window[:length]:
            raise RuntimeError(f"user {user}: sample does not match its sequence")
        histories.append(torch.tensor([item for item in sequence[:position] if item != target], dtype=torch.int64))
    return histories


def split_targets(dataset: Dataset, valid: Dataset, test: Dataset) -> dict[str, list[str | None]]:
    """{original user id: [valid target, test target]} in original ids (None where RecBole has no target)."""
    targets: dict[str, list[str | None]] = {}
    for column, split in enumerate((valid, test)):
        users = dataset.id2token(dataset.uid_field, split.inter_feat[dataset.uid_field].numpy())
        items = dataset.id2token(dataset.iid_field, split.inter_feat[dataset.iid_field].numpy())
        for user, item in zip(users.tolist(), items.tolist(), strict=True):
            targets.setdefault(user, [None, None])[column] = item
    return dict(sorted(targets.items(), key=lambda entry: (len(entry[0]), entry[0])))


def last_three_ties(inter_file: Path, user_field: str, time_field: str) -> dict[str, int]:
    """Users, and users whose three latest timestamps hold a tie: compared as float64, as raw float32 and as
    RecBole's sort key (min-max normalised float64, then float32). The latest three are well defined under
    each key whatever the tie order, since each key is a monotone function of the timestamp."""
    header = inter_file.open(encoding="utf-8").readline().rstrip("\n").split("\t")
    names = [column.split(":")[0] for column in header]
    columns = np.loadtxt(
        inter_file, dtype=str, delimiter="\t", skiprows=1, usecols=(names.index(user_field), names.index(time_field))
    )
    users, stamps = columns[:, 0], columns[:, 1].astype(np.float64)
    low, high = stamps.min(), stamps.max()
    keys = {
        "float64": stamps,
        "float32": stamps.astype(np.float32),
        "recbole_key": ((stamps - low) / (high - low)).astype(np.float32),
    }
    order = np.lexsort((stamps, users))  # by user, then timestamp
    bounds = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1], True])
    counts = dict.fromkeys(keys, 0)
    for start, stop in itertools.pairwise(bounds):
        latest = order[max(start, stop - 3) : stop]
        for name, key in keys.items():
            counts[name] += int(len(np.unique(key[latest])) < len(latest))
    return {"users": len(bounds) - 1, **counts}


def metrics(result: dict[str, float]) -> dict[str, float]:
    """RecBole's result keys (``hit@10``, ``ndcg@10``) as the engine names them (``HR@10``, ``NDCG@10``)."""
    return {f"{name}@{k}": float(result[f"{key}@{k}"]) for name, key in (("HR", "hit"), ("NDCG", "ndcg")) for k in KS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=300, help="at most this many epochs (early stopping decides)")
    parser.add_argument("--inner-size", type=int, default=256, help="SASRec's FFN width (RecBole's default 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="holds DIRNAME.inter")
    parser.add_argument("--work", type=Path, default=None, help="RecBole's scratch directory (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result JSON here")
    parser.add_argument("--dump-split", type=Path, default=None, help="write {user: [valid item, test item]} here")
    parser.add_argument(
        "--stock-anomaly-detection", action="store_true", help="keep the anomaly mode RecBole's import turns on"
    )
    parser.add_argument("--split-only", action="store_true", help="stop after the split (with --dump-split)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    args = parse_args(argv)
    args.data_dir = args.data_dir.resolve()
    outputs = [path.resolve() if path else None for path in (args.out, args.dump_split)]
    work = (args.work or Path(tempfile.mkdtemp(prefix="recbole-sasrec-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.autograd.set_detect_anomaly(args.stock_anomaly_detection)  # see patch 4 in the module docstring
    with working_directory(work):  # RecBole writes ./log and ./log_tensorboard relative to cwd
        config = recbole_config(args, work)
        init_seed(config["seed"], config["reproducibility"])
        init_logger(config)
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        valid_split, test_split = valid_data._dataset, test_data._dataset
        sequences = user_sequences(dataset)
        valid_data = HistoryMaskedLoader(
            config, valid_split, valid_data._sampler, sample_histories(valid_split, sequences, 2)
        )
        test_data = HistoryMaskedLoader(
            config, test_split, test_data._sampler, sample_histories(test_split, sequences, 1)
        )
        ties = last_three_ties(args.data_dir / f"{args.data_dir.name}.inter", dataset.uid_field, dataset.time_field)
        split = {
            "items": dataset.item_num - 1,
            "train_samples": len(train_data._dataset),
            "valid_users": len(valid_split),
            "test_users": len(test_split),
            "last3_ties": ties,
        }
        if outputs[1]:
            outputs[1].write_text(json.dumps(split_targets(dataset, valid_split, test_split)) + "\n")
        if args.split_only:
            print(json.dumps(split, indent=2))
            return split
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = SASRecBCE(config, train_data._dataset).to(config["device"])
        trainer = InMemoryTrainer(config, model)
        _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
        test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    result = {
        "peer": "recbole-sasrec",
        "dataset": args.data_dir.name,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "best_epoch": trainer.best_epoch + 1,
        "epochs_run": len(trainer.train_seconds),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "train_seconds_per_epoch": round(float(np.mean(trainer.train_seconds)), 3),
        "valid_seconds_per_epoch": round(float(np.mean(trainer.valid_seconds)), 3),
        "valid": metrics(best_valid),
        "test": metrics(test_result),
        "inner_size": args.inner_size,
        "anomaly_detection": args.stock_anomaly_detection,
        "split": split,
        "versions": {
            "recbole": recbole.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "work": str(work),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if outputs[0]:
        outputs[0].write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
