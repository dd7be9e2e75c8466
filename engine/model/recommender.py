"""Projector(s), transductive ID and position embeddings, SASRec, and the item table z = 0.5·m + h."""

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from perpeft.engine.model.groups import RowGroups

LAYER_NORM_EPS = 1e-8
MULTIMODAL_WEIGHT = 0.5


class GroupedProjector(nn.Module):
    """Per-group MLP: Linear(in→64) → LayerNorm → ReLU → Linear(64→d) → LayerNorm, all C groups stacked.

    Each row picks its own group's weights, so a mixed-group batch needs no loop over groups.
    ``placeholders`` (modality name → columns of the input) adds, per group, a learned vector for each
    modality that replaces those columns of items lacking it (the paper drops such items; App. D.3.2
    names this as a limitation). Initialised to zeros.
    """

    def __init__(
        self,
        groups: int,
        in_features: int,
        hidden: int = 64,
        out_features: int = 32,
        placeholders: dict[str, slice] | None = None,
    ) -> None:
        super().__init__()
        self.placeholder_columns = dict(placeholders or {})
        self.placeholders = nn.ParameterDict(
            {
                name: nn.Parameter(torch.zeros(groups, len(range(in_features)[columns])))
                for name, columns in self.placeholder_columns.items()
            }
        )
        self.w1 = nn.Parameter(torch.empty(groups, hidden, in_features))
        self.b1 = nn.Parameter(torch.empty(groups, hidden))
        self.ln1_weight = nn.Parameter(torch.ones(groups, hidden))
        self.ln1_bias = nn.Parameter(torch.zeros(groups, hidden))
        self.w2 = nn.Parameter(torch.empty(groups, out_features, hidden))
        self.b2 = nn.Parameter(torch.empty(groups, out_features))
        self.ln2_weight = nn.Parameter(torch.ones(groups, out_features))
        self.ln2_bias = nn.Parameter(torch.zeros(groups, out_features))
        for group in range(groups):
            for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
                # nn.Linear's default initialisation, per group.
                nn.init.kaiming_uniform_(weight.data[group], a=math.sqrt(5))
                bound = 1.0 / math.sqrt(weight.shape[-1])
                nn.init.uniform_(bias.data[group], -bound, bound)

    @property
    def groups(self) -> int:
        return self.w1.shape[0]

    def fill_missing(self, x: torch.Tensor, groups: RowGroups, present: torch.Tensor) -> torch.Tensor:
        """Replace each missing modality's columns by the group's placeholder; ``present`` is bool ``[N, M]``
        with one column per placeholder, in order."""
        x = x.clone()
        shared = groups.single
        for column, (name, columns) in enumerate(self.placeholder_columns.items()):
            vectors = self.placeholders[name]
            if shared is not None:
                fill = vectors[shared].expand(x.shape[0], -1)
            else:  # a one-hot GEMM rather than a gather: see forward
                fill = F.one_hot(groups.ids, self.groups).to(vectors.dtype) @ vectors
            missing = ~present[:, column : column + 1]
            x[:, columns] = torch.where(missing, fill.to(x.dtype), x[:, columns])
        return x

    def forward(self, x: torch.Tensor, groups: RowGroups, present: torch.Tensor | None = None) -> torch.Tensor:
        if present is not None and self.placeholder_columns:
            x = self.fill_missing(x, groups, present)
        rows, hidden, out_features = x.shape[0], self.w1.shape[1], self.w2.shape[1]
        shared = groups.single
        if shared is not None:  # a group-homogeneous batch (every PerPEFT training batch)
            h = F.linear(x, self.w1[shared], self.b1[shared])
            h = F.layer_norm(h, (hidden,), self.ln1_weight[shared], self.ln1_bias[shared], LAYER_NORM_EPS)
            h = F.linear(F.relu(h), self.w2[shared], self.b2[shared])
            return F.layer_norm(h, (out_features,), self.ln2_weight[shared], self.ln2_bias[shared], LAYER_NORM_EPS)
        # Mixed groups: every group's layer in one GEMM, each row keeping its own group's slice by a one-hot
        # mask, and per-group vectors picked by a one-hot GEMM. Gathering per-row weights instead would make
        # the backward a scatter-add (index_put_ with accumulate), which is nondeterministic on
        # multi-threaded CPUs; the projector is tiny next to CLIP, so C× its FLOPs cost nothing.
        select = F.one_hot(groups.ids, self.groups).to(x.dtype)

        def own_slice(stacked: torch.Tensor) -> torch.Tensor:
            return (stacked.view(rows, self.groups, -1) * select.unsqueeze(-1)).sum(dim=1)

        h = own_slice(x @ self.w1.reshape(-1, x.shape[-1]).T) + select @ self.b1
        h = F.layer_norm(h, (hidden,), eps=LAYER_NORM_EPS) * (select @ self.ln1_weight) + select @ self.ln1_bias
        h = own_slice(F.relu(h) @ self.w2.reshape(-1, hidden).T) + select @ self.b2
        h = F.layer_norm(h, (out_features,), eps=LAYER_NORM_EPS)
        return h * (select @ self.ln2_weight) + select @ self.ln2_bias


class PointWiseFeedForward(nn.Module):
    """SASRec's FFN: Linear → dropout → ReLU → Linear → dropout, with the residual added."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout2(self.linear2(F.relu(self.dropout1(self.linear1(x)))))


class SASRec(nn.Module):
    """Self-attentive sequential recommender (Kang & McAuley 2018) as configured by PerPEFT (App. C.2).

    The input is the already-scaled embedding sequence ``z·√d + position`` (see ``Recommender``); the
    output is one predictive vector per position. No padding mask, as in the authors' code.
    """

    def __init__(self, hidden: int = 32, blocks: int = 2, heads: int = 4, dropout: float = 0.3) -> None:
        super().__init__()
        self.attention_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=LAYER_NORM_EPS) for _ in range(blocks))
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True) for _ in range(blocks)
        )
        self.forward_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=LAYER_NORM_EPS) for _ in range(blocks))
        self.feed_forwards = nn.ModuleList(PointWiseFeedForward(hidden, dropout) for _ in range(blocks))
        self.last_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        causal = torch.zeros(length, length, dtype=x.dtype, device=x.device).masked_fill_(future, float("-inf"))
        for norm, attention, forward_norm, feed_forward in zip(
            self.attention_norms, self.attentions, self.forward_norms, self.feed_forwards, strict=True
        ):
            query = norm(x)
            x = forward_norm(query + causal_attention(cast(nn.MultiheadAttention, attention), query, x, causal))
            x = feed_forward(x)
        return self.last_norm(x)


def causal_attention(
    attention: nn.MultiheadAttention, query: torch.Tensor, source: torch.Tensor, causal: torch.Tensor
) -> torch.Tensor:
    """``attention(query, source, source, attn_mask=causal, need_weights=False)[0]`` for batch-first
    ``[B, L, d]`` inputs and an additive ``[L, L]`` mask: the very ops `nn.MultiheadAttention` runs for
    them (packed in-projection, SDPA with its dropout, out-projection), without its per-call checks and
    mask conversion, which cost more than the arithmetic at SASRec's sizes (a serving request is one
    window). Bitwise the same outputs, gradients and dropout draws (test)."""
    batch, length, width = query.shape
    heads = attention.num_heads
    head_width = width // heads
    w_q, w_kv = attention.in_proj_weight.split([width, 2 * width])
    b_q, b_kv = attention.in_proj_bias.split([width, 2 * width])
    q = F.linear(query.transpose(0, 1), w_q, b_q)
    kv = F.linear(source.transpose(0, 1), w_kv, b_kv)
    kv = kv.unflatten(-1, (2, width)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = (
        tensor.view(length, batch * heads, head_width).transpose(0, 1).view(batch, heads, length, head_width)
        for tensor in (q, kv[0], kv[1])
    )
    dropout = attention.dropout if attention.training else 0.0
    attended = F.scaled_dot_product_attention(q, k, v, causal.view(1, 1, length, length), dropout, False)
    attended = attended.permute(2, 0, 1, 3).reshape(batch * length, width)
    output = F.linear(attended, attention.out_proj.weight, attention.out_proj.bias)
    return output.view(length, batch, width).transpose(0, 1)


class PersonalEmbedding(nn.Module):
    """A learned embedding per user (User-level) or per group (Group-level) fed to SASRec (paper §4.1.3).

    Mode 1 appends it to the sequence as one more element, with its own position vector. Mode 2
    concatenates it to every item vector and maps ``[z; p]`` back to d with a Linear that starts as
    ``[I 0]``, so a model warm-started from Global PEFT begins exactly where Global PEFT ended.
    """

    def __init__(self, rows: int, hidden: int, mode: int) -> None:
        super().__init__()
        if mode not in (1, 2):
            raise ValueError(f"personal embedding mode must be 1 or 2, got {mode}")
        self.mode = mode
        self.embeddings = nn.Parameter(nn.init.xavier_normal_(torch.empty(rows, hidden)))
        if mode == 1:
            self.position = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, hidden))[0])
        else:
            self.mix = nn.Linear(2 * hidden, hidden)
            with torch.no_grad():
                self.mix.weight.zero_()
                self.mix.weight[:, :hidden] = torch.eye(hidden)
                self.mix.bias.zero_()

    def element(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """Mode 1: the extra sequence element ``[B, d]``, scaled like the item vectors."""
        return self.embeddings[rows] * scale + self.position

    def concatenated(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Mode 2: ``Linear([z_t; p])`` for every position of ``vectors`` ``[B, L, d]``."""
        personal = self.embeddings[rows].unsqueeze(1).expand_as(vectors)
        return self.mix(torch.cat([vectors, personal], dim=-1))


class Recommender(nn.Module):
    """Everything trainable beside the CLIP adapters: projector(s), ID/position embeddings, SASRec."""

    def __init__(
        self,
        num_items: int,
        groups: int,
        multimodal_dim: int | None,
        hidden: int = 32,
        maxlen: int = 10,
        blocks: int = 2,
        heads: int = 4,
        dropout: float = 0.3,
        placeholders: dict[str, slice] | None = None,
        personal_rows: int = 0,
        personal_mode: int = 0,
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.maxlen = maxlen
        self.item_embeddings = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(maxlen + 1, hidden, padding_idx=0)
        self.projector = GroupedProjector(groups, multimodal_dim, 64, hidden, placeholders) if multimodal_dim else None
        self.embedding_dropout = nn.Dropout(dropout)
        self.sasrec = SASRec(hidden, blocks, heads, dropout)
        for module in (self.sasrec, self.item_embeddings, self.position_embeddings):
            for parameter in module.parameters():
                if parameter.dim() >= 2:
                    nn.init.xavier_normal_(parameter)
        with torch.no_grad():
            self.item_embeddings.weight[0].zero_()
            self.position_embeddings.weight[0].zero_()
        self.personal = PersonalEmbedding(personal_rows, hidden, personal_mode) if personal_rows else None

    def item_vectors(
        self,
        items: torch.Tensor,
        multimodal: torch.Tensor | None,
        groups: RowGroups,
        present: torch.Tensor | None = None,
        with_ids: bool = True,
    ) -> torch.Tensor:
        """z = 0.5·MLP_g(multimodal) + h for ``items`` (padding rows are zero); ``present`` marks which
        modalities each item has, when the projector holds placeholders. ``with_ids=False`` leaves h out:
        the vector of an item added after training, which has no ID embedding (``items`` then need not
        index the ID table)."""
        if not with_ids and (self.projector is None or multimodal is None):
            raise ValueError("an item without an ID embedding needs its multimodal features")
        if self.projector is None or multimodal is None:
            return self.item_embeddings(items)
        z = MULTIMODAL_WEIGHT * self.projector(multimodal, groups, present)
        if with_ids:
            z = z + self.item_embeddings(items)
        return z * (items != 0).unsqueeze(-1).to(z.dtype)

    def sequence_output(
        self,
        sequence_items: torch.Tensor,
        sequence_vectors: torch.Tensor,
        personal_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SASRec over ``[B, L]`` item ids with their vectors ``[B, L, d]`` → ``[B, L, d]``.

        With personal embeddings, ``personal_rows`` ``[B]`` picks each sequence's user or group embedding.
        """
        personal = self.personal
        if personal is not None and personal_rows is None:
            raise ValueError("this model has personal embeddings: pass personal_rows")
        length = sequence_items.shape[1]
        real = sequence_items != 0
        if personal is not None and personal_rows is not None and personal.mode == 2:
            sequence_vectors = personal.concatenated(sequence_vectors, personal_rows) * real.unsqueeze(-1)
        positions = torch.arange(1, length + 1, device=sequence_items.device).expand_as(sequence_items)
        x = sequence_vectors * math.sqrt(self.hidden) + self.position_embeddings(positions * real)
        if personal is None or personal_rows is None or personal.mode == 2:
            return self.sasrec(self.embedding_dropout(x))
        element = personal.element(personal_rows, math.sqrt(self.hidden))
        output = self.sasrec(self.embedding_dropout(torch.cat([x, element.unsqueeze(1)], dim=1)))
        # The appended element's output (the only one that sees it, under causal attention) predicts
        # what the last item's output would have: the next item.
        return torch.cat([output[:, : length - 1], output[:, length:]], dim=1)

    def id_norm(self) -> torch.Tensor:
        """‖ID-embedding weight‖₂ (the norm, not squared), the loss's 1e-6 regulariser."""
        return self.item_embeddings.weight.norm(2)
