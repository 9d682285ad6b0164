"""CUDA checks of both fusion architectures; skipped without a GPU (run them with benchmarks/gpu_check.sh).

Tolerances:
- fp32 CUDA vs CPU logits ≤ 1e-4 (TF32 is off, so the only difference is kernel order);
- bf16, every attention backend vs bf16 eager ≤ 3e-2 on logits of magnitude ~0.5, whose bf16 spacing is ~4e-3
  (measured on CPU in bf16: 4e-3 for sdpa, packed and flex alike; the margin is for the GPU kernels' other
  accumulation orders). The backends: sdpa (vision padded), packed variable-length (sdpa: torch's FlashAttention
  varlen kernel), flex attention (vision padded and packed), flash_attention_2 (padded and packed, transformers'
  varlen path) where flash-attn is installed;
- bf16 generation: each greedy token is the argmax of eager bf16 logits up to twice that (both sides round).

The backend checks use a tiny model with head size 16 (flex attention's CUDA kernels need at least 16).
"""

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_flash_attn_2_available

from conftest import (
    IMAGE_TOKEN_ID,
    image_attention_mask_for,
    image_prompt,
    marker_prompt,
    tiny_autoregressive_model,
    tiny_connector_config,
    tiny_cross_attention_model,
    tiny_text_config,
    tiny_vision_config,
)
from vlmforge.modeling import packed_sequences
from vlmforge.training.policies import apply_training_policy

pytestmark = pytest.mark.gpu

BF16_ATOL = 3e-2
FLASH = pytest.mark.skipif(not is_flash_attn_2_available(), reason="flash-attn is not installed")


def _pixels(device: str) -> dict:
    """Two images, the second 42 × 42 padded to 56 × 42."""
    torch.manual_seed(1)
    pixel_values = torch.randn(1, 2, 3, 56, 42, device=device)
    pixel_attention_mask = torch.ones(1, 2, 56, 42, dtype=torch.bool, device=device)
    pixel_attention_mask[0, 1, 42:] = False
    pixel_values[0, 1, :, 42:] = 0
    return dict(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask)


def _autoregressive(**overrides):
    model = tiny_autoregressive_model(**overrides)
    ids = torch.tensor([image_prompt(2, model.config.image_seq_len)])
    return model, dict(input_ids=ids, **_pixels("cpu"))


def _cross_attention(**overrides):
    model = tiny_cross_attention_model(gate_init=0.5, **overrides)
    ids = torch.tensor([marker_prompt(2)])
    return model, dict(input_ids=ids, image_attention_mask=image_attention_mask_for(ids), **_pixels("cpu"))


FUSIONS = {"autoregressive": _autoregressive, "cross_attention": _cross_attention}

HEAD_DIM_16 = dict(  # every attention of the tiny model with 16-wide heads
    vision_config=tiny_vision_config(hidden_size=64, intermediate_size=128),
    connector_config=tiny_connector_config(head_dim=16),
    text_config=tiny_text_config(hidden_size=64, intermediate_size=128),
)


def _to(inputs: dict, device: str, dtype: torch.dtype | None = None) -> dict:
    moved = {k: v.to(device) for k, v in inputs.items()}
    if dtype is not None:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 off for matmuls and for cuDNN convolutions (the patch embedding), whose TF32 default is on: TF32 there
    alone moves the autoregressive logits by ~1.6e-4 (measured on CPU with inputs rounded to TF32), past 1e-4."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


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
def test_cuda_generate_matches_cpu(fusion):
    model, inputs = FUSIONS[fusion]()
    cpu_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    cuda_tokens = model.to("cuda").generate(**_to(inputs, "cuda"), max_new_tokens=8, do_sample=False)
    assert torch.equal(cuda_tokens.cpu(), cpu_tokens)


# --- every attention backend in bf16 ----------------------------------------------------------------------------


def _bf16_logits(model, inputs: dict, *, packed: bool) -> torch.Tensor:
    """Logits with the images encoded packed or padded (through the precomputed-image entry points)."""
    pixels = inputs["pixel_values"], inputs["pixel_attention_mask"]
    with torch.no_grad():
        if "image_attention_mask" in inputs:
            images = model.get_image_key_values(*pixels, packed=packed)
            text = {key: inputs[key] for key in ("input_ids", "image_attention_mask")}
            logits = model(**text, image_key_values=images).logits
        else:
            features = model.get_image_features(*pixels, packed=packed)
            logits = model(input_ids=inputs["input_ids"], **features).logits
    return logits.float()


BACKENDS = {  # name: (attn_implementation for every part, packed vision encoding)
    "sdpa": ("sdpa", False),
    "packed_varlen": ("sdpa", True),
    "flex": ("flex_attention", False),
    "flex_packed": ("flex_attention", True),
    "flash_attention_2": pytest.param(("flash_attention_2", False), marks=FLASH),
    "flash_attention_2_packed": pytest.param(("flash_attention_2", True), marks=FLASH),
}


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@pytest.mark.parametrize("fusion", FUSIONS)
def test_cuda_bf16_backend_matches_eager(fusion, backend):
    attn_implementation, packed = backend
    model, inputs = FUSIONS[fusion](**HEAD_DIM_16)
    model = model.to("cuda", torch.bfloat16)
    inputs = _to(inputs, "cuda", torch.bfloat16)
    model.set_attn_implementation("eager")
    eager = _bf16_logits(model, inputs, packed=False)
    model.set_attn_implementation(attn_implementation)
    logits = _bf16_logits(model, inputs, packed=packed)
    assert eager.abs().max() > 0.1
    torch.testing.assert_close(logits, eager, atol=BF16_ATOL, rtol=0)


def test_packed_sdpa_runs_the_varlen_kernel_on_cuda():
    """What `packed_varlen` above exercises: torch's FlashAttention varlen kernel, not the per-image loop."""
    if packed_sequences.varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    query = torch.zeros(1, 4, 10, 16, device="cuda", dtype=torch.bfloat16)
    sequences = packed_sequences.PackedSequences.from_mask(torch.ones(2, 5, dtype=torch.bool, device="cuda"))
    assert sequences.kernel("sdpa", query, dropout=0.0) == "varlen_attn"
    assert sequences.kernel("sdpa", query.float(), dropout=0.0) == "per_sequence"
    assert sequences.kernel("eager", query, dropout=0.0) == "per_sequence"

    # and the kernel computes what each image's own attention computes: three sequences of different lengths, a
    # non-default scale; both sides are bf16 outputs of fp32-accumulating kernels, so they differ by bf16 rounding
    torch.manual_seed(0)
    mask = torch.zeros(3, 12, dtype=torch.bool, device="cuda")
    mask[0, :12], mask[1, :5], mask[2, :9] = True, True, True
    sequences = packed_sequences.PackedSequences.from_mask(mask)
    # (1, H, T, Dh) views of (1, T, H, Dh) tensors, as the attention layers make them
    query, key, value = torch.randn(3, 1, 26, 4, 16, device="cuda", dtype=torch.bfloat16).transpose(2, 3).unbind(0)
    sdpa, module = ALL_ATTENTION_FUNCTIONS["sdpa"], torch.nn.Module()
    packed = sequences.attend(module, sdpa, "sdpa", query, key, value, scaling=0.3, dropout=0.0)
    per_image = sequences.attend(module, sdpa, "eager", query, key, value, scaling=0.3, dropout=0.0)
    assert packed.shape == per_image.shape == (1, 26, 4, 16)
    torch.testing.assert_close(packed.float(), per_image.float(), atol=2e-2, rtol=0)


# --- generation with CUDA kernels ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attn_implementation", ["sdpa", pytest.param("flash_attention_2", marks=FLASH)], ids=["sdpa", "flash"]
)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_cuda_bf16_generate(fusion, attn_implementation):
    """Greedy generation with the KV cache: every new token is the argmax of eager bf16 logits on the same prefix
    (up to bf16 rounding on both sides: a token within 2 × BF16_ATOL of the best counts as a tie)."""
    model, inputs = FUSIONS[fusion](**HEAD_DIM_16)
    model = model.to("cuda", torch.bfloat16)
    inputs = _to(inputs, "cuda", torch.bfloat16)
    model.set_attn_implementation(attn_implementation)
    tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert tokens.shape == (1, prompt_length + 8)

    model.set_attn_implementation("eager")
    full = dict(inputs, input_ids=tokens)
    if "image_attention_mask" in inputs:  # generated tokens see what the last prompt token saw
        mask = inputs["image_attention_mask"]
        full["image_attention_mask"] = torch.cat([mask, mask[:, -1:].expand(-1, 8, -1)], dim=1)
    with torch.no_grad():
        logits = model(**full).logits[0, prompt_length - 1 : -1].float()  # (8, vocab): the logits of each choice
    chosen = logits.gather(1, tokens[0, prompt_length:, None])[:, 0]
    assert (chosen >= logits.max(dim=1).values - 2 * BF16_ATOL).all()


# --- LoRA training in bf16 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attn_implementation", ["sdpa", pytest.param("flash_attention_2", marks=FLASH)], ids=["sdpa", "flash"]
)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_cuda_bf16_lora_training_step(fusion, attn_implementation):
    """One LoRA step on both backbones (the training recipe's policy), images packed: finite loss, every adapter's
    B matrix gets a non-zero gradient (A's are zero at the first step: B starts at zero)."""
    model, inputs = FUSIONS[fusion](**HEAD_DIM_16)
    model = model.to("cuda", torch.bfloat16)
    model.set_attn_implementation(attn_implementation)
    model = apply_training_policy(
        model, vision="lora", text="lora", lora_dropout=0.0, new_token_ids=[IMAGE_TOKEN_ID], verbose=False
    )
    model.train()
    inputs = _to(inputs, "cuda", torch.bfloat16)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)

    loss = model(**inputs, labels=labels).loss
    loss.backward()

    assert torch.isfinite(loss)
    lora_b = {name: p.grad for name, p in model.named_parameters() if "lora_B" in name}
    assert any("vision_model" in name for name in lora_b) and any("text_model" in name for name in lora_b)
    for name, grad in lora_b.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
