"""Export a vlmforge checkpoint as a hub-ready folder that loads with or without vlmforge installed.

`export_checkpoint(checkpoint, out)` writes, atomically (a temporary folder beside `out`, renamed at the end):

- the weights as safetensors shards of at most `max_shard_size` (`model.safetensors`, or
  `model-XXXXX-of-XXXXX.safetensors` + `model.safetensors.index.json`), streamed tensor by tensor as raw bytes
  from the source files, so peak memory stays far below one shard (see `benchmarks/bench_convert.py`);
- `config.json` with an `auto_map` for AutoConfig, AutoModel, AutoModelForImageTextToText,
  AutoModelForVision2Seq, AutoProcessor and AutoImageProcessor;
- the files of `modeling/` and `processing/` the auto_map needs, copied flat as remote code (the same closure of
  `from .sibling import` files that transformers' loader copies into its module cache), checked to import
  nothing but the standard library, torch, transformers, numpy, PIL and each other;
- the tokenizer, `processor_config.json` (with its own auto_map), the chat template, and a generation config
  that stops at `<end_of_utterance>`;
- a model card `README.md` rendered from `model_cards/vlm_model_card.md` (`vlmforge.model_cards`).

Before anything is written, the checkpoint is checked: its weights against the config (every key, every shape),
and the processor against the model (`image_seq_len`, patch size, fusion, image token ids, the special tokens,
tokenizer length vs vocabulary size); any disagreement raises one `ValueError` that lists them all.

`push_folder_to_hub(folder, repo_id)` uploads a folder with huggingface_hub (`create_repo` + `upload_folder`);
the token comes from `HF_TOKEN` or `hf auth login`, as everywhere in huggingface_hub.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import struct
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedConfig,
)
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

import vlmforge
from vlmforge.conversion.checkpoint_io import atomic_output_dir, check_destination, weight_files
from vlmforge.conversion.generation_config import chat_generation_config
from vlmforge.model_cards import render_model_card
from vlmforge.processing.prompt_expansion import IMAGE_SPECIAL_TOKENS

logger = logging.get_logger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"
# What remote code may import besides the standard library and its own siblings (DESIGN.md, "Remote-code safe")
REMOTE_CODE_PACKAGES = frozenset({"torch", "transformers", "numpy", "PIL"})

# safetensors dtype names ↔ torch dtypes (the pickled-weights path needs the names; sizes validate headers)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_COPY_CHUNK = 16 * 2**20  # bytes per read when copying a tensor between files
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header


def parse_size(size: int | str) -> int:
    """`"5GB"` → 5_000_000_000 bytes (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024); ints pass through."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"max_shard_size={size!r} is not a size; expected e.g. 5GB, 500MB, 2GiB or a byte count.")
        value = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be at least one byte, got {size!r}.")
    return value


# ---- weights: raw safetensors bytes, streamed shard by shard ---------------------------------------------------


@dataclass(frozen=True, eq=False)
class TensorRecord:
    """One tensor to copy: its name, safetensors dtype and shape, and where its bytes are.

    `offset` is the absolute byte offset of its data in `file` (a safetensors file); a pickled checkpoint
    (opted in) gives `tensor` instead, memory-mapped where torch can.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    offset: int | None = None
    tensor: torch.Tensor | None = None


def _read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{file} is not a safetensors file: it is shorter than its 8-byte header length.")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER:
            raise ValueError(f"{file} is not a safetensors file: its header claims {length} bytes.")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{file} is not a safetensors file: unreadable header ({error}).") from error
    return header, 8 + length


def _safetensors_records(file: Path) -> tuple[list[TensorRecord], dict[str, str]]:
    """The tensors of one safetensors file in data order (no tensor data is read), and its metadata."""
    header, data_start = _read_header(file)
    metadata = header.pop("__metadata__", None) or {}
    file_size = file.stat().st_size
    records = []
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        dtype = _DTYPES.get(info["dtype"])
        expected = None if dtype is None else dtype.itemsize * int(torch.Size(shape).numel())
        if end < begin or data_start + end > file_size or (expected is not None and end - begin != expected):
            raise ValueError(
                f"{file}: tensor {name!r} ({info['dtype']}, shape {list(shape)}) has data offsets {[begin, end]} that "
                f"do not fit its size or the file ({file_size} bytes); the file is truncated or corrupt."
            )
        records.append(TensorRecord(name, info["dtype"], shape, end - begin, file, offset=data_start + begin))
    return records, metadata


def _pickle_records(file: Path) -> list[TensorRecord]:
    """The tensors of an opted-in pickled checkpoint file (`weights_only=True`, memory-mapped when possible)."""
    try:
        try:
            state_dict = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise ValueError(f"Could not read weights from {file}: {error}") from error
    records = []
    for name, tensor in state_dict.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store.")
        tensor = tensor.contiguous()
        shape = tuple(tensor.shape)
        records.append(TensorRecord(name, _DTYPE_NAMES[tensor.dtype], shape, tensor.nbytes, file, tensor=tensor))
    return records


def read_tensor_records(checkpoint: str | Path, *, allow_pickle: bool = False) -> tuple[list[TensorRecord], dict]:
    """Every tensor of `checkpoint` (safetensors, sharded or not; pickles only with `allow_pickle`), unread.

    Returns the records in file and data order, and the safetensors metadata to carry over (`format` = `pt`).

    Raises:
        ValueError: no weights, refused pickles, a corrupt file, or a tensor name repeated across files.
    """
    records, metadata = [], {}
    for file in weight_files(checkpoint, allow_pickle=allow_pickle):
        if file.suffix == ".safetensors":
            part, part_metadata = _safetensors_records(file)
            metadata = metadata or part_metadata
        else:
            part = _pickle_records(file)
        records.extend(part)
    counts = Counter(record.name for record in records)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(f"{checkpoint}: tensors {repeated[:3]} appear in more than one weight file.")
    return records, {**metadata, "format": "pt"}


def plan_shards(records: list[TensorRecord], max_shard_size: int) -> list[list[TensorRecord]]:
    """Greedy split in order: a shard closes before the tensor that would take it past `max_shard_size`
    (a tensor larger than that gets a shard of its own, as in transformers)."""
    shards: list[list[TensorRecord]] = [[]]
    size = 0
    for record in records:
        if shards[-1] and size + record.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(record)
        size += record.nbytes
    return shards if shards[0] else []


def _copy_tensor(record: TensorRecord, out, buffer: memoryview, progress) -> None:
    if record.tensor is not None:
        data = record.tensor.reshape(-1).view(torch.uint8).numpy()  # a view: no copy of the tensor
        out.write(memoryview(data))
        progress.update(record.nbytes)
        return
    with open(record.file, "rb") as source:
        source.seek(record.offset)
        remaining = record.nbytes
        while remaining:
            read = source.readinto(buffer[: min(remaining, len(buffer))])
            if not read:
                raise ValueError(f"{record.file} ended inside tensor {record.name!r}: the file is truncated.")
            out.write(buffer[:read])
            remaining -= read
            progress.update(read)


def _write_shard(path: Path, records: list[TensorRecord], metadata: dict, buffer: memoryview, progress) -> None:
    """Write one safetensors file: the header, then each tensor's bytes copied from its source."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for record in records:
        header[record.name] = {
            "dtype": record.dtype,
            "shape": list(record.shape),
            "data_offsets": [offset, offset + record.nbytes],
        }
        offset += record.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for record in records:
            _copy_tensor(record, out, buffer, progress)


def write_sharded_safetensors(
    records: list[TensorRecord], folder: Path, *, max_shard_size: int | str, metadata: dict | None = None
) -> list[str]:
    """Write `records` into `folder` as transformers names them; returns the file names written.

    One shard: `model.safetensors`. More: `model-00001-of-0000N.safetensors` + `model.safetensors.index.json`.
    Only one tensor's worth of bytes (at most 16 MiB for safetensors sources) is in memory at a time.
    """
    shards = plan_shards(records, parse_size(max_shard_size))
    if not shards:
        raise ValueError("The checkpoint holds no tensors.")
    names = (
        [SAFE_WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    metadata = {key: str(value) for key, value in (metadata or {"format": "pt"}).items()}
    total_size = sum(record.nbytes for record in records)
    buffer = memoryview(bytearray(_COPY_CHUNK))
    with logging.tqdm(total=total_size, unit="B", unit_scale=True, desc="Writing safetensors shards") as progress:
        for name, shard in zip(names, shards):
            _write_shard(folder / name, shard, metadata, buffer, progress)
    if len(shards) > 1:
        index = {
            "metadata": {
                "total_size": total_size,
                "total_parameters": sum(int(torch.Size(r.shape).numel()) for r in records),
            },
            "weight_map": {record.name: name for name, shard in zip(names, shards) for record in shard},
        }
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append(SAFE_WEIGHTS_INDEX_NAME)
    return names


# ---- checks before writing -------------------------------------------------------------------------------------


def check_weights(model: torch.nn.Module, records: list[TensorRecord]) -> list[str]:
    """Differences between the checkpoint's tensors and `model`'s state dict (names and shapes), as messages.

    A key missing from the checkpoint is fine when it is tied to a key that is there (a tied `lm_head` is
    saved once, as the input embeddings).
    """
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    aliases: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), set()).add(name)
    tied = {name: names for names in aliases.values() for name in names if len(names) > 1}
    present = {record.name: record.shape for record in records}
    missing = [name for name in expected if name not in present and not (tied.get(name, set()) & present.keys())]
    unexpected = [name for name in present if name not in expected]
    shapes = [
        f"{name}: checkpoint {list(shape)}, model {list(expected[name])}"
        for name, shape in present.items()
        if name in expected and shape != expected[name]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights the model needs are missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} weights the model does not have, e.g. {unexpected[:3]}")
    if shapes:
        problems.append(f"{len(shapes)} weights have the wrong shape, e.g. {shapes[:3]}")
    return problems


def check_processor(processor, tokenizer, config: PreTrainedConfig) -> list[str]:
    """Differences between the processor and the model config that would make prompts the model misreads.

    `tokenizer` is the checkpoint's tokenizer as saved (before `VLMProcessor` adds any missing special token).
    """
    problems = []
    vocab = tokenizer.get_vocab()
    absent = [token for token in IMAGE_SPECIAL_TOKENS if token not in vocab]
    if absent:
        problems.append(f"the tokenizer lacks the special tokens {absent}")
    vocab_size = config.get_text_config().vocab_size
    if len(tokenizer) > vocab_size:
        problems.append(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size} rows (token ids "
            f"{vocab_size}..{len(tokenizer) - 1} have no embedding; resize the model's embeddings)"
        )
    try:
        processor.check_model_config(config)
    except ValueError as error:
        problems.append(str(error))
    return problems


# ---- remote code ---------------------------------------------------------------------------------------------


def _module_name(cls: type) -> str:
    return cls.__module__.rsplit(".", 1)[-1]


def remote_code_classes(config: PreTrainedConfig, processor) -> dict[str, type]:
    """auto class name → our class, for the auto_map: the classes `import vlmforge` registered for `config`."""
    config_class = type(config)
    try:
        base_model = AutoModel._model_mapping[config_class]
        generation_model = AutoModelForImageTextToText._model_mapping[config_class]
    except KeyError as error:
        raise ValueError(
            f"{config_class.__name__} ({config.model_type}) has no model registered with AutoModel and "
            "AutoModelForImageTextToText; only vlmforge checkpoints can be exported."
        ) from error
    return {
        "AutoConfig": config_class,
        "AutoModel": base_model,
        "AutoModelForImageTextToText": generation_model,
        "AutoModelForVision2Seq": generation_model,  # transformers 4's name, and vlmforge.AutoModelForVision2Seq's
        "AutoProcessor": type(processor),
        "AutoImageProcessor": type(processor.image_processor),
    }


def copy_remote_code(classes: dict[str, type], folder: Path) -> tuple[dict[str, str], list[str]]:
    """Copy the files defining `classes`, and every sibling file they import, flat into `folder`.

    Returns the auto_map (`{"AutoModel": "modeling_x.XModel", ...}`) and the names of the copied files. The set
    of files is the one transformers' loader copies into its module cache (`get_relative_import_files`).
    """
    sources: dict[str, Path] = {}
    for cls in classes.values():
        defining = Path(sys.modules[cls.__module__].__file__)
        for file in [defining, *map(Path, get_relative_import_files(defining))]:
            if sources.setdefault(file.name, file) != file:
                raise ValueError(
                    f"Two remote-code files share the base name {file.name}: {sources[file.name]} and {file}."
                )
    for name, file in sources.items():
        shutil.copyfile(file, folder / name)
    auto_map = {auto_class: f"{_module_name(cls)}.{cls.__name__}" for auto_class, cls in classes.items()}
    return auto_map, sorted(sources)


def check_remote_code(folder: Path, auto_map: dict[str, str]) -> None:
    """Raise ValueError unless the remote code in `folder` loads without vlmforge: every auto_map module is
    there, every `from .sibling import` names a file that is there, and nothing else but the standard library,
    torch, transformers, numpy and PIL is imported (`from . import x` and `from ..x` are not followed by
    transformers' loader, so they are refused too)."""
    needed = {reference.rsplit(".", 1)[0] for reference in auto_map.values()}
    problems = [f"{name}.py (auto_map) is missing" for name in sorted(needed) if not (folder / f"{name}.py").is_file()]
    allowed = set(sys.stdlib_module_names) | REMOTE_CODE_PACKAGES
    for file in sorted(folder.glob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level > 1 or node.module is None:
                    problems.append(f"{file.name}:{node.lineno} uses a relative import the Hub loader does not follow")
                elif not (folder / f"{node.module.split('.')[0]}.py").is_file():
                    problems.append(f"{file.name}:{node.lineno} imports .{node.module}, which is not in the folder")
                continue
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                modules = [node.module]
            for module in modules:
                top = module.split(".")[0]
                if top not in allowed:
                    problems.append(f"{file.name}:{node.lineno} imports {module}, which a loader may not have")
    if problems:
        raise ValueError("The remote code would not load without vlmforge: " + "; ".join(problems) + ".")


def _add_processor_auto_map(folder: Path, auto_map: dict[str, str]) -> None:
    """processor_config.json gets AutoProcessor's (and its nested image processor AutoImageProcessor's) entry:
    AutoProcessor and AutoImageProcessor read them from there, not from config.json."""
    path = folder / PROCESSOR_CONFIG_NAME
    processor_dict = json.loads(path.read_text())
    processor_dict["auto_map"] = {key: auto_map[key] for key in ("AutoProcessor", "AutoImageProcessor")}
    if isinstance(processor_dict.get("image_processor"), dict):
        processor_dict["image_processor"]["auto_map"] = {"AutoImageProcessor": auto_map["AutoImageProcessor"]}
    path.write_text(json.dumps(processor_dict, indent=2, sort_keys=True) + "\n")


# ---- export and push ---------------------------------------------------------------------------------------


def _load_checkpoint_parts(checkpoint: Path):
    """config, processor, raw tokenizer and generation config of a vlmforge checkpoint (no weights)."""
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"{checkpoint} is not a checkpoint folder: it has no config.json.")
    if not (checkpoint / PROCESSOR_CONFIG_NAME).is_file():
        raise ValueError(
            f"{checkpoint} has no processor ({PROCESSOR_CONFIG_NAME}); a hub checkpoint needs one. Save a "
            "VLMProcessor.from_model_config(config, image_processor, tokenizer) into it first."
        )
    config = AutoConfig.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)  # as saved: VLMProcessor would add missing tokens
    try:
        processor = AutoProcessor.from_pretrained(checkpoint)
    except ValueError as error:  # VLMProcessor.from_pretrained checks itself against config.json
        raise ValueError(f"Refusing to export {checkpoint}: {error}") from error
    if (checkpoint / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(checkpoint)
    else:
        generation_config = GenerationConfig.from_model_config(config)
    return config, processor, tokenizer, generation_config


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    license: str = "other",
    base_model: list[str] | None = None,
) -> Path:
    """Write the vlmforge checkpoint folder `checkpoint` to `out` as a hub-ready folder (see the module docstring).

    Args:
        checkpoint: a folder written by vlmforge (`save_pretrained` of a model and its `VLMProcessor`).
        out: the folder to create; it must be absent or empty unless `overwrite`.
        max_shard_size: largest safetensors shard, e.g. `"5GB"`, `"500MB"` or a byte count.
        push_to_hub: a Hub repo id (`user/name`): upload `out` there afterwards (`push_folder_to_hub`); if the
            upload fails, `out` stays written and can be pushed again with `push_folder_to_hub`.
        private, revision, commit_message: for the upload (a new repo is private; a branch is created if needed).
        overwrite: replace a non-empty `out` (the old folder is removed only once the new one is in place).
        allow_pickle: read pickled `pytorch_model*.bin` weights (can run code from the file: trusted sources only).
        license: the model card's license id (the backbones' licenses apply to the weights).
        base_model: the backbones' Hub ids for the model card; default: the config's `base_models` field.

    Returns:
        `out` as a `Path`.

    Raises:
        ValueError: `out` is not empty (without `overwrite`) or is `checkpoint`; the checkpoint is not a vlmforge
            checkpoint, its weights do not match its config, its processor does not match its model, or its
            weights are pickled without `allow_pickle`.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise ValueError(f"export writes a new folder: OUT ({out}) must not be the checkpoint itself.")
    check_destination(out, overwrite=overwrite)
    max_shard_bytes = parse_size(max_shard_size)
    records, metadata = read_tensor_records(checkpoint, allow_pickle=allow_pickle)
    config, processor, tokenizer, generation_config = _load_checkpoint_parts(checkpoint)
    classes = remote_code_classes(config, processor)
    with torch.device("meta"):  # names, shapes and parameter counts only
        skeleton = classes["AutoModelForImageTextToText"](config)
    problems = check_weights(skeleton, records) + check_processor(processor, tokenizer, config)
    if problems:
        raise ValueError(f"Refusing to export {checkpoint}: " + "; ".join(problems) + ".")
    generation_config = chat_generation_config(processor.tokenizer, generation_config)
    card = render_model_card(
        config, processor, skeleton, repo_id=push_to_hub or out.name, license=license, base_model=base_model
    )

    with atomic_output_dir(out, overwrite=overwrite) as staging:
        write_sharded_safetensors(records, staging, max_shard_size=max_shard_bytes, metadata=metadata)
        auto_map, code_files = copy_remote_code(classes, staging)
        config_dict = json.loads((checkpoint / "config.json").read_text())
        config_dict["auto_map"] = auto_map
        config_dict.setdefault("architectures", [classes["AutoModelForImageTextToText"].__name__])
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        generation_config.save_pretrained(staging)
        processor.save_pretrained(staging)  # tokenizer, processor_config.json, chat_template.jinja
        _add_processor_auto_map(staging, auto_map)
        (staging / "README.md").write_text(card, encoding="utf-8")
        check_remote_code(staging, auto_map)
        logger.info(f"Remote code: {', '.join(code_files)}.")
    logger.info(f"Exported {checkpoint} → {out}.")

    if push_to_hub:
        push_folder_to_hub(out, push_to_hub, private=private, revision=revision, commit_message=commit_message)
    return out


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
):
    """Upload `folder` to the Hub model repo `repo_id`, creating the repo (and the branch `revision`) if needed.

    Args:
        token: a Hub token; None uses `HF_TOKEN` or the `hf auth login` cache, as huggingface_hub does.
        api: the `HfApi` to use (tests pass a stand-in that records the calls); a new `HfApi(token=token)` if None.

    Returns:
        The `CommitInfo` of the upload.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a checkpoint folder (no config.json); export it first.")
    api = HfApi(token=token) if api is None else api
    # private=None leaves an existing repo (and the account's default) alone; True makes a new repo private
    repo_url = api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload {folder.name} (vlmforge {vlmforge.__version__})",
    )
    logger.info(f"Pushed {folder} to https://huggingface.co/{repo_id}" + (f" (branch {revision})" if revision else ""))
    return commit


__all__ = [
    "REMOTE_CODE_PACKAGES",
    "TensorRecord",
    "check_processor",
    "check_remote_code",
    "check_weights",
    "copy_remote_code",
    "export_checkpoint",
    "parse_size",
    "plan_shards",
    "push_folder_to_hub",
    "read_tensor_records",
    "remote_code_classes",
    "write_sharded_safetensors",
]
