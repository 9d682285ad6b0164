"""Shared helpers of the benchmarks that put our autoregressive VLM beside transformers' Idefics2.

Not a benchmark itself. What every `bench_*.py` script that imports it gets:

- `add_common_arguments` / `setup_torch`: --device, --dtype, --attn, --threads, --repeats, --warmup, --seed,
  --json, and the model-size flags (--vision-*, --text-*, --perceiver-*); `--preset idefics2` sets the real
  Idefics2-8B widths (SigLIP-so400m at 980 px, 64-latent perceiver, Mistral-7B widths) for a GPU.
- `build_pair`: a random `Idefics2ForConditionalGeneration` and our `AutoregressiveVLMForConditionalGeneration`
  converted from it by the production converter (`convert_config` + `convert_state_dict`, strict load): the
  same weights, built on the benchmark device.
- `make_processor` / `photographs`: our `VLMProcessor` for a config (the toy tokenizer; offline) and the bundled
  photograph with crops/resizes of other aspect ratios. Both models get the same processor outputs.
- `time_interleaved`: warm-up, then the runners take turns `repeats` times (load from other processes hits
  them alike); medians are reported, and speed ratios are `paired_ratio`s: the median over rounds of the two
  runs' ratio in that round.
- `peak_memory`: CUDA, `max_memory_allocated` growth over the call; CPU, the peak resident set size growth over
  the call, measured in a fresh subprocess per runner (the script re-runs itself with `--memory-worker NAME`).
- `print_table`, `write_json` and, run as a script (used by gpu_check.sh): `python benchmarks/_common.py summarize
  FILE` prints the rows the scripts appended to FILE (`--json FILE`) as one table; `record-tests FILE LOG STATUS`
  appends a pytest run's outcome to FILE.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "vlmforge" / "assets" / "grace_hopper.jpg"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Model sizes. "cpu": small enough that each script finishes in about a minute on 2 CPU cores, with the
# processor at Idefics2's real settings (378..980 px, 14 px patches, a 70 × 70 position table), so images have
# their real patch counts and padding; the encoder is narrower and shallower than SigLIP. "idefics2": the real
# widths of Idefics2-8B (SigLIP-so400m, 64-latent perceiver of depth 3, Mistral-7B layers), for a GPU; the LM
# keeps `--text-layers` layers (default 8 of Mistral's 32) so that both models fit and build in seconds.
PRESETS = {
    "cpu": dict(
        vision_hidden=192, vision_intermediate=768, vision_layers=2, vision_heads=3, image_size=980, patch_size=14,
        perceiver_latents=64, perceiver_depth=3, perceiver_heads=4, perceiver_kv_heads=2, perceiver_head_dim=64,
        text_hidden=256, text_intermediate=768, text_layers=4, text_heads=4, text_kv_heads=2, vocab_size=4096,
    ),
    "idefics2": dict(
        vision_hidden=1152, vision_intermediate=4304, vision_layers=27, vision_heads=16, image_size=980, patch_size=14,
        perceiver_latents=64, perceiver_depth=3, perceiver_heads=16, perceiver_kv_heads=4, perceiver_head_dim=96,
        text_hidden=4096, text_intermediate=14336, text_layers=8, text_heads=32, text_kv_heads=8, vocab_size=32768,
    ),
}  # fmt: skip


# ---- arguments and torch set-up ------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, *, repeats: int = 5, warmup: int = 1) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights and activations")
    parser.add_argument(
        "--attn",
        default="auto",
        help="attention backend set on both models (eager, sdpa, flash_attention_2, ...); auto: each model's own "
        "default, as users get it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine a descheduled worker thread stalls every parallel op, "
        "which made 2-thread timings 2-4× slower and far noisier than 1-thread ones here)",
    )
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed runs per model first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", metavar="FILE", help="append the result rows to FILE (JSON lines)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: measure one runner's peak RSS
    parser.add_argument(
        "--preset", default=None, choices=PRESETS, help="model sizes (default: cpu on CPU, idefics2 on CUDA)"
    )
    size = parser.add_argument_group("model size (override the preset)")
    for name, value in PRESETS["cpu"].items():
        size.add_argument("--" + name.replace("_", "-"), type=type(value), default=None)


def resolve_sizes(args: argparse.Namespace) -> None:
    """Fill every size flag left unset from the preset (cpu on CPU, idefics2 on CUDA)."""
    if args.preset is None:
        args.preset = "cpu" if args.device == "cpu" else "idefics2"
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def setup_torch(args: argparse.Namespace):
    import torch

    resolve_sizes(args)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return getattr(torch, DTYPES[args.dtype])


def bench_label(name: str, args: argparse.Namespace) -> str:
    """The `bench` field of result rows: the name, plus the attention backend when one was forced."""
    return name if args.attn == "auto" else f"{name} [{args.attn}]"


def size_line(args: argparse.Namespace) -> str:
    return (
        f"vision {args.vision_layers} layers × {args.vision_hidden} ({args.vision_heads} heads, MLP "
        f"{args.vision_intermediate}), {args.image_size} px table / {args.patch_size} px patches | perceiver "
        f"{args.perceiver_latents} latents × depth {args.perceiver_depth} ({args.perceiver_heads} heads, "
        f"{args.perceiver_kv_heads} kv, head_dim {args.perceiver_head_dim}) | LM llama {args.text_layers} layers × "
        f"{args.text_hidden} (MLP {args.text_intermediate}, {args.text_heads} heads, {args.text_kv_heads} kv), "
        f"vocab {args.vocab_size}"
    )


def run_line(args: argparse.Namespace, attn: dict[str, str], *, turns: str = "models") -> str:
    import torch

    where = args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name(args.device)})"
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    backends = ", ".join(f"{name}: {impl}" for name, impl in attn.items())
    return (
        f"{where}{threads}, {args.dtype}, attention {backends}; torch {torch.__version__}; median of "
        f"{args.repeats} runs after {args.warmup} warm-up, {turns} taking turns; load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )


# ---- models, processor, photographs --------------------------------------------------------------------------


def tokenizer_for(vocab_size: int):
    from vlmforge.toy_tokenizer import build_toy_tokenizer

    tokenizer = build_toy_tokenizer(vocab_size)
    tokenizer.padding_side = "left"
    return tokenizer


def idefics2_config(args: argparse.Namespace, tokenizer):
    from transformers import Idefics2Config

    return Idefics2Config(
        vision_config=dict(
            hidden_size=args.vision_hidden,
            intermediate_size=args.vision_intermediate,
            num_hidden_layers=args.vision_layers,
            num_attention_heads=args.vision_heads,
            image_size=args.image_size,
            patch_size=args.patch_size,
        ),
        perceiver_config=dict(
            hidden_size=args.text_hidden,
            resampler_n_latents=args.perceiver_latents,
            resampler_depth=args.perceiver_depth,
            resampler_n_heads=args.perceiver_heads,
            resampler_head_dim=args.perceiver_head_dim,
            num_key_value_heads=args.perceiver_kv_heads,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=args.vocab_size,
            hidden_size=args.text_hidden,
            intermediate_size=args.text_intermediate,
            num_hidden_layers=args.text_layers,
            num_attention_heads=args.text_heads,
            num_key_value_heads=args.text_kv_heads,
            max_position_embeddings=8192,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )


def randomise(model, seed: int) -> None:
    """Weights of unit-scale activations (as tests/test_parity_idefics2.py): default init gives near-zero outputs
    and identical latents, which would make the parity figures meaningless. Drawn on the model's device, seeded by
    parameter name, so parameters of the same name get the same values in two models."""
    import zlib

    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            generator = torch.Generator(device=param.device).manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
            noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
            if param.ndim == 1:
                param.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)  # norms, biases
            else:
                param.copy_(noise * param[0].numel() ** -0.5)


def set_attention(model, attn: str) -> str:
    if attn != "auto":
        model.set_attn_implementation(attn)
    return model.config._attn_implementation


@dataclass
class Pair:
    theirs: object  # Idefics2ForConditionalGeneration
    ours: object  # AutoregressiveVLMForConditionalGeneration
    attn: dict[str, str]  # attention backend of each
    tokenizer: object
    processor: object  # our VLMProcessor for the converted config


def build_pair(args: argparse.Namespace, dtype, *, image_processor_kwargs: dict | None = None) -> Pair:
    """Idefics2 with random weights and ours converted from it (strict load), both in eval mode on the device."""
    import torch
    from transformers import Idefics2ForConditionalGeneration

    from vlmforge.conversion.idefics2 import convert_config, convert_state_dict
    from vlmforge.modeling.modeling_autoregressive_vlm import AutoregressiveVLMForConditionalGeneration

    tokenizer = tokenizer_for(args.vocab_size)
    config = idefics2_config(args, tokenizer)
    with torch.device(args.device):
        theirs = Idefics2ForConditionalGeneration(config)
    randomise(theirs, args.seed)
    theirs.to(dtype).eval()
    our_config = convert_config(config)
    with torch.device(args.device):
        ours = AutoregressiveVLMForConditionalGeneration(our_config)
    converted = convert_state_dict(theirs.state_dict(), expected_keys=ours.state_dict().keys())
    ours.load_state_dict(converted, strict=True)
    del converted
    ours.to(dtype).eval()
    attn = {"ours": set_attention(ours, args.attn), "Idefics2": set_attention(theirs, args.attn)}
    for model in (theirs, ours):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = make_processor(ours.config, tokenizer, **(image_processor_kwargs or {}))
    return Pair(theirs=theirs, ours=ours, attn=attn, tokenizer=tokenizer, processor=processor)


def make_processor(model_config, tokenizer, **image_processor_kwargs):
    from vlmforge.processing.image_processing_vlm import VLMImageProcessor
    from vlmforge.processing.processing_vlm import VLMProcessor

    return VLMProcessor.from_model_config(model_config, VLMImageProcessor(**image_processor_kwargs), tokenizer)


def photographs() -> dict:
    """The bundled photograph (512 × 600, width × height) and crops/resizes of other sizes and aspect ratios."""
    from PIL import Image

    photo = Image.open(PHOTO).convert("RGB")
    images = {
        "512x600 original": photo,
        "400x600 portrait": photo.crop((56, 0, 456, 600)),
        "512x300 landscape": photo.crop((0, 100, 512, 400)),
        "256x300 small": photo.resize((256, 300), Image.BICUBIC),
        "980x420 wide": photo.crop((0, 150, 512, 369)).resize((980, 420), Image.BICUBIC),
    }
    for image in images.values():
        image.load()
    return images


def to_device(inputs: dict, device: str, dtype) -> dict:
    """Processor outputs onto the device; pixel values in the model's dtype (what a user's pipeline does)."""
    moved = {}
    for key, value in inputs.items():
        value = value.to(device)
        if key == "pixel_values":
            value = value.to(dtype)
        moved[key] = value
    return moved


def patch_statistics(inputs: dict, patch_size: int) -> dict:
    """Sub-images, and real vs padded (computed) patches, of a processor batch."""
    mask = inputs["pixel_attention_mask"].flatten(0, 1).bool()  # (B * N_img, H, W)
    real_images = mask.flatten(1).any(dim=1)
    mask = mask[real_images]
    heights = mask[:, :, 0].sum(dim=1) // patch_size
    widths = mask[:, 0, :].sum(dim=1) // patch_size
    real = int((heights * widths).sum())
    padded = int(len(mask) * (mask.shape[1] // patch_size) * (mask.shape[2] // patch_size))
    return {"sub_images": len(mask), "real_patches": real, "computed_patches": padded}


# ---- timing and memory ---------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_interleaved(runners: dict[str, Callable[[], object]], *, repeats: int, warmup: int, device: str) -> dict:
    """Seconds of each run of each runner, the runners taking turns (warm-up runs first, not returned)."""
    times = {name: [] for name in runners}
    for attempt in range(warmup + repeats):
        for name, run in runners.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if attempt >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Ratio:
    """A paired ratio: the median over rounds, and the interquartile range of the per-round ratios (the noise)."""

    median: float
    low: float
    high: float


def paired_ratio(numerators: list[float], denominators: list[float]) -> Ratio:
    """Median over rounds of numerator_i / denominator_i. The runners took turns, so round i's two runs saw about
    the same load from other processes: pairing them cancels slow drifts that a ratio of medians would keep."""
    ratios = sorted(n / d for n, d in zip(numerators, denominators, strict=True))
    if len(ratios) < 2:
        return Ratio(ratios[0], ratios[0], ratios[0])
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return Ratio(statistics.median(ratios), low, high)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _release_free_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed heap pages resident; give them back so they cannot hide the next call's growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_in_process(run: Callable[[], object], device: str) -> dict:
    """Peak memory growth (bytes) of one call of `run`, after one warm-up call."""
    import torch

    run()  # warm-up: one-time allocations (kernel caches, lazily built buffers) are not the call's cost
    if device.startswith("cuda"):
        _release_free_memory()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before, "kind": "max_memory_allocated"}
    _release_free_memory()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    run()
    return {"peak_bytes": (_status_kib("VmHWM") - before) * 1024, "kind": "peak RSS"}


def peak_memory(args: argparse.Namespace, runners: dict[str, Callable[[], object]]) -> dict[str, dict]:
    """Peak memory growth of one call of each runner: in this process on CUDA; on CPU in a fresh subprocess each
    (this script again, with `--memory-worker NAME`), so one runner's freed pages cannot hide the other's."""
    if args.device.startswith("cuda"):
        return {name: measure_in_process(run, args.device) for name, run in runners.items()}
    results = {}
    for name in runners:
        command = [sys.executable, sys.argv[0], *sys.argv[1:], "--memory-worker", name]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((line for line in completed.stdout.splitlines() if line.startswith("MEMORY ")), None)
        if completed.returncode != 0 or line is None:
            raise RuntimeError(f"memory worker {name} failed:\n{completed.stderr[-3000:]}")
        results[name] = json.loads(line.removeprefix("MEMORY "))
    return results


def memory_row(args: argparse.Namespace, runners: dict, label: str, config: str) -> list[dict]:
    """[the peak-memory comparison row of `runners` ("ours", "Idefics2")], or [] under --no-memory."""
    if args.no_memory:
        return []
    memory = peak_memory(args, runners)
    return [
        comparison_row(label, f"peak memory ({memory['ours']['kind']} growth)", memory["ours"]["peak_bytes"],
                       memory["Idefics2"]["peak_bytes"], unit="bytes", higher_is_better=False, target=None,
                       config=config)
    ]  # fmt: skip


def report(args: argparse.Namespace, rows: list[dict], times: dict[str, list[float]]) -> None:
    """Print the comparison rows and each model's run-to-run range of `times` (seconds), then write --json."""
    print_comparisons(rows)
    spread = {name: f"{min(v) * 1e3:.0f}–{max(v) * 1e3:.0f} ms" for name, v in times.items()}
    print(f"\nrun-to-run range: {spread}")
    write_json(args, rows)


def memory_worker(args: argparse.Namespace, runners: dict[str, Callable[[], object]]) -> None:
    """The `--memory-worker NAME` side of `peak_memory`: measure one runner, print one MEMORY line."""
    print("MEMORY " + json.dumps(measure_in_process(runners[args.memory_worker], args.device)), flush=True)


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


# ---- output ----------------------------------------------------------------------------------------------------


def print_table(header: list[str], rows: list[list[str]], *, left: int = 1) -> None:
    """Columns padded to their widest cell; the first `left` left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "  ".join(
            str(cell).ljust(width) if i < left else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        )
    print(line(header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def write_json(args: argparse.Namespace, rows: list[dict]) -> None:
    """Append result rows ({bench, metric, ours, theirs, unit, ratio, spread, target, config}) to --json FILE, each
    with the model sizes and the device, dtype and threads it ran with."""
    if not args.json:
        return
    run = f"{args.device}, {args.dtype}" + (f", {args.threads} threads" if args.device == "cpu" else "")
    with open(args.json, "a") as out:
        for row in rows:
            out.write(json.dumps({**row, "sizes": f"preset {args.preset}: {size_line(args)}", "run": run}) + "\n")


def comparison_row(bench: str, metric: str, ours: float, theirs: float, *, unit: str, higher_is_better: bool,
                   target: float | None, config: str, ratio: "Ratio | None" = None) -> dict:  # fmt: skip
    """One result: ratio = our speed / their speed (or their memory / our memory): > 1 means we do better.
    `ratio` (a `paired_ratio`) overrides the quotient of the two figures and brings its spread."""
    spread = None
    if ratio is None:
        ratio = ours / theirs if higher_is_better else theirs / ours
    else:
        ratio, spread = ratio.median, [ratio.low, ratio.high]
    return dict(bench=bench, metric=metric, ours=ours, theirs=theirs, unit=unit, ratio=ratio, spread=spread,
                target=target, config=config)  # fmt: skip


def format_ratio(row: dict) -> str:
    if row.get("ratio") is None:
        return "-"
    spread = row.get("spread")
    return f"{row['ratio']:.2f}×" + (f" (IQR {spread[0]:.2f}–{spread[1]:.2f})" if spread else "")


def verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return ""
    return f"≥ {target:.2f}× {'met' if ratio >= target else 'NOT MET'}"


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return mib(value)
    if unit == "s":
        return f"{value * 1e3:.1f} ms"
    return f"{value:.1f} {unit}"


def print_comparisons(rows: list[dict]) -> None:
    print_table(
        ["metric", "ours", "Idefics2", "ratio, >1: ours better (IQR of paired runs)", "target"],
        [
            [
                row["metric"],
                format_value(row["ours"], row["unit"]),
                format_value(row["theirs"], row["unit"]),
                format_ratio(row),
                verdict(row["ratio"], row["target"]) if row["ratio"] is not None else "",
            ]
            for row in rows
        ],
    )


def summarize(path: str) -> int:
    """Print every row of a --json file as one table, then how many targets were missed (informational)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    table, missed = [], []
    for row in rows:
        if row.get("ratio") is None:  # an informational row: the test run, our own trade-offs
            table.append([row["bench"], row["metric"], row.get("ours_text", format_value(row.get("ours"), row["unit"])),
                          row.get("theirs_text", "-"), "-", row.get("note", "")])  # fmt: skip
            continue
        if row["target"] is not None and row["ratio"] < row["target"]:
            missed.append(f"{row['bench']}: {row['metric']}")
        table.append([row["bench"], row["metric"], format_value(row["ours"], row["unit"]),
                      format_value(row["theirs"], row["unit"]), format_ratio(row),
                      verdict(row["ratio"], row["target"])])  # fmt: skip
    print_table(["bench", "metric", "ours", "Idefics2", "ratio, >1: ours better", "target / note"], table, left=2)
    for key in ("run", "sizes", "config"):
        for value in dict.fromkeys(row[key] for row in rows if row.get(key)):
            print(f"{key}: {value}")
    print(f"targets missed: {len(missed)}" + (f" ({'; '.join(missed)})" if missed else ""))
    return 0


def record_tests(path: str, log: str, status: str) -> int:
    """Append the outcome of a pytest run (its log's last line and exit status) to a --json file as a row."""
    lines = [line.strip() for line in Path(log).read_text().splitlines() if line.strip()]
    summary = lines[-1] if lines else "(no output)"
    row = dict(bench="tests", metric="pytest -m gpu", ours=None, unit="", ratio=None, target=None, config=None,
               ours_text=summary, theirs_text="", note=f"exit status {status}")  # fmt: skip
    with open(path, "a") as out:
        out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summarize":
        sys.exit(summarize(sys.argv[2]))
    if len(sys.argv) == 5 and sys.argv[1] == "record-tests":
        sys.exit(record_tests(*sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} summarize RESULTS.jsonl | record-tests RESULTS.jsonl PYTEST_LOG EXIT_STATUS")
