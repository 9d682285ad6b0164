"""CUDA checks of both fusion architectures; skipped without a GPU (run them with benchmarks/gpu_check.sh).

Tolerances: fp32 CUDA vs CPU logits ≤ 1e-4 (TF32 is off, so the only difference is kernel order);
bf16 sdpa vs bf16 eager ≤ 3e-2 (bf16 keeps 8 bits of mantissa; the logits here are O(1)).
"""

import pytest
import torch

from conftest import (
    image_attention_mask_for,
    image_prompt,
    marker_prompt,
    tiny_autoregressive_model,
    tiny_cross_attention_model,
)

pytestmark = pytest.mark.gpu


def _pixels(device: str) -> dict:
    """Two images, the second 42 × 42 padded to 56 × 42."""
    torch.manual_seed(1)
    pixel_values = torch.randn(1, 2, 3, 56, 42, device=device)
    pixel_attention_mask = torch.ones(1, 2, 56, 42, dtype=torch.bool, device=device)
    pixel_attention_mask[0, 1, 42:] = False
    pixel_values[0, 1, :, 42:] = 0
    return dict(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask)


def _autoregressive():
    model = tiny_autoregressive_model()
    ids = torch.tensor([image_prompt(2, model.config.image_seq_len)])
    return model, dict(input_ids=ids, **_pixels("cpu"))


def _cross_attention():
    model = tiny_cross_attention_model(gate_init=0.5)
    ids = torch.tensor([marker_prompt(2)])
    return model, dict(input_ids=ids, image_attention_mask=image_attention_mask_for(ids), **_pixels("cpu"))


FUSIONS = {"autoregressive": _autoregressive, "cross_attention": _cross_attention}


def _to(inputs: dict, device: str, dtype: torch.dtype | None = None) -> dict:
    moved = {k: v.to(device) for k, v in inputs.items()}
    if dtype is not None:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


@pytest.fixture(autouse=True)
def _no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_cuda_fp32_matches_cpu(fusion, attn_implementation):
    model, inputs = FUSIONS[fusion]()
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        cpu_logits = model(**inputs).logits
        cuda_logits = model.to("cuda")(**_to(inputs, "cuda")).logits.cpu()
    torch.testing.assert_close(cuda_logits, cpu_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_cuda_bf16_sdpa_matches_eager(fusion):
    model, inputs = FUSIONS[fusion]()
    model = model.to("cuda", torch.bfloat16)
    inputs = _to(inputs, "cuda", torch.bfloat16)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(**inputs).logits.float()
        model.set_attn_implementation("sdpa")
        sdpa = model(**inputs).logits.float()
    torch.testing.assert_close(sdpa, eager, atol=3e-2, rtol=0)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_cuda_generate_matches_cpu(fusion):
    model, inputs = FUSIONS[fusion]()
    cpu_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    cuda_tokens = model.to("cuda").generate(**_to(inputs, "cuda"), max_new_tokens=8, do_sample=False)
    assert torch.equal(cuda_tokens.cpu(), cpu_tokens)
