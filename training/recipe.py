"""Training recipes: one YAML file names the model, the data, the freezing policies and `TrainingArguments`;
`run_recipe` runs transformers' `Trainer` on them and saves the result together with its processor.

    output_dir: runs/demo                  # Trainer's folder: checkpoint-*/ and logs (resume reads it)
    save_dir: runs/demo/final              # the final model (or adapters) + processor; default output_dir/final
    seed: 0
    num_threads: 1                         # torch threads per process (optional)
    model:                                 # exactly one of:
      checkpoint: path/to/vlmforge-checkpoint
      build: {vision: SIGLIP_DIR, text: LM_DIR, fusion: autoregressive, pooling: perceiver, image_size: 980}
                                           # build_vlm's options; built once into output_dir/built_model
      from_scratch:                        # a new autoregressive model and a toy tokenizer, e.g. for the demo
        tokenizer: {vocab_size: 400, extra_corpus: synthetic_vqa}
        image_processor: {size: {shortest_edge: 112, longest_edge: 112}}
        vision_config: {...}; connector_config: {...}; text_config: {model_type: llama, ...}
    data:
      train: {synthetic_vqa: {n: 1000, seed: 0}}     # generated scenes (training/synthetic_vqa.py), or
                                                     # {dataset: DIR, split: train}: a datasets.save_to_disk folder
                                                     # (split picks from a DatasetDict; needs vlmforge[datasets]), or
      eval: {jsonl: FILE, image_folder: DIR}         # one sample per line, image file names relative to DIR
                                                     # (default: FILE's folder); eval is optional
    policies: {vision: full, text: full}   # frozen | lora | full per backbone (training/policies.py); optional
                                           # lora_r, lora_alpha, lora_dropout, target_modules, and connector_lr /
                                           # backbone_lr (separate learning rates through parameter_groups)
    collator: {max_length: 256}            # VLMDataCollator keyword arguments
    training_args: {per_device_train_batch_size: 8, max_steps: 100, ...}   # TrainingArguments, passed as they are

Under `accelerate launch`, `Trainer` runs the recipe data-parallel unchanged (`vlmforge train` is the script). On
CPUs use `accelerate launch --multi_gpu --num_processes N -m vlmforge.cli train R.yaml` with `use_cpu: true` in
`training_args`: torchrun starts N processes that train together over gloo (accelerate 1.x's `--cpu --num_processes
N` starts one process unless under mpirun, and without `use_cpu` accelerate runs each of the N alone).
Batches without images keep the vision path in every process's graph (the models add 0 × a dummy image's tokens),
so DDP needs no `ddp_find_unused_parameters`, and the ranks of an FSDP run gather the same layers in the same order.
`training_args.fsdp` / `fsdp_config` and `deepspeed` reach TrainingArguments unchanged; FSDP's default wrap policy
shards each class in the model's `_no_split_modules` (vision encoder, perceiver and decoder layers, and the
cross-attention blocks). accelerate enables FSDP only in multi-process runs on GPUs (or other accelerators) and
DeepSpeed never with `use_cpu`. Where accelerate would fall back without a word (FSDP asked for where it cannot run;
N processes launched that would each train alone), `build_trainer` raises a ValueError instead.
"""

import dataclasses
import json
import os
from pathlib import Path

import torch
import yaml

_MODEL_KINDS = ("checkpoint", "build", "from_scratch")
_DATA_KINDS = ("synthetic_vqa", "dataset", "jsonl")
_DATA_OPTIONS = {"synthetic_vqa": (), "dataset": ("split",), "jsonl": ("image_folder",)}
_POLICIES = ("frozen", "lora", "full")
_POLICY_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")


def _one_of(section: dict, kinds: tuple[str, ...], where: str) -> str:
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a mapping with one of the keys {kinds}, got {section!r:.200}.")
    found = [kind for kind in kinds if kind in section]
    if len(found) != 1:
        raise ValueError(f"{where} must have exactly one of the keys {kinds}; it has {sorted(section)}.")
    return found[0]


def _check_data_source(source: dict, where: str) -> None:
    kind = _one_of(source, _DATA_KINDS, where)
    unknown = sorted(set(source) - {kind, *_DATA_OPTIONS[kind]})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} beside {kind!r}; it takes {list(_DATA_OPTIONS[kind])}.")


@dataclasses.dataclass
class TrainRecipe:
    """What to train, on what, how; see the module docstring for the YAML layout."""

    output_dir: str
    model: dict
    data: dict
    policies: dict = dataclasses.field(default_factory=lambda: {"vision": "full", "text": "full"})
    collator: dict = dataclasses.field(default_factory=dict)
    training_args: dict = dataclasses.field(default_factory=dict)
    save_dir: str | None = None
    seed: int = 0
    num_threads: int | None = None  # torch.set_num_threads; 1 per process is fastest on a shared small CPU

    def __post_init__(self) -> None:
        _one_of(self.model, _MODEL_KINDS, "model")
        if not isinstance(self.data, dict) or "train" not in self.data:
            raise ValueError(
                f"data must be a mapping with a 'train' source (and optionally 'eval'), got {self.data!r:.200}."
            )
        for split in ("train", "eval"):
            if self.data.get(split) is not None:
                _check_data_source(self.data[split], f"data.{split}")
        for part in ("vision", "text"):
            if self.policies.get(part, "full") not in _POLICIES:
                raise ValueError(f"policies.{part} must be one of {_POLICIES}, got {self.policies[part]!r}.")
        known = {"vision", "text", "connector_lr", "backbone_lr", *_POLICY_OPTIONS}
        if set(self.policies) - known:
            unknown = sorted(set(self.policies) - known)
            raise ValueError(f"Unknown policies keys {unknown}; expected some of {sorted(known)}.")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainRecipe":
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown recipe keys {unknown}; expected some of {sorted(names)}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainRecipe":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No recipe file at {path}.")
        values = yaml.safe_load(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a recipe is a YAML mapping, got {type(values).__name__}.")
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @property
    def final_dir(self) -> Path:
        return Path(self.save_dir) if self.save_dir else Path(self.output_dir) / "final"


# ---- model ------------------------------------------------------------------------------------------------------


def build_from_scratch(spec: dict, *, seed: int = 0):
    """A new autoregressive VLM (random weights, our initialisation) and its processor, from a `from_scratch` spec."""
    from vlmforge.conversion.generation_config import chat_generation_config
    from vlmforge.modeling.configuration_autoregressive_vlm import AutoregressiveVLMConfig
    from vlmforge.modeling.modeling_autoregressive_vlm import AutoregressiveVLMForConditionalGeneration
    from vlmforge.processing.image_processing_vlm import VLMImageProcessor
    from vlmforge.processing.processing_vlm import VLMProcessor
    from vlmforge.toy_tokenizer import build_toy_tokenizer

    from .synthetic_vqa import vocabulary_text

    unknown = sorted(set(spec) - {"tokenizer", "image_processor", "vision_config", "connector_config", "text_config"})
    if unknown:
        raise ValueError(f"model.from_scratch has unknown keys {unknown}.")
    tokenizer_spec = dict(spec.get("tokenizer", {}))
    extra = tokenizer_spec.pop("extra_corpus", "")
    if extra == "synthetic_vqa":
        extra = (" " + vocabulary_text()) * 3  # weighted so the task's words become whole tokens
    tokenizer = build_toy_tokenizer(tokenizer_spec.pop("vocab_size", 400), extra_corpus=extra, **tokenizer_spec)
    text_config = dict(spec.get("text_config", {}))
    text_config.setdefault("model_type", "llama")
    text_config.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = AutoregressiveVLMConfig(
        vision_config=spec.get("vision_config", {}),
        connector_config=spec.get("connector_config", {}),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    image_processor = VLMImageProcessor(**spec.get("image_processor", {}))
    processor = VLMProcessor.from_model_config(config, image_processor, tokenizer)
    torch.manual_seed(seed)
    model = AutoregressiveVLMForConditionalGeneration(config)
    model.generation_config = chat_generation_config(tokenizer, model.generation_config)
    return model, processor


def load_model_and_processor(recipe: TrainRecipe):
    """The recipe's model and processor: loaded from a checkpoint, built from two backbones, or new."""
    from transformers import AutoProcessor

    from vlmforge.auto import AutoModelForVision2Seq

    kind = _one_of(recipe.model, _MODEL_KINDS, "model")
    if kind == "from_scratch":
        return build_from_scratch(recipe.model["from_scratch"], seed=recipe.seed)
    if kind == "build":
        from vlmforge.conversion.build import build_vlm

        spec = dict(recipe.model["build"])
        folder = Path(recipe.output_dir) / "built_model"
        if not (folder / "config.json").is_file():  # a resumed run reuses the model it built
            build_vlm(spec.pop("vision"), spec.pop("text"), folder, **spec)
    else:
        folder = Path(recipe.model["checkpoint"])
    return AutoModelForVision2Seq.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


# ---- data -------------------------------------------------------------------------------------------------------


class JsonlImageDataset(torch.utils.data.Dataset):
    """Samples from a JSONL file (one the_cauldron or chat sample per line) whose image entries are file names
    relative to `image_folder`; images are opened on access."""

    def __init__(self, path: str | Path, image_folder: str | Path | None = None) -> None:
        self.path, self.image_folder = Path(path), Path(image_folder or Path(path).parent)
        if not self.path.is_file():
            raise FileNotFoundError(f"No JSONL file at {self.path}.")
        with self.path.open() as lines:
            self.samples = [json.loads(line) for line in lines if line.strip()]
        if not self.samples:
            raise ValueError(f"{self.path} holds no samples.")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        sample = dict(self.samples[index])
        if "images" in sample:
            images = sample["images"] if isinstance(sample["images"], list) else [sample["images"]]
            sample["images"] = [Image.open(self.image_folder / name).convert("RGB") for name in images]
        return sample


def load_data_source(source: dict):
    """A map-style dataset for one `data.train` / `data.eval` entry."""
    kind = _one_of(source, _DATA_KINDS, "data source")
    if kind == "synthetic_vqa":
        from .synthetic_vqa import SyntheticVQADataset

        spec = dict(source["synthetic_vqa"])
        return SyntheticVQADataset(spec.pop("n"), seed=spec.pop("seed", 0), **spec)
    if kind == "jsonl":
        return JsonlImageDataset(source["jsonl"], source.get("image_folder"))
    try:
        import datasets
    except ModuleNotFoundError as error:
        raise ValueError(
            "data source {'dataset': ...} needs the `datasets` package: pip install 'vlmforge[datasets]'."
        ) from error
    loaded = datasets.load_from_disk(source["dataset"])
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    split = source.get("split", "train")
    if split not in loaded:
        raise ValueError(f"data source {source['dataset']} has no split {split!r}; its splits are {list(loaded)}.")
    return loaded[split]


# ---- run --------------------------------------------------------------------------------------------------------


def _apply_policies(model, processor, policies: dict):
    """Freeze / adapt the backbones as the recipe says (the connector always trains); prints what trains."""
    from .policies import apply_training_policy, special_token_ids

    options = {key: policies[key] for key in _POLICY_OPTIONS if key in policies}
    return apply_training_policy(
        model,
        vision=policies.get("vision", "full"),
        text=policies.get("text", "full"),
        new_token_ids=special_token_ids(processor),
        **options,
    )


def _optimizer(model, policies: dict, training_args: dict):
    """AdamW over `parameter_groups` when the recipe sets `policies.connector_lr` / `backbone_lr`, else None
    (Trainer's own optimizer at `learning_rate`)."""
    if "connector_lr" not in policies and "backbone_lr" not in policies:
        return None
    from .policies import parameter_groups

    default_lr = training_args.get("learning_rate", 5e-5)
    groups = parameter_groups(
        model,
        connector_lr=policies.get("connector_lr", default_lr),
        backbone_lr=policies.get("backbone_lr", default_lr),
        weight_decay=training_args.get("weight_decay", 0.0),
    )
    return torch.optim.AdamW(groups)


def _save_final(model, processor, final_dir: Path) -> None:
    """Write the trained model with its processor and generation config. A PEFT model's adapters go to
    `adapter/`, and the model with the adapters merged (connector and `full` parts included) to the folder itself,
    so that both `from_pretrained(final_dir)` and `PeftModel.from_pretrained(base, final_dir / "adapter")` work."""
    from vlmforge.conversion.checkpoint_io import atomic_output_dir

    with atomic_output_dir(final_dir, overwrite=True) as staging:
        if hasattr(model, "peft_config"):
            model.save_pretrained(staging / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)


def training_arguments(recipe: TrainRecipe):
    """The recipe's `TrainingArguments`: its `training_args` as they are (FSDP, DeepSpeed and DDP settings included),
    with `output_dir` from the recipe, the recipe's seed by default, no reporting unless asked for, and the raw
    `images`/`texts` columns kept for the collator (Trainer would otherwise drop them)."""
    from transformers import TrainingArguments

    arguments = {"report_to": "none", "seed": recipe.seed, **recipe.training_args}
    arguments.update(output_dir=recipe.output_dir, remove_unused_columns=False)
    return TrainingArguments(**arguments)


def _check_distributed(trainer) -> None:
    """accelerate falls back without a word where it cannot run what was asked for: refuse instead."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    setup = f"accelerate's distributed type: {trainer.accelerator.distributed_type}"
    if trainer.accelerator.num_processes != launched:
        raise ValueError(
            f"{launched} processes were launched, but accelerate trains each one alone ({setup}): on a machine "
            f"without GPUs, set use_cpu: true in training_args so that they train together over gloo."
        )
    if trainer.args.fsdp and not trainer.is_fsdp_enabled:
        raise ValueError(
            f"training_args.fsdp is set, but accelerate did not enable FSDP ({setup}): it does so only in "
            f"multi-process runs on GPUs or other accelerators, not on the CPU (use_cpu), and this run would train "
            f"unsharded. Launch with `accelerate launch --multi_gpu --num_processes N` on GPUs, or remove fsdp from "
            f"the recipe."
        )


def build_trainer(recipe: TrainRecipe):
    """The `Trainer` `run_recipe` runs, with its processor: for tests and notebooks that drive it themselves."""
    from transformers import Trainer, set_seed

    from .collator import VLMDataCollator
    from .stability import GradNormPerPartCallback, NonFiniteLossCallback

    set_seed(recipe.seed)
    model, processor = load_model_and_processor(recipe)
    model = _apply_policies(model, processor, recipe.policies)
    train_dataset = load_data_source(recipe.data["train"])
    eval_source = recipe.data.get("eval")
    eval_dataset = load_data_source(eval_source) if eval_source else None
    trainer = Trainer(
        model=model,
        args=training_arguments(recipe),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=VLMDataCollator(processor, **recipe.collator),
        processing_class=processor,  # saved into every checkpoint-*: each one loads on its own
        callbacks=[NonFiniteLossCallback(), GradNormPerPartCallback()],
        optimizers=(_optimizer(model, recipe.policies, recipe.training_args), None),
    )
    _check_distributed(trainer)
    return trainer, processor


def run_recipe(recipe: TrainRecipe | str | Path, *, resume: bool = False) -> Path:
    """Train as the recipe says and save the final model (or adapters) with its processor; return that folder.

    `resume=True` continues from the last `checkpoint-*` in `output_dir` (Trainer restores the model, optimizer,
    scheduler, RNG states and data order), so the run reaches the same loss at each step as an uninterrupted one.
    """
    if not isinstance(recipe, TrainRecipe):
        recipe = TrainRecipe.from_yaml(recipe)
    if resume and not any(Path(recipe.output_dir).glob("checkpoint-*")):
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {recipe.output_dir} to resume from.")
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    trainer, processor = build_trainer(recipe)
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_state()  # trainer_state.json (log history) in output_dir
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    final_dir = recipe.final_dir
    if trainer.is_world_process_zero():
        _save_final(trainer.model, processor, final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir


__all__ = [
    "JsonlImageDataset",
    "TrainRecipe",
    "build_from_scratch",
    "build_trainer",
    "load_data_source",
    "run_recipe",
    "training_arguments",
]
