"""Connector: modality projection, then learned pooling (Idefics2 paper, section 3.2, Finding 4).

The projection (a SwiGLU MLP) maps vision-encoder outputs to the language model's width. The perceiver
resampler then compresses each image's patch sequence to `n_latents` tokens (729 → 64 in Idefics2): learned
latent queries attend to [image tokens; latents] through `depth` layers of grouped-query attention.
With `pooling="none"`, the projected patch tokens are the visual tokens (the paper's baseline).
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention_backends import SdpaFallbackAtLoad, bidirectional_mask, runnable_attention
from .common_layers import RMSNorm, SwiGLUMLP, eager_attention_forward
from .packed_sequences import PackedSequences
from .configuration_connector import ConnectorConfig

PART = "perceiver"


class PerceiverAttention(nn.Module):
    """Latent queries attend to the concatenation [context; latents], with grouped key/value heads."""

    def __init__(self, config: ConnectorConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=False)

    def forward(
        self, latents: torch.Tensor, context: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs
    ) -> torch.Tensor:
        batch, n_latents, _ = latents.shape
        keys_and_values = torch.cat([context, latents], dim=1)  # (N, P + L, D)
        kv_len = keys_and_values.shape[1]
        query = self.q_proj(latents).view(batch, n_latents, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(keys_and_values).view(batch, kv_len, self.num_key_value_heads, self.head_dim)
        value = self.v_proj(keys_and_values).view(batch, kv_len, self.num_key_value_heads, self.head_dim)
        key, value = key.transpose(1, 2), value.transpose(1, 2)  # (N, H_kv, P + L, Dh)

        dropout = self.config.attention_dropout if self.training else 0.0
        implementation = runnable_attention(self.config, PART, query, dropout=dropout)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, _ = attention_interface(
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
        output = output.reshape(batch, n_latents, self.num_heads * self.head_dim)  # (N, L, H * Dh)
        return self.o_proj(output)


class PerceiverLayer(GradientCheckpointingLayer):
    """latents + attn(norm(latents), norm(context)), then latents + mlp(norm(latents))."""

    def __init__(self, config: ConnectorConfig, hidden_size: int) -> None:
        super().__init__()
        self.input_latents_norm = RMSNorm(hidden_size, eps=config.rms_norm_eps)
        self.input_context_norm = RMSNorm(hidden_size, eps=config.rms_norm_eps)
        self.self_attn = PerceiverAttention(config, hidden_size)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLUMLP(
            input_size=hidden_size,
            intermediate_size=4 * hidden_size,
            output_size=hidden_size,
            hidden_act=config.hidden_act,
        )

    def forward(
        self, latents: torch.Tensor, context: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs
    ) -> torch.Tensor:
        attended = self.self_attn(
            self.input_latents_norm(latents), self.input_context_norm(context), attention_mask, **kwargs
        )
        latents = latents + attended
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """Compress (N, P, D) patch tokens with a (N, P) validity mask into (N, n_latents, D) tokens."""

    def __init__(self, config: ConnectorConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.empty(config.n_latents, hidden_size))
        self.layers = nn.ModuleList([PerceiverLayer(config, hidden_size) for _ in range(config.depth)])
        self.norm = RMSNorm(hidden_size, eps=config.rms_norm_eps)

    def forward(self, context: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        num_images = context.shape[0]
        latents = self.latents.unsqueeze(0).expand(num_images, -1, -1)  # (N, L, D)
        # keys are [context; latents]: the latents themselves are always visible (and, being last, tell flash
        # kernels that no query is padding)
        key_mask = torch.cat([attention_mask, attention_mask.new_ones(num_images, latents.shape[1])], dim=1)
        dropout = self.config.attention_dropout if self.training else 0.0
        implementation = runnable_attention(self.config, PART, context, dropout=dropout)
        key_mask = bidirectional_mask(self.config, implementation, latents, key_mask)
        for layer in self.layers:
            latents = layer(latents, context, key_mask, **kwargs)
        return self.norm(latents)


class Connector(SdpaFallbackAtLoad, PreTrainedModel):
    """Modality projection, then perceiver pooling (or none).

    A `PreTrainedModel` of its own so that `connector_config` carries its own attention backend
    (`attn_implementation={"connector_config": "sdpa", ...}`) and initialises its own latents.

    Input: vision features (N, P, vision_hidden) and `patch_mask` (N, P) bool, True on real patches.
    Output: a list of N tensors, one per image, each (tokens_i, text_hidden): `n_latents` rows with the
    perceiver, the image's real patches without pooling.
    """

    config_class = ConnectorConfig
    config: ConnectorConfig
    supports_gradient_checkpointing = True
    _no_split_modules = ["PerceiverLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: ConnectorConfig, *, vision_hidden_size: int, text_config) -> None:
        super().__init__(config)
        connector_config = config
        self.pooling = connector_config.pooling
        self.modality_projection = SwiGLUMLP(
            input_size=vision_hidden_size,
            intermediate_size=text_config.intermediate_size,
            output_size=text_config.hidden_size,
            hidden_act=text_config.hidden_act,
        )
        if self.pooling == "perceiver":
            self.perceiver_resampler = PerceiverResampler(connector_config, text_config.hidden_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # A new connector must break symmetry and pass a signal. With a fixed std of 0.02 the projection and the
        # perceiver scale activations by ~0.02 * sqrt(width) per layer, so the visual tokens start near zero and
        # the LM learns the answer prior, ignoring the image (measured in issue 6: the loss never leaves the
        # prior). Fan-in scaling, std = 1 / sqrt(in_features), keeps activations O(1) at every width.
        # Loading a checkpoint is unaffected: only missing parameters are initialised.
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        # Idefics2 fills the latents with ones: identical latents get identical gradients, so they could
        # never become different queries. Draw them from N(0, 1) instead.
        if isinstance(module, PerceiverResampler):
            init.normal_(module.latents, mean=0.0, std=1.0)

    def forward(
        self,
        image_hidden_states: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        *,
        packed_sequences: PackedSequences | None = None,
        **kwargs,
    ) -> list[torch.Tensor]:
        """image_hidden_states (N, P, vision_hidden) with `patch_mask` (N, P), or the packed encoder's
        (1, T, vision_hidden) with `packed_sequences`: then only real patches are projected, and the perceiver gets
        each image's tokens padded to the longest image."""
        projected = self.modality_projection(image_hidden_states)  # (N, P, text_hidden) or (1, T, text_hidden)
        if packed_sequences is not None:
            if self.pooling == "none":
                return list(projected[0].split(packed_sequences.lengths))
            projected, patch_mask = packed_sequences.unpack(projected)  # (N, T_max, text_hidden), (N, T_max)
        if self.pooling == "none":
            return [tokens[mask] for tokens, mask in zip(projected, patch_mask)]
        pooled = self.perceiver_resampler(projected, patch_mask, **kwargs)  # (N, n_latents, text_hidden)
        return list(pooled.unbind(0))


__all__ = ["Connector", "PerceiverResampler"]
