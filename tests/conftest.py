"""Shared tiny-config factory: every test builds its models here, on CPU, in well under a second."""

import pytest
import torch

import vlmforge

IMAGE_TOKEN_ID = 99
FAKE_IMAGE_TOKEN_ID = 98
VOCAB_SIZE = 100

TEXT_CONFIGS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", use_sliding_window=False),
}


def tiny_text_config(model_type: str = "llama", **overrides) -> dict:
    """A 2-layer decoder of width 32 with grouped-query attention."""
    config = dict(
        TEXT_CONFIGS[model_type],
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    config.update(overrides)
    return config


def tiny_vision_config(**overrides) -> dict:
    """A 2-layer SigLIP-style encoder of width 32; 14 px patches on a 4 × 4 position table."""
    config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
    )
    config.update(overrides)
    return config


def tiny_connector_config(**overrides) -> dict:
    config = dict(pooling="perceiver", n_latents=4, depth=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    config.update(overrides)
    return config


def tiny_autoregressive_config(text_model_type: str = "llama", **overrides) -> vlmforge.AutoregressiveVLMConfig:
    kwargs = dict(
        vision_config=tiny_vision_config(),
        connector_config=tiny_connector_config(),
        text_config=tiny_text_config(text_model_type),
        image_token_id=IMAGE_TOKEN_ID,
    )
    kwargs.update(overrides)
    return vlmforge.AutoregressiveVLMConfig(**kwargs)


def tiny_autoregressive_model(text_model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_autoregressive_config(text_model_type, **overrides)
    return vlmforge.AutoregressiveVLMForConditionalGeneration(config).eval()


def image_prompt(n_images: int, image_seq_len: int, text=(5, 6, 7)) -> list[int]:
    """Token ids in Idefics2's layout: text, then per image <fake> <image>×image_seq_len, a closing <fake>."""
    ids = [1, *text]
    for _ in range(n_images):
        ids += [FAKE_IMAGE_TOKEN_ID] + [IMAGE_TOKEN_ID] * image_seq_len
    if n_images:
        ids.append(FAKE_IMAGE_TOKEN_ID)
    return ids + [8, 9]


@pytest.fixture
def tiny_model():
    return tiny_autoregressive_model()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
