"""Shared tiny-config factory: every test builds its models here, on CPU, in well under a second."""

import pytest
import torch

from transformers import Idefics2Config

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


def tiny_cross_attention_config(text_model_type: str = "llama", **overrides) -> vlmforge.CrossAttentionVLMConfig:
    """conftest's tiny vision encoder and connector; a 3-layer LM with blocks before layers 0 and 2, so that
    fused and plain decoder layers both occur."""
    kwargs = dict(
        vision_config=tiny_vision_config(),
        connector_config=tiny_connector_config(),
        text_config=tiny_text_config(text_model_type, num_hidden_layers=3),
        image_token_id=IMAGE_TOKEN_ID,
        cross_attention_every_n_layers=2,
    )
    kwargs.update(overrides)
    return vlmforge.CrossAttentionVLMConfig(**kwargs)


def tiny_cross_attention_model(text_model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny cross-attention VLM; pass gate_init=0.5 (say) for blocks that change the output."""
    torch.manual_seed(seed)
    config = tiny_cross_attention_config(text_model_type, **overrides)
    return vlmforge.CrossAttentionVLMForConditionalGeneration(config).eval()


def marker_prompt(n_images: int, text=(5, 6, 7), between=(10, 11)) -> list[int]:
    """Token ids in the cross-attention layout: text, then per image one <image> marker followed by text."""
    ids = [1, *text]
    for _ in range(n_images):
        ids += [IMAGE_TOKEN_ID, *between]
    return ids


def image_attention_mask_for(
    input_ids: torch.Tensor, rule: str = "latest", *, sub_images: int = 1, num_slots: int | None = None
) -> torch.Tensor:
    """(B, T, N_img) long, what the processor computes: token t sees image j from image j's marker on — up to
    image j + 1's marker with rule "latest", to the end with "all_previous". Image j owns slots
    j * sub_images … (j + 1) * sub_images - 1, which share a column; N_img defaults to the most images."""
    markers = [(row == IMAGE_TOKEN_ID).nonzero()[:, 0].tolist() for row in input_ids]
    num_slots = num_slots or max(len(m) for m in markers) * sub_images
    mask = torch.zeros(*input_ids.shape, num_slots, dtype=torch.long)
    for b, positions in enumerate(markers):
        for j, start in enumerate(positions):
            end = positions[j + 1] if rule == "latest" and j + 1 < len(positions) else input_ids.shape[1]
            mask[b, start:end, j * sub_images : (j + 1) * sub_images] = 1
    return mask


def image_prompt(n_images: int, image_seq_len: int, text=(5, 6, 7)) -> list[int]:
    """Token ids in Idefics2's layout: text, then per image <fake> <image>×image_seq_len, a closing <fake>."""
    ids = [1, *text]
    for _ in range(n_images):
        ids += [FAKE_IMAGE_TOKEN_ID] + [IMAGE_TOKEN_ID] * image_seq_len
    if n_images:
        ids.append(FAKE_IMAGE_TOKEN_ID)
    return ids + [8, 9]


def tiny_idefics2_config(
    text_model_type: str = "llama", *, image_size: int = 112, tie_word_embeddings: bool = False
) -> Idefics2Config:
    """conftest's tiny vision encoder, connector and LM, in Idefics2's config layout.

    The default 112 px table (8 × 8 patches) with images of at most 112 px gives many grid shapes.
    """
    connector = tiny_connector_config()
    return Idefics2Config(
        vision_config=tiny_vision_config(image_size=image_size),
        perceiver_config=dict(
            hidden_size=tiny_text_config()["hidden_size"],
            resampler_n_latents=connector["n_latents"],
            resampler_depth=connector["depth"],
            resampler_n_heads=connector["num_attention_heads"],
            resampler_head_dim=connector["head_dim"],
            num_key_value_heads=connector["num_key_value_heads"],
        ),
        text_config=tiny_text_config(text_model_type, tie_word_embeddings=tie_word_embeddings),
        image_token_id=IMAGE_TOKEN_ID,
        tie_word_embeddings=tie_word_embeddings,
    )


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


def left_pad(sequences: list[list[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists, as batched generation wants: (input_ids (B, S), attention_mask (B, S))."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.tensor([[pad_token_id] * (length - len(ids)) + list(ids) for ids in sequences])
    attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in sequences])
    return input_ids, attention_mask


def random_images(n_images: int, height: int = 56, width: int = 56, seed: int = 0) -> torch.Tensor:
    """(n_images, 3, height, width) normalised-looking pixels, never all zero (all-zero images are padding)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_images, 3, height, width, generator=generator)


class CallCounter:
    """Counts forward calls of a module and the images each call saw; a context manager that removes its hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.batch_sizes: list[int] = []
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        self.batch_sizes.append(first.shape[0])

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)

    def __enter__(self) -> "CallCounter":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
