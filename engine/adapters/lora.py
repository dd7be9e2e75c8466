"""LoRA with all C groups stacked in one module per adapted ``nn.Linear``."""

import math

import numpy as np
import torch
from torch import nn

from perpeft.kernels import grouped_lora

from .context import GroupContext


class GroupedLoRALinear(nn.Module):
    """``base(x) + scaling · B_g A_g dropout(x)`` with ``g`` the row's group (HF peft LoRA semantics).

    ``lora_A`` is ``[C, r, in]`` (kaiming-uniform, a=√5, as peft), ``lora_B`` is ``[C, out, r]`` (zeros).
    Dropout (train mode only) zeroes inputs of the LoRA branch with probability ``dropout``; its
    ``1 / (1 - dropout)`` rescale is folded into ``scaling`` (the branch is linear), so the input is
    masked by one multiply and never rescaled.
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
        self.lora_A = nn.Parameter(torch.empty(groups, rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(groups, base.out_features, rank))
        for group in range(groups):
            nn.init.kaiming_uniform_(self.lora_A.data[group], a=math.sqrt(5))

    def _keep_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """Elementwise Bernoulli(1 - dropout) mask of ``rows``, as a float tensor (multiplying by a bool one
        takes a slow type-promoting path on CPU, forward and backward).

        On CPU the uniforms come from NumPy's PCG64, seeded from torch's generator so that seeded runs and
        resumes draw the same masks: CPU ``torch.rand`` is one serial Mersenne Twister, about twice as slow,
        and these masks (one per adapted layer and step) were a tenth of a training step."""
        if rows.device.type == "cpu":
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
            uniform = torch.from_numpy(np.random.default_rng(seed).random(rows.shape, dtype=np.float32))
        else:
            uniform = torch.rand(rows.shape, dtype=torch.float32, device=rows.device)
        return (uniform >= self.dropout).to(rows.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = x.reshape(-1, x.shape[-1])
        scaling = self.scaling
        if self.training and self.dropout > 0.0:
            rows = rows * self._keep_mask(rows)
            scaling /= 1.0 - self.dropout
        delta = grouped_lora(
            rows,
            self.lora_A.to(rows.dtype),
            self.lora_B.to(rows.dtype),
            self.context.row_groups(x),
            scaling,
            segments=self.context.segments(self.lora_A.shape[0]),
        )
        return out + delta.view(out.shape).to(out.dtype)
