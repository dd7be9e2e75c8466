"""CLIP's pooled tower outputs, with the last layer run only at the position the pooling reads.

A tower's pooled output is one position of its last layer: the EOS token of a title, the class token of
an image. That layer still needs every position's keys and values, but its queries, attention output,
``out_proj``, MLP and norms only at the pooled position: in a two-layer tower this is two fifths of the
layer GEMMs, forward and backward. Exact: the same arithmetic on fewer rows, so pooled outputs equal the
full tower's (``tests/engine/clip/test_layers.py``).
"""

import torch
from torch import nn
from transformers import CLIPTextConfig
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import (
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPTextModel,
    CLIPVisionModel,
    eager_attention_forward,
)

LEGACY_EOS_TOKEN_ID = 2


def text_eos_token_id(text_config: CLIPTextConfig) -> int:
    """The text tower's EOS token id (what `eos_positions` pools); an error for a config without one."""
    token = text_config.eos_token_id
    if not isinstance(token, int):
        raise ValueError(f"CLIP text config: eos_token_id {token!r}, expected one token id")
    return token


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The token CLIP pools for its text embedding (HF's rule): the first ``eos_token_id``, or the largest id
    for configs with the legacy ``eos_token_id == 2`` (``openai/clip-vit-base-patch32``)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return input_ids.to(torch.int).argmax(dim=-1)
    return (input_ids == eos_token_id).int().argmax(dim=-1)


def _layers(encoder: CLIPEncoder) -> tuple[list[nn.Module], CLIPEncoderLayer]:
    """A tower's layers before the last, and the last."""
    *layers, last = encoder.layers
    if not isinstance(last, CLIPEncoderLayer):
        raise TypeError(f"a CLIP tower whose last layer is a {type(last).__name__}, not a CLIPEncoderLayer")
    return layers, last


def _pooled_layer(
    layer: CLIPEncoderLayer, hidden: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """``layer(hidden)`` at one position per row (``[B, L, D]`` → ``[B, D]``); ``key_mask`` (bool
    ``[B, 1, 1, L]``) says which keys that position may attend to (None: all)."""
    attention = layer.self_attn
    batch, width = hidden.shape[0], hidden.shape[2]
    rows = torch.arange(batch, device=hidden.device)
    normed = layer.layer_norm1(hidden)
    heads = (batch, -1, attention.num_heads, attention.head_dim)
    queries = attention.q_proj(normed[rows, positions].unsqueeze(1)).view(heads).transpose(1, 2)
    keys = attention.k_proj(normed).view(heads).transpose(1, 2)
    values = attention.v_proj(normed).view(heads).transpose(1, 2)
    implementation = attention.config._attn_implementation
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    if key_mask is not None and implementation == "eager":  # HF's eager attention adds its mask to the scores
        key_mask = torch.zeros((), dtype=hidden.dtype).masked_fill(~key_mask, torch.finfo(hidden.dtype).min)
    attended, _ = interface(
        attention,
        queries,
        keys,
        values,
        key_mask,
        scaling=attention.scale,
        dropout=attention.dropout if attention.training else 0.0,
        is_causal=False,
    )
    pooled = hidden[rows, positions].unsqueeze(1) + attention.out_proj(attended.reshape(batch, 1, width))
    pooled = pooled + layer.mlp(layer.layer_norm2(pooled))
    return pooled[:, 0]


def pooled_text(
    text_model: CLIPTextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """``text_model(input_ids, attention_mask).pooler_output`` of a CLIPTextModel (EOS rows, final norm)."""
    hidden = text_model.embeddings(input_ids=input_ids)
    mask = create_causal_mask(config=text_model.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None)
    layers, last = _layers(text_model.encoder)
    for layer in layers:
        hidden = layer(hidden, mask, is_causal=True)
    positions = eos_positions(input_ids, text_eos_token_id(text_model.config))
    # The EOS query sees the keys up to its own position that the padding mask keeps.
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    keys = columns <= positions.unsqueeze(1)
    if attention_mask is not None:
        keys = keys & attention_mask.bool()
    pooled = _pooled_layer(last, hidden, positions, keys[:, None, None, :])
    return text_model.final_layer_norm(pooled)


def pooled_image(vision_model: CLIPVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """``vision_model(pixel_values).pooler_output`` of a CLIPVisionModel (class token, post-layernorm)."""
    hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))
    layers, last = _layers(vision_model.encoder)
    for layer in layers:
        hidden = layer(hidden, None)
    positions = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    return vision_model.post_layernorm(_pooled_layer(last, hidden, positions, None))
