"""Each grouped adapter equals HF peft (the reference) for every group of a mixed-group batch."""

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model

from perpeft.engine.clip.preprocess import normalize_pixels
from perpeft.engine.config.run_config import LoraSettings
from perpeft.engine.model.encoders import GroupedClipEncoder
from perpeft.engine.model.groups import RowGroups
from perpeft.kernels import frozen

GROUPS = 3
ITEMS = 7


def _inputs(bundle):
    generator = torch.Generator().manual_seed(1)
    input_ids, attention_mask = bundle.tokenizer([f"golf travel bag {k} red" for k in range(ITEMS)])
    pixels = torch.randint(0, 256, (ITEMS, 3, 16, 16), generator=generator, dtype=torch.uint8)
    groups = RowGroups.per_row(torch.tensor([0, 2, 1, 2, 0, 1, 2]), GROUPS, torch.device("cpu"))
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask), pixels, groups


def _randomise(encoder: GroupedClipEncoder) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in encoder.adapter_state().values():
            parameter.copy_(
                torch.randn(parameter.shape, generator=generator) * 0.3 + (parameter.mean() if parameter.numel() else 0)
            )


def _peft_model(stock, peft: str, encoder: GroupedClipEncoder, group: int):
    """HF peft on the transformers CLIP ``stock``, with ``group``'s adapter weights of ``encoder``."""
    base = copy.deepcopy(stock)
    if peft == "lora":
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    else:
        config = IA3Config(target_modules=["k_proj", "v_proj", "fc1"], feedforward_modules=["fc1"])
    model = get_peft_model(base, config)
    ours = encoder.adapter_state()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".default" not in name:
                continue
            module_path = name.removeprefix("base_model.model.").split(".lora_")[0].split(".ia3_l")[0]
            if peft == "lora":
                kind = "lora_A" if ".lora_A." in name else "lora_B"
                parameter.copy_(ours[f"clip.{module_path}.{kind}"][group])
            else:
                parameter.copy_(ours[f"clip.{module_path}.ia3_l"][group].view(parameter.shape))
    return model.eval()


@pytest.mark.parametrize("frozen_layers", ["reference", "onednn"])
@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_grouped_adapter_matches_peft_per_group(small_bundle, small_hf_clip, peft, frozen_layers, monkeypatch):
    """Also with every frozen layer through oneDNN (`perpeft.kernels.frozen`, however few its rows): the
    adapters' gradients then pass through its written-out input gradients."""
    gemms = []
    if frozen_layers == "onednn":
        if not frozen._onednn_available():
            pytest.skip("torch has no oneDNN matmul on this machine")
        gemm = frozen._gemm
        monkeypatch.setattr(frozen, "_gemm", lambda *args: gemms.append(args[0].shape) or gemm(*args))
        monkeypatch.setattr(frozen, "ONEDNN_ROWS_AT_LEAST", 1)
    monkeypatch.delenv("PERPEFT_KERNELS", raising=False)
    bundle = small_bundle
    encoder = GroupedClipEncoder(copy.deepcopy(bundle), peft, GROUPS, lora=LoraSettings(rank=4, alpha=8.0, dropout=0.0))
    _randomise(encoder)
    encoder.eval()
    input_ids, attention_mask, pixels, groups = _inputs(bundle)
    weights = torch.randn(ITEMS, 2 * bundle.model.config.projection_dim, generator=torch.Generator().manual_seed(3))

    ours = encoder(input_ids, attention_mask, pixels, groups)
    (ours * weights).sum().backward()
    our_grads = {name: parameter.grad for name, parameter in encoder.adapter_state().items()}

    checked = 0
    for group in range(GROUPS):
        rows = groups.host == group
        reference_model = _peft_model(small_hf_clip, peft, encoder, group)
        output = reference_model(
            input_ids=input_ids[rows],
            attention_mask=attention_mask[rows],
            pixel_values=normalize_pixels(pixels[rows], encoder.image_mean, encoder.image_std),
        )
        reference = torch.cat([output.image_embeds, output.text_embeds], dim=-1)
        torch.testing.assert_close(ours[rows], reference, rtol=1e-5, atol=1e-5)
        (reference * weights[rows]).sum().backward()
        for name, parameter in reference_model.named_parameters():
            if ".default" not in name:
                continue
            module_path = name.removeprefix("base_model.model.").split(".lora_")[0].split(".ia3_l")[0]
            kind = ("lora_A" if ".lora_A." in name else "lora_B") if peft == "lora" else "ia3_l"
            mine = our_grads[f"clip.{module_path}.{kind}"][group]
            torch.testing.assert_close(mine, parameter.grad.view(mine.shape), rtol=1e-4, atol=1e-6)
            checked += 1
    expected_per_group = 2 * 2 * 2 * 2 if peft == "lora" else 2 * 2 * 3
    assert checked == GROUPS * expected_per_group
    assert bool(gemms) == (frozen_layers == "onednn")


def test_adapters_start_as_identity(small_bundle):
    """LoRA B = 0 and (IA)3 = 1 at init: the adapted CLIP equals the frozen one, as in peft."""
    input_ids, attention_mask, pixels, groups = _inputs(small_bundle)
    frozen = GroupedClipEncoder(copy.deepcopy(small_bundle), "none", GROUPS).eval()
    expected = frozen(input_ids, attention_mask, pixels, groups)
    for peft in ("lora", "ia3"):
        encoder = GroupedClipEncoder(copy.deepcopy(small_bundle), peft, GROUPS).eval()
        torch.testing.assert_close(encoder(input_ids, attention_mask, pixels, groups), expected)
