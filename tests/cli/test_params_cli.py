"""`perpeft-engine params` prints the paper's Table 8 counts without loading weights."""

import json

from click.testing import CliRunner

from perpeft.cli.main import cli


def test_params_json_matches_table_8():
    result = CliRunner().invoke(
        cli, ["params", "--clip", "vit-b-32", "--peft", "ia3", "--groups", "8", "--items", "18884", "--json"]
    )
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    assert [counts[key] for key in ("peft_per_group", "projector_per_group", "sasrec", "transductive")] == [
        46_080,
        67_872,
        12_992,
        604_672,
    ]
    assert (counts["global_peft_total"], counts["perpeft_total"]) == (731_616, 1_529_280)


def test_params_table_is_human_readable():
    result = CliRunner().invoke(cli, ["params", "--peft", "ia3", "--items", "18884"])
    assert result.exit_code == 0
    assert "1,529,280" in result.output


def test_unknown_clip_alias_is_one_line_exit_2():
    result = CliRunner().invoke(cli, ["params", "--clip", "vit-h-99", "--items", "10"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "vit-h-99" in result.output


def test_params_counts_missing_modality_placeholders():
    result = CliRunner().invoke(cli, ["params", "--peft", "ia3", "--items", "18884", "--missing-modalities", "--json"])
    assert json.loads(result.output)["projector_per_group"] == 67_872 + 2 * 512
