"""Which attention backend each of our modules runs (vision encoder, perceiver, cross-attention blocks).

`runnable_attention` turns a requested backend into one that can run on the tensors at hand: a backend that cannot
(a flash kernel on CPU tensors or in float32; flash or flex attention under a per-token mask; flex attention with
attention dropout) becomes `sdpa`, with one warning — never an error deep inside a kernel, never silently wrong
numbers. `SdpaFallbackAtLoad` does the same for flash requests that transformers refuses at load time.
"""

import torch
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging
from transformers.utils.generic import is_flash_attention_requested

from .common_layers import HALF_DTYPES

logger = logging.get_logger(__name__)


def _why_not_runnable(requested: str, hidden_states: torch.Tensor, dropout: float, dense_mask: bool) -> str | None:
    """Why `requested` cannot attend over `hidden_states` (the attention's input dtype and device); None if it can."""
    if is_flash_attention_requested(requested_attention_implementation=requested):
        if dense_mask:
            return "flash kernels cannot take a per-token (4-D) attention mask"
        if hidden_states.device.type != "cuda":
            return f"flash kernels need CUDA tensors, these are on {hidden_states.device.type}"
        if hidden_states.dtype not in HALF_DTYPES and not torch.is_autocast_enabled("cuda"):
            return f"flash kernels need float16 or bfloat16, these are {hidden_states.dtype}"
    if requested == "flex_attention":
        if dense_mask:
            # flex would add it as a dense score mask: no block to skip, nothing gained over sdpa (and torch 2.13's
            # compiled CPU kernel corrupts memory on such a captured mask)
            return "a per-token (4-D) attention mask leaves flex attention no blocks to skip"
        if dropout > 0:
            return "flex_attention has no attention dropout"
    return None


def runnable_attention(
    config, part: str, hidden_states: torch.Tensor, *, dropout: float = 0.0, dense_mask: bool = False
) -> str:
    """The attention backend `part` runs: `config._attn_implementation` if it can run here, else `sdpa`.

    Args:
        part: the module family, as named in the log ("vision encoder", "perceiver", "cross-attention blocks").
        hidden_states: a tensor of the attention's input dtype and device.
        dropout: the attention dropout of this call (0 in eval).
        dense_mask: the call takes a per-token 4-D mask (flash kernels take padding masks only, flex attention
            gains only from block masks).

    A fallback is warned once and the effective choice logged once per part and backend (transformers'
    `warning_once`/`info_once`), not at every layer and call. Deterministic in its arguments, so a model's mask
    builder and its attention layers, asking with the same tensors, agree.
    """
    requested = config._attn_implementation
    reason = _why_not_runnable(requested, hidden_states, dropout, dense_mask)
    effective = requested if reason is None else "sdpa"
    if reason is not None:
        logger.warning_once(
            f"{part}: attn_implementation={requested!r} cannot run here ({reason}); falling back to 'sdpa'."
        )
    logger.info_once(f"{part}: attention runs {effective!r}.")
    return effective


def bidirectional_mask(config, implementation: str, queries: torch.Tensor, key_mask: torch.Tensor):
    """The mask `implementation` takes for queries attending to every real key.

    Args:
        queries: (B, Sq, D), for the batch size, query length, dtype and device.
        key_mask: (B, Sk) bool, True on real keys.

    Returns transformers' mask for the configured backend (`create_bidirectional_mask`), or, after a fallback to
    sdpa (see `runnable_attention`), sdpa's boolean (B, 1, 1, Sk) mask — None when no key is padding.
    """
    if implementation == config._attn_implementation:
        return create_bidirectional_mask(config=config, inputs_embeds=queries, attention_mask=key_mask)
    return None if bool(key_mask.all()) else key_mask[:, None, None, :]


class SdpaFallbackAtLoad:
    """Mixin for our own `PreTrainedModel`s (vision encoder, connector): a flash backend that transformers refuses
    at load or `set_attn_implementation` time (flash-attn not installed, no GPU) becomes `sdpa`, with one warning.

    transformers raises instead (`_flash_attn_can_dispatch`), which is right for the language model, whose
    kernels we do not touch — so a plain `attn_implementation="flash_attention_2"` still raises there — but a
    per-sub-config request such as `{"vision_config": "flash_attention_2", ...}` should not stop a model from loading.
    """

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        try:
            return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)
        except (ImportError, ValueError) as error:
            return self._sdpa_instead_of(attn_implementation, error)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        try:
            return super().get_correct_attn_implementation(requested_attention, is_init_check)
        except (ImportError, ValueError) as error:
            return self._sdpa_instead_of(requested_attention, error)

    def _sdpa_instead_of(self, requested: str | None, error: Exception) -> str:
        if not is_flash_attention_requested(requested_attention_implementation=requested):
            raise error
        logger.warning_once(
            f"{type(self).__name__}: attn_implementation={requested!r} cannot be used ({error}); "
            "falling back to 'sdpa'."
        )
        return "sdpa"
