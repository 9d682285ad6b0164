"""vlmforge.training — collator, freezing/LoRA policies, stability callbacks, recipes, synthetic VQA (Idefics2 paper, section 3.3).

Names load lazily: `import vlmforge.training` pulls in neither PEFT nor the Trainer.
"""

import importlib

_EXPORTS = {
    "IGNORE_INDEX": "collator",
    "VLMDataCollator": "collator",
    "supervised_fraction": "collator",
    "to_conversation": "collator",
    "POLICIES": "policies",
    "apply_training_policy": "policies",
    "parameter_groups": "policies",
    "special_token_ids": "policies",
    "trainable_parameter_names": "policies",
    "GradNormPerPartCallback": "stability",
    "NonFiniteLossCallback": "stability",
    "NonFiniteLossError": "stability",
    "enable_activation_checkpointing": "stability",
    "uses_reentrant_checkpointing": "stability",
    "TrainRecipe": "recipe",
    "run_recipe": "recipe",
    "SyntheticVQADataset": "synthetic_vqa",
    "evaluate_vqa": "synthetic_vqa",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
