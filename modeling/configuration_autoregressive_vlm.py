"""Configuration of the fully autoregressive VLM (Idefics2 paper, section 3.1, Finding 2).

The shared three parts (`VisionLanguageConfig`); the visual tokens replace `<image>` placeholders in the
language model's input sequence, `image_seq_len` of them per (sub-)image.
"""

from .configuration_vlm_base import VisionLanguageConfig


class AutoregressiveVLMConfig(VisionLanguageConfig):
    r"""
    Args:
        vision_config, connector_config, text_config, image_token_id, tie_word_embeddings, use_cache:
            see `VisionLanguageConfig`; `image_token_id` is the placeholder each visual token replaces.
    """

    model_type = "vlmforge_autoregressive"


__all__ = ["AutoregressiveVLMConfig"]
