"""Variable-length attention over several sequences (the real patches of several images) packed into one.

On CUDA this is FlashAttention's varlen kernel (transformers' flash backend with `cu_seqlens`, or torch's
`varlen_attn` for sdpa in half precision); elsewhere each sequence attends on its own, which is exact.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function
from transformers.utils import logging
from transformers.utils.generic import is_flash_attention_requested

from .common_layers import HALF_DTYPES

try:
    from torch.nn.attention.varlen import varlen_attn  # FlashAttention's variable-length kernel (torch 2.13 has it)
except ImportError:
    varlen_attn = None

logger = logging.get_logger(__name__)


@dataclass
class PackedSequences:
    """N sequences of different lengths packed one after another into a (1, T, ...) batch.

    cu_seqlens: (N + 1,) int32, the boundaries: sequence i is rows cu_seqlens[i] : cu_seqlens[i + 1].
    lengths: the N lengths, on the host (splitting needs them there; read once, not at every layer).
    """

    cu_seqlens: torch.Tensor
    lengths: list[int]

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "PackedSequences":
        """From a (N, S) bool mask whose True entries are the tokens to pack, sequence by sequence."""
        lengths = mask.sum(dim=1)  # (N,)
        cu_seqlens = nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(cu_seqlens=cu_seqlens, lengths=lengths.tolist())

    def to(self, device, non_blocking: bool = False) -> "PackedSequences":
        """On `device` (what device-map hooks call to move a layer's inputs)."""
        return PackedSequences(self.cu_seqlens.to(device, non_blocking=non_blocking), self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)

    def sequence_ids(self) -> torch.Tensor:
        """(1, T) long: which sequence each packed token belongs to."""
        device = self.cu_seqlens.device
        counts = torch.tensor(self.lengths, device=device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), counts)[None]

    def block_diagonal_mask(self, config, packed: torch.Tensor):
        """transformers' mask for `config`'s backend that keeps each sequence to itself; `packed` (1, T, D).

        Used for flex attention, whose block mask skips the off-diagonal blocks entirely.
        """
        same_sequence = packed_sequence_mask_function(self.sequence_ids())
        return create_bidirectional_mask(
            config=config, inputs_embeds=packed, attention_mask=None, and_mask_function=same_sequence
        )

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, T, D) → (N, max_seqlen, D), each sequence right-padded with zeros, and the (N, max_seqlen) bool mask
        of its real rows."""
        padded = nn.utils.rnn.pad_sequence(list(packed[0].split(self.lengths)), batch_first=True)
        positions = torch.arange(padded.shape[1], device=packed.device)
        mask = positions[None, :] < torch.tensor(self.lengths, device=packed.device)[:, None]
        return padded, mask

    def kernel(self, implementation: str, query: torch.Tensor, dropout: float) -> str:
        """How `attend` runs: "flash_varlen" (transformers' flash backend with `cu_seqlens`), "varlen_attn"
        (torch's FlashAttention varlen kernel: sdpa on CUDA in half precision) or "per_sequence" (the backend on
        each sequence in turn: exact, for CPU, float32 and eager)."""
        if is_flash_attention_requested(requested_attention_implementation=implementation):
            return "flash_varlen"
        if implementation == "sdpa" and _varlen_attn_can_run(query, dropout):
            return "varlen_attn"
        return "per_sequence"

    def attend(
        self,
        module: nn.Module,
        attention_interface: Callable,
        implementation: str,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scaling: float,
        dropout: float,
        **kwargs,
    ) -> torch.Tensor:
        """Bidirectional attention within each sequence: q/k/v (1, H, T, Dh) → (1, T, H, Dh)."""
        kernel = self.kernel(implementation, query, dropout)
        logger.info_once(f"packed variable-length attention runs {kernel!r}.")
        if kernel == "flash_varlen":
            output, _ = attention_interface(
                module,
                query,
                key,
                value,
                None,
                is_causal=False,
                scaling=scaling,
                dropout=dropout,
                cu_seq_lens_q=self.cu_seqlens,
                cu_seq_lens_k=self.cu_seqlens,
                max_length_q=self.max_seqlen,
                max_length_k=self.max_seqlen,
                **kwargs,
            )
            return output
        if kernel == "varlen_attn":
            # (1, H, T, Dh) → (T, H, Dh), the varlen layout
            q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))
            max_len = self.max_seqlen
            return varlen_attn(q, k, v, self.cu_seqlens, self.cu_seqlens, max_len, max_len, scale=scaling)[None]
        outputs = [
            attention_interface(module, q, k, v, None, is_causal=False, scaling=scaling, dropout=dropout, **kwargs)[0]
            for q, k, v in zip(*(tensor.split(self.lengths, dim=2) for tensor in (query, key, value)))
        ]
        return torch.cat(outputs, dim=1)  # (1, T, H, Dh)


def _varlen_attn_can_run(query: torch.Tensor, dropout: float) -> bool:
    """torch's varlen kernel: CUDA, half precision, no dropout, FlashAttention's head sizes and GPUs (sm80+)."""
    if varlen_attn is None or not query.is_cuda or query.dtype not in HALF_DTYPES or dropout > 0:
        return False
    head_dim = query.shape[-1]
    return head_dim % 8 == 0 and head_dim <= 256 and torch.cuda.get_device_capability(query.device) >= (8, 0)
