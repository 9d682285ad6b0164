"""Freezing and LoRA policies per backbone (Idefics2 paper, section 3.3, Findings 2 and 3).

Unfreezing the backbones of the fully autoregressive model can make training diverge; LoRA on them adds
expressivity and keeps it stable, and the cross-attention fusion does best with frozen backbones. So each backbone
— the vision encoder and the language model — gets its own policy, `frozen`, `lora` or `full`; the parts that are
new in a VLM (the connector and the cross-attention blocks) always train.

LoRA goes through PEFT with our explicit target patterns (never a parallel LoRA implementation). The three image
tokens are new rows of the LM's vocabulary: with a frozen or LoRA-adapted LM their embedding (and `lm_head`) rows
train through PEFT's trainable tokens, so the model can learn to read `<fake_token_around_image>`/`<image>` and to
emit `<end_of_utterance>`.
"""

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers.utils import logging

from vlmforge.modeling.parameter_breakdown import parameter_breakdown

logger = logging.get_logger(__name__)

POLICIES = ("frozen", "lora", "full")

# Explicit default LoRA targets, as full-name regexes (PEFT `target_modules` given as a string is a fullmatch).
# They name only the backbones' own layers: the connector and the cross-attention blocks also have q_proj/…/down_proj
# modules, but those train fully and must not get adapters.
TEXT_LORA_TARGETS = (
    r"(.*\.)?text_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)
VISION_LORA_TARGETS = (
    r"(.*\.)?vision_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
)

# parts of the model a policy speaks of → attributes of the base model (`lm_head` sits on the wrapper)
_ALWAYS_TRAIN = ("connector", "cross_attention_blocks")


def unwrap(model: nn.Module) -> nn.Module:
    """The vlmforge `*ForConditionalGeneration` (or `*Model`) inside a PEFT / DDP / compiled wrapper."""
    while True:
        if hasattr(model, "get_base_model") and model.get_base_model() is not model:
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DistributedDataParallel
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """`{"vision_encoder", "connector", "cross_attention", "language_model", "lm_head"}` → module (the ones present).

    Looked up on the unwrapped model, so modules PEFT inserted (LoRA, trainable tokens) belong to the part they sit in.
    """
    vlm = unwrap(model)
    base = getattr(vlm, "model", vlm)
    names = {
        "vision_encoder": "vision_model",
        "connector": "connector",
        "cross_attention": "cross_attention_blocks",
        "language_model": "text_model",
    }
    parts = {part: getattr(base, attribute) for part, attribute in names.items() if hasattr(base, attribute)}
    missing = {"vision_encoder", "connector", "language_model"} - set(parts)
    if missing:
        raise TypeError(
            f"{type(vlm).__name__} is not a vlmforge VLM: it lacks {sorted(missing)} (expected `vision_model`, "
            "`connector` and `text_model` on the base model)."
        )
    if isinstance(getattr(vlm, "lm_head", None), nn.Module):
        parts["lm_head"] = vlm.lm_head
    return parts


def named_parameters_by_part(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter of `model` (names as `model.named_parameters()` gives them) under the part that holds it:
    vision_encoder, connector, cross_attention, language_model (lm_head included) or other."""
    owner = {}
    for part, module in model_parts(model).items():
        part = "language_model" if part == "lm_head" else part
        for parameter in module.parameters():
            owner.setdefault(id(parameter), part)
    grouped: dict[str, list] = {"vision_encoder": [], "connector": [], "cross_attention": [], "language_model": []}
    for name, parameter in model.named_parameters():
        grouped.setdefault(owner.get(id(parameter), "other"), []).append((name, parameter))
    return grouped


def special_token_ids(processor) -> list[int]:
    """The ids of `<fake_token_around_image>`, `<image>` and `<end_of_utterance>` in a `VLMProcessor`'s tokenizer."""
    return sorted({processor.fake_image_token_id, processor.image_token_id, processor.end_of_utterance_token_id})


def apply_training_policy(
    model: nn.Module,
    *,
    vision: str = "frozen",
    text: str = "lora",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str | Sequence[str] | None = None,
    new_token_ids: Iterable[int] | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Set what trains: the vision encoder per `vision`, the LM (and `lm_head`) per `text`, each `"frozen"`,
    `"lora"` or `"full"`; the connector and the cross-attention blocks always train.

    Args:
        model: a vlmforge `*ForConditionalGeneration` (either fusion), not yet wrapped by PEFT.
        lora_r, lora_alpha, lora_dropout: the LoRA adapters' rank, scale and dropout.
        target_modules: PEFT `target_modules` replacing the defaults (`TEXT_LORA_TARGETS` and, with
            `vision="lora"`, `VISION_LORA_TARGETS`: the LM's q/k/v/o and gate/up/down projections, the encoder's
            q/k/v/out projections and fc1/fc2).
        new_token_ids: vocabulary rows that train although the LM does not (`text` frozen or lora): pass
            `special_token_ids(processor)`; defaults to the config's `image_token_id` alone, with a warning.
        verbose: also print the summary that is logged (modules with adapters, trainable parameters per part).

    Returns:
        A `peft.PeftModel` when any LoRA or trainable-token rows are used, else `model` itself (frozen in place).
        Note that `PeftModel.save_pretrained` saves the adapters and token rows; the connector, the cross-attention
        blocks and any `full` backbone train outside PEFT — save them with the base model (or merge the adapters
        and save the whole model).
    """
    for name, value in (("vision", vision), ("text", text)):
        if value not in POLICIES:
            raise ValueError(f"{name}={value!r} is not a policy; expected one of {POLICIES}.")
    if hasattr(model, "peft_config"):
        raise ValueError("The model is already wrapped by PEFT; apply the training policy to the bare vlmforge model.")
    parts = model_parts(model)
    config = unwrap(model).config

    model.requires_grad_(False)
    trainable_parts = ["connector", "cross_attention"]
    if vision == "full":
        trainable_parts.append("vision_encoder")
    if text == "full":
        trainable_parts += ["language_model", "lm_head"]
    for part in trainable_parts:
        if part in parts:
            parts[part].requires_grad_(True)

    peft_config = _peft_config(
        config,
        vision=vision,
        text=text,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        new_token_ids=new_token_ids,
        has_lm_head="lm_head" in parts,
    )
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
        # PEFT freezes everything but its own parameters: the always-trained and `full` parts train again
        for part in trainable_parts:
            if part in parts:
                parts[part].requires_grad_(True)

    summary = policy_summary(model, vision=vision, text=text)
    logger.info(summary)
    if verbose:
        print(summary)
    return model


def _peft_config(config, *, vision, text, lora_r, lora_alpha, lora_dropout, target_modules, new_token_ids, has_lm_head):
    """The PEFT config a policy needs: LoRA (with trainable token rows), trainable tokens alone, or None."""
    token_rows = None
    if text != "full":
        if new_token_ids is None:
            logger.warning(
                "apply_training_policy: no new_token_ids given; only the <image> row (image_token_id="
                f"{config.image_token_id}) will train. Pass new_token_ids=special_token_ids(processor) so that "
                "<fake_token_around_image> and <end_of_utterance> train too."
            )
            new_token_ids = [config.image_token_id]
        token_rows = sorted({int(i) for i in new_token_ids})
        vocab_size = config.get_text_config().vocab_size
        if not token_rows or any(not 0 <= i < vocab_size for i in token_rows):
            raise ValueError(f"new_token_ids={token_rows} must be non-empty ids in [0, vocab_size={vocab_size}).")
    targets = ["embed_tokens", "lm_head"] if has_lm_head else ["embed_tokens"]

    if "lora" in (vision, text):
        from peft import LoraConfig

        if target_modules is None:
            wanted = ((TEXT_LORA_TARGETS, text == "lora"), (VISION_LORA_TARGETS, vision == "lora"))
            patterns = [pattern for pattern, on in wanted if on]
            target_modules = "|".join(f"(?:{p})" for p in patterns)
        return LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules,
            trainable_token_indices=None if token_rows is None else {name: token_rows for name in targets},
        )
    if token_rows is not None:
        from peft import TrainableTokensConfig

        return TrainableTokensConfig(target_modules=targets, token_indices=token_rows)
    return None


def adapter_module_names(model: nn.Module) -> list[str]:
    """Names (relative to the vlmforge model) of the modules holding LoRA adapters or trainable token rows."""
    vlm = unwrap(model)
    names = []
    for name, module in vlm.named_modules():
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A", {})):
            names.append(name)
        elif hasattr(module, "trainable_tokens_delta") and len(getattr(module, "trainable_tokens_delta", {})):
            names.append(re.sub(r"\.token_adapter$", "", name))
    return names


def policy_summary(model: nn.Module, *, vision: str, text: str) -> str:
    """What a policy did, in a few lines: adapter modules (layer indices folded) and trainable parameters per part."""
    adapters = adapter_module_names(model)
    folded = sorted(set(re.sub(r"\.\d+\.", ".*.", name) for name in adapters))
    layers = {name: sum(1 for a in adapters if re.sub(r"\.\d+\.", ".*.", a) == name) for name in folded}
    lines = [f"Training policy: vision={vision}, text={text}; connector and cross-attention blocks train."]
    if adapters:
        lines.append(f"Adapters (LoRA / trainable token rows) on {len(adapters)} modules:")
        lines += [f"  {name}  (×{count})" for name, count in layers.items()]
    else:
        lines.append("Adapters: none.")
    breakdown = parameter_breakdown(unwrap(model))
    trainable = breakdown.num_trainable
    total = breakdown.num_parameters
    lines.append(f"Trainable parameters: {trainable:,} of {total:,} ({trainable / max(total, 1):.2%})")
    lines.append(str(breakdown))
    return "\n".join(lines)


def parameter_groups(
    model: nn.Module, *, connector_lr: float, backbone_lr: float, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups: the connector and cross-attention blocks at `connector_lr`, everything else that
    trains (LoRA adapters, token rows, `full` backbones) at `backbone_lr`. Weight decay applies to matrices only
    (not to biases, norms, gates or the trainable-token deltas).

    Use: `optimizer = torch.optim.AdamW(parameter_groups(model, connector_lr=1e-4, backbone_lr=1e-5))`, then
    `Trainer(..., optimizers=(optimizer, None))`.
    """
    groups: dict[tuple[str, bool], list] = {}
    for part, named in named_parameters_by_part(model).items():
        fast = part in ("connector", "cross_attention")
        for name, parameter in named:
            if not parameter.requires_grad:
                continue
            decay = parameter.ndim >= 2 and "trainable_tokens_delta" not in name
            groups.setdefault((("connector" if fast else "backbone"), decay), []).append(parameter)
    result = []
    for (kind, decay), params in sorted(groups.items()):
        result.append(
            {
                "params": params,
                "lr": connector_lr if kind == "connector" else backbone_lr,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{kind}{'' if decay else '_no_decay'}",
            }
        )
    if not result:
        raise ValueError("No parameter of the model requires a gradient; apply a training policy first.")
    return result


def trainable_parameter_names(model: nn.Module) -> dict[str, set[str]]:
    """Per part, the names of the parameters that require a gradient (handy for checks and logs)."""
    return {
        part: {name for name, parameter in named if parameter.requires_grad}
        for part, named in named_parameters_by_part(model).items()
    }


__all__ = [
    "POLICIES",
    "TEXT_LORA_TARGETS",
    "VISION_LORA_TARGETS",
    "adapter_module_names",
    "apply_training_policy",
    "model_parts",
    "named_parameters_by_part",
    "parameter_groups",
    "policy_summary",
    "special_token_ids",
    "trainable_parameter_names",
    "unwrap",
]
