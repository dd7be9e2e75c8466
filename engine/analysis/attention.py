"""Where CLIP's text tower looks under each group's adapters (paper §4.5), and how much that differs
between groups and between seeds (paper App. C.5.1, Table 7).

The attention distribution of an item under group g is read from the last text-encoder layer with g's
LoRA or (IA)3 adapters of the run's best PerPEFT epoch active:

- the query is the token CLIP pools for the text embedding (HF's rule, `eos_positions`: the EOS);
- the keys are the item's title tokens: padding (attention mask 0), the tokenizer's special tokens
  (BOS, EOS) and the pooled position itself are excluded. The text tower is causal, so the EOS sees
  every title token;
- the weights are averaged over heads, then renormalised over the kept tokens so that each
  distribution sums to 1 (the EOS's attention to itself and to BOS, often most of its mass, is dropped
  rather than spread).

A title with no kept token (an empty title) has no distribution: `title_attention` refuses such an
item and `divergence` leaves it out. Titles longer than the tokenizer's window are truncated, as in
training; the tokens shown are the kept ones. The tiny CLIP's `HashWordTokenizer` names its tokens by
the (lower-cased) title words; HF tokenizers by ``convert_ids_to_tokens`` with BPE's ``</w>`` removed.

Divergences are Jensen–Shannon divergences in nats (natural log), bounded by ln 2 ≈ 0.693.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import rel_entr
from tqdm.auto import tqdm

from perpeft.engine.analysis import open_perpeft_run, refuse_existing
from perpeft.engine.clip.loading import ClipBundle, load_clip
from perpeft.engine.clip.model import eos_positions
from perpeft.engine.clip.tiny import HashWordTokenizer
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.errors import InputError
from perpeft.engine.features.inputs import load_item_inputs
from perpeft.engine.model.encoders import GroupedClipEncoder, require_clip_adapters
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.run_inputs import RunInputs, clip_encoder_factory
from perpeft.engine.runtime.atomic import atomic_write_bytes
from perpeft.engine.runtime.device import resolve_device
from perpeft.engine.serve.embed import load_model
from perpeft.engine.serve.recommend import engine_indices

# (item, group) rows per text-tower pass: every layer's [rows, heads, L, L] weights are kept while recording.
ATTENTION_BATCH_ROWS = 64
SAMPLE_SEED = 0
MAX_FIGURE_WIDTH = 40.0  # inches: CLIP's 77-token window still fits, with smaller annotations
TokenNamer = Callable[[np.ndarray, str], list[str]]


@dataclass
class TitleAttention:
    """One item's EOS→title attention under every group: ``weights[g]`` over ``tokens`` sums to 1."""

    item: str
    title: str
    tokens: list[str]
    weights: np.ndarray
    group_sizes: list[int]


def token_namer(bundle: ClipBundle) -> tuple[frozenset[int], TokenNamer]:
    """The tokenizer's special ids, and a function naming every position of one token-id row of a title."""
    tokenizer = bundle.tokenizer
    if isinstance(tokenizer, HashWordTokenizer):
        special = {tokenizer.pad_token_id: "<pad>", tokenizer.bos_token_id: "<bos>", tokenizer.eos_token_id: "<eos>"}

        def hashed(ids: np.ndarray, title: str) -> list[str]:
            words = iter(tokenizer.tokens(title))
            return [special[token] if token in special else next(words) for token in ids.tolist()]

        return frozenset(special), hashed
    from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(bundle.source, local_files_only=True)
    except Exception as error:
        raise InputError(f"{bundle.source}: cannot load the CLIP tokenizer ({type(error).__name__})") from None

    def bpe(ids: np.ndarray, title: str) -> list[str]:
        return [token.removesuffix("</w>") for token in hf_tokenizer.convert_ids_to_tokens(ids.tolist())]

    return frozenset(hf_tokenizer.all_special_ids), bpe


class AttentionProbe:
    """A finished LoRA or (IA)3 PerPEFT run's CLIP text tower with its best-epoch grouped adapters,
    read for EOS→title attention (module docstring). Runs on the run's device unless ``device`` is given."""

    def __init__(self, path: Path, device: str | None = None, progress: bool = False) -> None:
        run = open_perpeft_run(path)
        config = run.config
        require_clip_adapters(run.path, config.peft, "attention analysis")
        if not config.text:
            raise InputError(f"{run.path}: trained without titles (--no-text): its text adapters never trained")
        self.run = run
        self.dataset = run_dataset(config)
        if config.clip is None:
            raise InputError(f"{run.path}: its config names no CLIP (--clip)")
        bundle = load_clip(config.clip)
        self.special_ids, self.namer = token_namer(bundle)
        self.inputs = load_item_inputs(self.dataset, bundle.tokenizer, bundle.tokenizer_id, bundle.image_size, progress)
        run_inputs = RunInputs(self.dataset, clip_encoder_factory(config, bundle), self.inputs)
        model = load_model(run, run.best_checkpoint("perpeft"), config.groups, self.dataset.num_items, run_inputs)
        self.device = resolve_device(device or config.device)
        if not isinstance(model.encoder, GroupedClipEncoder):
            raise InputError(f"{run.path}: its model has no CLIP encoder ({type(model.encoder).__name__})")
        self.encoder = model.encoder.to(self.device)
        self.eos_token_id = self.encoder.clip.text_model.config.eos_token_id
        self.groups = config.groups
        self.assignment = run.read_grouping()[0].numpy()
        self.group_sizes = np.bincount(self.assignment[1:], minlength=self.groups).tolist()

    def title_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """bool ``[N, L]``: the title-token positions of token-id rows (padding, special tokens and the pooled
        position excluded)."""
        special = torch.tensor(sorted(self.special_ids), device=ids.device)
        positions = torch.arange(ids.shape[1], device=ids.device)
        pooled = eos_positions(ids, self.eos_token_id).unsqueeze(1)
        return mask.bool() & ~torch.isin(ids, special) & (positions != pooled)

    @torch.no_grad()
    def distributions(self, items: np.ndarray) -> np.ndarray:
        """float64 ``[n, C, L]``: each item's attention distribution under each group over its token
        positions (zero outside the title tokens); all zeros for an item without title tokens."""
        ids = torch.from_numpy(np.ascontiguousarray(self.inputs.input_ids[items])).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(self.inputs.attention_mask[items])).to(self.device)
        count, length = ids.shape
        # Each item repeated once per group, groups 0..C-1: one pass serves all of an item's groups.
        ids, mask = ids.repeat_interleave(self.groups, 0), mask.repeat_interleave(self.groups, 0)
        self.encoder.context.set(RowGroups.per_row(torch.arange(self.groups).repeat(count), self.groups, self.device))
        try:
            output = self.encoder.clip.text_model(input_ids=ids, attention_mask=mask, output_attentions=True)
        finally:
            self.encoder.context.clear()
        assert output.attentions is not None  # for the type checker: output_attentions returns them
        rows = torch.arange(ids.shape[0], device=self.device)
        from_eos = output.attentions[-1][rows, :, eos_positions(ids, self.eos_token_id)].mean(dim=1).double()
        weights = from_eos * self.title_tokens(ids, mask)
        total = weights.sum(dim=1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        return weights.view(count, self.groups, length).cpu().numpy()

    def chunks(self, items: np.ndarray, progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(items, distributions)`` for consecutive chunks of ``items``, with a progress bar."""
        size = max(1, ATTENTION_BATCH_ROWS // self.groups)
        starts = range(0, len(items), size)
        bar = tqdm(starts, desc="Attention", unit="chunk", disable=not progress, leave=False, dynamic_ncols=True)
        for start in bar:
            chunk = items[start : start + size]
            yield chunk, self.distributions(chunk)

    def explain(self, item: int) -> TitleAttention:
        """Engine item ``item``'s title tokens and their weights under each group; InputError without tokens."""
        ids = np.array(self.inputs.input_ids[item : item + 1])
        mask = np.array(self.inputs.attention_mask[item : item + 1])
        kept = np.flatnonzero(self.title_tokens(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy())
        title = self.dataset.titles[item]
        item_id = str(self.dataset.item_ids[item])
        if not len(kept):
            raise InputError(f"--item {item_id}: the item's title has no tokens to attend to ({title!r})")
        weights = self.distributions(np.array([item]))[0][:, kept]
        names = self.namer(ids[0], title)
        return TitleAttention(item_id, title, [names[k] for k in kept], weights, self.group_sizes)


def title_attention(
    run_dir: Path, item_ids: list[str], device: str | None = None, progress: bool = False
) -> list[TitleAttention]:
    """EOS→title attention of each of ``item_ids`` (dataset ids) under every group of a finished LoRA or
    (IA)3 PerPEFT run (module docstring); InputError for other runs, unknown ids and empty titles."""
    probe = AttentionProbe(run_dir, device, progress)
    items = engine_indices(probe.dataset.item_ids, item_ids, "--item")
    return [probe.explain(int(item)) for item in items]


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence along the last axis, in nats: in ``[0, ln 2]``, 0 iff ``p == q``, symmetric.

    ``p`` and ``q`` are distributions (non-negative, summing to 1; they broadcast); zeros are allowed.
    This is the square of ``scipy.spatial.distance.jensenshannon``, which returns the distance.
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    middle = 0.5 * (p + q)
    value = 0.5 * (rel_entr(p, middle).sum(axis=-1) + rel_entr(q, middle).sum(axis=-1))
    return np.clip(value, 0.0, np.log(2.0))


def match_groups(assignment_a: np.ndarray, assignment_b: np.ndarray, groups: int) -> np.ndarray:
    """For each group of A, the group of B sharing the most users with it under a one-to-one matching
    (Hungarian algorithm on the ``[C, C]`` contingency table): ``match[a] = b``.

    Both arrays give the group of the same users in the same order.
    """
    table = np.bincount(assignment_a * groups + assignment_b, minlength=groups * groups).reshape(groups, groups)
    rows, columns = linear_sum_assignment(table, maximize=True)
    return columns[np.argsort(rows)]


def _same_inputs(a: AttentionProbe, b: AttentionProbe) -> str | None:
    """Why two runs' attention cannot be compared item by item and group by group, or None."""
    if a.groups != b.groups:
        return f"{a.groups} and {b.groups} groups"
    first, second = a.dataset, b.dataset
    same_dataset = (
        first.user_ids == second.user_ids
        and first.item_ids == second.item_ids
        and all(np.array_equal(x, y) for x, y in zip(first.sequences, second.sequences, strict=True))
    )
    if not same_dataset:
        return "different datasets (their users must be the same to match groups)"
    if not np.array_equal(a.inputs.input_ids, b.inputs.input_ids):
        return "different tokenizations of the titles (different CLIPs)"
    return None


def divergence(
    run_a: Path,
    run_b: Path | None = None,
    items: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, float | int | list[int] | None]:
    """Mean JSD of EOS→title attention (paper Table 7), in nats.

    ``inter``: over items and all pairs of distinct groups of run A. ``intra`` (with ``run_b``): between each
    group of A and its matched group of B (`match_groups` on the two runs' groupings of the same users);
    ``matched_users`` is the share of users whose B group is the one matched to their A group. The paper's
    protocol ("the same cluster, another seed") is a B made by ``train --global-from A --seed N``: A's Global
    stage and groups, the second stage retrained, ``matched_users`` 1. Two independent runs (another seed
    end to end) also differ in their Global stage and group their users differently (``matched_users`` < 1),
    so their intra value adds both to the noise of training one group. ``items``: a seeded random sample
    of that many items, else the whole catalog; items without title tokens are left out, and ``"items"`` is
    the number used.
    """
    result = divergences(run_a, [run_b] if run_b is not None else [], items, device, progress)
    against = result.pop("against")
    return {**result, **(against[0] if against else {"intra": None, "matching": None, "matched_users": None})}


def divergences(
    run_a: Path, others: list[Path], items: int | None = None, device: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """`divergence` of run A against several runs at once, A's attention computed once: ``inter``, ``items``,
    ``groups``, and ``against``, one ``{"intra", "matching", "matched_users"}`` per run of ``others``."""
    probe_a = AttentionProbe(run_a, device, progress)
    if probe_a.groups < 2:
        raise InputError(f"{probe_a.run.path}: one group only; inter-group divergence needs at least two")
    probes, matchings = [], []
    for run_b in others:
        probe_b = AttentionProbe(run_b, device, progress)
        reason = _same_inputs(probe_a, probe_b)
        if reason is not None:
            raise InputError(f"{probe_a.run.path} and {probe_b.run.path}: cannot compare runs with {reason}")
        probes.append(probe_b)
        matchings.append(match_groups(probe_a.assignment[1:], probe_b.assignment[1:], probe_a.groups))
    num_items = probe_a.dataset.num_items
    chosen = np.arange(1, num_items + 1)
    if items is not None and items < num_items:
        chosen = np.sort(np.random.default_rng(SAMPLE_SEED).choice(chosen, items, replace=False))
    first, second = (np.array(side) for side in zip(*combinations(range(probe_a.groups), 2), strict=True))
    inter, intra, used = 0.0, [0.0] * len(probes), 0
    for chunk, weights in probe_a.chunks(chosen, progress):
        valid = weights[:, 0].any(axis=1)
        weights = weights[valid]
        used += int(valid.sum())
        inter += float(jensen_shannon(weights[:, first], weights[:, second]).mean(axis=1).sum())
        for index, (probe_b, matching) in enumerate(zip(probes, matchings, strict=True)):
            other = probe_b.distributions(chunk[valid])[:, matching]
            intra[index] += float(jensen_shannon(weights, other).mean(axis=1).sum())
    if not used:
        raise InputError(f"{probe_a.run.path}: no item with title tokens among the {len(chosen)} chosen")
    return {
        "inter": inter / used,
        "items": used,
        "groups": probe_a.groups,
        "against": [
            {
                "intra": total / used,
                "matching": matching.tolist(),
                "matched_users": float(np.mean(matching[probe_a.assignment[1:]] == probe_b.assignment[1:])),
            }
            for total, matching, probe_b in zip(intra, matchings, probes, strict=True)
        ],
    }


def attention_heatmap_png(attention: TitleAttention) -> bytes:
    """A PNG heat map of ``attention``: one row per group, one column per title token, each cell annotated.

    Needs matplotlib (``pip install perpeft-engine[plot]``); imported here, only when a PNG is wanted.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("writing a PNG needs matplotlib: install perpeft-engine[plot] (or pass --no-png)") from None
    groups, tokens = attention.weights.shape
    width = min(MAX_FIGURE_WIDTH, max(4.0, 0.85 * tokens + 2.2))
    figure = Figure(figsize=(width, max(2.0, 0.55 * groups + 1.6)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(attention.weights, cmap="Blues", vmin=0.0, vmax=max(float(attention.weights.max()), 1e-12))
    for group in range(groups):
        strongest = int(attention.weights[group].argmax())
        for token in range(tokens):
            value = attention.weights[group, token]
            dark = value > 0.6 * attention.weights.max()
            axes.text(
                token,
                group,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=8 if tokens <= 40 else 6,
                color="white" if dark else "black",
                fontweight="bold" if token == strongest else "normal",
            )
    axes.set_xticks(range(tokens), attention.tokens, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(
        range(groups), [f"group {group} ({size} users)" for group, size in enumerate(attention.group_sizes)]
    )
    title = attention.title if len(attention.title) <= 80 else attention.title[:77] + "…"
    axes.set_title(
        f"{attention.item}: {title}\nlast-layer EOS→title attention (bold: each group's highest)", fontsize=9
    )
    figure.colorbar(image, ax=axes, shrink=0.8)
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=150)
    return buffer.getvalue()


def write_attention_heatmap(attention: TitleAttention, path: Path, overwrite: bool = False) -> None:
    """Write `attention_heatmap_png` to ``path`` atomically, refusing an existing file unless ``overwrite``."""
    refuse_existing(path, overwrite)
    atomic_write_bytes(path, attention_heatmap_png(attention))
