"""`perpeft-engine embed|evaluate|recommend|export` on a small trained demo run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import CLIPModel

from perpeft.cli.inference import embed, evaluate, export, recommend
from perpeft.cli.main import cli
from perpeft.engine.clip.preprocess import normalize_pixels
from perpeft.engine.clip.tiny import TINY_CLIP_DIR
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.run_inputs import load_run_inputs
from perpeft.engine.runtime.run_directory import EMBEDDINGS, RunDirectory
from perpeft.engine.serve.embed import load_model

for command in (embed, evaluate, recommend, export):
    if command.name not in cli.commands:
        cli.add_command(command)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def demo_run(demo_run: Path) -> Path:
    """The shared small run, embedded through the CLI."""
    result = invoke("embed", "--run", str(demo_run), "--batch-size", "16", "--quiet")
    assert result.exit_code == 0, result.output
    assert "2 groups × 34 items × 32" in result.stdout
    return demo_run


def test_evaluate_reproduces_metrics_json(demo_run):
    recorded = json.loads((demo_run / "metrics.json").read_text())["perpeft"]
    result = invoke("evaluate", "--run", str(demo_run), "--json")
    assert result.exit_code == 0, result.output
    recomputed = json.loads(result.stdout)
    assert recomputed["max_abs_difference"] <= 1e-6
    for stage in ("valid", "test"):
        assert recomputed[stage] == pytest.approx(recorded[stage], rel=0, abs=1e-6)
    table = invoke("evaluate", "--run", str(demo_run)).stdout.splitlines()
    assert table[0].split() == ["HR@10", "HR@20", "HR@30", "NDCG@10", "NDCG@20", "NDCG@30"]
    assert [line.split()[0] for line in table[1:3]] == ["valid", "test"]
    assert table[3].startswith("largest difference from metrics.json")


def test_recommend_known_user(demo_run):
    result = invoke("recommend", "--run", str(demo_run), "--user", "u00004", "--k", "3")
    assert result.exit_code == 0, result.output
    header, columns, *rows = result.stdout.splitlines()
    assert header.startswith("user u00004 · group ")
    assert columns.split() == ["rank", "item", "score", "title"]
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]

    as_json = json.loads(invoke("recommend", "--run", str(demo_run), "--user", "u00004", "--k", "3", "--json").stdout)
    assert as_json["user"] == "u00004"
    assert [entry["rank"] for entry in as_json["recommendations"]] == [1, 2, 3]
    assert [row.split()[1] for row in rows] == [entry["item"] for entry in as_json["recommendations"]]
    assert not {entry["item"] for entry in as_json["recommendations"]} & set(as_json["history"])
    assert as_json["assigned_by"] == "known_user"
    first = as_json["recommendations"][0]["item"]
    excluded = json.loads(
        invoke("recommend", "--run", str(demo_run), "--user", "u00004", "--k", "3", "--exclude", first, "--json").stdout
    )
    assert [entry["item"] for entry in excluded["recommendations"]][:2] == [
        entry["item"] for entry in as_json["recommendations"][1:]
    ]


def test_recommend_new_user_json(demo_run):
    result = invoke("recommend", "--run", str(demo_run), "--history", "i0001, i0002,i0003", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["user"] is None and answer["history"] == ["i0001", "i0002", "i0003"]
    assert answer["group"] in (0, 1) and len(answer["recommendations"]) == 10
    assert answer["assigned_by"] == "nearest_centroid"
    scores = [entry["score"] for entry in answer["recommendations"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--user", "u99999"], ["user: unknown id u99999"]),
        (["--history", "i0001,x1"], ["history: unknown id x1"]),
        (["--user", "u00004", "--exclude", "i0001,zz"], ["exclude: unknown id zz"]),
        ([], ["exactly one of --user and --history"]),
    ],
)
def test_recommend_input_errors(demo_run, args, fragments, assert_one_line_error):
    assert_one_line_error(invoke("recommend", "--run", str(demo_run), *args), *fragments)


def test_errors_before_embed_or_training_ends(demo_run, tmp_path, assert_one_line_error):
    copy_path = shutil.copytree(demo_run, tmp_path / "copy", ignore=shutil.ignore_patterns(EMBEDDINGS))
    assert_one_line_error(invoke("evaluate", "--run", str(copy_path)), "perpeft-engine embed")
    assert_one_line_error(invoke("embed", "--run", str(demo_run)), "--overwrite")
    (copy_path / "metrics.json").unlink()
    assert_one_line_error(invoke("embed", "--run", str(copy_path)), "not finished")
    assert_one_line_error(invoke("evaluate", "--run", str(tmp_path / "nowhere")), "not a run directory")


def test_export_loads_in_peft_and_refuses_iisan(demo_run, tmp_path, assert_one_line_error):
    out = tmp_path / "adapter"
    result = invoke("export", "--run", str(demo_run), "--group", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("LORA adapter of group 1")

    run = RunDirectory.open(demo_run)
    run_inputs = load_run_inputs(run.config, run_dataset(run.config), progress=False)
    model = load_model(run, run.best_checkpoint("perpeft"), 2, run_inputs.dataset.num_items, run_inputs)
    input_ids, attention_mask, pixels = run_inputs.inputs.batch(torch.arange(1, 9), torch.device("cpu"))
    assert run.config.clip == "tiny"
    reference = PeftModel.from_pretrained(CLIPModel.from_pretrained(TINY_CLIP_DIR), out)
    with torch.no_grad():
        ours = model.encoder(input_ids, attention_mask, pixels, RowGroups.one(1, 8, 2, torch.device("cpu")))
        pixel_values = normalize_pixels(pixels, model.encoder.image_mean, model.encoder.image_std)
        theirs = reference.eval()(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    torch.testing.assert_close(torch.cat([theirs.image_embeds, theirs.text_embeds], -1), ours)

    iisan = shutil.copytree(demo_run, tmp_path / "iisan", ignore=shutil.ignore_patterns(EMBEDDINGS))
    config = json.loads((iisan / "config.json").read_text())
    (iisan / "config.json").write_text(json.dumps({**config, "peft": "iisan"}))
    assert_one_line_error(
        invoke("export", "--run", str(iisan), "--group", "0", "--out", str(tmp_path / "x")), "IISAN", "peft"
    )


def test_embed_add_items_then_recommend_them(demo_run, tmp_path, item_copies, assert_one_line_error):
    copy = shutil.copytree(demo_run, tmp_path / "run")
    run = str(copy)
    item_file, ids = item_copies(copy, tmp_path / "new", [2, 5, 8])
    result = invoke("embed", "--run", run, "--add-items", str(item_file), "--quiet")
    assert result.exit_code == 0, result.output
    assert "added 3 items (catalog version 1, 3 added in all)" in result.stdout
    result = invoke("recommend", "--run", run, "--history", ",".join(ids[:2]), "--k", "40", "--json")
    assert result.exit_code == 0, result.output
    assert ids[2] in [entry["item"] for entry in json.loads(result.stdout)["recommendations"]]
    assert_one_line_error(
        invoke("embed", "--run", run, "--add-items", str(item_file)), "new.item: already in the run's catalog", ids[0]
    )
    assert_one_line_error(
        invoke("embed", "--run", run, "--add-items", str(item_file), "--overwrite"), "--add-items or --overwrite"
    )
    assert_one_line_error(
        invoke("embed", "--run", run, "--add-items", str(tmp_path / "absent.item")), "absent.item: item file not found"
    )
