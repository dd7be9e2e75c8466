"""IISAN's side network (Fu et al., SIGIR 2024) over cached CLIP hidden states, all C groups stacked.

Per layer ``l`` (of the cached states ``t_l``, ``v_l``) and gates ``g = sigmoid(w)``, ``w`` ``[3, L]``:

* text-intra:  ``a_l = B^t_l(g_{0,l}·a_{l-1} + (1−g_{0,l})·t_l)``
* image-intra: ``b_l = B^v_l(g_{1,l}·b_{l-1} + (1−g_{1,l})·v_l)``
* inter-modal: ``c_l = B^c_l(c_{l-1} + g_{2,l}·t_l + (1−g_{2,l})·P_l(v_l))``

where ``B(x) = x + up(GELU(down(x)))`` is a bottleneck block and ``P_l`` a Linear(image → text). The first
layer has no previous value: ``a_0 = B^t_0(t_0)``, ``b_0 = B^v_0(v_0)``, ``c_0 = B^c_0(g_{2,0}·t_0 +
(1−g_{2,0})·P_0(v_0))``, so ``w[0, 0]`` and ``w[1, 0]`` are never used (kept so that ``w`` is ``3 × L`` as
in the paper; they get zero gradient). This is the research code's reading of IISAN. The output is
``concat(a_{L-1}, b_{L-1}, c_{L-1})``.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from perpeft.engine.model.groups import RowGroups
from perpeft.engine.runtime.device import to_device

INIT_STD = 1e-4
TEXT, IMAGE, INTER = 0, 1, 2


@dataclass(frozen=True)
class _Packing:
    """Rows of a mixed-group batch laid out as ``[P, M, …]``: one slab per group present, padded to ``M``.

    ``index`` selects the present groups' weights (a slice when all rows share one group, so no weight
    is copied), ``slots`` is each row's position in the flattened ``[P·M]`` layout (``None``: one group).
    """

    index: slice | torch.Tensor
    slots: torch.Tensor | None
    width: int
    slabs: int  # P

    @classmethod
    def of(cls, groups: RowGroups) -> "_Packing":
        """The layout of ``groups``' rows, worked out on the host; only the row slots go to the device."""
        if groups.single is not None:
            return cls(slice(groups.single, groups.single + 1), None, groups.rows, 1)
        present, inverse, counts = np.unique(groups.host.numpy(), return_inverse=True, return_counts=True)
        width = int(counts.max())
        order = np.argsort(inverse, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        starts = np.cumsum(counts) - counts
        device = groups.ids.device
        slots = torch.from_numpy(inverse * width + rank - starts[inverse])
        return cls(to_device(torch.from_numpy(present), device), to_device(slots, device), width, present.size)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.slots is None:
            return x.unsqueeze(0)
        padded = x.new_zeros((self.slabs * self.width, *x.shape[1:])).index_copy(0, self.slots, x)
        return padded.view(self.slabs, self.width, *x.shape[1:])

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        if self.slots is None:
            return y.squeeze(0)
        return y.reshape(-1, *y.shape[2:])[self.slots]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-slab ``x @ weight.T + bias`` for ``x`` ``[P, M, in]``, ``weight`` ``[P, out, in]``, ``bias`` ``[P, out]``."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class GroupedBottlenecks(nn.Module):
    """One residual bottleneck ``x + up(GELU(down(x)))`` per (group, layer); weights and biases ~ N(0, 1e-4)."""

    def __init__(self, groups: int, layers: int, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(groups, layers, bottleneck, dim))
        self.down_bias = nn.Parameter(torch.empty(groups, layers, bottleneck))
        self.up = nn.Parameter(torch.empty(groups, layers, dim, bottleneck))
        self.up_bias = nn.Parameter(torch.empty(groups, layers, dim))
        for parameter in self.parameters():
            nn.init.normal_(parameter, std=INIT_STD)

    def per_layer(self, index: slice | torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Each layer's ``(down, down_bias, up, up_bias)`` for the groups ``index`` selects, ``[P, …]`` each.

        One ``unbind`` per parameter: its backward stacks the layers' gradients once, where indexing each
        layer separately would scatter every layer's gradient into a full-size zero tensor.
        """
        parameters = (self.down, self.down_bias, self.up, self.up_bias)
        return list(zip(*(parameter[index].unbind(1) for parameter in parameters), strict=True))


def _bottleneck(
    x: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor
) -> torch.Tensor:
    return x + _linear(F.gelu(_linear(x, down, down_bias)), up, up_bias)


class GroupedIISAN(nn.Module):
    """The IISAN side network for C groups: ``forward(text [N, L, T], image [N, L, I], groups)`` (`RowGroups`)
    → ``[N, T + I + T]``. Every group present in a batch is served by the same batched matmuls."""

    def __init__(self, groups: int, text_dim: int, image_dim: int, layers: int, bottleneck: int = 32) -> None:
        super().__init__()
        self.layers = layers
        self.text_dim = text_dim
        self.image_dim = image_dim
        self.text_blocks = GroupedBottlenecks(groups, layers, text_dim, bottleneck)
        self.image_blocks = GroupedBottlenecks(groups, layers, image_dim, bottleneck)
        self.inter_blocks = GroupedBottlenecks(groups, layers, text_dim, bottleneck)
        # P_l: Linear(image → text) with nn.Linear's default initialisation (uniform ±1/√in for both).
        bound = 1.0 / math.sqrt(image_dim)
        self.fuse = nn.Parameter(torch.empty(groups, layers, text_dim, image_dim).uniform_(-bound, bound))
        self.fuse_bias = nn.Parameter(torch.empty(groups, layers, text_dim).uniform_(-bound, bound))
        self.gates = nn.Parameter(torch.zeros(groups, 3, layers))

    @property
    def out_features(self) -> int:
        """Width of concat(text, image, inter), the projector's input."""
        return 2 * self.text_dim + self.image_dim

    def forward(self, text_hidden: torch.Tensor, image_hidden: torch.Tensor, groups: RowGroups) -> torch.Tensor:
        packing = _Packing.of(groups)
        index = packing.index
        text, image = packing.pack(text_hidden), packing.pack(image_hidden)
        gates = torch.sigmoid(self.gates[index])[:, :, :, None, None]  # [P, 3, L, 1, 1]
        layers = zip(
            self.text_blocks.per_layer(index),
            self.image_blocks.per_layer(index),
            self.inter_blocks.per_layer(index),
            self.fuse[index].unbind(1),
            self.fuse_bias[index].unbind(1),
            strict=True,
        )
        for layer, (text_block, image_block, inter_block, fuse, fuse_bias) in enumerate(layers):
            text_in, image_in = text[:, :, layer], image[:, :, layer]
            g_text, g_image, g_inter = (gates[:, chain, layer] for chain in (TEXT, IMAGE, INTER))
            cross = g_inter * text_in + (1 - g_inter) * _linear(image_in, fuse, fuse_bias)
            if layer == 0:
                text_z, image_z, inter_z = text_in, image_in, cross
            else:
                text_z = g_text * text_z + (1 - g_text) * text_in
                image_z = g_image * image_z + (1 - g_image) * image_in
                inter_z = inter_z + cross
            text_z = _bottleneck(text_z, *text_block)
            image_z = _bottleneck(image_z, *image_block)
            inter_z = _bottleneck(inter_z, *inter_block)
        return packing.unpack(torch.cat([text_z, image_z, inter_z], dim=-1))
