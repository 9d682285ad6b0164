"""Parameters per part of a VLM (Idefics2 paper, Finding 2: cross-attention costs more parameters than the fully
autoregressive fusion for the same backbones; Table 1's "trainable parameters" depend on what is frozen).

Works on both fusions, with or without the LM head, by the checkpoint names every vlmforge model shares:
`vision_model`, `connector`, `cross_attention_blocks` (cross-attention fusion only), `text_model`, `lm_head`.
"""

from dataclasses import dataclass, field

from torch import nn

# part name → attribute of the base model (`lm_head` lives on the *ForConditionalGeneration wrapper)
PARTS = {
    "vision_encoder": "vision_model",
    "connector": "connector",
    "cross_attention": "cross_attention_blocks",
    "language_model": "text_model",
    "lm_head": "lm_head",
}


@dataclass(frozen=True)
class ParameterBreakdown:
    """`total[part]` and `trainable[part]` parameter counts; a tied `lm_head` counts 0 (its weight is the LM's)."""

    total: dict[str, int] = field(default_factory=dict)
    trainable: dict[str, int] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(self.total.values())

    @property
    def num_trainable(self) -> int:
        return sum(self.trainable.values())

    def __str__(self) -> str:
        width = max(len(part) for part in (*self.total, "total"))
        rows = [f"{'part':<{width}}  {'parameters':>14}  {'share':>6}  {'trainable':>14}"]
        for part, count in self.total.items():
            share = count / max(self.num_parameters, 1)
            rows.append(f"{part:<{width}}  {count:>14,}  {share:>6.1%}  {self.trainable[part]:>14,}")
        rows.append(f"{'total':<{width}}  {self.num_parameters:>14,}  {1:>6.1%}  {self.num_trainable:>14,}")
        return "\n".join(rows)


def parameter_breakdown(model: nn.Module) -> ParameterBreakdown:
    """Count the parameters of `model` (a vlmforge `*Model` or `*ForConditionalGeneration`) per part.

    Each parameter is counted once, in the first part that holds it (in `PARTS` order); parameters outside the
    known parts (none in vlmforge's models) are reported as `"other"`.
    """
    base = getattr(model, "model", model)
    owner = {}  # id(parameter) → part
    for part, attribute in PARTS.items():
        module = getattr(base, attribute, None)
        module = getattr(model, attribute, None) if module is None else module
        if isinstance(module, nn.Module):
            for parameter in module.parameters():
                owner.setdefault(id(parameter), part)

    total = dict.fromkeys(PARTS, 0)
    trainable = dict.fromkeys(PARTS, 0)
    for parameter in model.parameters():  # shared (tied) parameters are yielded once
        part = owner.get(id(parameter), "other")
        total[part] = total.get(part, 0) + parameter.numel()
        trainable[part] = trainable.get(part, 0) + (parameter.numel() if parameter.requires_grad else 0)
    return ParameterBreakdown(total=total, trainable=trainable)


__all__ = ["PARTS", "ParameterBreakdown", "parameter_breakdown"]
