"""Model card templates (`string.Template` Markdown files) and their renderer, which `vlmforge export` uses to
write a checkpoint's README.md.

The templates ship as package data of `vlmforge.model_cards`, so an installed vlmforge finds them with
`importlib.resources`. `render_model_card(config, processor, model, repo_id=...)` fills `vlm_model_card.md` with
the YAML metadata the Hub reads (license, library_name, pipeline_tag, base_model, tags) and the facts a user needs:
fusion, pooling, visual tokens per image with and without splitting, parameters per part, how to load the model.
"""

from __future__ import annotations

import json
from importlib import resources
from string import Template

import torch
from transformers import PreTrainedConfig

import vlmforge
from vlmforge.modeling.parameter_breakdown import parameter_breakdown

MODEL_CARD_TEMPLATE = "vlm_model_card.md"


def _fusion(config: PreTrainedConfig) -> tuple[str, str]:
    """(short name, one-line description) of the config's fusion architecture."""
    if config.model_type == "vlmforge_autoregressive":
        return "fully autoregressive", (
            "the visual tokens replace the `<image>` placeholders in the language model's input sequence "
            "(Idefics2 paper, section 3.1)"
        )
    if config.model_type == "vlmforge_cross_attention":
        layers = ", ".join(map(str, config.cross_attention_layers))
        total = config.get_text_config().num_hidden_layers
        return "cross-attention", (
            f"tanh-gated cross-attention blocks before decoder layers {layers} (of {total}) of the language model "
            f"let the text attend to the visual tokens; image rule `{config.image_rule}` (Idefics2 paper, section 3.1)"
        )
    return config.model_type, ""


_PART_NAMES = {
    "vision_encoder": "vision encoder",
    "connector": "connector (projection + pooling)",
    "cross_attention": "cross-attention blocks",
    "language_model": "language model",
    "lm_head": "LM head",
}


def base_models(config: PreTrainedConfig, explicit: list[str] | None = None) -> list[str]:
    """The backbones' Hub ids: `explicit`, else the config's `base_models` field (a list, or a dict by part,
    as `vlmforge build` records it when it knows them); empty when unknown."""
    found = explicit if explicit is not None else getattr(config, "base_models", None)
    if isinstance(found, dict):
        found = list(found.values())
    return [str(model) for model in (found or []) if model]


def _visual_tokens(processor, config: PreTrainedConfig) -> str:
    side = processor.image_processor.size["longest_edge"]
    whole, split = (processor.num_image_tokens(side, side, do_image_splitting=flag) for flag in (False, True))
    if processor.image_seq_len is not None:
        return (
            f"{whole} per image ({processor.image_seq_len} per sub-image); {split} with image splitting "
            "(4 crops + the whole image, `do_image_splitting=True`)"
        )
    return (
        f"one per {config.vision_config.patch_size} px patch: {whole} for a {side}×{side} px image, {split} with "
        "image splitting (4 crops + the whole image, `do_image_splitting=True`); smaller images cost fewer"
    )


def _yaml_list(key: str, values: list[str]) -> str:
    return f"{key}:\n" + "".join(f"- {json.dumps(value)}\n" for value in values) if values else ""


def render_model_card(
    config: PreTrainedConfig,
    processor,
    model: torch.nn.Module,
    *,
    repo_id: str,
    license: str = "other",
    base_model: list[str] | None = None,
) -> str:
    """The checkpoint's README.md, from `model_cards/vlm_model_card.md` (a `string.Template`).

    `model` may live on the meta device: only its parameter counts are read.
    """
    fusion_name, fusion_description = _fusion(config)
    connector = config.connector_config
    pooling = (
        f"perceiver resampler: {connector.n_latents} learned latents per sub-image (Finding 4)"
        if connector.pooling == "perceiver"
        else "none: every patch becomes a visual token (the paper's baseline)"
    )
    breakdown = parameter_breakdown(model)
    tied = getattr(config, "tie_word_embeddings", False)
    rows = [
        f"| {_PART_NAMES.get(part, part)} | {count:,} |"
        + (" (tied to the input embeddings)" if part == "lm_head" and tied and not count else "")
        for part, count in breakdown.total.items()
        if count or part == "lm_head"
    ]
    rows.append(f"| **total** | **{breakdown.num_parameters:,}** |")
    vision, text = config.vision_config, config.get_text_config()
    backbones = base_models(config, base_model)
    values = dict(
        license=license,
        base_model_yaml=_yaml_list("base_model", backbones),
        tags_yaml=_yaml_list(
            "tags", ["vlmforge", "vision-language", "idefics2", fusion_name.replace(" ", "-"), "custom_code"]
        ),
        repo_id=repo_id,
        fusion=fusion_name,
        fusion_description=fusion_description,
        pooling=pooling,
        visual_tokens=_visual_tokens(processor, config),
        vision_backbone=(
            f"SigLIP-style encoder, {vision.num_hidden_layers} layers × {vision.hidden_size} wide, "
            f"{vision.patch_size} px patches, position grid for {vision.image_size} px (native resolution and "
            "aspect ratio, Finding 5)"
        ),
        text_backbone=f"{text.model_type}, {text.num_hidden_layers} layers × {text.hidden_size} wide, "
        f"{text.vocab_size:,} token vocabulary",
        base_models=", ".join(f"[{m}](https://huggingface.co/{m})" for m in backbones) or "not recorded",
        parameter_rows="\n".join(rows),
        image_size=(
            f"shortest edge ≥ {processor.image_processor.size['shortest_edge']} px, longest edge ≤ "
            f"{processor.image_processor.size['longest_edge']} px"
        ),
        model_type=config.model_type,
        vlmforge_version=vlmforge.__version__,
    )
    template = resources.files(__name__).joinpath(MODEL_CARD_TEMPLATE).read_text(encoding="utf-8")
    return Template(template).substitute(values)


__all__ = ["MODEL_CARD_TEMPLATE", "base_models", "render_model_card"]
