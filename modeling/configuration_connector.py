"""Configuration of the connector between vision encoder and language model (Idefics2 paper, Finding 4).

The connector is a modality projection (SwiGLU MLP, vision width → text width) followed by learned pooling:
a perceiver resampler that turns every image into `n_latents` tokens (64 in Idefics2), or no pooling at all
(`pooling="none"`, every patch becomes a token — the paper's unpooled baseline).
"""

from transformers import PreTrainedConfig

POOLING_CHOICES = ("perceiver", "none")


class ConnectorConfig(PreTrainedConfig):
    r"""
    Args:
        pooling (`str`, defaults to `"perceiver"`): `"perceiver"` or `"none"`.
        n_latents (`int`, defaults to 64): visual tokens per image after the perceiver.
        depth (`int`, defaults to 3): perceiver layers.
        num_attention_heads (`int`, defaults to 16): perceiver query heads.
        num_key_value_heads (`int`, defaults to 4): perceiver key/value heads (grouped-query attention).
        head_dim (`int`, defaults to 96): perceiver head width.
        hidden_act (`str`, defaults to `"silu"`): activation of the perceiver MLPs.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of the perceiver RMSNorms.
        attention_dropout (`float`, defaults to 0.0): dropout on perceiver attention probabilities.
        initializer_range (`float`, defaults to 0.02): std of the normal initialiser.

    The perceiver works at the language model's width; the modality projection uses the language model's
    `intermediate_size` and `hidden_act`, as Idefics2 does, so those are not repeated here.
    """

    model_type = "vlmforge_connector"
    base_config_key = "connector_config"

    pooling: str = "perceiver"
    n_latents: int = 64
    depth: int = 3
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 96
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(f"ConnectorConfig: pooling={self.pooling!r} is not one of {POOLING_CHOICES}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"ConnectorConfig: num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.n_latents < 1 or self.depth < 1:
            raise ValueError(
                f"ConnectorConfig: n_latents={self.n_latents} and depth={self.depth} must both be at least 1."
            )


__all__ = ["ConnectorConfig"]
