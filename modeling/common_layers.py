"""Building blocks shared by the vision encoder, the connector and the fusion modules.

Attention. `eager_attention_forward` is the reference every backend is checked against; `sdpa`, `flex_attention`
and the flash kernels come from transformers' `ALL_ATTENTION_FUNCTIONS`, dispatched on
`config._attn_implementation` (which backend can run where: `attention_backends.py`; several images packed into one
sequence: `packed_sequences.py`).

Half precision. `Float32LayerNorm` normalises in float32; the vision encoder also keeps its residual stream in
float32 when it computes in float16 (`residual_dtype`). Both are no-ops in float32.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN

HALF_DTYPES = (torch.float16, torch.bfloat16)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Expand grouped key/value heads: (B, kv_heads, S, D) → (B, kv_heads * n_rep, S, D)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. q: (B, H, Sq, D), k/v: (B, H_kv, Sk, D), additive mask (B, 1, Sq, Sk).

    Returns the output as (B, Sq, H, D) and the attention probabilities (B, H, Sq, Sk).
    """
    n_rep = getattr(module, "num_key_value_groups", 1)
    key = repeat_kv(key, n_rep)
    value = repeat_kv(value, n_rep)

    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Sq, Sk)
    if attention_mask is not None:
        scores = scores + attention_mask
    # softmax in float32: bf16 scores over long image sequences otherwise lose the small probabilities
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, Sq, H, D)
    return output, probs


# --- layers ---------------------------------------------------------------------------------------------------


def residual_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The residual stream's dtype for layers computing in `compute_dtype`: float32 for float16, whose 65504
    ceiling the summed residual of a deep SigLIP-style encoder can pass; unchanged otherwise (bfloat16 has
    float32's range)."""
    return torch.float32 if compute_dtype == torch.float16 else compute_dtype


class Float32LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` computed in float32 and returned in its weight's dtype (the dtype of the layer it feeds).

    In float16 the mean and variance of large activations overflow, and the input may be a float32 residual
    stream (`residual_dtype`); in float32 and bfloat16 (whose statistics torch accumulates in float32, with no
    round trip through copies) this is exactly `nn.LayerNorm`.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == self.weight.dtype != torch.float16:
            return super().forward(hidden_states)  # float32, or bfloat16 (torch accumulates it in float32 already)
        normed = nn.functional.layer_norm(
            hidden_states.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        )
        return normed.to(self.weight.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled by a learned weight (initialised to ones)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class SwiGLUMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`, bias-free: the modality projection and the perceiver's MLP."""

    def __init__(self, *, input_size: int, intermediate_size: int, output_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(input_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(input_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, output_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
