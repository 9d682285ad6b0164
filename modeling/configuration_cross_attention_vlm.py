"""Configuration of the cross-attention VLM (Idefics2 paper, section 3.1, Finding 2; Flamingo; Idefics1).

The same three parts as the fully autoregressive VLM — `vision_config`, `connector_config`, `text_config` (any
transformers decoder) — fused differently: the text keeps one `<image>` marker per image, and tanh-gated
cross-attention blocks before every `cross_attention_every_n_layers`-th decoder layer let text tokens attend to
the visual tokens of the images `image_attention_mask` allows (the processor derives it from `image_rule`).
"""

from .configuration_vlm_base import VisionLanguageConfig

IMAGE_RULES = ("latest", "all_previous")


class CrossAttentionVLMConfig(VisionLanguageConfig):
    r"""
    Args:
        vision_config, connector_config, text_config, tie_word_embeddings, use_cache: see `VisionLanguageConfig`.
        image_token_id (`int`, defaults to 32001): id of the `<image>` marker, one per image in the text (one per
            group of sub-images when the processor splits images).
        image_rule (`str`, defaults to `"latest"`): which images a text token sees — `"latest"`, the most recent
            image at or before it (Flamingo, Idefics1), or `"all_previous"`, every image at or before it.
        cross_attention_every_n_layers (`int`, defaults to 4): a gated cross-attention block runs before decoder
            layers 0, n, 2n, …
        gate_init (`float`, defaults to 0.0): initial value of every gate (before tanh); 0 makes each block the
            identity, so the VLM starts as exactly its language model.

    The blocks take their width, heads (grouped-query), MLP size, activation and norm epsilon from `text_config`.
    Derived: `image_seq_len` (visual tokens per sub-image) and `cross_attention_layers` (where the blocks sit).
    """

    model_type = "vlmforge_cross_attention"

    image_rule: str = "latest"
    cross_attention_every_n_layers: int = 4
    gate_init: float = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text = self.text_config
        if self.image_rule not in IMAGE_RULES:
            raise ValueError(f"CrossAttentionVLMConfig: image_rule={self.image_rule!r} is not one of {IMAGE_RULES}.")
        if not 1 <= self.cross_attention_every_n_layers <= text.num_hidden_layers:
            raise ValueError(
                f"CrossAttentionVLMConfig: cross_attention_every_n_layers={self.cross_attention_every_n_layers} "
                f"must be between 1 and the text model's num_hidden_layers={text.num_hidden_layers}."
            )
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        if text.num_attention_heads % kv_heads != 0:
            raise ValueError(
                f"CrossAttentionVLMConfig: the text model's num_attention_heads={text.num_attention_heads} must be a "
                f"multiple of its num_key_value_heads={kv_heads}."
            )

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the decoder layers a gated cross-attention block runs before: 0, n, 2n, …"""
        return list(range(0, self.text_config.num_hidden_layers, self.cross_attention_every_n_layers))


__all__ = ["CrossAttentionVLMConfig"]
