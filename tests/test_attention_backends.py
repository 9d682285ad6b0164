"""Attention backends of our own modules — vision encoder (padded and packed), perceiver connector, gated
cross-attention blocks — on CPU: eager, sdpa and flex attention agree within 1e-5 (fp32); a backend that cannot
run here falls back to sdpa with exactly one warning and gives sdpa's numbers; the effective backend of each part
is logged once; float16 keeps the vision encoder's residual stream in float32.

flex_attention runs on CPU in torch 2.13 (transformers compiles it with inductor: the first call of each shape
takes tens of seconds). The cross-attention blocks' per-token image mask gives flex nothing to skip, so they run
sdpa under flex (and flash) — a fallback tested below. Measured: max |Δ| ≤ 1e-6 between any two backends.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    image_attention_mask_for,
    marker_prompt,
    tiny_autoregressive_model,
    tiny_cross_attention_model,
    tiny_vision_config,
)
from transformers.utils import is_flash_attn_2_available, is_kernels_available
from transformers.utils import logging as transformers_logging

from vlmforge import VisionEncoder, VisionEncoderConfig
from vlmforge.modeling import attention_backends
from vlmforge.modeling.attention_backends import runnable_attention

ATOL = 1e-5
BACKENDS = ["eager", "sdpa", "flex_attention"]
LOGGER = attention_backends.__name__


@pytest.fixture
def fresh_once_logs():
    """transformers' `warning_once`/`info_once` remember messages for the whole process: forget them."""
    transformers_logging.warning_once.cache_clear()
    transformers_logging.info_once.cache_clear()
    yield
    transformers_logging.warning_once.cache_clear()
    transformers_logging.info_once.cache_clear()


def mixed_size_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Three images padded to 56 × 56 px: full, 3 × 2 and 2 × 4 patches."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.zeros(3, 3, 56, 56)
    patch_mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    for i, (h, w) in enumerate([(4, 4), (3, 2), (2, 4)]):
        pixel_values[i, :, : 14 * h, : 14 * w] = torch.randn(3, 14 * h, 14 * w, generator=generator)
        patch_mask[i, :h, :w] = True
    return pixel_values, patch_mask


# --- every backend agrees with eager, module by module ------------------------------------------------------------


def vision_encoder_output(attn_implementation: str, packed: bool) -> torch.Tensor:
    """(T, D): the real patches' states, image by image."""
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionEncoderConfig(**tiny_vision_config())).eval()
    encoder.set_attn_implementation(attn_implementation)
    pixel_values, patch_mask = mixed_size_images()
    with torch.no_grad():
        states = encoder(pixel_values, patch_attention_mask=patch_mask, packed=packed).last_hidden_state
    return states[0] if packed else states[patch_mask.flatten(1)]


def connector_output(attn_implementation: str) -> torch.Tensor:
    """(N, n_latents, D): the perceiver's tokens for context of 10 positions, the last 0, 3 and 6 padding."""
    connector = tiny_autoregressive_model().model.connector
    connector.set_attn_implementation(attn_implementation)
    context = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(10)[None, :] < torch.tensor([10, 7, 4])[:, None]
    with torch.no_grad():
        return torch.stack(connector(context, mask))


def cross_attention_block_output(attn_implementation: str) -> torch.Tensor:
    """(B, S, D): a gated block on text of 5 tokens and 6 visual tokens, under a per-token image mask."""
    model = tiny_cross_attention_model(gate_init=0.5)
    model.set_attn_implementation({"": attn_implementation})
    block = model.model.cross_attention_blocks[0]
    generator = torch.Generator().manual_seed(2)
    hidden_states, image_states = torch.randn(2, 5, 32, generator=generator), torch.randn(2, 6, 32, generator=generator)
    visible = torch.rand(2, 5, 6, generator=generator) > 0.4
    visible[:, 0] = False  # a token that sees no image attends to every token, its result multiplied by 0
    has_image = visible.any(dim=-1, keepdim=True)
    allowed = (visible | ~has_image)[:, None]  # (B, 1, S, M)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        output, _ = block(hidden_states, attention_mask=mask, has_image=has_image.float(), image_states=image_states)
        return output


MODULES = {  # module: (its output under a backend, the backends it runs)
    "vision_encoder_padded": (lambda backend: vision_encoder_output(backend, packed=False), BACKENDS),
    "vision_encoder_packed": (lambda backend: vision_encoder_output(backend, packed=True), BACKENDS),
    "perceiver": (connector_output, BACKENDS),
    "cross_attention_block": (cross_attention_block_output, ["eager", "sdpa"]),
}


@pytest.mark.parametrize("module", MODULES)
def test_every_backend_agrees_with_eager(module):
    output_of, backends = MODULES[module]
    outputs = {backend: output_of(backend) for backend in backends}
    assert outputs["eager"].abs().max() > 0.1
    for backend in backends[1:]:
        torch.testing.assert_close(outputs[backend], outputs["eager"], atol=ATOL, rtol=0, msg=backend)


# --- backends that cannot run fall back to sdpa ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "dropout", "dense_mask", "effective"),
    [
        ("eager", 0.0, False, "eager"),
        ("sdpa", 0.0, True, "sdpa"),
        ("flex_attention", 0.0, False, "flex_attention"),
        ("flex_attention", 0.0, True, "sdpa"),  # a per-token mask: no block to skip
        ("flex_attention", 0.1, False, "sdpa"),  # flex attention has no dropout
        ("flash_attention_2", 0.0, True, "sdpa"),
        ("flash_attention_2", 0.0, False, "sdpa"),  # CPU tensors
        ("flash_attention_3", 0.0, False, "sdpa"),
    ],
)
def test_runnable_attention(requested, dropout, dense_mask, effective, fresh_once_logs, caplog):
    config = SimpleNamespace(_attn_implementation=requested)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            got = runnable_attention(config, "test part", torch.zeros(1), dropout=dropout, dense_mask=dense_mask)
    assert got == effective
    assert len(caplog.records) == (effective != requested)


def _fusion_inputs(fusion: str) -> dict:
    pixel_values, patch_mask = mixed_size_images()
    pixel_mask = patch_mask.repeat_interleave(14, dim=1).repeat_interleave(14, dim=2)  # (N, 56, 56)
    if fusion == "autoregressive":
        return dict(pixel_values=pixel_values, pixel_attention_mask=pixel_mask, input_ids=None)
    ids = torch.tensor([marker_prompt(3)])
    return dict(
        input_ids=ids,
        pixel_values=pixel_values[None],
        pixel_attention_mask=pixel_mask[None],
        image_attention_mask=image_attention_mask_for(ids),
    )


def _logits(model, inputs: dict) -> torch.Tensor:
    if inputs["input_ids"] is None:  # autoregressive: one image per sample, 4 placeholders each
        n_latents = model.config.image_seq_len
        inputs = dict(inputs, input_ids=torch.tensor([[1] + [99] * n_latents + [5, 6]] * 3))
    with torch.no_grad():
        return model(**inputs).logits


PARTS = {  # part: (fusion, the config its attention reads)
    "vision encoder": ("autoregressive", lambda model: model.config.vision_config),
    "perceiver": ("autoregressive", lambda model: model.config.connector_config),
    "cross-attention blocks": ("cross_attention", lambda model: model.config),
}


@pytest.mark.parametrize(
    ("part", "requested"),
    [
        ("vision encoder", "flash_attention_2"),
        ("perceiver", "flash_attention_2"),
        ("cross-attention blocks", "flash_attention_2"),
        ("cross-attention blocks", "flex_attention"),
    ],
)
def test_backend_that_cannot_run_falls_back_to_sdpa_with_one_warning(part, requested, fresh_once_logs, caplog):
    """flash_attention_2 on CPU tensors — as a model loaded with it on a GPU and then run on CPU: the config says
    flash, the tensors cannot take it. The cross-attention blocks never run flash or flex: their mask is per token."""
    fusion, config_of = PARTS[part]
    model = tiny_autoregressive_model() if fusion == "autoregressive" else tiny_cross_attention_model(gate_init=0.5)
    inputs = _fusion_inputs(fusion)
    sdpa_logits = _logits(model, inputs)

    config_of(model)._attn_implementation_internal = requested  # bypasses transformers' load-time check
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fallback_logits = [_logits(model, inputs) for _ in range(2)]

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{part}: attn_implementation={requested!r} cannot run here")
    assert "falling back to 'sdpa'" in warnings[0]
    for logits in fallback_logits:
        assert torch.equal(logits, sdpa_logits)


@pytest.mark.skipif(
    is_flash_attn_2_available() or is_kernels_available(),
    reason="flash-attn (or the `kernels` hub substitute) is installed: transformers accepts the request",
)
def test_flash_request_without_flash_attn_loads_vision_and_connector_with_sdpa(tmp_path, fresh_once_logs, caplog):
    """transformers refuses flash_attention_2 without the flash-attn package; a per-sub-config request for our
    vision encoder and connector loads them with sdpa instead (one warning each). A plain string also reaches the
    language model, and transformers' own check still raises there."""
    tiny_autoregressive_model().save_pretrained(tmp_path)
    model_class = type(tiny_autoregressive_model())
    reference = model_class.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    requested = {"vision_config": "flash_attention_2", "connector_config": "flash_attention_2", "": "sdpa"}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = model_class.from_pretrained(tmp_path, attn_implementation=requested).eval()

    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.config.connector_config._attn_implementation == "sdpa"
    warnings = sorted(r.getMessage().split(":")[0] for r in caplog.records if r.levelno == logging.WARNING)
    assert warnings == ["Connector", "VisionEncoder"]
    inputs = _fusion_inputs("autoregressive")
    assert torch.equal(_logits(model, inputs), _logits(reference, inputs))
    with pytest.raises(ImportError, match="FlashAttention2"):
        model_class.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_effective_backend_is_logged_once_per_part(fresh_once_logs, caplog):
    model = tiny_cross_attention_model(gate_init=0.5)
    model.set_attn_implementation({"vision_config": "eager", "connector_config": "sdpa", "": "sdpa"})
    inputs = _fusion_inputs("cross_attention")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(2):
            _logits(model, inputs)
    assert sorted(r.getMessage() for r in caplog.records) == [
        "cross-attention blocks: attention runs 'sdpa'.",
        "perceiver: attention runs 'sdpa'.",
        "vision encoder: attention runs 'eager'.",
    ]


# --- half precision -----------------------------------------------------------------------------------------------


def test_float16_residual_stream_does_not_overflow():
    """A channel of the residual stream passing float16's 65504 (a 'massive activation', as deep SigLIP encoders
    grow): the stream is float32 in a float16 encoder, so the output stays finite and close to float32's."""
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionEncoderConfig(**tiny_vision_config())).eval()
    with torch.no_grad():
        for layer in encoder.encoder.layers:
            layer.mlp.fc2.bias[0] = 40_000.0  # each layer adds 40000 to channel 0: 80000 after two
    pixel_values, patch_mask = mixed_size_images()
    stream = []
    encoder.encoder.layers[-1].register_forward_hook(lambda module, args, output: stream.append(output))
    with torch.no_grad():
        expected = encoder(pixel_values, patch_attention_mask=patch_mask).last_hidden_state
        assert stream[0].abs().max() > torch.finfo(torch.float16).max  # a float16 stream would be inf here
        actual = encoder.half()(pixel_values.half(), patch_attention_mask=patch_mask).last_hidden_state

    assert stream[1].dtype == torch.float32 and actual.dtype == torch.float16
    real = patch_mask.flatten(1)
    assert torch.isfinite(actual[real]).all()
    torch.testing.assert_close(actual[real].float(), expected[real], atol=2e-2, rtol=0)
