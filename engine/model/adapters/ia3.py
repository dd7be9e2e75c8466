"""(IA)3 with all C groups stacked in one module per adapted ``nn.Linear``."""

import torch
from torch import nn

from perpeft.engine.model.adapters.context import GroupContext
from perpeft.kernels.ops import grouped_ia3


class GroupedIA3Linear(nn.Module):
    """Learned per-group scaling vectors, initialised to 1 (HF peft (IA)3 semantics).

    Attention projections scale the layer *output* (``ia3_l`` is ``[C, out]``); feed-forward layers
    (``feedforward=True``, CLIP's ``fc1``) scale the layer *input* (``ia3_l`` is ``[C, in]``).
    """

    def __init__(self, base: nn.Linear, groups: int, feedforward: bool, context: GroupContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.feedforward = feedforward
        width = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(groups, width))

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        groups = self.ia3_l.shape[0]
        scaled = grouped_ia3(
            rows,
            self.ia3_l.to(rows.dtype),
            self.context.row_groups(x, groups),
            segments=self.context.segments(groups, x),
        )
        return scaled.view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return self.base(self._scale(x))
        return self.from_base(x, self.base(x))

    def from_base(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` given ``base_output = base(x)``: an output-scaling layer scales it; a feed-forward
        one scales its input, so its output cannot start from the base output."""
        if self.feedforward:
            raise ValueError("a feed-forward (IA)3 layer scales its input: it cannot finish from the base output")
        return self._scale(base_output)
