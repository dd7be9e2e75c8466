"""The engine's CLIP: Hugging Face's ``CLIPModel`` in plain torch, read from HF checkpoint directories.

`ClipModel` has HF's module tree and parameter names (``text_model.encoder.layers.0.self_attn.q_proj``,
``visual_projection``, …), so an HF CLIP directory loads as it is (`load_clip_model`: ``config.json`` and
``model.safetensors``, sharded safetensors or ``pytorch_model.bin``), and adapters exported by module name
load into HF's ``CLIPModel`` with peft. Its outputs equal HF's (``tests/engine/clip/test_model.py`` runs
both on the same weights). Transformers is not imported: its import takes seconds, and training needs
none of it.

**Attention** (`attend`): on the CPU, scores are one ``baddbmm`` that applies the scale and the causal or
padding bias in the GEMM, then a softmax and a ``bmm``. SDPA's CPU math backend scales queries and keys
apart, adds the mask, and runs a "safe" softmax that scans the scores for fully masked rows three more
times (``isneginf``, ``all``, ``where``); at CLIP's short sequences those passes over the scores cost more
than the GEMMs. One query per row (the pooled layer's) is broadcast products and sums instead. On other
devices it is torch's SDPA, unless the weights are asked for.
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from perpeft.engine.errors import InputError

LEGACY_EOS_TOKEN_ID = 2
QUICK_GELU_SLOPE = 1.702
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class QuickGELU(nn.Module):
    """CLIP's activation ``x·σ(1.702x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SLOPE * x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "quick_gelu": QuickGELU,
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


def _require_int(owner: object, name: str, least: int) -> None:
    value = getattr(owner, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _check_tower(tower: "TextConfig | VisionConfig") -> None:
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        _require_int(tower, name, 1)
    if tower.hidden_size % tower.num_attention_heads:
        raise ValueError(f"hidden_size {tower.hidden_size} is not a multiple of num_attention_heads")
    if tower.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {tower.hidden_act!r}: supported are {', '.join(ACTIVATIONS)}")
    eps, dropout = tower.layer_norm_eps, tower.attention_dropout
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"layer_norm_eps must be a positive number, got {eps!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"attention_dropout must be in [0, 1), got {dropout!r}")


@dataclass(frozen=True)
class TextConfig:
    """The text tower (HF's ``CLIPTextConfig`` fields and defaults: ViT-B/32's)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        _check_tower(self)
        _require_int(self, "vocab_size", 1)
        _require_int(self, "max_position_embeddings", 1)
        _require_int(self, "eos_token_id", 0)


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower (HF's ``CLIPVisionConfig`` fields and defaults: ViT-B/32's); square images."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_tower(self)
        for name in ("num_channels", "image_size", "patch_size"):
            _require_int(self, name, 1)
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} exceeds image_size {self.image_size}")

    @property
    def positions(self) -> int:
        """Patches and the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class ClipConfig:
    """A CLIP (HF's ``CLIPConfig`` fields and defaults: ``openai/clip-vit-base-patch32``'s architecture)."""

    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    def __post_init__(self) -> None:
        _require_int(self, "projection_dim", 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClipConfig":
        """A config from HF's ``config.json`` layout: the towers' fields under ``text_config`` and
        ``vision_config`` (a legacy ``*_config_dict`` overrides them, as in HF); other keys are ignored."""

        def tower(name: str) -> dict[str, Any]:
            return {**(data.get(f"{name}_config") or {}), **(data.get(f"{name}_config_dict") or {})}

        def known(kind: type, values: Mapping[str, Any]) -> dict[str, Any]:
            return {f.name: values[f.name] for f in fields(kind) if f.name in values}

        top = {key: data[key] for key in ("projection_dim", "logit_scale_init_value") if key in data}
        return cls(
            TextConfig(**known(TextConfig, tower("text"))), VisionConfig(**known(VisionConfig, tower("vision"))), **top
        )

    def to_dict(self) -> dict[str, Any]:
        """The config in HF's ``config.json`` layout (`from_dict` reads it back)."""
        return {
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": asdict(self.text_config),
            "vision_config": asdict(self.vision_config),
        }


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask as the score bias it stands for: a bool one (True: may attend) becomes 0 / the dtype's minimum."""
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
        return zero.masked_fill(~attention_mask, torch.finfo(dtype).min)
    return attention_mask.to(dtype)


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


def _bias(
    attention_mask: torch.Tensor | None, causal: bool, heads: int, queries: int, keys: int, like: torch.Tensor
) -> torch.Tensor | None:
    """The additive score bias ``baddbmm`` broadcasts over ``[B·H, Q, K]``, or None without a mask."""
    if attention_mask is not None:
        batch = attention_mask.shape[0]
        bias = additive_mask(attention_mask, like.dtype)
        return bias.expand(batch, heads, queries, keys).reshape(batch * heads, queries, keys)
    if causal and queries > 1:
        return like.new_full((queries, keys), float("-inf")).triu_(1)
    return None


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


def sdpa(
    attention: "ClipAttention",
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor:
    """`attend`'s output through torch's SDPA (its path off the CPU): ``[B, L, H, D]``."""
    dropout = attention.dropout if attention.training else 0.0
    causal = is_causal and mask is None and query.shape[2] > 1
    output = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=attention.scale, is_causal=causal
    )
    return output.transpose(1, 2)


def attend(
    attention: "ClipAttention",
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, H, L, D]`` queries, keys and values → ``[B, L, H, D]`` output and the ``[B, H, L, K]`` weights
    (None from SDPA). A bool ``mask`` (True: may attend) broadcasts to the scores; ``is_causal`` applies
    causality when there is no mask (a mask already holds it)."""
    if query.device.type != "cpu" and not weights:
        return sdpa(attention, query, key, value, mask, is_causal), None
    dropout = attention.dropout if attention.training else 0.0
    batch, heads, length, width = query.shape
    if length == 1:
        return _one_query(attention, query, key, value, mask, dropout, attention.scale)
    queries = query.reshape(batch * heads, length, width)
    keys_t = key.reshape(batch * heads, -1, width).transpose(1, 2)
    bias = _bias(mask, is_causal, heads, length, keys_t.shape[2], query)
    if bias is None:
        scores = torch.baddbmm(query.new_zeros(()), queries, keys_t, beta=0.0, alpha=attention.scale)
    else:
        scores = torch.baddbmm(bias, queries, keys_t, alpha=attention.scale)
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype).view(batch, heads, length, -1)
    attended = value_weights(attention, probabilities, mask, dropout)
    output = torch.bmm(attended.reshape(batch * heads, length, -1), value.reshape(batch * heads, -1, width))
    return output.view(batch, heads, length, width).transpose(1, 2), attended


def text_attention_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The text tower's bool mask ``[B, 1, L, L]`` (True: may attend): causal, and the padding of
    ``attention_mask``. None when no position is padded (outside torch.compile, which keeps the mask): the
    attention then applies causality itself."""
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    if not torch.compiler.is_compiling() and bool(keep.all()):
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()
    return causal & keep[:, None, None, :]


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The token CLIP pools for its text embedding (HF's rule): the first ``eos_token_id``, or the largest id
    for configs with the legacy ``eos_token_id == 2`` (``openai/clip-vit-base-patch32``)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return input_ids.to(torch.int).argmax(dim=-1)
    return (input_ids == eos_token_id).int().argmax(dim=-1)


def split_heads(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H·D]`` rows as ``[B, H, L, D]`` heads (a view)."""
    return rows.view(rows.shape[0], rows.shape[1], heads, -1).transpose(1, 2)


class ClipAttention(nn.Module):
    """Multi-head self-attention with HF's projections ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``."""

    def __init__(self, config: TextConfig | VisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = float(config.attention_dropout)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        projections = (self.q_proj, self.k_proj, self.v_proj)
        queries, keys, values = (split_heads(p(hidden), self.num_heads) for p in projections)
        attended, probabilities = attend(self, queries, keys, values, mask, is_causal, weights)
        return self.out_proj(attended.reshape(hidden.shape)), probabilities


class ClipMLP(nn.Module):
    """``fc2(activation_fn(fc1(x)))``."""

    def __init__(self, config: TextConfig | VisionConfig) -> None:
        super().__init__()
        self.activation_fn = ACTIVATIONS[config.hidden_act]()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    """A pre-norm transformer layer: ``x + attn(layer_norm1(x))``, then ``+ mlp(layer_norm2(·))``."""

    def __init__(self, config: TextConfig | VisionConfig) -> None:
        super().__init__()
        self.self_attn = ClipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return self.attended(hidden, mask, is_causal)[0]

    def attended(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output and its attention weights (when ``weights``; None otherwise)."""
        attended, probabilities = self.self_attn(self.layer_norm1(hidden), mask, is_causal, weights)
        hidden = hidden + attended
        return hidden + self.mlp(self.layer_norm2(hidden)), probabilities


class ClipEncoder(nn.Module):
    """A tower's layers (``layers``)."""

    def __init__(self, config: TextConfig | VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(config.num_hidden_layers))


@dataclass
class TowerOutput:
    """A tower's outputs, named as HF's: ``hidden_states`` are the input of the first layer and every
    layer's output (when asked for), ``attentions`` every layer's weights ``[B, H, L, L]`` (when asked for)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _run_layers(
    encoder: ClipEncoder, hidden: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, states: bool, weights: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
    seen, attentions = [hidden], []
    for layer in encoder.layers:
        hidden, probabilities = cast(ClipEncoderLayer, layer).attended(hidden, mask, is_causal, weights)
        seen.append(hidden)
        if probabilities is not None:
            attentions.append(probabilities)
    return hidden, tuple(seen) if states else None, tuple(attentions) if weights else None


def _embedding(count: int, width: int) -> nn.Embedding:
    """An ``nn.Embedding`` initialised as HF's CLIP (normal, std 0.02); on the meta device (`clip_from_state`)
    left uninitialised, since torch's random initialisation there imports ``torch._dynamo`` (about a second)."""
    weight = torch.empty(count, width)
    if not weight.is_meta:
        weight.normal_(0.0, 0.02)
    return nn.Embedding(count, width, _weight=weight)


class ClipTextEmbeddings(nn.Module):
    """Token and learned position embeddings."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = _embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"{length} tokens exceed max_position_embeddings {self.position_embedding.num_embeddings}")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class ClipTextTower(nn.Module):
    """HF's ``CLIPTextTransformer``: embeddings, causal layers, ``final_layer_norm``; pooled at the EOS."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ClipTextEmbeddings(config)
        self.encoder = ClipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> TowerOutput:
        mask = text_attention_mask(attention_mask, input_ids.shape[1])
        hidden = self.embeddings(input_ids)
        hidden, states, weights = _run_layers(self.encoder, hidden, mask, True, output_hidden_states, output_attentions)
        last = self.final_layer_norm(hidden)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return TowerOutput(last, last[rows, eos_positions(input_ids, self.config.eos_token_id)], states, weights)


class ClipVisionEmbeddings(nn.Module):
    """Patch embeddings (a strided convolution), a class token, and learned position embeddings."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = _embedding(config.positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(f"{height}×{width} pixels: the model takes {self.image_size}×{self.image_size}")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        rows = torch.cat([self.class_embedding.expand(batch, 1, -1), patches], dim=1)
        return rows + self.position_embedding.weight


class ClipVisionTower(nn.Module):
    """HF's ``CLIPVisionTransformer``: embeddings, ``pre_layrnorm``, layers; pooled at the class token
    through ``post_layernorm``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ClipVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = ClipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> TowerOutput:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        hidden, states, weights = _run_layers(
            self.encoder, hidden, None, False, output_hidden_states, output_attentions
        )
        return TowerOutput(hidden, self.post_layernorm(hidden[:, 0]), states, weights)


class ClipModel(nn.Module):
    """Both towers and their projections (``text_projection``, ``visual_projection``) and ``logit_scale``.
    ``source`` is the checkpoint directory it was loaded from (None when built in memory). Built with random
    weights (torch's initialisation; embeddings as HF's): trained ones come from a checkpoint
    (`load_clip_model`, `clip_from_state`)."""

    def __init__(self, config: ClipConfig, source: Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.source = source
        text, vision = config.text_config, config.vision_config
        self.text_model = ClipTextTower(text)
        self.vision_model = ClipVisionTower(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))


def read_clip_config(directory: Path) -> ClipConfig:
    """The `ClipConfig` of an HF CLIP directory's ``config.json``; InputError naming the file otherwise."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{directory}: not a CLIP checkpoint directory (no config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a JSON {type(data).__name__}, not an object")
    if data.get("model_type", "clip") != "clip":
        raise InputError(f"{path}: model_type {data['model_type']!r}, not a CLIP ('clip')")
    try:
        return ClipConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise InputError(f"{path}: {error}") from None


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's weight files (the first of ``WEIGHT_FILES`` present)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index, pickled = (directory / name for name in WEIGHT_FILES)
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [directory / name for name in sorted(set(weight_map.values()))]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise InputError(f"{index}: not a safetensors index ({type(error).__name__}: {error})") from None
    elif pickled.is_file():
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as error:
            raise InputError(f"{pickled}: cannot read the weights ({type(error).__name__}: {error})") from None
        if not isinstance(state, dict):
            raise InputError(f"{pickled}: a {type(state).__name__}, not a state dict")
        return state
    else:
        raise InputError(f"{directory}: no CLIP weights ({', '.join(WEIGHT_FILES)})")
    state = {}
    for path in files:
        try:
            state.update(load_file(path))
        except (OSError, SafetensorError) as error:
            raise InputError(f"{path}: cannot read the weights ({type(error).__name__}: {error})") from None
    return state


def load_clip_model(directory: Path) -> ClipModel:
    """The CLIP of an HF checkpoint directory (`clip_from_state` of its config and weights)."""
    return clip_from_state(read_clip_config(directory), _read_weights(directory), directory)


def clip_from_state(config: ClipConfig, state: Mapping[str, torch.Tensor], source: Path | None = None) -> ClipModel:
    """A `ClipModel` holding ``state``'s tensors (HF ``CLIPModel`` names; a transformers model's
    ``state_dict()`` serves) in float32: float32 tensors are taken as they are, not copied. Every weight must be there with its shape; HF's ``position_ids`` buffers are
    ignored, any other tensor is refused (InputError naming ``source``, else "the weights")."""
    where = str(source) if source is not None else "the weights"
    weights = {name: tensor for name, tensor in state.items() if not name.endswith("position_ids")}
    with torch.device("meta"):
        model = ClipModel(config, source)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        name, what = (missing[0], "lack") if missing else (unexpected[0], "have an unexpected")
        others = len(missing or unexpected) - 1
        raise InputError(f"{where}: the weights {what} {name}{f' (and {others} more)' if others else ''}")
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise InputError(f"{where}: weight {name} is not a float tensor")
        if tensor.shape != expected[name].shape:
            shapes = f"{tuple(tensor.shape)}, the config says {tuple(expected[name].shape)}"
            raise InputError(f"{where}: weight {name} has shape {shapes}")
    model.load_state_dict({name: tensor.float() for name, tensor in weights.items()}, assign=True)
    return model
