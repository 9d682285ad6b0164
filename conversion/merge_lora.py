"""Merge a PEFT LoRA adapter into its base VLM and save the full checkpoint (Idefics2 paper, Finding 3).

LoRA on the backbones is how the paper keeps the fully autoregressive model stable when its backbones train; for
deployment the low-rank updates are folded into the weights (`W ← W + (alpha / r) · B A`), so the model runs at the
base model's speed and loads without PEFT. `merge_lora(base, adapter, out)`:

1. loads the base checkpoint (with its processor) and the adapter on top of it, and records the logits of
   base + adapter on a probe input: the real photograph in `vlmforge/assets/` under the processor's chat template;
2. merges (`merge_and_unload`) and saves the full checkpoint — weights, processor, chat template, and a
   generation config that stops at `<end_of_utterance>` — into a temporary folder beside `out`;
3. reloads that folder and checks its logits against step 1; only then renames it to `out`.

The check's tolerance, with tol = 1e-4 in float32 and 2e-2 in float16/bfloat16 (merging reorders the float
arithmetic: `x (W + s·BA)` instead of `x W + s·(x A) B`): elementwise
|merged − (base + adapter)| ≤ tol · max(1, max |base + adapter|) + tol · |base + adapter|.
"""

from __future__ import annotations

import gc
from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging

from vlmforge.conversion.checkpoint_io import atomic_output_dir, check_destination, weight_files
from vlmforge.conversion.generation_config import chat_generation_config

logger = logging.get_logger(__name__)

PROBE_IMAGE = "assets/grace_hopper.jpg"  # inside the vlmforge package
PROBE_QUESTION = "Describe the picture in one sentence."
# relative tolerance (and absolute, per unit of the largest logit) of the reload check, by dtype
TOLERANCES = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _adapter_files(adapter: Path, *, allow_pickle: bool) -> None:
    """Refuse an adapter folder without a config or weights, or with only pickled weights (unless opted in)."""
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{adapter} is not a PEFT adapter folder: it has no adapter_config.json.")
    if (adapter / "adapter_model.safetensors").is_file():
        return
    if not (adapter / "adapter_model.bin").is_file():
        raise ValueError(f"{adapter} holds no adapter weights: expected adapter_model.safetensors.")
    if not allow_pickle:
        raise ValueError(
            f"{adapter} holds only pickled adapter weights (adapter_model.bin). Unpickling can run arbitrary code; "
            "convert them to safetensors, or pass allow_pickle=True if you trust their origin."
        )


def probe_inputs(processor) -> dict[str, torch.Tensor]:
    """The reload check's input: the real photograph and a question under the processor's chat template."""
    with resources.as_file(resources.files("vlmforge").joinpath(PROBE_IMAGE)) as path, Image.open(path) as image:
        image = image.convert("RGB")
    content = [{"type": "image", "image": image}, {"type": "text", "text": PROBE_QUESTION}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float()


def check_logits(merged: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise ValueError if the merged model's logits are not base + adapter's within the module's tolerance."""
    tolerance = TOLERANCES.get(dtype, 2e-2)
    atol = tolerance * max(1.0, reference.abs().max().item())
    difference = (merged - reference).abs()
    if merged.shape != reference.shape or bool((difference > atol + tolerance * reference.abs()).any()):
        worst = difference.max().item() if merged.shape == reference.shape else float("nan")
        raise ValueError(
            f"The merged checkpoint's logits differ from base + adapter's by up to {worst:.3g} (allowed: {atol:.3g} + "
            f"{tolerance:g}·|logit|, dtype {dtype}); nothing was written. Is the adapter made for this base model?"
        )


def merge_lora(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Merge the PEFT LoRA `adapter` into the vlmforge checkpoint `base`; write the full checkpoint to `out`.

    Args:
        base: a vlmforge checkpoint folder with its processor (as `vlmforge build`, `convert` or training write).
        adapter: a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) trained on `base`.
        out: the folder to create; absent or empty unless `overwrite`.
        max_shard_size: largest safetensors shard of the merged weights.
        overwrite: replace a non-empty `out` (only once the new checkpoint has passed its check).
        allow_pickle: accept pickled `.bin` weights for the base or the adapter (trusted sources only).

    Returns:
        `out` as a `Path`.

    Raises:
        ValueError: `out` is not empty (without `overwrite`); pickled weights without `allow_pickle`; `base` has no
            processor; the reloaded merged checkpoint's logits are not base + adapter's (see the module docstring
            for the tolerance) — in which case nothing is written.
    """
    from peft import PeftModel  # only merging needs PEFT

    base, adapter, out = Path(base), Path(adapter), Path(out)
    check_destination(out, overwrite=overwrite)
    weight_files(base, allow_pickle=allow_pickle)  # refuses pickled base weights early
    _adapter_files(adapter, allow_pickle=allow_pickle)
    if not (base / "processor_config.json").is_file():
        raise ValueError(f"{base} has no processor (processor_config.json); the merged checkpoint needs one.")
    processor = AutoProcessor.from_pretrained(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype="auto", use_safetensors=not allow_pickle).eval()
    dtype = model.dtype
    model = PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()
    inputs = probe_inputs(processor)
    reference = _logits(model, inputs)  # base + adapter, unmerged
    merged = model.merge_and_unload()
    merged.generation_config = chat_generation_config(processor.tokenizer, merged.generation_config)
    logger.info(f"Merged LoRA adapter {adapter} into {base}.")

    with atomic_output_dir(out, overwrite=overwrite) as staging:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)  # tokenizer, processor config, chat template
        del model, merged
        gc.collect()
        reloaded = AutoModelForImageTextToText.from_pretrained(staging, dtype="auto").eval()
        check_logits(_logits(reloaded, inputs), reference, dtype)
    logger.info(f"Wrote the merged checkpoint {out}; its logits match base + adapter.")
    return out


__all__ = ["TOLERANCES", "check_logits", "merge_lora", "probe_inputs"]
