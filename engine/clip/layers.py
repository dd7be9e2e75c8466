"""Two exact rewrites of CLIP's layers that train faster, applied to the engine's own CLIP copy.

- **QuickGELU folded into SiLU**: ``x·σ(1.702x) = SiLU(1.702x) / 1.702``, so scaling ``fc1`` by 1.702 and
  ``fc2``'s weight by 1 / 1.702 turns CLIP's MLP into ``fc2(SiLU(fc1(x)))``. SiLU is one fused ATen kernel
  forward and backward; QuickGELU is three elementwise passes forward and five backward over the widest
  activation of the tower. (IA)3's scaling of ``fc1``'s input is linear, so it commutes with the fold.
- **Frozen layers through oneDNN** (`FrozenLinear`, `FrozenMLP`): every projection of the copy is frozen, so
  each runs `perpeft.kernels.frozen.frozen_linear` and each SiLU MLP whose ``fc1`` carries no adapter runs
  `perpeft.kernels.frozen.frozen_silu_mlp`: on the CPU, oneDNN's GEMMs instead of MKL's (about twice as fast
  where MKL takes its AVX2 kernels on an AVX-512 processor), elsewhere ``F.linear``.

Both change item vectors only by float rounding (``tests/engine/clip/test_layers.py``).
"""

import torch
from torch import nn

from perpeft.engine.clip.model import QUICK_GELU_SLOPE, ClipModel, QuickGELU
from perpeft.kernels.frozen import frozen_linear, frozen_silu_mlp


def _is_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is a CLIP MLP: ``fc1``, ``fc2`` and the activation between them."""
    return all(hasattr(module, part) for part in ("fc1", "fc2", "activation_fn"))


def fold_quick_gelu(clip: nn.Module) -> int:
    """Rewrite every QuickGELU MLP of ``clip`` as ``fc2(SiLU(fc1(x)))`` in place (before adapters wrap
    ``fc1``); returns how many MLPs were folded."""
    folded = 0
    for module in clip.modules():
        if not _is_mlp(module):
            continue
        if not isinstance(module.activation_fn, QuickGELU):
            continue
        fc1, fc2 = module.fc1, module.fc2
        if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
            raise TypeError(f"a QuickGELU MLP with a {type(fc1).__name__} and a {type(fc2).__name__}, not two Linears")
        with torch.no_grad():
            fc1.weight.mul_(QUICK_GELU_SLOPE)
            if fc1.bias is not None:
                fc1.bias.mul_(QUICK_GELU_SLOPE)
            fc2.weight.div_(QUICK_GELU_SLOPE)
        module.activation_fn = nn.SiLU()
        folded += 1
    return folded


class FrozenLinear(nn.Linear):
    """An ``nn.Linear`` run by `frozen_linear`: oneDNN on the CPU while its weight and bias are frozen."""

    @classmethod
    def of(cls, linear: nn.Linear) -> "FrozenLinear":
        """``linear`` as a FrozenLinear holding the same parameters."""
        frozen = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        frozen.weight = linear.weight
        frozen.bias = linear.bias
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)


class FrozenMLP(nn.Module):
    """CLIP's MLP ``fc2(activation_fn(fc1(x)))`` on the same ``fc1`` and ``fc2``: one `frozen_silu_mlp` when the
    activation is SiLU and both are still plain linears (an (IA)3 adapter wraps ``fc1``: then layer by layer)."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module, activation_fn: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2, self.activation_fn = fc1, fc2, activation_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if isinstance(self.activation_fn, nn.SiLU) and isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
            return frozen_silu_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return fc2(self.activation_fn(fc1(x)))


def freeze_layers(clip: nn.Module) -> None:
    """Every ``nn.Linear`` of ``clip`` as a `FrozenLinear` and every MLP as a `FrozenMLP`, in place, on the same
    parameters (before adapters wrap any of them)."""
    for name, module in list(clip.named_modules()):
        if type(module) is nn.Linear:
            clip.set_submodule(name, FrozenLinear.of(module))
    for name, module in list(clip.named_modules()):
        if _is_mlp(module) and not isinstance(module, FrozenMLP):
            clip.set_submodule(name, FrozenMLP(module.fc1, module.fc2, module.activation_fn))


def prepare_clip(clip: ClipModel) -> None:
    """The engine's CLIP copy with both rewrites: QuickGELU folded into SiLU, and its frozen layers through
    `frozen_linear` and `frozen_silu_mlp`."""
    fold_quick_gelu(clip)
    freeze_layers(clip)
