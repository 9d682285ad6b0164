"""Peak memory of `vlmforge export` on a checkpoint of more than 1 GB, beside transformers' load-and-save.

Run: `.venv/bin/python benchmarks/bench_convert.py` (options: --size-gb, --max-shard-size, --source-shard-size,
--skip-transformers). Needs about 3.5 × size-gb of free disk in the temporary folder and takes 1–3 minutes.

A random fully autoregressive checkpoint (tiny vision encoder and connector, a Llama of 1024 × N layers sized to
`--size-gb` in float32) is generated on the fly in a temporary folder — one source shard in memory at a time — with
its processor and generation config, then:

- `vlmforge export SRC OUT --max-shard-size S` runs in a fresh process; it streams tensors from the source files
  into the output shards, so its memory should not grow with the checkpoint;
- for comparison, transformers' way to re-shard, `from_pretrained(SRC)` then `save_pretrained(OUT, max_shard_size=S)`,
  runs in another fresh process (it holds the whole model).

Each process reports its peak resident set size (`VmHWM`) and its RSS after imports, before the work
(`baseline`: Python, torch, transformers). The figures are peak RSS ÷ largest output shard, and the growth over the
baseline ÷ largest output shard. The temporary folder is deleted at the end.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlmforge.conversion.export import parse_size
from vlmforge.conversion.generation_config import chat_generation_config
from vlmforge.modeling.configuration_autoregressive_vlm import AutoregressiveVLMConfig
from vlmforge.modeling.modeling_autoregressive_vlm import AutoregressiveVLMForConditionalGeneration
from vlmforge.processing.image_processing_vlm import VLMImageProcessor
from vlmforge.processing.processing_vlm import VLMProcessor
from vlmforge.toy_tokenizer import build_toy_tokenizer

HIDDEN, INTERMEDIATE, VOCAB = 1024, 4096, 32000

# runs in a fresh process: report RSS after imports, do the work, report the peak
WORKER = r"""
import json, sys, time
mode, src, out, max_shard_size = sys.argv[1:5]
from transformers.utils import logging
logging.disable_progress_bar()
if mode == "vlmforge":
    from vlmforge.conversion.export import export_checkpoint
else:
    import vlmforge
    from transformers import AutoModelForImageTextToText

def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

baseline = status_kib("VmRSS")
start = time.perf_counter()
if mode == "vlmforge":
    export_checkpoint(src, out, max_shard_size=max_shard_size)
else:
    model = AutoModelForImageTextToText.from_pretrained(src, dtype="auto")
    model.save_pretrained(out, max_shard_size=max_shard_size)
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
peak = status_kib("VmHWM")
print("RESULT " + json.dumps({"baseline_kib": baseline, "peak_kib": peak, "seconds": seconds}))
"""


def bench_config(tokenizer, size_bytes: int) -> AutoregressiveVLMConfig:
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN  # attention, SwiGLU MLP, norms
    layers = max(1, -(-(size_bytes // 4 - 2 * VOCAB * HIDDEN) // per_layer))  # float32, untied embeddings
    return AutoregressiveVLMConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        connector_config=dict(n_latents=64, depth=1, num_attention_heads=8, num_key_value_heads=8, head_dim=128),
        text_config=dict(
            model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip


def generate_checkpoint(folder: Path, *, size_bytes: int, shard_bytes: int) -> int:
    """A random checkpoint of about `size_bytes` (float32) in `folder`, written shard by shard; returns its size."""
    tokenizer = build_toy_tokenizer(300)
    config = bench_config(tokenizer, size_bytes)
    with torch.device("meta"):
        skeleton = AutoregressiveVLMForConditionalGeneration(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for i, names in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: torch.randn(shapes[name], generator=generator) * 0.02 for name in names}
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(names, shard))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    chat_generation_config(tokenizer, skeleton.generation_config).save_pretrained(folder)
    VLMProcessor.from_model_config(config, VLMImageProcessor(), tokenizer).save_pretrained(folder)
    return total


def run_worker(mode: str, src: Path, out: Path, max_shard_size: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(src), str(out), max_shard_size],
        capture_output=True,
        text=True,
        check=False,  # a failure is raised below with the worker's stderr
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{completed.stderr[-3000:]}")
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["largest_shard"] = max(path.stat().st_size for path in out.glob("*.safetensors"))
    result["shards"] = len(list(out.glob("*.safetensors")))
    return result


def report(name: str, result: dict) -> str:
    mib = 2**20
    peak, baseline, largest = result["peak_kib"] * 1024, result["baseline_kib"] * 1024, result["largest_shard"]
    return (
        f"{name:<34} {result['shards']:>3} shards, largest {largest / mib:7.1f} MiB | peak RSS {peak / mib:7.1f} MiB "
        f"(baseline {baseline / mib:6.1f}) | peak ÷ largest shard {peak / largest:5.2f} | "
        f"(peak − baseline) ÷ largest shard {(peak - baseline) / largest:5.2f} | {result['seconds']:5.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.1, help="checkpoint size in GB (10^9 bytes)")
    parser.add_argument("--max-shard-size", default="300MB", help="output shard size")
    parser.add_argument("--source-shard-size", default="600MB", help="shard size of the generated checkpoint")
    parser.add_argument("--skip-transformers", action="store_true", help="only run vlmforge export")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="vlmforge-bench-convert-"))
    try:
        start = time.perf_counter()
        (workdir / "src").mkdir()
        total = generate_checkpoint(
            workdir / "src", size_bytes=int(args.size_gb * 1e9), shard_bytes=parse_size(args.source_shard_size)
        )
        print(f"generated a {total / 1e9:.2f} GB float32 checkpoint in {time.perf_counter() - start:.1f} s ({workdir})")
        print(f"max_shard_size={args.max_shard_size}; peak RSS of a fresh process each\n")
        ours = run_worker("vlmforge", workdir / "src", workdir / "exported", args.max_shard_size)
        print(report("vlmforge export (streamed)", ours))
        if not args.skip_transformers:
            shutil.rmtree(workdir / "exported")  # disk: one output at a time
            theirs = run_worker("transformers", workdir / "src", workdir / "resaved", args.max_shard_size)
            print(report("transformers from/save_pretrained", theirs))
            print(f"\npeak RSS, vlmforge ÷ transformers: {ours['peak_kib'] / theirs['peak_kib']:.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
