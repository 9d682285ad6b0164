"""Building blocks shared by the vision encoder, the connector and the fusion modules.

`eager_attention_forward` is the reference attention every backend is checked against; `sdpa` and the flash
kernels come from transformers' `ALL_ATTENTION_FUNCTIONS`, dispatched on `config._attn_implementation`.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN


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
