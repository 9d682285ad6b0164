"""Configuration of the cross-attention VLM (Idefics2 paper, section 3.1, Finding 2; Flamingo; Idefics1).

The same three parts as the fully autoregressive VLM — `vision_config`, `connector_config`, `text_config` (any
transformers decoder) — fused differently: the text keeps one `<image>` marker per image, and tanh-gated
cross-attention blocks before every `cross_attention_every_n_layers`-th decoder layer let text tokens attend to
the visual tokens of the images `image_attention_mask` allows (the processor derives it from `image_rule`).
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_connector import ConnectorConfig
from .configuration_vision_encoder import VisionEncoderConfig

IMAGE_RULES = ("latest", "all_previous")


class CrossAttentionVLMConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config (`VisionEncoderConfig` or `dict`, *optional*): the vision encoder.
        connector_config (`ConnectorConfig` or `dict`, *optional*): modality projection and pooling.
        text_config (`PreTrainedConfig` or `dict`, *optional*): any decoder config AutoConfig knows
            (a dict needs its `model_type`); defaults to Llama with room for the image tokens.
        image_token_id (`int`, defaults to 32001): id of the `<image>` marker, one per image in the text (one per
            group of sub-images when the processor splits images).
        image_rule (`str`, defaults to `"latest"`): which images a text token sees — `"latest"`, the most recent
            image at or before it (Flamingo, Idefics1), or `"all_previous"`, every image at or before it.
        cross_attention_every_n_layers (`int`, defaults to 4): a gated cross-attention block runs before decoder
            layers 0, n, 2n, …
        gate_init (`float`, defaults to 0.0): initial value of every gate (before tanh); 0 makes each block the
            identity, so the VLM starts as exactly its language model.
        tie_word_embeddings (`bool`, defaults to `False`): tie `lm_head` to the input embeddings.
        use_cache (`bool`, defaults to `True`): return the key/value cache.

    The blocks take their width, heads (grouped-query), MLP size, activation and norm epsilon from `text_config`.
    Derived: `image_seq_len` (visual tokens per sub-image) and `cross_attention_layers` (where the blocks sit).
    """

    model_type = "vlmforge_cross_attention"
    sub_configs_defaults = {
        "vision_config": VisionEncoderConfig,
        "connector_config": ConnectorConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs={"vocab_size": 32003}),
    }

    vision_config: dict | PreTrainedConfig | None = None
    connector_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32001
    image_rule: str = "latest"
    cross_attention_every_n_layers: int = 4
    gate_init: float = 0.0
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        for key in ("vision_config", "connector_config"):
            sub_config = getattr(self, key)
            if isinstance(sub_config, dict):
                # a copy: from_dict(d) must not mutate the caller's d
                setattr(self, key, {k: v for k, v in sub_config.items() if k != "model_type"})
        super().__post_init__(**kwargs)
        text = self.text_config
        if not 0 <= self.image_token_id < text.vocab_size:
            raise ValueError(
                f"CrossAttentionVLMConfig: image_token_id={self.image_token_id} is outside the text model's "
                f"vocabulary (vocab_size={text.vocab_size}); add the image token to the tokenizer and resize."
            )
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
        self.text_config.tie_word_embeddings = self.tie_word_embeddings

    @property
    def image_seq_len(self) -> int:
        """Visual tokens per (sub-)image: perceiver latents, or every patch of a full-size image."""
        if self.connector_config.pooling == "perceiver":
            return self.connector_config.n_latents
        return self.vision_config.num_patches_per_side**2

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the decoder layers a gated cross-attention block runs before: 0, n, 2n, …"""
        return list(range(0, self.text_config.num_hidden_layers, self.cross_attention_every_n_layers))


__all__ = ["CrossAttentionVLMConfig"]
