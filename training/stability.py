"""Training stability checks (Idefics2 paper, section 3.3, Finding 3: unfreezing the backbones of the fully
autoregressive model can diverge).

- `GradNormPerPartCallback`: logs the gradient norm of each part — vision encoder, connector, cross-attention
  blocks, language model — so a diverging part shows before the loss does.
- `NonFiniteLossCallback`: stops training at the first NaN/inf loss, before the optimizer step writes it into the
  weights, with a message that names the step. (Trainer's `logging_nan_inf_filter`, on by default, would otherwise
  hide such a loss from the logs.)
- Activation (gradient) checkpointing is non-reentrant by default: the models' `activation_checkpointing_enable`
  adds `use_reentrant=False` unless told otherwise, which is what Trainer calls; `enable_activation_checkpointing`
  does the same for a PEFT-wrapped model and `uses_reentrant_checkpointing` checks it.
"""

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from .policies import named_parameters_by_part, unwrap

logger = logging.get_logger(__name__)

GRAD_NORM_PREFIX = "grad_norm/"


class NonFiniteLossError(RuntimeError):
    """Raised by `NonFiniteLossCallback` when the training loss is NaN or infinite."""


class GradNormPerPartCallback(TrainerCallback):
    """Add `grad_norm/<part>` (L2 norm of the gradients of the part's trainable parameters) to Trainer's logs.

    Parts: vision_encoder, connector, cross_attention, language_model (its `lm_head`, LoRA adapters and token rows
    included); parts with nothing to train are left out. Norms are measured just before the optimizer step, i.e.
    after Trainer clipped the gradients to `max_grad_norm` (Trainer's own `grad_norm` is the norm before clipping).
    Under DDP the gradients are already averaged across ranks; with FSDP/DeepSpeed each rank sees its own shards.
    """

    def __init__(self) -> None:
        self.latest: dict[str, float] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        step = state.global_step + 1  # the step this optimizer update completes
        if args.logging_steps and step % max(int(args.logging_steps), 1) and step != 1:
            return  # only the steps that will be logged
        self.latest = grad_norms_per_part(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.latest or logs is None or "loss" not in logs:
            return
        values = {f"{GRAD_NORM_PREFIX}{part}": norm for part, norm in self.latest.items()}
        logs.update(values)
        if state.log_history:  # Trainer appended a copy of `logs` before calling us
            state.log_history[-1].update(values)
        self.latest = {}


def grad_norms_per_part(model: nn.Module) -> dict[str, float]:
    """{part: L2 norm of its parameters' gradients} over the parts with trainable parameters (0.0 if no grads yet)."""
    norms = {}
    for part, named in named_parameters_by_part(model).items():
        grads = [p.grad.detach() for _, p in named if p.requires_grad and p.grad is not None]
        if not any(p.requires_grad for _, p in named):
            continue
        norms[part] = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
            if grads
            else 0.0
        )
    return norms


class NonFiniteLossCallback(TrainerCallback):
    """Stop training at the first non-finite loss: raise `NonFiniteLossError` naming the step (1-based, as Trainer
    counts and logs steps) and the epoch, before the optimizer step can write NaNs into the weights.

    The loss is read from each training forward pass (a forward hook on the model Trainer trains), so it is caught
    even when Trainer's `logging_nan_inf_filter` keeps it out of the logs.
    """

    def __init__(self) -> None:
        self._handle = None
        self._state = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._state = state
        if model is not None and self._handle is None:
            self._handle = model.register_forward_hook(self._check)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _check(self, module, args, output):
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None or bool(torch.isfinite(loss.detach()).all()):
            return
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        state = self._state
        step = state.global_step + 1 if state is not None else "?"
        epoch = f"{state.epoch:.2f}" if state is not None and state.epoch is not None else "?"
        value = loss.detach().float()
        value = value.item() if value.numel() == 1 else value.tolist()
        raise NonFiniteLossError(
            f"Non-finite training loss ({value}) at step {step} (epoch {epoch}): training stopped before the "
            "optimizer step. Likely causes: a learning rate too high for an unfrozen backbone (try LoRA or a lower "
            "backbone learning rate), fp16 overflow (use bf16), or a batch whose labels are all -100 with a loss "
            "normalised by zero tokens. Resume from the last checkpoint after fixing it."
        )


def enable_activation_checkpointing(model: nn.Module, **checkpoint_kwargs) -> nn.Module:
    """Turn on activation checkpointing of a vlmforge model (also inside PEFT), non-reentrant unless
    `use_reentrant=True` is passed. Returns `model`."""
    unwrap(model).activation_checkpointing_enable({"use_reentrant": False, **checkpoint_kwargs})
    return model


def uses_reentrant_checkpointing(model: nn.Module) -> bool | None:
    """Whether the model's checkpointed layers use reentrant checkpointing; None if checkpointing is off."""
    for module in unwrap(model).modules():
        if getattr(module, "gradient_checkpointing", False):
            func = getattr(module, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", {}) or {}
            return bool(keywords.get("use_reentrant", True))
    return None


__all__ = [
    "GRAD_NORM_PREFIX",
    "GradNormPerPartCallback",
    "NonFiniteLossCallback",
    "NonFiniteLossError",
    "enable_activation_checkpointing",
    "grad_norms_per_part",
    "uses_reentrant_checkpointing",
]
