"""Packed vision encoding: the real patches of all images in one (1, T, D) sequence with `cu_seqlens` give the same
numbers as the padded batch (N, max_h * max_w, D) — encoder outputs, visual tokens, logits of both fusions and
gradients — on batches of mixed image sizes, with image splitting on and off.

Tolerance: 1e-5 (fp32, CPU). Measured: ≤ 1e-6 everywhere (only the order of float sums differs: padding keys add
exact zeros, and the per-image attention sees shorter rows).
"""

from pathlib import Path

import pytest
import torch
from conftest import tiny_autoregressive_model, tiny_cross_attention_model, tiny_vision_config
from PIL import Image

import vlmforge
from vlmforge import VisionEncoder, VisionEncoderConfig, VLMImageProcessor, VLMProcessor
from vlmforge.modeling.modeling_vision_stack import encode_images
from vlmforge.toy_tokenizer import build_toy_tokenizer

ATOL = 1e-5
PHOTO = Path(vlmforge.__file__).parent / "assets" / "grace_hopper.jpg"
SIZE = {"shortest_edge": 28, "longest_edge": 112}  # sub-images of 2 to 8 patches a side
BACKENDS = ["eager", "sdpa"]


def mixed_size_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four images padded to 56 × 56: full, 42 × 28, 28 × 56 and 14 × 14 px (grids 4×4, 3×2, 2×4, 1×1)."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.zeros(4, 3, 56, 56)
    patch_mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    for i, (h, w) in enumerate([(4, 4), (3, 2), (2, 4), (1, 1)]):
        pixel_values[i, :, : 14 * h, : 14 * w] = torch.randn(3, 14 * h, 14 * w, generator=generator)
        patch_mask[i, :h, :w] = True
    return pixel_values, patch_mask


def tiny_encoder(attn_implementation: str) -> VisionEncoder:
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionEncoderConfig(**tiny_vision_config())).eval()
    encoder.set_attn_implementation(attn_implementation)
    return encoder


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """The photograph (512 × 600) and two crops of other aspect ratios: sub-images of several grid shapes."""
    photo = Image.open(PHOTO).convert("RGB")
    return [photo, photo.crop((0, 200, 512, 420)), photo.crop((100, 0, 300, 600))]


# --- the encoder ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", BACKENDS)
def test_packed_encoder_output_is_the_padded_one_on_real_patches(attn_implementation):
    encoder = tiny_encoder(attn_implementation)
    pixel_values, patch_mask = mixed_size_batch()
    with torch.no_grad():
        padded = encoder(pixel_values, patch_attention_mask=patch_mask)
        packed = encoder(pixel_values, patch_attention_mask=patch_mask, packed=True)

    assert padded.packed_sequences is None and padded.last_hidden_state.shape == (4, 16, 32)
    real = patch_mask.flatten(1)  # (N, P)
    assert packed.last_hidden_state.shape == (1, int(real.sum()), 32)
    assert packed.packed_sequences.cu_seqlens.tolist() == [0, 16, 22, 30, 31]
    torch.testing.assert_close(packed.last_hidden_state[0], padded.last_hidden_state[real], atol=ATOL, rtol=0)

    moved = packed.packed_sequences.to("meta")  # as device-map hooks move a layer's inputs
    assert moved.cu_seqlens.device.type == "meta" and moved.lengths == [16, 6, 8, 1]

    unpacked, mask = packed.packed_sequences.unpack(packed.last_hidden_state)  # (N, 16, D), (N, 16)
    assert torch.equal(mask.sum(dim=1), real.sum(dim=1))
    torch.testing.assert_close(unpacked[mask], padded.last_hidden_state[real], atol=ATOL, rtol=0)


def test_packed_gradients_are_the_padded_ones():
    pixel_values, patch_mask = mixed_size_batch()
    grads = []
    for packed in (False, True):
        encoder = tiny_encoder("sdpa").train()
        output = encoder(pixel_values, patch_attention_mask=patch_mask, packed=packed).last_hidden_state
        states = output[0] if packed else output[patch_mask.flatten(1)]  # (T, D), image by image
        (states * torch.linspace(-1, 1, states.numel()).view_as(states)).sum().backward()
        grads.append({name: param.grad for name, param in encoder.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=ATOL, rtol=0, msg=name)


def test_packing_is_chosen_where_it_pays_off():
    """Packed when some patches are padding (measured faster on CPU, see `packing_pays_off`); padded without
    padding, and always with eager, the reference the parity tests hold to identical numbers."""
    _, patch_mask = mixed_size_batch()
    sdpa, eager = tiny_encoder("sdpa"), tiny_encoder("eager")
    assert sdpa.packing_pays_off(patch_mask)
    assert not sdpa.packing_pays_off(torch.ones_like(patch_mask))
    assert not eager.packing_pays_off(patch_mask)


# --- both fusions, through the processor --------------------------------------------------------------------------


def processed(model, photos, split: bool) -> dict:
    """Two samples (2 and 1 photographs), left-padded, at the model's prompt layout; splitting `split`."""
    processor = VLMProcessor.from_model_config(model.config, VLMImageProcessor(size=SIZE), build_toy_tokenizer(100))
    processor.tokenizer.padding_side = "left"
    batch = processor(
        text=["<image>and<image>what differs?", "what is it?<image>"],
        images=[photos[:2], photos[2:]],
        do_image_splitting=split,
        padding=True,
        return_tensors="pt",
    )
    assert batch["pixel_values"].shape[1] == (10 if split else 2)
    return dict(batch)


def autoregressive_logits(model, inputs: dict, packed: bool) -> torch.Tensor:
    features = model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"], packed=packed)
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    return model(**text, **features).logits


def cross_attention_logits(model, inputs: dict, packed: bool) -> torch.Tensor:
    images = model.get_image_key_values(inputs["pixel_values"], inputs["pixel_attention_mask"], packed=packed)
    text = {k: inputs[k] for k in ("input_ids", "attention_mask", "image_attention_mask")}
    return model(**text, image_key_values=images).logits


FUSIONS = {
    "autoregressive": (tiny_autoregressive_model, autoregressive_logits),
    "cross_attention": (lambda **kw: tiny_cross_attention_model(gate_init=0.5, **kw), cross_attention_logits),
}


@pytest.mark.parametrize("split", [False, True], ids=["no_split", "split"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_packed_and_padded_give_the_same_logits(photos, fusion, split):
    build, logits_of = FUSIONS[fusion]
    model = build(vision_config=tiny_vision_config(image_size=112))
    inputs = processed(model, photos, split)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        padded = logits_of(model, inputs, packed=False)[real]
        packed = logits_of(model, inputs, packed=True)[real]
        default = model(**inputs).logits[real]  # sdpa on padded images: packed
    assert padded.abs().max() > 0.1  # logits of a working model, not zeros
    torch.testing.assert_close(packed, padded, atol=ATOL, rtol=0)
    torch.testing.assert_close(default, packed, atol=0, rtol=0)


def test_visual_tokens_agree_with_pooling_none(photos):
    """Without the perceiver, each image's tokens are its patches, in the same order in both layouts."""
    model = tiny_autoregressive_model(
        vision_config=tiny_vision_config(image_size=112), connector_config={"pooling": "none"}
    )
    inputs = processed(model, photos, split=True)
    vision, connector = model.model.vision_model, model.model.connector
    pixels = inputs["pixel_values"], inputs["pixel_attention_mask"]
    with torch.no_grad():
        padded, _ = encode_images(vision, connector, *pixels, packed=False)
        packed, _ = encode_images(vision, connector, *pixels, packed=True)
    assert [len(t) for t in packed] == [len(t) for t in padded]
    for packed_tokens, padded_tokens in zip(packed, padded):
        torch.testing.assert_close(packed_tokens, padded_tokens, atol=ATOL, rtol=0)
