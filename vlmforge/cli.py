"""The `vlmforge` command: each sub-command parses its arguments into a dataclass and calls one library function.

    vlmforge demo [--output-dir DIR] [--max-new-tokens N] [--seed S] [--random-weights]
    vlmforge convert idefics2 SRC DST [--allow-pickle]
    vlmforge build --vision DIR --text DIR --output DIR [--fusion F] [--pooling P] [--image-size N] [...]
    vlmforge export CHECKPOINT OUT [--max-shard-size 5GB] [--push-to-hub REPO_ID] [--private] [...]
    vlmforge merge-lora BASE ADAPTER OUT [--max-shard-size 5GB] [--overwrite] [--allow-pickle]
    vlmforge train RECIPE.yaml [--resume]

The arguments of a sub-command are the fields of its dataclass (a field's `help` metadata is its help text;
a field without a default is positional, or a required `--option` when its metadata says `option`; a `bool`
field is an off-by-default `--flag`). Tests call the library functions directly; this file only translates a
command line into one call.
"""

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence


def _help(text: str) -> dict:
    return {"help": text}


def _required_option(text: str) -> dict:
    return {"help": text, "option": True}


@dataclasses.dataclass
class DemoArgs:
    """Ask the embedded trained demo checkpoint about fresh synthetic images and print answers beside the truth;
    without that checkpoint (or with --random-weights), build and run a small RANDOM-weight VLM on a photograph."""

    output_dir: str | None = dataclasses.field(
        default=None,
        metadata=_help("folder for a copy of the checkpoint (trained demo: and the images asked about); default: none"),
    )
    max_new_tokens: int = dataclasses.field(default=20, metadata=_help("tokens to generate (random demo)"))
    seed: int = dataclasses.field(default=0, metadata=_help("seed of the images (trained) or of the random weights"))
    random_weights: bool = dataclasses.field(
        default=False, metadata=_help("run the random-weight demo even when the trained checkpoint is there")
    )

    def run(self) -> None:
        from vlmforge.demo import demo

        demo(self.output_dir, max_new_tokens=self.max_new_tokens, seed=self.seed, random_weights=self.random_weights)


@dataclasses.dataclass
class ConvertIdefics2Args:
    """Convert a transformers Idefics2 checkpoint folder into a vlmforge autoregressive checkpoint."""

    src: str = dataclasses.field(metadata=_help("Idefics2 checkpoint folder (config.json + weights)"))
    dst: str = dataclasses.field(metadata=_help("output folder for the vlmforge checkpoint"))
    allow_pickle: bool = dataclasses.field(
        default=False, metadata=_help("also read pickled .bin weights (runs code from the file: trusted sources only)")
    )

    def run(self) -> None:
        # imported here: the other commands must not pay for (or depend on) the conversion code
        try:
            from vlmforge.conversion.idefics2 import convert_idefics2_checkpoint
        except ModuleNotFoundError as error:
            if error.name != "vlmforge.conversion.idefics2":
                raise
            raise ValueError("Idefics2 conversion is not part of this vlmforge install.") from error

        written = convert_idefics2_checkpoint(self.src, self.dst, allow_pickle=self.allow_pickle)
        print(f"vlmforge convert idefics2: wrote {written}")


@dataclasses.dataclass
class BuildArgs:
    """Build a VLM from a pretrained SigLIP encoder and a pretrained causal LM (new connector, image tokens added)."""

    vision: str = dataclasses.field(metadata=_required_option("SigLIP folder (SiglipVisionModel or SiglipModel)"))
    text: str = dataclasses.field(metadata=_required_option("causal-LM folder (safetensors) with its tokenizer"))
    output: str = dataclasses.field(metadata=_required_option("output folder for the built checkpoint"))
    fusion: str = dataclasses.field(default="autoregressive", metadata=_help("autoregressive | cross_attention"))
    pooling: str = dataclasses.field(default="perceiver", metadata=_help("perceiver | none"))
    image_size: int = dataclasses.field(
        default=980, metadata=_help("side in px the position table is interpolated to (image_size // patch_size)")
    )
    cross_attention_every: int = dataclasses.field(
        default=4, metadata=_help("cross_attention fusion: a gated block before every N-th LM layer")
    )
    dtype: str | None = dataclasses.field(default=None, metadata=_help("dtype of the built model (default: the LM's)"))
    overwrite: bool = dataclasses.field(default=False, metadata=_help("replace a non-empty output folder"))
    allow_pickle: bool = dataclasses.field(
        default=False, metadata=_help("also read pickled .bin weights (runs code from the file: trusted sources only)")
    )

    def run(self) -> None:
        from vlmforge.conversion.build import build_vlm

        written = build_vlm(
            self.vision,
            self.text,
            self.output,
            fusion=self.fusion,
            pooling=self.pooling,
            image_size=self.image_size,
            cross_attention_every_n_layers=self.cross_attention_every,
            dtype=self.dtype,
            overwrite=self.overwrite,
            allow_pickle=self.allow_pickle,
        )
        print(f"vlmforge build: wrote {written}")


@dataclasses.dataclass
class ExportArgs:
    """Write a vlmforge checkpoint as a hub-ready folder (sharded safetensors, remote code, processor, model card)
    that loads with `trust_remote_code=True` where vlmforge is not installed; optionally upload it to the Hub."""

    checkpoint: str = dataclasses.field(metadata=_help("vlmforge checkpoint folder (model + processor)"))
    out: str = dataclasses.field(metadata=_help("output folder (must be absent or empty unless --overwrite)"))
    max_shard_size: str = dataclasses.field(default="5GB", metadata=_help("largest safetensors shard"))
    push_to_hub: str | None = dataclasses.field(
        default=None, metadata=_help("upload OUT to this Hub repo id (token: HF_TOKEN or `hf auth login`)")
    )
    private: bool = dataclasses.field(default=False, metadata=_help("create the Hub repo as private"))
    revision: str | None = dataclasses.field(default=None, metadata=_help("Hub branch to upload to (made if needed)"))
    commit_message: str | None = dataclasses.field(default=None, metadata=_help("message of the Hub commit"))
    license: str = dataclasses.field(default="other", metadata=_help("license id for the model card"))
    base_model: str | None = dataclasses.field(
        default=None, metadata=_help("comma-separated Hub ids of the backbones, for the model card")
    )
    overwrite: bool = dataclasses.field(default=False, metadata=_help("replace a non-empty OUT"))
    allow_pickle: bool = dataclasses.field(
        default=False, metadata=_help("also read pickled .bin weights (runs code from the file: trusted sources only)")
    )

    def run(self) -> None:
        from vlmforge.conversion.export import export_checkpoint

        written = export_checkpoint(
            self.checkpoint,
            self.out,
            max_shard_size=self.max_shard_size,
            push_to_hub=self.push_to_hub,
            private=self.private,
            revision=self.revision,
            commit_message=self.commit_message,
            overwrite=self.overwrite,
            allow_pickle=self.allow_pickle,
            license=self.license,
            base_model=None if self.base_model is None else [m.strip() for m in self.base_model.split(",")],
        )
        pushed = f" and pushed it to {self.push_to_hub}" if self.push_to_hub else ""
        print(f"vlmforge export: wrote {written}{pushed}")


@dataclasses.dataclass
class MergeLoraArgs:
    """Merge a PEFT LoRA adapter into its base checkpoint; save the full checkpoint after checking its outputs."""

    base: str = dataclasses.field(metadata=_help("vlmforge checkpoint folder the adapter was trained on"))
    adapter: str = dataclasses.field(metadata=_help("PEFT adapter folder (adapter_config.json + safetensors)"))
    out: str = dataclasses.field(metadata=_help("output folder for the merged checkpoint"))
    max_shard_size: str = dataclasses.field(default="5GB", metadata=_help("largest safetensors shard"))
    overwrite: bool = dataclasses.field(default=False, metadata=_help("replace a non-empty OUT"))
    allow_pickle: bool = dataclasses.field(
        default=False, metadata=_help("also read pickled .bin weights (runs code from the file: trusted sources only)")
    )

    def run(self) -> None:
        from vlmforge.conversion.merge_lora import merge_lora

        written = merge_lora(
            self.base,
            self.adapter,
            self.out,
            max_shard_size=self.max_shard_size,
            overwrite=self.overwrite,
            allow_pickle=self.allow_pickle,
        )
        print(f"vlmforge merge-lora: wrote {written}")


@dataclasses.dataclass
class TrainArgs:
    """Train as a recipe YAML says (model, data, policies, TrainingArguments); save the result with its processor.
    Works under `accelerate launch` (data-parallel)."""

    recipe: str = dataclasses.field(metadata=_help("recipe YAML file (see recipes/demo.yaml)"))
    resume: bool = dataclasses.field(
        default=False, metadata=_help("continue from the last checkpoint-* in the recipe's output_dir")
    )

    def run(self) -> None:
        from vlmforge.training.recipe import run_recipe

        written = run_recipe(self.recipe, resume=self.resume)
        print(f"vlmforge train: wrote {written}")


def _add_dataclass_arguments(parser: argparse.ArgumentParser, args_class: type) -> None:
    hints = typing.get_type_hints(args_class)
    for field in dataclasses.fields(args_class):
        kind = hints[field.name]
        # `str | None` → str: None is only the "not given" default
        kind = next((arg for arg in typing.get_args(kind) if arg is not type(None)), kind)
        help_text = field.metadata.get("help", "")
        if field.default is dataclasses.MISSING and field.metadata.get("option"):
            option = f"--{field.name.replace('_', '-')}"
            parser.add_argument(option, dest=field.name, type=kind, required=True, help=help_text)
        elif field.default is dataclasses.MISSING:
            parser.add_argument(field.name, metavar=field.name.upper(), type=kind, help=help_text)
        elif kind is bool:
            if field.default is not False:
                raise TypeError(f"{args_class.__name__}.{field.name}: bool fields must default to False.")
            parser.add_argument(f"--{field.name.replace('_', '-')}", action="store_true", help=help_text)
        else:
            default_text = "" if field.default is None else f" (default: {field.default})"
            parser.add_argument(
                f"--{field.name.replace('_', '-')}",
                dest=field.name,
                type=kind,
                default=field.default,
                help=help_text + default_text,
            )


def _add_command(subparsers, name: str, args_class: type, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=args_class.__doc__)
    _add_dataclass_arguments(parser, args_class)
    parser.set_defaults(_args_class=args_class)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmforge", description="Build, convert and run vision-language models the Idefics2 paper's way."
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    _add_command(commands, "demo", DemoArgs, "run the end-to-end demo (the trained checkpoint, else random weights)")

    convert = commands.add_parser("convert", help="convert a checkpoint from another format into vlmforge's")
    formats = convert.add_subparsers(title="source formats", dest="format", metavar="FORMAT", required=True)
    _add_command(formats, "idefics2", ConvertIdefics2Args, "a transformers Idefics2 checkpoint folder")
    _add_command(commands, "build", BuildArgs, "build a VLM from a SigLIP encoder and a causal LM")
    _add_command(commands, "export", ExportArgs, "write a hub-ready folder (remote code, model card); push it")
    _add_command(commands, "merge-lora", MergeLoraArgs, "merge a LoRA adapter into its base checkpoint")
    _add_command(commands, "train", TrainArgs, "train a model as a recipe YAML says (Trainer, PEFT, accelerate)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vlmforge` console script; returns the exit status."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    args_class = namespace._args_class
    args = args_class(**{field.name: getattr(namespace, field.name) for field in dataclasses.fields(args_class)})
    try:
        args.run()
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # the library raises these for bad input, with a message meant for the user: no traceback
        parser.exit(2, f"vlmforge {namespace.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
