"""Parity with transformers' Idefics2: a tiny random Idefics2ForConditionalGeneration, converted with the
production converter (`convert_config` + `convert_state_dict`, strict load), gives the same logits and the
same greedy tokens as our AutoregressiveVLMForConditionalGeneration on the same processor outputs.

Inputs come from transformers' own Idefics2Processor (PIL backend) on real photographs, so padding, pixel
masks, partial patches, several patch-grid shapes, splitting and left padding are Idefics2's own.

Measured (CPU, fp32, eager, torch 2.13, transformers 5.24): logits max abs diff 0.0 — bit-identical — in
every case (llama and mistral × one image, batch of 1 + 2 images with left padding, text only, image
splitting), with logits of magnitude ~3.5; the asserted bound is 1e-4. Greedy tokens identical everywhere.

Also here: our `patch_position_ids` equals Idefics2VisionEmbeddings' position ids for every h × w grid on
the 70 × 70 table (Idefics2-8B's), and exact rational bucketing would differ (50 × 55), which is why the
model does the arithmetic in float32.
"""

from fractions import Fraction
from pathlib import Path

import pytest
import torch
import vlmforge
from PIL import Image
from torch import nn
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessorPil,
    Idefics2Processor,
    Idefics2VisionConfig,
)
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings

from conftest import IMAGE_TOKEN_ID, VOCAB_SIZE, tiny_connector_config, tiny_idefics2_config, tiny_vision_config
from vlmforge import AutoregressiveVLMForConditionalGeneration
from vlmforge.conversion.idefics2 import convert_config, convert_state_dict
from vlmforge.modeling.modeling_vision_encoder import patch_position_ids
from vlmforge.toy_tokenizer import build_toy_tokenizer

N_LATENTS = tiny_connector_config()["n_latents"]
PATCH = tiny_vision_config()["patch_size"]
LOGITS_ATOL = 1e-4
PHOTO = Path(vlmforge.__file__).parent / "assets" / "grace_hopper.jpg"


def _randomise(model: nn.Module, seed: int) -> None:
    """Weights of unit-scale activations: default init (std 0.02, latents all ones) makes every output
    near-zero and every latent identical, and a parity test on such a model would prove little."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)  # norms, biases
            else:
                param.copy_(noise * param[0].numel() ** -0.5)


def build_pair(text_model_type: str, seed: int = 0):
    """A random Idefics2 model and ours converted from it by the production converter, both eager, eval."""
    config = tiny_idefics2_config(text_model_type)
    reference = Idefics2ForConditionalGeneration(config).eval()
    _randomise(reference, seed)
    ours = AutoregressiveVLMForConditionalGeneration(convert_config(config)).eval()
    converted = convert_state_dict(reference.state_dict(), expected_keys=ours.state_dict().keys())
    ours.load_state_dict(converted, strict=True)
    for model in (reference, ours):
        model.set_attn_implementation("eager")
    return reference, ours


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """The photograph (512 × 600, portrait) and crops/resizes of it with other sizes and aspect ratios."""
    photo = Image.open(PHOTO).convert("RGB")
    return {
        "portrait": photo,
        "square_crop": photo.crop((100, 80, 356, 336)),  # 256 × 256
        "wide": photo.crop((0, 200, 512, 420)).resize((300, 120)),  # 300 × 120
    }


def make_processor(*, do_image_splitting: bool = False) -> Idefics2Processor:
    """transformers' Idefics2 processor on the PIL backend; images resized to at most 112 px per side."""
    tokenizer = build_toy_tokenizer(VOCAB_SIZE)
    tokenizer.padding_side = "left"
    image_processor = Idefics2ImageProcessorPil(
        size={"shortest_edge": 28, "longest_edge": 112}, do_image_splitting=do_image_splitting
    )
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=N_LATENTS)
    assert processor.image_token_id == IMAGE_TOKEN_ID
    return processor


def _cases(photos):
    return {
        "one_image": dict(text=["User: what do you see?<image>"], images=[[photos["portrait"]]]),
        "batch_left_padded": dict(
            text=["<image>describe the picture.", "what colour is the background?<image>and<image>"],
            images=[[photos["square_crop"]], [photos["wide"], photos["portrait"]]],
        ),
        "text_only": dict(text=["how many people are there?", "read the text."]),
        "image_splitting": dict(
            text=["<image>is it day or night?"], images=[[photos["wide"]]], do_image_splitting=True
        ),
    }


def max_logits_diff(reference, ours, inputs) -> float:
    """Max |Δlogits| over the real (non-padding) positions, one forward pass each."""
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = ours(**inputs).logits
    real = inputs["attention_mask"].bool()
    return (expected[real] - actual[real]).abs().max().item()


def processed(photos, case: str):
    kwargs = dict(_cases(photos)[case])
    processor = make_processor(do_image_splitting=kwargs.pop("do_image_splitting", False))
    return processor(**kwargs, padding=True, return_tensors="pt")


@pytest.mark.parametrize("text_model_type", ["llama", "mistral"])
@pytest.mark.parametrize("case", ["one_image", "batch_left_padded", "text_only", "image_splitting"])
def test_logits_and_greedy_tokens_match_idefics2(photos, text_model_type, case):
    reference, ours = build_pair(text_model_type)
    inputs = processed(photos, case)
    if case == "batch_left_padded":
        assert inputs["pixel_values"].shape[:2] == (2, 2)  # sample 0 carries an all-zero padding image
        assert not inputs["attention_mask"][:, 0].all()  # left padding is really there
    if case == "image_splitting":
        assert inputs["pixel_values"].shape[1] == 5  # 4 crops + the whole image
        assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == 5 * N_LATENTS

    assert max_logits_diff(reference, ours, inputs) <= LOGITS_ATOL

    generate_kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(**inputs, **generate_kwargs)
        actual = ours.generate(**inputs, **generate_kwargs)
    assert expected.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(expected, actual)


def test_images_change_the_logits(photos):
    """Guards the parity test against a model whose images do not matter (e.g. identical latents)."""
    _, ours = build_pair("llama")
    processor = make_processor()
    prompt = ["User: what do you see?<image>"]
    with torch.no_grad():
        first = ours(**processor(text=prompt, images=[[photos["portrait"]]], return_tensors="pt")).logits[:, -1]
        second = ours(**processor(text=prompt, images=[[photos["square_crop"]]], return_tensors="pt")).logits[:, -1]
    assert (first - second).abs().max() > 1e-2


class _ZeroPatches(nn.Module):
    """Stands in for the patch convolution: position ids need only the grid shape, not the pixels."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        num_images, _, height, width = pixel_values.shape
        return pixel_values.new_zeros(1, 1, 1, 1).expand(num_images, 1, height // PATCH, width // PATCH)


def all_grid_masks(side: int) -> torch.Tensor:
    """(side², side, side) bool: one top-left h × w rectangle for every h, w in 1..side."""
    heights, widths = torch.meshgrid(torch.arange(1, side + 1), torch.arange(1, side + 1), indexing="ij")
    index = torch.arange(side)
    rows = index[None, :, None] < heights.flatten()[:, None, None]
    cols = index[None, None, :] < widths.flatten()[:, None, None]
    return rows & cols


def idefics2_position_ids(masks: torch.Tensor, side: int) -> torch.Tensor:
    """The ids Idefics2VisionEmbeddings feeds its position table, captured by a hook on that table."""
    embeddings = Idefics2VisionEmbeddings(
        Idefics2VisionConfig(hidden_size=1, num_attention_heads=1, image_size=side * PATCH, patch_size=PATCH)
    )
    embeddings.patch_embedding = _ZeroPatches()
    captured = []
    embeddings.position_embedding.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    # an expanded scalar: the right shape for the module's arithmetic, without side² full-size images in memory
    pixel_values = torch.zeros(1, 1, 1, 1).expand(len(masks), 3, side * PATCH, side * PATCH)
    with torch.no_grad():
        embeddings(pixel_values, masks)
    (position_ids,) = captured
    return position_ids


def test_patch_position_ids_equal_idefics2_on_every_grid_up_to_70():
    masks = all_grid_masks(70)  # 4900 grids
    expected = idefics2_position_ids(masks, 70)
    actual = patch_position_ids(masks, 70)
    assert actual.shape == expected.shape == (4900, 70 * 70)
    assert torch.equal(actual, expected)


def test_exact_rational_bucketing_would_differ_on_50_by_55():
    """Why `patch_position_ids` uses float32: bucket floor(i / h * side) in exact arithmetic disagrees with
    the float32 arithmetic Idefics2 checkpoints were trained with (506 of 2750 patches on 50 × 55)."""
    side, height, width = 70, 50, 55
    mask = torch.zeros(1, side, side, dtype=torch.bool)
    mask[0, :height, :width] = True
    exact = torch.zeros(side, side, dtype=torch.long)
    for i in range(height):
        for j in range(width):
            exact[i, j] = int(Fraction(i, height) * side) * side + int(Fraction(j, width) * side)
    float32_ids = patch_position_ids(mask, side)[0]
    assert torch.equal(float32_ids, idefics2_position_ids(mask, side)[0])
    assert (float32_ids != exact.flatten()).sum() > 0


@pytest.mark.parametrize("side", [4, 27, 64, 70])
def test_full_square_grid_uses_the_table_in_order(side):
    """On a full square the bucketing is the identity, i.e. SigLIP's own `arange` position ids."""
    ids = patch_position_ids(torch.ones(1, side, side, dtype=torch.bool), side)
    assert torch.equal(ids[0], torch.arange(side * side))
