"""SigLIP → VisionEncoder: a transformers `SiglipVisionModel` converts with `convert_siglip_state_dict`, loads
strictly, and gives the same `last_hidden_state` on full square images (max abs diff ≤ 1e-5; measured 0.0
on CPU in fp32 with eager attention, for both the tiny 56 px / 14 px geometry and SigLIP-so400m's 384 px / 14 px).
"""

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from vlmforge import VisionEncoder
from vlmforge.conversion.siglip import convert_siglip_state_dict, vision_config_from_siglip

ATOL = 1e-5


def tiny_siglip(image_size: int = 56, patch_size: int = 14, seed: int = 0) -> SiglipVisionModel:
    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    model = SiglipVisionModel(config).eval()
    model.set_attn_implementation("eager")
    return model


def converted_encoder(siglip: SiglipVisionModel, state_dict: dict | None = None) -> VisionEncoder:
    encoder = VisionEncoder(vision_config_from_siglip(siglip.config)).eval()
    encoder.set_attn_implementation("eager")
    converted = convert_siglip_state_dict(
        siglip.state_dict() if state_dict is None else state_dict, expected_keys=encoder.state_dict().keys()
    )
    encoder.load_state_dict(converted, strict=True)
    return encoder


# 384 px with 14 px patches is SigLIP-so400m's geometry: 27 × 27 patches, a 6 px remainder ignored
@pytest.mark.parametrize(("image_size", "patch_size"), [(56, 14), (384, 14)])
def test_siglip_vision_model_converts_and_matches(image_size, patch_size):
    siglip = tiny_siglip(image_size, patch_size)
    assert any(key.startswith("head.") for key in siglip.state_dict())  # the pooling head is there, to be dropped
    encoder = converted_encoder(siglip)
    assert encoder.config.num_patches_per_side == image_size // patch_size

    pixel_values = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = siglip(pixel_values).last_hidden_state
        actual = encoder(pixel_values).last_hidden_state
    assert actual.shape == expected.shape == (2, (image_size // patch_size) ** 2, 32)
    assert (actual - expected).abs().max().item() <= ATOL


def test_on_disk_prefixed_keys_convert_too():
    """Hub checkpoints store the vision tower under `vision_model.`; transformers 5 drops it in memory."""
    siglip = tiny_siglip()
    prefixed = {f"vision_model.{key}": value for key, value in siglip.state_dict().items()}
    encoder = converted_encoder(siglip, prefixed)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, siglip.state_dict()[key])


@pytest.mark.parametrize(
    "bad_key",
    [
        "vision_model.encoder.layers.0.self_attn.rotary.weight",  # a leaf the encoder layer does not have
        "text_model.embeddings.token_embedding.weight",  # a full SiglipModel's text tower
        "logit_scale",
    ],
)
def test_unknown_key_raises(bad_key):
    state_dict = dict(tiny_siglip().state_dict())
    state_dict[bad_key] = torch.zeros(1)
    with pytest.raises(ValueError, match="match no conversion rule"):
        convert_siglip_state_dict(state_dict)


def test_missing_key_raises():
    siglip = tiny_siglip()
    state_dict = dict(siglip.state_dict())
    del state_dict["encoder.layers.1.mlp.fc2.bias"]
    expected_keys = VisionEncoder(vision_config_from_siglip(siglip.config)).state_dict().keys()
    with pytest.raises(ValueError, match="missing key"):
        convert_siglip_state_dict(state_dict, expected_keys=expected_keys)


def test_vision_config_fields_carry_over():
    siglip_config = SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, image_size=384,
        patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
    )
    config = vision_config_from_siglip(siglip_config)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads) == (
        48, 96, 3, 6,
    )
    assert (config.image_size, config.patch_size, config.hidden_act, config.layer_norm_eps) == (384, 14, "gelu", 1e-5)
    assert config.num_patches_per_side == 27  # SigLIP-so400m's table: the 384 % 14 remainder is ignored
