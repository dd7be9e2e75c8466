"""LoRA with all C groups stacked in one module per adapted ``nn.Linear``."""

import math

import numpy as np
import torch
from torch import nn

from perpeft.engine.model.adapters.context import GroupContext
from perpeft.kernels.frozen import frozen_linear
from perpeft.kernels.ops import grouped_lora
from perpeft.kernels.reference import expand_ranks, grouped_lora_shrink

DRAW_LEVELS = 2**16


class GroupedLoRALinear(nn.Module):
    """``base(x) + scaling · B_g A_g dropout(x)`` with ``g`` the row's group (HF peft LoRA semantics).

    ``lora_A`` is ``[C, r, in]`` (kaiming-uniform, a=√5, as peft), ``lora_B`` is ``[C, out, r]`` (zeros).
    Dropout (train mode only) zeroes inputs of the LoRA branch with probability ``dropout`` rounded up to
    a multiple of 2⁻¹⁶ (the masks come from 16-bit draws: 0.1 becomes 0.100006); the rescale by the exact
    keep probability is folded into ``scaling`` (the branch is linear), so the input is masked by one
    multiply and never rescaled. In eval mode a group-homogeneous batch runs one GEMM with that group's
    merged weight ``W + scaling · B_g A_g`` (peft's merge, per call), not the base GEMM plus the branch.
    """

    def __init__(
        self, base: nn.Linear, groups: int, rank: int, alpha: float, dropout: float, context: GroupContext
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.context = context
        self.scaling = alpha / rank
        self.dropout = dropout
        self.drop_levels = math.ceil(dropout * DRAW_LEVELS)
        self.keep_probability = 1.0 - self.drop_levels / DRAW_LEVELS
        self.lora_A = nn.Parameter(torch.empty(groups, rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(groups, base.out_features, rank))
        for group in range(groups):
            nn.init.kaiming_uniform_(self.lora_A.data[group], a=math.sqrt(5))

    def _keep_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """Elementwise Bernoulli(``keep_probability``) mask of ``rows``, as a float tensor (multiplying by a
        bool one takes a slow type-promoting path on CPU, forward and backward).

        On CPU the draws are 16-bit integers, the raw 64-bit outputs of NumPy's PCG64 read four at a time
        (the same draws as ``Generator.bytes``, at half its cost), seeded from torch's generator so that
        seeded runs and resumes draw the same masks: CPU ``torch.rand`` is one serial Mersenne Twister, and
        float32 uniforms cost twice the bytes; these masks (one per adapted layer and step) were a tenth of
        a training step. The comparison and the float cast stay in NumPy (a third of torch's cast). Under
        torch.compile, which cannot trace NumPy's generator, they are ``torch.rand`` draws on every device,
        as on CUDA."""
        if rows.device.type == "cpu" and not torch.compiler.is_compiling():
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
            raw = np.random.PCG64(seed).random_raw(-(-rows.numel() // 4))  # four 16-bit draws per 64-bit output
            draws = raw.view(np.uint16)[: rows.numel()].reshape(rows.shape)
            return torch.from_numpy((draws >= self.drop_levels).astype(np.float32)).to(rows.dtype)
        keep = torch.rand(rows.shape, dtype=torch.float32, device=rows.device) >= self.drop_levels / DRAW_LEVELS
        return keep.to(rows.dtype)

    def _merged_weight(self, group: int, dtype: torch.dtype) -> torch.Tensor:
        return (self.base.weight + (self.scaling * self.lora_B[group]) @ self.lora_A[group]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.lora_A.shape[0]
        if not self.training:
            group = self.context.shared_group(groups)
            if group is not None:
                weight = self._merged_weight(group, x.dtype)
                bias = None if self.base.bias is None else self.base.bias.to(x.dtype)
                return frozen_linear(x, weight, bias)
        return self.from_base(x, self.base(x))

    def from_base(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """``base_output`` (``base(x)``, computed by the caller) plus the LoRA branch of ``x``: in eval mode
        too, where `forward` would merge the weights instead."""
        groups = self.lora_A.shape[0]
        rows, scaling = self._branch_input(x)
        delta = grouped_lora(
            rows,
            self.lora_A.to(rows.dtype),
            self.lora_B.to(rows.dtype),
            self.context.row_groups(x, groups),
            scaling,
            segments=self.context.segments(groups, x),
        )
        return base_output + delta.view(base_output.shape).to(base_output.dtype)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's rank-space rows ``scaling · A_g dropout(x)`` ``[..., r]`` (`up` finishes them), each
        row through its group's ``A``; for a caller that mixes rows before the rank is expanded."""
        rows, scaling = self._branch_input(x)
        ranks = grouped_lora_shrink(rows, self.lora_A.to(rows.dtype), self.context.row_groups(x, self.lora_A.shape[0]))
        return (ranks * scaling).view(*x.shape[:-1], ranks.shape[-1])

    def up(self, ranks: torch.Tensor) -> torch.Tensor:
        """``[B, T, r]`` rank-space rows of the batch's ``B`` items (`down`, then mixed) → ``B_g`` of each
        item's group: ``[B, T, out]``."""
        groups = self.lora_B.shape[0]
        shared = self.context.shared_group(groups)
        if shared is not None:
            return expand_ranks(ranks, self.lora_B[shared].to(ranks.dtype))
        items = self.lora_B.to(ranks.dtype).index_select(0, self.context.item_groups(groups))  # [B, out, r]
        return ranks @ items.transpose(1, 2)

    def _branch_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``x``'s rows as the branch reads them (dropped out in training) and the scaling that then applies
        (dropout's rescale folded in)."""
        rows = x.reshape(-1, x.shape[-1])
        scaling = self.scaling
        if self.training and self.dropout > 0.0:
            rows = rows * self._keep_mask(rows)
            scaling /= self.keep_probability
        return rows, scaling
