"""CLIP's pooled tower outputs, with the last layer run only at the position the pooling reads.

A tower's pooled output is one position of its last layer: the EOS token of a title, the class token of
an image. That layer still needs every position's keys and values, but its queries, attention output,
``out_proj``, MLP and norms only at the pooled position: in a two-layer tower this is two fifths of the
layer GEMMs, forward and backward. On the CPU the keys and values are not projected at all: with one
query per item, ``k_proj`` and ``v_proj`` fold into that query and into the weighted mean of the normed
rows (`_folded_layer`). On the CPU the text tower also runs on packed rows (`TitleRows`): no
token after a title's EOS reaches its pooled output. Exact: the same arithmetic on fewer rows, so pooled
outputs equal the full tower's (``tests/engine/clip/test_layers.py``).

The start of a tower's first layer is frozen under the engine's adapters: its input (the embeddings, and
the vision tower's pre-norm), ``layer_norm1`` of it, and the base ``q``/``k``/``v`` projections of that.
`title_prefix` and `image_prefix` compute those once per item; both towers then take an item's rows of it
(``prefix``) in place of its tokens or pixels, and the adapters add their part to the stored base
outputs (`FromBase`). The same arithmetic on the same rows: outputs and gradients equal the towers run
from their inputs.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from perpeft.engine.clip.model import (
    ClipAttention,
    ClipEncoder,
    ClipEncoderLayer,
    ClipTextTower,
    ClipVisionTower,
    additive_mask,
    attend,
    eos_positions,
    split_heads,
    text_attention_mask,
    value_weights,
)

PACKED_ROWS_AT_MOST = 0.85
PREFIX_PARTS = 5  # the first layer's input, layer_norm1 of it, and its base q, k and v projections


@runtime_checkable
class FromBase(Protocol):
    """An adapted projection that can finish from its frozen ``base``'s output (the prefix's stored q, k, v)."""

    base: nn.Linear

    def from_base(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """The projection of ``x`` given ``base(x)``."""
        ...


@runtime_checkable
class LowRank(Protocol):
    """An adapted projection ``base(x) + up(down(x))`` whose branch runs through a small rank space (LoRA),
    so the pooled layer can mix its rank-space rows instead of its outputs (`_folded_layer`)."""

    base: nn.Linear

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` rows → their ``[..., r]`` rank-space rows (dropout and scaling applied)."""
        ...

    def up(self, ranks: torch.Tensor) -> torch.Tensor:
        """``[B, T, r]`` rank-space rows of ``B`` items → ``[B, T, out]``, each item through its group."""
        ...


@dataclass(frozen=True)
class TitleRows:
    """The token rows of a ``[B, L]`` title batch that its pooled outputs depend on, packed: each title's
    tokens up to its EOS that the attention mask keeps (and the EOS itself), in batch order (`title_rows`).

    Under CLIP's causal attention no token up to the EOS sees a later one, so the rows after it (padding, and
    the repeated EOS of pad-as-EOS tokenizers) change no pooled output: a tower run on the packed rows does
    the layers' row-wise work (norms, projections, MLP) on ``items.numel()`` rows instead of ``B * L``.
    """

    items: torch.Tensor
    """``[T]`` int64: the title of each kept row (ascending)."""
    columns: torch.Tensor
    """``[T]`` int64: its token position."""
    lengths: torch.Tensor
    """``[B]`` int64: how many rows each title keeps."""
    pooled: torch.Tensor
    """``[B]`` int64: each title's EOS row in the packed rows."""
    batch: int
    width: int
    _rows_for: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def heads(self, rows: torch.Tensor, heads: int) -> torch.Tensor:
        """Packed ``[T, H·D]`` rows as the padded batch's attention heads ``[B, H, L, D]``, zeros where a
        row was dropped: one row copy per head into a heads-major buffer, which the attention's batched
        GEMMs read as it is (no transposed copy)."""
        width = rows.shape[1] // heads
        buffer = rows.new_zeros(self.batch * heads * self.width, width)
        packed = buffer.index_copy(0, self._rows(heads), rows.reshape(-1, width))
        return packed.view(self.batch, heads, self.width, width)

    def unheads(self, attended: torch.Tensor) -> torch.Tensor:
        """The kept rows of an attention output ``[B, L, H, D]``, packed: ``[T, H·D]``. Reads heads-major
        memory (what the engine's CPU attention returns) in place; other layouts are copied first."""
        heads, width = attended.shape[2:]
        rows = attended.transpose(1, 2).reshape(-1, width).index_select(0, self._rows(heads))
        return rows.view(-1, heads * width)

    def pack(self, batch: torch.Tensor) -> torch.Tensor:
        """The kept rows of a ``[B, L, ...]`` batch, packed: ``[T, ...]`` (a copy of a contiguous batch's
        rows; other layouts are copied first)."""
        return batch.flatten(0, 1).index_select(0, self._rows(1))

    def _rows(self, heads: int) -> torch.Tensor:
        """``[T·H]``: where each kept row's heads sit in a heads-major ``[B·H·L]`` buffer, row by row (one
        head: the rows of the flattened ``[B·L]`` batch). Built once per head count: every layer reuses it."""
        rows = self._rows_for.get(heads)
        if rows is None:
            head = torch.arange(heads, device=self.items.device)
            rows = ((self.items.unsqueeze(1) * heads + head) * self.width + self.columns.unsqueeze(1)).flatten()
            self._rows_for[heads] = rows
        return rows


def _kept(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ``[B, L]`` positions a packed tower keeps, and each title's EOS position ``[B, 1]``. A title
    whose EOS the mask drops keeps all of its rows, a rare case kept simple: that query sees no key, so its
    attention weights are zero (`value_weights`)."""
    positions = eos_positions(input_ids, eos_token_id).unsqueeze(1)
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    keep = columns <= positions
    if attention_mask is not None:
        mask = attention_mask.bool()
        keep = (keep & mask) | (columns == positions) | ~mask.gather(1, positions)
    return keep, positions


def _title_rows(keep: torch.Tensor, positions: torch.Tensor) -> TitleRows:
    batch, width = keep.shape
    lengths = keep.sum(dim=1)
    items, columns = keep.nonzero(as_tuple=True)
    before_eos = keep & (torch.arange(width, device=keep.device) < positions)
    return TitleRows(items, columns, lengths, lengths.cumsum(0) - lengths + before_eos.sum(dim=1), batch, width)


def title_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, eos_token_id: int) -> TitleRows:
    """The rows `pooled_text` keeps for a packed tower (see `_kept`)."""
    return _title_rows(*_kept(input_ids, attention_mask, eos_token_id))


def packed_title_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, eos_token_id: int
) -> TitleRows | None:
    """`title_rows` of the batch when the text tower should run on them, else None (the padded tower).

    On the CPU, where padded rows cost their arithmetic, and when the packed rows are at most
    ``PACKED_ROWS_AT_MOST`` of the batch's: moving rows into and out of the padded attention buffers costs
    about 15% of the padded tower (measured on the CPU with every row kept), so batches of nearly
    full-width titles stay padded. Not on CUDA (the row count would be read back from the device every
    batch, and the Triton kernels take item-level segments) nor under torch.compile (a data-dependent row
    count)."""
    if input_ids.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    keep, positions = _kept(input_ids, attention_mask, eos_token_id)
    if int(keep.sum()) > PACKED_ROWS_AT_MOST * keep.numel():
        return None
    return _title_rows(keep, positions)


def _layers(encoder: ClipEncoder) -> tuple[list[ClipEncoderLayer], ClipEncoderLayer]:
    """A tower's layers before the last, and the last."""
    layers = []
    for layer in encoder.layers:
        if not isinstance(layer, ClipEncoderLayer):
            raise TypeError(f"a CLIP tower with a {type(layer).__name__} layer, not a ClipEncoderLayer")
        layers.append(layer)
    return layers[:-1], layers[-1]


def _projections(attention: ClipAttention) -> tuple[nn.Module, nn.Module, nn.Module]:
    return attention.q_proj, attention.k_proj, attention.v_proj


def _frozen(projection: nn.Module) -> nn.Linear:
    """A projection's frozen ``nn.Linear``: its adapter's ``base``, or itself."""
    base = projection.base if isinstance(projection, FromBase) else projection
    if not isinstance(base, nn.Linear):
        raise TypeError(f"a CLIP projection of type {type(base).__name__}, not an nn.Linear")
    return base


def _first_layer_prefix(encoder: ClipEncoder, hidden: torch.Tensor) -> torch.Tensor:
    """The frozen start of a tower's first layer for its input rows ``hidden`` ``[..., D]``: ``hidden``,
    ``layer_norm1(hidden)`` and the base q, k and v projections of that, side by side: ``[..., 5·D]``."""
    layers, _ = _before_last(encoder, from_prefix=True)
    layer = layers[0]
    normed = layer.layer_norm1(hidden)
    bases = [_frozen(projection)(normed) for projection in _projections(layer.self_attn)]
    return torch.cat([hidden, normed, *bases], dim=-1)


def title_prefix(text_model: ClipTextTower, input_ids: torch.Tensor) -> torch.Tensor:
    """The text tower's first-layer prefix of titles ``[B, L]``: ``[B, L, 5·D]``, for `pooled_text`."""
    return _first_layer_prefix(text_model.encoder, text_model.embeddings(input_ids))


def image_prefix(vision_model: ClipVisionTower, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's first-layer prefix of images: ``[B, P, 5·D]``, for `pooled_image`."""
    return _first_layer_prefix(vision_model.encoder, _image_rows(vision_model, pixel_values))


def _from_prefix(
    attention: ClipAttention, prefix: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first layer's input and its q, k and v from prefix rows (`title_prefix`, `image_prefix`): each adapter adds its
    part to the stored base output; a plain ``nn.Linear`` is the base output."""
    hidden, normed, *bases = prefix.chunk(PREFIX_PARTS, dim=-1)
    projected = []
    for projection, base in zip(_projections(attention), bases, strict=True):
        if isinstance(projection, FromBase):
            projected.append(projection.from_base(normed, base))
        elif isinstance(projection, nn.Linear):
            projected.append(base)
        else:
            raise TypeError(f"a CLIP projection of type {type(projection).__name__}: no base output to finish from")
    q, k, v = projected
    return hidden, (q, k, v)


def _prefixed_layer(
    layer: ClipEncoderLayer, prefix: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """A ``ClipEncoderLayer`` on ``[B, L, D]`` rows, started from their prefix rows ``[B, L, 5·D]``."""
    attention = layer.self_attn
    hidden, projected = _from_prefix(attention, prefix)
    queries, keys, values = (split_heads(part, attention.num_heads) for part in projected)
    attended = attend(attention, queries, keys, values, mask, is_causal)[0]
    hidden = hidden + attention.out_proj(attended.reshape(hidden.shape))
    return hidden + layer.mlp(layer.layer_norm2(hidden))


Heads = Callable[[torch.Tensor, int], torch.Tensor]
"""Rows of every position (packed or padded) → ``[B, heads, L, width]``, as the attention reads them."""


def _last_layer(
    layer: ClipEncoderLayer,
    residual: torch.Tensor,
    normed: torch.Tensor,
    rows: torch.Tensor,
    heads: Heads,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """A tower's last ``layer`` at one position per item: ``residual`` and ``normed`` (``layer_norm1`` of it)
    ``[B, D]`` at that position, ``rows`` (``layer_norm1`` at every position) for its keys and values;
    ``key_mask`` (bool ``[B, 1, 1, L]``) says which positions it may see (None: all). Returns ``[B, D]``."""
    attention = layer.self_attn
    if _folds(attention, rows):
        ranks = attention.v_proj.down(rows) if isinstance(attention.v_proj, LowRank) else None
        return _folded_layer(
            layer, residual, normed, heads(rows, 1)[:, 0], None if ranks is None else heads(ranks, 1)[:, 0], key_mask
        )
    keys, values = (heads(projection(rows), attention.num_heads) for projection in (attention.k_proj, attention.v_proj))
    return _pooled_layer(layer, residual, normed, keys, values, key_mask)


def _folds(attention: ClipAttention, rows: torch.Tensor) -> bool:
    """Whether `_folded_layer` serves this attention: the engine's CPU attention (outside torch.compile), a
    plain ``k_proj`` and a plain or low-rank (LoRA) ``v_proj``."""
    return (
        rows.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and isinstance(attention.k_proj, nn.Linear)
        and isinstance(attention.v_proj, (nn.Linear, LowRank))
    )


def _folded_layer(
    layer: ClipEncoderLayer,
    residual: torch.Tensor,
    normed: torch.Tensor,
    rows: torch.Tensor,
    ranks: torch.Tensor | None,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """`_pooled_layer` with ``k_proj`` and ``v_proj`` folded into the one query, not run at every position.

    With one query per item, ``q·(W_k n_j + b_k) = (W_kᵀ q)·n_j + q·b_k``, whose last term is the same for
    every key and leaves the softmax unchanged; and ``Σ_j w_j (W_v n_j + b_v) = W_v (Σ_j w_j n_j) + b_v Σ_j
    w_j``. So the scores read the normed rows directly through the folded query, and the values are one
    projection per item and head of the weighted mean row, instead of the two projections at every
    position (forward and backward). A LoRA ``v_proj`` mixes its rank-space rows (``ranks``, ``[B, L, r]``)
    the same way. ``rows`` is ``[B, L, D]``, padded; the same math as `_one_query` otherwise (the engine's
    attention). Returns ``[B, D]``."""
    attention = layer.self_attn
    batch, width = residual.shape
    heads, head = attention.num_heads, attention.head_dim
    # Per head a [B, d]·[d, D] GEMM (a broadcast matmul would copy the weight once per item).
    query = attention.q_proj(normed.unsqueeze(1)).view(batch, heads, head).transpose(0, 1)  # [H, B, d]
    folded = torch.bmm(query, attention.k_proj.weight.view(heads, head, width)).transpose(0, 1) * attention.scale
    scores = torch.bmm(folded, rows.transpose(1, 2)).unsqueeze(2)  # [B, H, 1, L]
    if key_mask is not None:
        scores = scores + additive_mask(key_mask, scores.dtype)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    dropout = float(attention.dropout or 0.0) if attention.training else 0.0
    weights = value_weights(attention, weights, key_mask, dropout).view(batch, heads, -1)  # [B, H, L]
    values = _frozen(attention.v_proj)
    mixed = torch.bmm(weights, rows).transpose(0, 1)  # [H, B, D]
    attended = torch.bmm(mixed, values.weight.view(heads, head, width).transpose(1, 2)).transpose(0, 1)  # [B, H, d]
    if values.bias is not None:
        attended = attended + weights.sum(dim=-1, keepdim=True) * values.bias.view(heads, head)
    if ranks is not None and isinstance(attention.v_proj, LowRank):
        branch = attention.v_proj.up(torch.bmm(weights, ranks))  # [B, H, D]: each head keeps its own columns
        attended = attended + branch.view(batch, heads, heads, head).diagonal(dim1=1, dim2=2).transpose(1, 2)
    pooled = residual.unsqueeze(1) + attention.out_proj(attended.reshape(batch, 1, width))
    pooled = pooled + layer.mlp(layer.layer_norm2(pooled))
    return pooled[:, 0]


def _pooled_layer(
    layer: ClipEncoderLayer,
    residual: torch.Tensor,
    normed: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``layer`` at one position per row: ``residual`` and ``normed`` (``layer_norm1`` of it) ``[B, D]`` at
    that position, every position's ``keys`` and ``values`` ``[B, H, L, D]``; ``key_mask`` (bool
    ``[B, 1, 1, L]``) says which keys the position may see (None: all). Returns ``[B, D]``."""
    attention = layer.self_attn
    batch, width = residual.shape
    queries = split_heads(attention.q_proj(normed.unsqueeze(1)), attention.num_heads)
    attended = attend(attention, queries, keys, values, key_mask, is_causal=False)[0]
    pooled = residual.unsqueeze(1) + attention.out_proj(attended.reshape(batch, 1, width))
    pooled = pooled + layer.mlp(layer.layer_norm2(pooled))
    return pooled[:, 0]


def _packed_layer(
    layer: ClipEncoderLayer, rows: torch.Tensor, packing: TitleRows, mask: torch.Tensor | None
) -> torch.Tensor:
    """``layer`` on packed title rows ``[T, D]``: row-wise work on the rows, attention on the padded batch."""
    normed = layer.layer_norm1(rows)
    projected = (projection(normed) for projection in _projections(layer.self_attn))
    return _packed_rest(layer, rows, tuple(projected), packing, mask)


def _packed_rest(
    layer: ClipEncoderLayer,
    rows: torch.Tensor,
    projected: tuple[torch.Tensor, ...],
    packing: TitleRows,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """`_packed_layer` from its packed input ``rows`` and their q, k and v."""
    attention = layer.self_attn
    queries, keys, values = (packing.heads(part, attention.num_heads) for part in projected)
    attended = packing.unheads(attend(attention, queries, keys, values, mask, is_causal=True)[0])
    rows = rows + attention.out_proj(attended)
    return rows + layer.mlp(layer.layer_norm2(rows))


def _before_last(encoder: ClipEncoder, from_prefix: bool) -> tuple[list[ClipEncoderLayer], ClipEncoderLayer]:
    """`_layers`, checking that a tower started ``from_prefix`` has a first layer before its last."""
    layers, last = _layers(encoder)
    if from_prefix and not layers:
        raise ValueError("a first-layer prefix for a one-layer tower: its only layer runs at the pooled position")
    return layers, last


def pooled_text(
    text_model: ClipTextTower,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    packing: TitleRows | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """``text_model(input_ids, attention_mask).pooler_output`` of a ClipTextTower (EOS rows, final norm);
    with ``packing`` (`title_rows` of the same batch) the tower runs on its packed rows. With ``prefix``
    (the titles' `title_prefix` rows: ``[T, 5·D]`` packed, else ``[B, L, 5·D]``) neither the
    embeddings nor the first layer's frozen start run."""
    batch, width = input_ids.shape
    layers, last = _before_last(text_model.encoder, prefix is not None)
    mask = text_attention_mask(attention_mask, width)
    positions = eos_positions(input_ids, text_model.config.eos_token_id)
    # The EOS query sees the keys up to its own position that the padding mask keeps.
    columns = torch.arange(width, device=input_ids.device)
    keys_seen = columns <= positions.unsqueeze(1)
    if attention_mask is not None:
        keys_seen = keys_seen & attention_mask.bool()
    key_mask = keys_seen[:, None, None, :]
    if packing is None:
        if prefix is None:
            hidden = text_model.embeddings(input_ids)
        else:
            hidden = _prefixed_layer(layers[0], prefix, mask, is_causal=True)
            layers = layers[1:]
        for layer in layers:
            hidden = layer(hidden, mask, is_causal=True)
        normed = last.layer_norm1(hidden)
        rows = torch.arange(batch, device=input_ids.device)
        pooled = _last_layer(last, hidden[rows, positions], normed[rows, positions], normed, split_heads, key_mask)
    else:
        if prefix is None:
            packed = packing.pack(text_model.embeddings(input_ids))
        else:
            packed, projected = _from_prefix(layers[0].self_attn, prefix)
            packed = _packed_rest(layers[0], packed, projected, packing, mask)
            layers = layers[1:]
        for layer in layers:
            packed = _packed_layer(layer, packed, packing, mask)
        normed = last.layer_norm1(packed)
        pooled = _last_layer(last, packed[packing.pooled], normed[packing.pooled], normed, packing.heads, key_mask)
    return text_model.final_layer_norm(pooled)


def pooled_image(
    vision_model: ClipVisionTower, pixel_values: torch.Tensor | None, prefix: torch.Tensor | None = None
) -> torch.Tensor:
    """``vision_model(pixel_values).pooler_output`` of a ClipVisionTower (class token, post-layernorm); with
    ``prefix`` (the images' `image_prefix` rows ``[B, P, 5·D]``) the pixels are not read."""
    layers, last = _before_last(vision_model.encoder, prefix is not None)
    if prefix is not None:
        hidden = _prefixed_layer(layers[0], prefix, None, is_causal=False)
        layers = layers[1:]
    elif pixel_values is not None:
        hidden = _image_rows(vision_model, pixel_values)
    else:
        raise ValueError("pooled_image needs the pixels or their first-layer prefix")
    for layer in layers:
        hidden = layer(hidden, None)
    normed = last.layer_norm1(hidden)
    return vision_model.post_layernorm(_last_layer(last, hidden[:, 0], normed[:, 0], normed, split_heads, None))


def _image_rows(vision_model: ClipVisionTower, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's first-layer input ``[B, P, D]``: patch and class embeddings, pre-norm."""
    return vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))
