"""Import SigLIP vision weights into our `VisionEncoder` (Idefics2 paper, section 3.2, Finding 5).

Idefics2 starts from SigLIP-so400m and adapts it to native resolution; our `VisionEncoder` keeps SigLIP's
parameter names, so the conversion is a rename that strips the `vision_model.` prefix and drops the
attention-pooling head (the connector's perceiver does the pooling).

Conversion is a declarative key map plus a pure function: `SIGLIP_KEY_MAP` lists `(regex, replacement)`
rules, tried in order, each matched against the whole source key (`re.fullmatch`); the first match wins.
A replacement of `None` drops the key on purpose. A source key that no rule matches raises `ValueError`,
so a checkpoint of an unexpected layout can never load partially.

`rename_state_dict` is the rule engine, shared with `vlmforge.conversion.idefics2`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from transformers.utils import logging

from vlmforge.modeling.configuration_vision_encoder import VisionEncoderConfig

logger = logging.get_logger(__name__)

KeyMap = Sequence[tuple[str, str | None]]

# Leaf names inside one SigLIP encoder layer; identical in our `VisionEncoderLayer`.
_ENCODER_LAYER_LEAVES = r"(?:layer_norm[12]|self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])\.(?:weight|bias)"

# Keys of a transformers `SiglipVisionModel`. On disk they carry a `vision_model.` prefix (the layout of
# Hub checkpoints, and of `SiglipModel`'s vision tower); in memory, transformers 5 drops it. Both are accepted.
SIGLIP_KEY_MAP: KeyMap = [
    # patch convolution and the learned square position table
    (r"(?:vision_model\.)?(embeddings\.(?:patch_embedding\.(?:weight|bias)|position_embedding\.weight))", r"\1"),
    # the transformer layers, name for name
    (rf"(?:vision_model\.)?(encoder\.layers\.\d+\.{_ENCODER_LAYER_LEAVES})", r"\1"),
    (r"(?:vision_model\.)?(post_layernorm\.(?:weight|bias))", r"\1"),
    # dropped by design: the attention-pooling head (one vector per image); the perceiver pools instead
    (
        r"(?:vision_model\.)?head\.(?:probe|attention\.(?:in_proj_weight|in_proj_bias|out_proj\.(?:weight|bias))"
        r"|layernorm\.(?:weight|bias)|mlp\.fc[12]\.(?:weight|bias))",
        None,
    ),
    # dropped: older checkpoints stored the constant `arange` position-id buffer
    (r"(?:vision_model\.)?embeddings\.position_ids", None),
]


def rename_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    key_map: KeyMap,
    *,
    source_name: str,
    expected_keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename `state_dict` keys by the first rule of `key_map` whose regex fully matches; no I/O.

    Args:
        state_dict: source key → tensor. Tensors are passed through, not copied.
        key_map: `(regex, replacement)` rules; replacement `None` drops the key.
        source_name: how error messages name the source ("SigLIP", "Idefics2").
        expected_keys: when given, the exact set of target keys the result must have.

    Raises:
        ValueError: a source key matches no rule, two source keys map to one target key, or (with
            `expected_keys`) a target key is missing or unexpected.
    """
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in key_map]
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    dropped: list[str] = []
    for key, tensor in state_dict.items():
        for pattern, replacement in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if replacement is None:
                dropped.append(key)
            else:
                target = match.expand(replacement)
                if target in converted:
                    raise ValueError(
                        f"{source_name} keys {origin[target]!r} and {key!r} both map to {target!r}; the checkpoint "
                        "holds the same weight twice."
                    )
                converted[target], origin[target] = tensor, key
            break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} {source_name} key(s) match no conversion rule, e.g. {sorted(unknown)[:5]}. "
            f"Expected only keys the rules describe: {[pattern for pattern, _ in key_map]}."
        )
    if dropped:
        logger.info(f"Dropped {len(dropped)} {source_name} key(s) by design, e.g. {sorted(dropped)[:3]}.")
    if expected_keys is not None:
        expected = set(expected_keys)
        missing, unexpected = sorted(expected - converted.keys()), sorted(converted.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"The converted {source_name} checkpoint does not match the target model: "
                f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}. "
                "Is the checkpoint complete, and does its config match its weights?"
            )
    return converted


def convert_siglip_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, expected_keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """A `SiglipVisionModel` state dict (with or without the `vision_model.` prefix) → `VisionEncoder` keys.

    The pooling head is dropped. Pass `expected_keys=VisionEncoder(config).state_dict().keys()` to also
    check that nothing is missing. Raises `ValueError` on any key `SIGLIP_KEY_MAP` does not describe
    (a full `SiglipModel` state dict, with its text tower, must be filtered to the vision tower first).
    """
    return rename_state_dict(state_dict, SIGLIP_KEY_MAP, source_name="SigLIP", expected_keys=expected_keys)


def _square_side(value: int | Sequence[int], name: str) -> int:
    """An int, or a square `(h, w)` pair, as one int."""
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ValueError(f"{name}={value!r}: only square sizes (an int or two equal ints) are supported.")


def vision_config_from_siglip(siglip_vision_config) -> VisionEncoderConfig:
    """Our `VisionEncoderConfig` from a `SiglipVisionConfig` (an `Idefics2VisionConfig` works too).

    A `SiglipConfig` is accepted and its `vision_config` used. Every field carries over unchanged.
    """
    config = getattr(siglip_vision_config, "vision_config", None) or siglip_vision_config
    patch_size = _square_side(config.patch_size, "patch_size")
    image_size = _square_side(config.image_size, "image_size")
    return VisionEncoderConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_channels=config.num_channels,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        attention_dropout=float(config.attention_dropout),
        initializer_range=getattr(config, "initializer_range", 0.02),
    )


__all__ = ["SIGLIP_KEY_MAP", "convert_siglip_state_dict", "rename_state_dict", "vision_config_from_siglip"]
