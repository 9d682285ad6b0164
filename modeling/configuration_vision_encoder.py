"""Configuration of the SigLIP-compatible vision encoder (Idefics2 paper, section 3.2, Finding 5).

The fields are SigLIP's, so a `SiglipVisionConfig` maps onto this class field by field. `image_size` is the
resolution the position table was trained for: an image of any other size and aspect ratio is mapped onto the
`image_size // patch_size` × `image_size // patch_size` table by fractional-coordinate bucketing. As in
SigLIP, a remainder is ignored: SigLIP-so400m's 384 px with 14 px patches is a 27 × 27 table.
"""

from transformers import PreTrainedConfig


class VisionEncoderConfig(PreTrainedConfig):
    r"""
    Args:
        hidden_size (`int`, defaults to 1152): width of the encoder.
        intermediate_size (`int`, defaults to 4304): width of the MLP.
        num_hidden_layers (`int`, defaults to 27): number of encoder layers.
        num_attention_heads (`int`, defaults to 16): attention heads per layer.
        num_channels (`int`, defaults to 3): input channels.
        image_size (`int`, defaults to 980): side of the square the position table covers.
        patch_size (`int`, defaults to 14): side of a square patch.
        hidden_act (`str`, defaults to `"gelu_pytorch_tanh"`): MLP activation.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02): std of the normal initialiser.

    The defaults are the SigLIP-so400m encoder adapted to 980 px, as in Idefics2-8B.
    """

    model_type = "vlmforge_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"VisionEncoderConfig: hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )
        if self.image_size < self.patch_size:
            raise ValueError(
                f"VisionEncoderConfig: image_size={self.image_size} is smaller than patch_size={self.patch_size}."
            )

    @property
    def num_patches_per_side(self) -> int:
        """Side of the learned position table, in patches."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["VisionEncoderConfig"]
