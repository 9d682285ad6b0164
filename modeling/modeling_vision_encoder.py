"""SigLIP-compatible vision encoder at native resolution and aspect ratio (Idefics2 paper, Finding 5).

A SigLIP ViT (no pooling head) that takes a padded batch of images of different sizes with a
`patch_attention_mask`. Each image's patch grid, whatever its shape, is mapped onto the learned square
position table by fractional-coordinate bucketing (the NaViT-style adaptation): patch (i, j) of an
h × w grid takes the table row/column whose bucket holds i/h and j/w. Padding patches are masked out of
attention. The parameter names are SigLIP's, so a `SiglipVisionModel` state dict loads after dropping
its `vision_model.` prefix (see `vlmforge.conversion.siglip`).

Two layouts, the same numbers (≤ 1e-5 in float32):
- padded (the default of `forward`, SigLIP's and Idefics2's): (N, max_h * max_w, D), padding patches masked out;
- packed (`forward(..., packed=True)`): the real patches of all images in one (1, T, D) sequence with `cu_seqlens`,
  attention kept within each image by a variable-length kernel (FlashAttention's on CUDA; exact per-image attention
  on CPU). No layer computes a padding patch. `VisionEncoder.packing_pays_off` says when it is the faster one.

In float16 the residual stream is float32 and the layer norms compute in float32 (`common_layers.residual_dtype`);
float32 and bfloat16 numbers are unchanged by that.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention_backends import SdpaFallbackAtLoad, bidirectional_mask, runnable_attention
from .common_layers import Float32LayerNorm, eager_attention_forward, residual_dtype
from .packed_sequences import PackedSequences
from .configuration_vision_encoder import VisionEncoderConfig

PART = "vision encoder"


def patch_position_ids(patch_attention_mask: torch.Tensor, num_patches_per_side: int) -> torch.Tensor:
    """Position-table index of every patch, by fractional-coordinate bucketing.

    Args:
        patch_attention_mask: (N, max_h, max_w) bool, True on real patches; each image's real patches form
            a top-left h × w rectangle.
        num_patches_per_side: side of the square position table.

    Returns:
        (N, max_h * max_w) long; padding patches get 0.

    The arithmetic is float32 on purpose: Idefics2 checkpoints were trained with float32 fractional
    coordinates, and exact rational arithmetic picks a different bucket on some grids (e.g. 50 × 55).
    """
    num_images, max_h, max_w = patch_attention_mask.shape
    device = patch_attention_mask.device
    side = num_patches_per_side
    # bucket b covers [b/side, (b+1)/side); the boundaries are the interior edges, in float32. CUDA's arange
    # accumulates in float, the CPU's in double, so a few edges differ between devices; built on the images' device,
    # as transformers' Idefics2 builds them, they give its buckets on either
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    rows = patch_attention_mask[:, :, 0].sum(dim=1)  # (N,) real patch rows per image
    cols = patch_attention_mask[:, 0, :].sum(dim=1)  # (N,)
    # an all-padding image has 0 rows: its ids are discarded by the mask below, avoid dividing by zero
    row_step = 1.0 / rows.clamp(min=1)  # (N,) float32
    col_step = 1.0 / cols.clamp(min=1)
    row_coords = torch.arange(max_h, device=device, dtype=torch.float32)[None, :] * row_step[:, None]  # (N, max_h)
    col_coords = torch.arange(max_w, device=device, dtype=torch.float32)[None, :] * col_step[:, None]  # (N, max_w)
    row_buckets = torch.bucketize(row_coords.clamp(max=1.0 - 1e-6), boundaries, right=True)
    col_buckets = torch.bucketize(col_coords.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = row_buckets[:, :, None] * side + col_buckets[:, None, :]  # (N, max_h, max_w)
    ids = torch.where(patch_attention_mask, ids, torch.zeros_like(ids))
    return ids.reshape(num_images, max_h * max_w)


class VisionEmbeddings(nn.Module):
    """Patchify with a strided convolution and add the bucketed position embedding."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.num_patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # (N, D, max_h, max_w)
        embeddings = patches.flatten(2).transpose(1, 2)  # (N, max_h * max_w, D)
        position_ids = patch_position_ids(patch_attention_mask, self.num_patches_per_side)
        return embeddings + self.position_embedding(position_ids)


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention over an image's patches (or, packed, over each image's own)."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packed_sequences: PackedSequences | None = None,
        **kwargs,
    ):
        """hidden_states (N, P, D) with the backend's padding mask, or (1, T, D) with `packed_sequences` (and, for
        flex attention, its block-diagonal mask). Returns (same shape as the input, attention weights or None)."""
        batch, seq_len, _ = hidden_states.shape
        head_shape = (batch, seq_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(head_shape).transpose(1, 2)  # (N, H, P, Dh)
        key = self.k_proj(hidden_states).view(head_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(head_shape).transpose(1, 2)

        dropout = self.config.attention_dropout if self.training else 0.0
        implementation = runnable_attention(self.config, PART, query, dropout=dropout)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        if packed_sequences is None or implementation == "flex_attention":
            output, weights = attention_interface(
                self,
                query,
                key,
                value,
                attention_mask,
                is_causal=self.is_causal,
                scaling=self.scaling,
                dropout=dropout,
                **kwargs,
            )
        else:
            output = packed_sequences.attend(
                self,
                attention_interface,
                implementation,
                query,
                key,
                value,
                scaling=self.scaling,
                dropout=dropout,
                **kwargs,
            )
            weights = None
        output = output.reshape(batch, seq_len, -1).contiguous()  # (N, P, D)
        return self.out_proj(output), weights


class VisionMLP(nn.Module):
    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class VisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x)).

    `x` is the residual stream, float32 when the layer computes in float16 (`residual_dtype`): the norms hand their
    sub-layers the weights' dtype, and the sums stay in the stream's.
    """

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.layer_norm1 = Float32LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = Float32LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        attended, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class VisionTransformerStack(nn.Module):
    """The encoder layers; the attribute path `encoder.layers.N` matches SigLIP's checkpoint keys."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return hidden_states


@dataclass
class VisionEncoderOutput(BaseModelOutput):
    """`last_hidden_state`: (N, max_h * max_w, D) padded, or (1, T, D) packed, with `packed_sequences` then
    saying where each image's T_i patches are (`packed_sequences.unpack` pads them per image)."""

    packed_sequences: PackedSequences | None = None


class VisionEncoder(SdpaFallbackAtLoad, PreTrainedModel):
    """SigLIP ViT without pooling head, for images of any size up to `image_size` per side.

    Input: `pixel_values` (N, C, H, W), images padded bottom/right (a remainder below one patch is ignored,
    as by the strided convolution), and `patch_attention_mask` (N, H // patch_size, W // patch_size) bool,
    True on real patches (all True when omitted).
    Output: `VisionEncoderOutput`; `last_hidden_state` is (N, H//p * W//p, hidden_size), padding patches included,
    or with `packed=True` (1, T, hidden_size), the T real patches of all images, image by image, row by row.
    """

    config_class = VisionEncoderConfig
    config: VisionEncoderConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__(config)
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionTransformerStack(config)
        self.post_layernorm = Float32LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def packing_pays_off(self, patch_attention_mask: torch.Tensor) -> bool:
        """Whether `packed=True` is the faster layout for a batch with this (N, h, w) patch mask: when some
        patches are padding, and the backend is not eager (the reference, kept on the padded layout)."""
        return self.config._attn_implementation != "eager" and not bool(patch_attention_mask.all())

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_attention_mask: torch.Tensor | None = None,
        packed: bool = False,
        **kwargs,
    ) -> VisionEncoderOutput:
        patch_size = self.config.patch_size
        num_images, _, height, width = pixel_values.shape
        if patch_attention_mask is None:
            patch_attention_mask = torch.ones(
                num_images, height // patch_size, width // patch_size, dtype=torch.bool, device=pixel_values.device
            )
        patch_attention_mask = patch_attention_mask.bool()

        embeddings = self.embeddings(pixel_values, patch_attention_mask)  # (N, P, D)
        dropout = self.config.attention_dropout if self.training else 0.0
        implementation = runnable_attention(self.config, PART, embeddings, dropout=dropout)
        stream = embeddings.to(residual_dtype(embeddings.dtype))
        patch_mask = patch_attention_mask.view(num_images, -1)  # (N, P)
        if packed:
            return self._encode_packed(stream, patch_mask, implementation, **kwargs)
        attention_mask = bidirectional_mask(self.config, implementation, embeddings, patch_mask)
        stream = self.encoder(stream, attention_mask, **kwargs)
        return VisionEncoderOutput(last_hidden_state=self.post_layernorm(stream))

    def _encode_packed(
        self, stream: torch.Tensor, patch_mask: torch.Tensor, implementation: str, **kwargs
    ) -> VisionEncoderOutput:
        """The real patches of (N, P, D) `stream`, where (N, P) `patch_mask` is True, as one (1, T, D) sequence."""
        packed_sequences = PackedSequences.from_mask(patch_mask)
        stream = stream[patch_mask][None]  # (1, T, D)
        attention_mask = None  # the varlen kernels and per-image attention need none; flex takes a block mask
        if implementation == "flex_attention":
            attention_mask = packed_sequences.block_diagonal_mask(self.config, stream)
        stream = self.encoder(stream, attention_mask, packed_sequences=packed_sequences, **kwargs)
        return VisionEncoderOutput(last_hidden_state=self.post_layernorm(stream), packed_sequences=packed_sequences)


__all__ = ["VisionEncoder", "VisionEncoderOutput", "patch_position_ids"]
