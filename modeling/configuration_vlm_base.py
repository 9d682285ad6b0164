"""What both fusion configs share (Idefics2 paper, section 3): the three parts and the image token.

`vision_config` (the SigLIP-compatible encoder), `connector_config` (modality projection + pooling) and
`text_config` (any transformers decoder, resolved through AutoConfig; Llama by default). Each fusion's config
subclasses this one and adds its own fields.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_connector import ConnectorConfig
from .configuration_vision_encoder import VisionEncoderConfig


class VisionLanguageConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config (`VisionEncoderConfig` or `dict`, *optional*): the vision encoder.
        connector_config (`ConnectorConfig` or `dict`, *optional*): modality projection and pooling.
        text_config (`PreTrainedConfig` or `dict`, *optional*): any decoder config AutoConfig knows
            (a dict needs its `model_type`); defaults to Llama with room for the three image tokens.
        image_token_id (`int`, defaults to 32001): id of the `<image>` token.
        tie_word_embeddings (`bool`, defaults to `False`): tie `lm_head` to the input embeddings.
        use_cache (`bool`, defaults to `True`): return the key/value cache.

    Derived: `image_seq_len`, the visual tokens one (sub-)image costs — `n_latents` with the perceiver,
    the number of patches of a full `image_size` square without pooling (smaller images cost fewer).

    Attention backends: `attn_implementation` (of this config, `from_pretrained` or `set_attn_implementation`) is
    one name for every part, or a dict per part, e.g. `{"vision_config": "flash_attention_2", "connector_config":
    "sdpa", "text_config": "flash_attention_2", "": "sdpa"}`; the key `""` is this config's own, which the
    cross-attention blocks follow. The vision encoder and connector run `eager`, `sdpa`, `flex_attention` and flash
    kernels; a flash request they cannot load (no flash-attn, no GPU) gives `sdpa` with a warning, where the
    language model, whose kernels are transformers', raises. The cross-attention blocks' per-token mask suits only
    `eager` and `sdpa`: under flash or flex they run `sdpa`, with one warning.
    """

    sub_configs_defaults = {
        "vision_config": VisionEncoderConfig,
        "connector_config": ConnectorConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs={"vocab_size": 32003}),
    }

    vision_config: dict | PreTrainedConfig | None = None
    connector_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32001
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        for key in ("vision_config", "connector_config"):
            sub_config = getattr(self, key)
            if isinstance(sub_config, dict):
                # a copy: from_dict(d) must not mutate the caller's d
                setattr(self, key, {k: v for k, v in sub_config.items() if k != "model_type"})
        super().__post_init__(**kwargs)
        vocab_size = self.text_config.vocab_size
        if not 0 <= self.image_token_id < vocab_size:
            raise ValueError(
                f"{type(self).__name__}: image_token_id={self.image_token_id} is outside the text model's "
                f"vocabulary (vocab_size={vocab_size}); add the image tokens to the tokenizer and resize."
            )
        self.text_config.tie_word_embeddings = self.tie_word_embeddings

    @property
    def image_seq_len(self) -> int:
        """Visual tokens per (sub-)image: perceiver latents, or every patch of a full-size image."""
        if self.connector_config.pooling == "perceiver":
            return self.connector_config.n_latents
        return self.vision_config.num_patches_per_side**2


__all__ = ["VisionLanguageConfig"]
