"""EOS→title attention per group, its Jensen–Shannon divergence, group matching and the heat map."""

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from scipy.spatial.distance import jensenshannon
from transformers import CLIPTokenizer

from perpeft.engine.analysis.attention import (
    AttentionProbe,
    divergence,
    jensen_shannon,
    match_groups,
    title_attention,
    token_namer,
    write_attention_heatmap,
)
from perpeft.engine.clip.loading import load_clip
from perpeft.engine.clip.tiny import HashWordTokenizer
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.serve.export import export_adapter
from perpeft.engine.train.pipeline import train_new_run
from perpeft.engine.train.reseed import reseeded_config


@pytest.fixture(scope="module")
def probe(demo_run: Path) -> AttentionProbe:
    return AttentionProbe(demo_run, device="cpu")


@pytest.fixture(scope="module")
def train_small(small_demo, small_config, tmp_path_factory):
    def train(**changes: object) -> Path:
        out = tmp_path_factory.mktemp("analysis-run") / "run"
        return train_new_run(small_config(small_demo, **changes), out, False, lambda line: None, False)[0].path

    return train


def test_distributions_cover_the_title_tokens_and_sum_to_one(probe):
    items = np.arange(1, probe.dataset.num_items + 1)
    weights = probe.distributions(items)
    assert weights.shape == (len(items), 2, HashWordTokenizer().max_length)
    np.testing.assert_allclose(weights.sum(axis=2), 1.0, atol=1e-12)
    ids = np.asarray(probe.inputs.input_ids[items])
    title = (ids >= HashWordTokenizer.first_word_id)[:, None, :]
    assert (weights[~np.broadcast_to(title, weights.shape)] == 0).all()  # BOS, EOS and padding get nothing
    assert (weights[np.broadcast_to(title, weights.shape)] > 0).all()

    explained = probe.explain(7)
    assert explained.tokens == HashWordTokenizer.tokens(probe.dataset.titles[7])
    np.testing.assert_allclose(explained.weights, weights[6][:, title[6, 0]])


@pytest.mark.parametrize("group", [0, 1])
def test_weights_equal_a_hand_computed_softmax_with_only_that_groups_adapter(probe, demo_run, tmp_path, group):
    """Group g's adapter merged into plain CLIP by HF peft, the last layer's q/k applied and softmax(QKᵀ/√d)
    taken by hand: the probe (grouped adapters, the engine's attention) must give the same distribution."""
    export_adapter(demo_run, group, tmp_path / "adapter")
    clip = PeftModel.from_pretrained(load_clip("tiny").model, tmp_path / "adapter").merge_and_unload().eval()
    item = int(np.argmax([len(title.split()) for title in probe.dataset.titles]))
    ids = torch.from_numpy(np.array(probe.inputs.input_ids[item : item + 1]))
    mask = torch.from_numpy(np.array(probe.inputs.attention_mask[item : item + 1]))
    with torch.no_grad():
        hidden = clip.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        layers = clip.text_model.encoder.layers
        assert len(hidden) == len(layers) + 1
        last = layers[-1]
        x = last.layer_norm1(hidden[-2])
        heads = clip.config.text_config.num_attention_heads
        length, width = x.shape[1], x.shape[2] // heads
        q = last.self_attn.q_proj(x).view(1, length, heads, width).transpose(1, 2)
        k = last.self_attn.k_proj(x).view(1, length, heads, width).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(width)
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool)) & mask.bool()[0][None, :]
        probabilities = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    eos = ids[0].tolist().index(HashWordTokenizer.eos_token_id)
    by_hand = probabilities[0, :, eos].mean(dim=0)[1:eos].double()
    by_hand /= by_hand.sum()
    np.testing.assert_allclose(probe.explain(item).weights[group], by_hand.numpy(), atol=1e-5)


def test_groups_attend_differently_after_training(probe):
    weights = probe.distributions(np.arange(1, probe.dataset.num_items + 1))
    assert np.abs(weights[:, 0] - weights[:, 1]).max() > 1e-3
    assert jensen_shannon(weights[:, 0], weights[:, 1]).mean() > 0


def test_title_attention_by_dataset_ids(demo_run, probe):
    first, second = title_attention(demo_run, ["i0003", "i0001"])
    assert (first.item, second.item) == ("i0003", "i0001")
    assert first.title == probe.dataset.titles[3]
    np.testing.assert_allclose(first.weights.sum(axis=1), 1.0)
    assert sum(first.group_sizes) == probe.dataset.num_users
    with pytest.raises(InputError, match="--item: unknown id nope"):
        title_attention(demo_run, ["nope"])


def test_an_item_without_title_tokens_is_refused(probe):
    ids = np.array(probe.inputs.input_ids)
    mask = np.array(probe.inputs.attention_mask)
    ids[5], mask[5] = 0, 0
    ids[5, :2], mask[5, :2] = [HashWordTokenizer.bos_token_id, HashWordTokenizer.eos_token_id], 1
    empty = AttentionProbe.__new__(AttentionProbe)
    empty.__dict__.update(probe.__dict__, inputs=dataclasses.replace(probe.inputs, input_ids=ids, attention_mask=mask))
    assert not empty.distributions(np.array([5])).any()
    with pytest.raises(InputError, match="no tokens"):
        empty.explain(5)


def edited_copy(run: Path, destination: Path, **changes: object) -> Path:
    copy = shutil.copytree(run, destination)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


def test_refuses_runs_it_cannot_read(demo_run, tmp_path):
    with pytest.raises(InputError, match="IISAN is a side network"):
        AttentionProbe(edited_copy(demo_run, tmp_path / "iisan", peft="iisan"))
    with pytest.raises(InputError, match="global-peft run has no per-group adapters"):
        AttentionProbe(edited_copy(demo_run, tmp_path / "global", method="global-peft"))
    with pytest.raises(InputError, match="--no-text"):
        AttentionProbe(edited_copy(demo_run, tmp_path / "no-text", text=False))
    unfinished = edited_copy(demo_run, tmp_path / "unfinished")
    (unfinished / "metrics.json").unlink()
    with pytest.raises(InputError, match="not finished"):
        AttentionProbe(unfinished)


def test_hf_tokenizer_names_bpe_tokens(tmp_path, probe):
    merges = [("g", "o"), ("go", "l"), ("gol", "f</w>"), ("b", "a"), ("ba", "g</w>")]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for left, right in merges:
        for piece in (left, right, left + right):
            vocab.setdefault(piece, len(vocab))
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path)
    bundle = dataclasses.replace(load_clip("tiny"), tokenizer=lambda texts: None, source=str(tmp_path))
    special, name = token_namer(bundle)
    assert special == {0, 1}
    assert name(np.array([0, vocab["golf</w>"], vocab["bag</w>"], 1, 1]), "golf bag") == [
        "<|startoftext|>",
        "golf",
        "bag",
        "<|endoftext|>",
        "<|endoftext|>",
    ]


def test_jensen_shannon_is_zero_symmetric_and_bounded():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6), size=50), rng.dirichlet(np.ones(6), size=50)
    values = jensen_shannon(p, q)
    assert values.shape == (50,)
    np.testing.assert_allclose(values, jensenshannon(p, q, axis=1) ** 2, rtol=1e-9)
    np.testing.assert_array_equal(values, jensen_shannon(q, p))
    assert (jensen_shannon(p, p) == 0).all()
    assert ((values > 0) & (values <= math.log(2))).all()
    assert jensen_shannon(np.array([0.5, 0.5, 0, 0]), np.array([0, 0, 0.25, 0.75])) == pytest.approx(math.log(2))


def test_match_groups_recovers_a_permuted_grouping():
    rng = np.random.default_rng(1)
    groups = 6
    first = rng.integers(groups, size=600)
    permutation = rng.permutation(groups)
    second = permutation[first]
    noisy = rng.random(600) < 0.15
    second[noisy] = rng.integers(groups, size=int(noisy.sum()))
    np.testing.assert_array_equal(match_groups(first, second, groups), permutation)
    np.testing.assert_array_equal(match_groups(first, first, groups), np.arange(groups))


def test_divergence_of_a_run_with_itself_has_zero_intra(demo_run):
    result = divergence(demo_run, demo_run, progress=False)
    assert result["intra"] == 0.0 and result["matching"] == [0, 1]
    assert 0 < result["inter"] < math.log(2)
    assert result["items"] == 34 and result["groups"] == 2
    sampled = divergence(demo_run, items=10, progress=False)
    assert sampled["items"] == 10 and sampled["intra"] is None and sampled["matching"] is None


def test_divergence_between_two_seeds(demo_run, train_small, probe):
    other = train_small(seed=1)
    result = divergence(demo_run, other, progress=False)
    assert sorted(result["matching"]) == [0, 1]
    assert 0 < result["intra"] < math.log(2)
    other_assignment = AttentionProbe(other).assignment[1:]
    expected = match_groups(probe.assignment[1:], other_assignment, 2)
    assert result["matching"] == expected.tolist()
    assert result["matched_users"] == pytest.approx(np.mean(expected[probe.assignment[1:]] == other_assignment))


def test_reseeded_run_is_the_same_groups_with_another_seed(demo_run, probe, tmp_path):
    """Table 7's protocol: intra against a run with demo_run's Global stage and groups, second stage reseeded."""
    source = RunDirectory.open(demo_run)
    reseeded = train_new_run(
        reseeded_config(source, 7), tmp_path / "reseeded", False, lambda line: None, False, global_from=source
    )[0].path
    result = divergence(demo_run, reseeded, progress=False)
    assert result["matching"] == [0, 1] and result["matched_users"] == 1.0
    assert 0 < result["intra"] < math.log(2)
    assert result["inter"] == pytest.approx(divergence(demo_run, progress=False)["inter"])


def test_ia3_runs_are_read_and_other_group_counts_refused(demo_run, train_small):
    ia3 = train_small(peft="ia3", groups=3)
    (attention,) = title_attention(ia3, ["i0002"])
    assert attention.weights.shape[0] == 3
    np.testing.assert_allclose(attention.weights.sum(axis=1), 1.0)
    with pytest.raises(InputError, match="2 and 3 groups"):
        divergence(demo_run, ia3, progress=False)


def test_heatmap_png_written_once_unless_overwrite(probe, tmp_path, monkeypatch):
    attention = probe.explain(3)
    path = tmp_path / "out" / "map.png"
    write_attention_heatmap(attention, path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 2000
    with pytest.raises(InputError, match="--overwrite"):
        write_attention_heatmap(attention, path)
    write_attention_heatmap(attention, path, overwrite=True)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(InputError, match=r"perpeft-engine\[plot\]"):
        write_attention_heatmap(attention, tmp_path / "other.png")
    assert not (tmp_path / "other.png").exists()
