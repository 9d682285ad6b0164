"""Gated cross-attention blocks and their fusion into any transformers decoder (Flamingo's GATED XATTN-DENSE,
Idefics1; the cross-attention architecture of the Idefics2 paper, section 3.1).

A block runs before a decoder layer: text queries attend to the visual tokens (grouped-query, no rotary), the
result is added through a tanh gate, then a SwiGLU MLP is added through a second tanh gate. Gates start at 0, so
at initialisation every block is the identity and the VLM is exactly its language model.

Fusion keeps the decoder layer object where it is — same attribute path, same parameters, same hooks — and
switches its class to a generated subclass whose `forward` runs the block first (what FSDP2's `fully_shard` does
to layers, and what transformers' `GradientCheckpointingLayer` expects). The blocks themselves live outside the
language model; the images, their keys/values and the blocks reach the fused layers as one forward keyword,
`cross_attention_inputs`, that transformers hands to every decoder layer. Nothing is stored on modules between
calls.

Each block projects the visual tokens to its keys and values inside its own `forward` (or reuses those of an
earlier call, in generation): a wrapper that gathers a block's weights around its forward, as FSDP does, then
covers every use of them.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention_backends import runnable_attention
from .common_layers import RMSNorm, SwiGLUMLP, eager_attention_forward
from .configuration_cross_attention_vlm import CrossAttentionVLMConfig


class CrossAttention(nn.Module):
    """Text queries (B, S, D) attend to precomputed image keys/values (B, H_kv, M, Dh); no positions, no rotary."""

    def __init__(self, config: CrossAttentionVLMConfig) -> None:
        super().__init__()
        text = config.text_config
        self.config = config
        self.num_heads = text.num_attention_heads
        self.num_key_value_heads = getattr(text, "num_key_value_heads", None) or self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(text.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(text.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(text.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, text.hidden_size, bias=False)

    def image_key_values(self, image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, D) visual tokens → keys and values, each (B, H_kv, M, Dh). Computed once per batch of images."""
        batch, num_tokens, _ = image_states.shape
        shape = (batch, num_tokens, self.num_key_value_heads, self.head_dim)
        # contiguous: not views, so that a wrapper hooking the block's outputs (FSDP) can hook them safely
        key = self.k_proj(image_states).view(shape).transpose(1, 2).contiguous()
        value = self.v_proj(image_states).view(shape).transpose(1, 2).contiguous()
        return key, value

    def forward(
        self, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        # the per-token image mask is 4-D: eager and sdpa take it; flash and flex attention fall back to sdpa
        implementation = runnable_attention(self.config, "cross-attention blocks", query, dense_mask=True)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, _ = attention_interface(
            self, query, key, value, attention_mask, is_causal=self.is_causal, scaling=self.scaling, dropout=0.0
        )
        output = output.reshape(batch, seq_len, self.num_heads * self.head_dim)  # (B, S, H * Dh)
        return self.o_proj(output)


class GatedCrossAttentionBlock(nn.Module):
    """h + tanh(attn_gate) · xattn(norm(h), images), then h + tanh(mlp_gate) · mlp(norm(h)).

    Both residual updates are multiplied by `has_image` (1 where the token sees at least one image), so a token
    that sees no image leaves the block exactly as it entered, whatever the gates.
    """

    def __init__(self, config: CrossAttentionVLMConfig) -> None:
        super().__init__()
        text = config.text_config
        eps = getattr(text, "rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(text.hidden_size, eps=eps)
        self.cross_attn = CrossAttention(config)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, eps=eps)
        self.mlp = SwiGLUMLP(
            input_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            output_size=text.hidden_size,
            hidden_act=text.hidden_act,
        )
        # scalars before tanh; their value comes from `_init_weights` (config.gate_init)
        self.attn_gate = nn.Parameter(torch.empty(1))
        self.mlp_gate = nn.Parameter(torch.empty(1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        has_image: torch.Tensor,
        image_states: torch.Tensor | None = None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Text (B, S, D) attends to the images: `image_states` (B, M, D), projected here, or the `key_value` this
        block returned for the same images before. `attention_mask` (B, 1, S, M) additive, `has_image` (B, S, 1).

        Returns the new hidden states (B, S, D) and the image (key, value) used, each (B, H_kv, M, Dh).
        """
        if (image_states is None) == (key_value is None):
            raise ValueError("GatedCrossAttentionBlock needs exactly one of image_states or key_value.")
        if key_value is None:
            # the connector may sit on another device or in another dtype than this block (device maps, autocast)
            weight = self.cross_attn.k_proj.weight
            key_value = self.cross_attn.image_key_values(image_states.to(hidden_states.device, weight.dtype))
        key, value = key_value
        attended = self.cross_attn(self.input_layernorm(hidden_states), key, value, attention_mask)
        hidden_states = hidden_states + (has_image * self.attn_gate.tanh()) * attended
        fed_forward = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + (has_image * self.mlp_gate.tanh()) * fed_forward, key_value


@dataclass
class CrossAttentionInputs:
    """Everything the fused decoder layers need for one forward call, built once per call by the VLM.

    blocks: the VLM's `cross_attention_blocks`; a fused layer runs `blocks[its cross_attention_index]`.
    image_states: (B, M, D) visual tokens, each sample's images one after the other.
    key_values: per block, the image (key, value) of an earlier call on the same images, or None: each block then
        projects `image_states` itself.
    attention_mask: (B, 1, S, M) additive: 0 where text token s may see image token m, the dtype's minimum elsewhere.
    has_image: (B, S, 1), 1 where text token s sees at least one image token, else 0.
    keep_key_values: record each block's (key, value) in `used_key_values` (block index → (key, value)) for a
        later call. Off in training: under activation checkpointing the references would keep them alive.
    """

    blocks: nn.ModuleList
    image_states: torch.Tensor
    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None
    attention_mask: torch.Tensor
    has_image: torch.Tensor
    keep_key_values: bool = True
    used_key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __call__(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        # decided by the inputs alone, so that a checkpointed layer recomputes exactly what it computed
        key_value = None if self.key_values is None else self.key_values[index]
        hidden_states, used = self.blocks[index](
            hidden_states,
            attention_mask=self.attention_mask,
            has_image=self.has_image,
            image_states=self.image_states if key_value is None else None,
            key_value=key_value,
        )
        if self.keep_key_values:
            self.used_key_values[index] = used
        return hidden_states

    def all_key_values(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
        """Every block's (key, value), in block order, once all blocks have run and kept them; else None."""
        if len(self.used_key_values) != len(self.blocks):
            return None
        return tuple(self.used_key_values[index] for index in range(len(self.blocks)))


class CrossAttentionFusion(GradientCheckpointingLayer):
    """Mixin of a fused decoder layer: run cross-attention block `cross_attention_index`, then the layer itself.

    Being a `GradientCheckpointingLayer`, the block is recomputed with the layer under gradient checkpointing.
    """

    cross_attention_index: int
    decoder_layer_class: type  # the class the layer had before fusion

    def forward(self, hidden_states: torch.Tensor, *args, cross_attention_inputs=None, **kwargs):
        if cross_attention_inputs is not None:
            hidden_states = cross_attention_inputs(self.cross_attention_index, hidden_states)
        return super().forward(hidden_states, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        # generated classes are not importable by name: pickle (and deepcopy) rebuild them from the layer class
        return _new_fused_layer, (self.decoder_layer_class,), self.__dict__

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [super().extra_repr(), f"cross_attention_index={self.cross_attention_index}"]))


_FUSED_CLASSES: dict[type, type] = {}


def fused_layer_class(decoder_layer_class: type) -> type:
    """`CrossAttention<LayerClass>`: `decoder_layer_class` with a cross-attention block run before it (cached)."""
    if issubclass(decoder_layer_class, CrossAttentionFusion):
        raise ValueError(f"{decoder_layer_class.__name__} is already fused with a cross-attention block.")
    if decoder_layer_class not in _FUSED_CLASSES:
        name = f"CrossAttention{decoder_layer_class.__name__}"
        namespace = {"__module__": __name__, "__qualname__": name, "decoder_layer_class": decoder_layer_class}
        _FUSED_CLASSES[decoder_layer_class] = type(name, (CrossAttentionFusion, decoder_layer_class), namespace)
    return _FUSED_CLASSES[decoder_layer_class]


def _new_fused_layer(decoder_layer_class: type) -> nn.Module:
    cls = fused_layer_class(decoder_layer_class)
    return cls.__new__(cls)


def fuse_cross_attention(decoder_layer: nn.Module, cross_attention_index: int) -> nn.Module:
    """Make `decoder_layer` run cross-attention block `cross_attention_index` before itself, in place.

    Its parameters, buffers, attribute path and state-dict keys are untouched; it stays an instance of its class.
    """
    decoder_layer.__class__ = fused_layer_class(type(decoder_layer))
    decoder_layer.cross_attention_index = cross_attention_index
    return decoder_layer


__all__ = [
    "CrossAttention",
    "CrossAttentionFusion",
    "CrossAttentionInputs",
    "GatedCrossAttentionBlock",
    "fuse_cross_attention",
    "fused_layer_class",
]
