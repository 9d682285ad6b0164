"""Reading source checkpoints safely and writing ours atomically: shared by every converter and the builder.

- `weight_files(src, allow_pickle=...)`: the weight files of a checkpoint folder, safetensors first; pickled
  `pytorch_model*.bin` files only when the caller opts in (unpickling can run code from the file).
- `load_weights(src, allow_pickle=...)`: every tensor of those files, in one dict.
- `check_destination(dst, overwrite=...)` and `atomic_output_dir(dst, overwrite=...)`: a checkpoint is written
  into a temporary folder beside `dst` and renamed into place at the end, so `dst` appears complete or not at
  all, and a failure leaves neither `dst` nor the temporary folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.utils import logging

logger = logging.get_logger(__name__)

STAGING_SUFFIX = ".partial"


def weight_files(src: str | Path, *, allow_pickle: bool = False) -> list[Path]:
    """The weight files of checkpoint folder `src`: safetensors (one file, or the shards of its index), else
    opted-in pickled `pytorch_model*.bin` files.

    Raises:
        ValueError: `src` holds no weights, or only pickled ones and `allow_pickle` is False.
    """
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [src / name for name in shard_names]
    else:
        files = sorted(src.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(src.glob("pytorch_model*.bin"))
    if not pickles:
        raise ValueError(f"{src} holds no weights: expected model.safetensors or model-XXXXX-of-XXXXX.safetensors.")
    if not allow_pickle:
        raise ValueError(
            f"{src} holds only pickled weights ({[p.name for p in pickles]}). Unpickling can run arbitrary code; "
            "convert them to safetensors, or pass allow_pickle=True if you trust their origin."
        )
    logger.warning(f"Loading pickled weights from {src} (allow_pickle=True).")
    return pickles


def load_weights(src: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `src` (see `weight_files`), on the CPU.

    Raises:
        ValueError: no weights, refused pickles, an unreadable file, or a key repeated across shards.
    """
    files = weight_files(src, allow_pickle=allow_pickle)
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                part = load_file(file)
            else:  # opted in; weights_only still refuses anything but tensors and plain containers
                part = torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(f"Could not read weights from {file}: {error}") from error
        duplicated = state_dict.keys() & part.keys()
        if duplicated:
            raise ValueError(f"{file.name} repeats keys from another shard, e.g. {sorted(duplicated)[:3]}.")
        state_dict.update(part)
    logger.info(f"Read {len(state_dict)} tensors from {len(files)} file(s) in {src}.")
    return state_dict


def check_destination(dst: str | Path, *, overwrite: bool = False) -> None:
    """Raise ValueError unless `dst` is absent, an empty folder, or (with `overwrite`) an existing folder."""
    dst = Path(dst)
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ValueError(f"Destination {dst} exists and is not a folder; choose a new path.")
    if any(dst.iterdir()) and not overwrite:
        raise ValueError(
            f"Destination {dst} already exists and is not an empty folder; choose a new path "
            "(or pass overwrite=True / --overwrite to replace it)."
        )


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `dst`; on success it becomes `dst`, on any exception it is removed.

    With `overwrite`, an existing `dst` is moved aside, the new folder renamed into place, and only then the old
    one deleted; if that rename fails, the old `dst` is put back. Call `check_destination` first to refuse early,
    before any expensive work; it is checked again here.
    """
    dst = Path(dst)
    check_destination(dst, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=STAGING_SUFFIX, dir=dst.parent))
    # mkdtemp makes the folder private (0o700); the checkpoint should get the permissions mkdir would give it
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        _replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, dst: Path) -> None:
    """Rename `staging` to `dst`, replacing an existing `dst` (empty, or checked by `check_destination`)."""
    if not dst.exists():
        os.replace(staging, dst)
        return
    if not any(dst.iterdir()):
        dst.rmdir()  # a rename cannot replace a folder on every platform
        os.replace(staging, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(staging, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["STAGING_SUFFIX", "atomic_output_dir", "check_destination", "load_weights", "weight_files"]
