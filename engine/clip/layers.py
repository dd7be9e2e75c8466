"""Three exact rewrites of Hugging Face CLIP's layers that train faster, applied to the engine's own CLIP copy.

- **Attention** (``ATTENTION``, registered with HF's attention and mask interfaces): on CPU, scores are one
  ``baddbmm`` that applies the scale and the causal or padding bias in the GEMM, then a softmax and a ``bmm``.
  SDPA's CPU math backend scales queries and keys apart, adds the mask, and runs a "safe" softmax that
  scans the scores for fully masked rows three more times (``isneginf``, ``all``, ``where``); at CLIP's
  short sequences those passes over the scores cost more than the GEMMs. One query per row (the pooled
  layer's) is broadcast products and sums instead. On other devices it is HF's SDPA.
- **QuickGELU folded into SiLU**: ``x·σ(1.702x) = SiLU(1.702x) / 1.702``, so scaling ``fc1`` by 1.702 and
  ``fc2``'s weight by 1 / 1.702 turns CLIP's MLP into ``fc2(SiLU(fc1(x)))``. SiLU is one fused ATen kernel
  forward and backward; QuickGELU is three elementwise passes forward and five backward over the widest
  activation of the tower. (IA)3's scaling of ``fc1``'s input is linear, so it commutes with the fold.

- **Frozen layers through oneDNN** (`FrozenLinear`, `FrozenMLP`): every projection of the copy is frozen, so
  each runs `perpeft.kernels.frozen.frozen_linear` and each SiLU MLP whose ``fc1`` carries no adapter runs
  `perpeft.kernels.frozen.frozen_silu_mlp`: on the CPU, oneDNN's GEMMs instead of MKL's (about twice as fast
  where MKL takes its AVX2 kernels on an AVX-512 processor), elsewhere ``F.linear``.

All three change item vectors only by float rounding (``tests/engine/clip/test_layers.py``).
"""

from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface, PreTrainedModel

from perpeft.kernels.frozen import frozen_linear, frozen_silu_mlp

ATTENTION = "perpeft"
QUICK_GELU_SLOPE = 1.702


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask as the score bias it stands for: a bool one (True: may attend) becomes 0 / the dtype's minimum."""
    if attention_mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype).masked_fill(~attention_mask, torch.finfo(dtype).min)
    return attention_mask.to(dtype)


def _bias(
    attention_mask: torch.Tensor | None, causal: bool, heads: int, queries: int, keys: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """The additive score bias ``baddbmm`` broadcasts over ``[B·H, Q, K]``, or None without a mask."""
    if attention_mask is not None:
        batch = attention_mask.shape[0]
        bias = additive_mask(attention_mask, dtype)
        return bias.expand(batch, heads, queries, keys).reshape(batch * heads, queries, keys)
    if causal and queries > 1:
        return torch.full((queries, keys), float("-inf"), dtype=dtype).triu_(1)
    return None


def value_weights(
    module: nn.Module, weights: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """``[B, H, Q, K]`` softmax weights as the values see them: SDPA's rule for a query that may attend to
    nothing (a padding position before a left-padded title) is zero weights, not the uniform average the
    finite bias leaves; then attention dropout."""
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        weights = weights.masked_fill(~attention_mask.any(dim=-1, keepdim=True), 0.0)
    if dropout > 0.0:
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return weights


def _one_query(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per row (the pooled layer's) as broadcast products and sums: as batched GEMMs
    its backward has an inner size of 1, where MKL's batched GEMM costs about fifteen times as much."""
    scores = (query * scale * key).sum(dim=-1).unsqueeze(2)  # [B, H, 1, K]
    if attention_mask is not None:
        scores = scores + additive_mask(attention_mask, query.dtype)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    attended = value_weights(module, weights, attention_mask, dropout)
    output = (attended.transpose(2, 3) * value).sum(dim=2, keepdim=True)  # [B, H, 1, D]
    return output.transpose(1, 2), attended


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,  # whatever else transformers passes, handed on to its SDPA
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF attention interface: ``[B, H, L, D]`` queries, keys and values → ``[B, L, H, D]`` output, weights."""
    if query.device.type != "cpu":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, length, width = query.shape
    scale = width**-0.5 if scaling is None else scaling
    if length == 1:
        return _one_query(module, query, key, value, attention_mask, dropout, scale)
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    queries = query.reshape(batch * heads, length, width)
    keys_t = key.reshape(batch * heads, -1, width).transpose(1, 2)
    bias = _bias(attention_mask, causal, heads, length, keys_t.shape[2], query.dtype)
    if bias is None:
        scores = torch.baddbmm(query.new_zeros(()), queries, keys_t, beta=0.0, alpha=scale)
    else:
        scores = torch.baddbmm(bias, queries, keys_t, alpha=scale)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype).view(batch, heads, length, -1)
    attended = value_weights(module, weights, attention_mask, dropout)
    output = torch.bmm(attended.reshape(batch * heads, length, -1), value.reshape(batch * heads, -1, width))
    return output.view(batch, heads, length, width).transpose(1, 2), attended


AttentionInterface.register(ATTENTION, attention_forward)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


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
        if getattr(module.config, "hidden_act", None) != "quick_gelu":
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


def prepare_clip(clip: PreTrainedModel) -> None:
    """The engine's CLIP copy with the three rewrites: this module's attention, QuickGELU folded into SiLU,
    and its frozen layers through `frozen_linear` and `frozen_silu_mlp`."""
    fold_quick_gelu(clip)
    freeze_layers(clip)
    clip.set_attn_implementation(ATTENTION)
