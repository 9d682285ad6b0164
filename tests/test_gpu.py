"""CUDA checks of the autoregressive VLM; skipped without a GPU (run them with benchmarks/gpu_check.sh).

Tolerances: fp32 CUDA vs CPU logits ≤ 1e-4 (TF32 is off, so the only difference is kernel order);
bf16 sdpa vs bf16 eager ≤ 3e-2 (bf16 keeps 8 bits of mantissa; the logits here are O(1)).
"""

import pytest
import torch

from conftest import image_prompt, tiny_autoregressive_model

pytestmark = pytest.mark.gpu


def _inputs(image_seq_len: int, device: str):
    torch.manual_seed(1)
    ids = torch.tensor([image_prompt(2, image_seq_len)], device=device)
    pixel_values = torch.randn(1, 2, 3, 56, 42, device=device)
    pixel_attention_mask = torch.ones(1, 2, 56, 42, dtype=torch.bool, device=device)
    pixel_attention_mask[0, 1, 42:] = False  # second image is 42 × 42, padded
    pixel_values[0, 1, :, 42:] = 0
    return dict(input_ids=ids, pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask)


@pytest.fixture(autouse=True)
def _no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_cuda_fp32_matches_cpu(attn_implementation):
    model = tiny_autoregressive_model()
    model.set_attn_implementation(attn_implementation)
    inputs = _inputs(model.config.image_seq_len, "cpu")
    with torch.no_grad():
        cpu_logits = model(**inputs).logits
        cuda_model = model.to("cuda")
        cuda_logits = cuda_model(**{k: v.cuda() for k, v in inputs.items()}).logits.cpu()
    torch.testing.assert_close(cuda_logits, cpu_logits, atol=1e-4, rtol=0)


def test_cuda_bf16_sdpa_matches_eager():
    model = tiny_autoregressive_model().to("cuda", torch.bfloat16)
    inputs = _inputs(model.config.image_seq_len, "cuda")
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(**inputs).logits.float()
        model.set_attn_implementation("sdpa")
        sdpa = model(**inputs).logits.float()
    torch.testing.assert_close(sdpa, eager, atol=3e-2, rtol=0)


def test_cuda_generate_matches_cpu():
    model = tiny_autoregressive_model()
    inputs = _inputs(model.config.image_seq_len, "cpu")
    cpu_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    cuda_model = model.to("cuda")
    cuda_tokens = cuda_model.generate(**{k: v.cuda() for k, v in inputs.items()}, max_new_tokens=8, do_sample=False)
    assert torch.equal(cuda_tokens.cpu(), cpu_tokens)
