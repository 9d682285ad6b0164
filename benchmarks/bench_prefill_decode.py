"""Prefill time and decode tokens/s of `generate`: ours beside Idefics2, same weights, same processor inputs.

Run: `.venv/bin/python benchmarks/bench_prefill_decode.py` (under a minute on 2 CPU cores; options: --device cuda,
--dtype bf16, --attn, --photo, --split, --batch-size, --new-tokens, --repeats, the model-size flags,
--preset idefics2; --help lists them).

A random `Idefics2ForConditionalGeneration` and our `AutoregressiveVLMForConditionalGeneration` converted from it
(identical weights) get the same `VLMProcessor` outputs: a chat prompt with one photograph (default: the bundled
512 × 600 photograph at native resolution, no splitting → 1 image, 64 visual tokens). Greedy decoding with
`min_new_tokens = max_new_tokens = 32`, so both generate exactly 32 tokens. A streamer timestamps every new token:
prefill is from the `generate` call to the first new token (vision encoder, connector, the prompt through the LM;
Idefics2 encodes the images before the streamer's first call, so that is not the start), and each of the 31 later
decode steps is timed apart. Figures are medians over `--repeats` runs (the models taking turns, after a warm-up
run each), under torch.inference_mode; decode tokens/s = batch size / median step; the ratios are medians over
rounds of the paired ratio (see `_common.paired_ratio`).
Peak memory: growth over one `generate` call (CPU: peak RSS of a fresh process per model; CUDA:
max_memory_allocated).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under `python -P`

import _common as common  # noqa: E402

PROMPT = "User:<image>Describe the picture in one sentence.<end_of_utterance>\nAssistant:"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=12, warmup=1)
    parser.add_argument("--photo", default="512x600 original", help=f"one of: {', '.join(common.photographs())}")
    parser.add_argument("--split", action="store_true", help="image splitting on (5 sub-images, 320 tokens)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (the same prompt)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (min = max)")
    return parser.parse_args(argv)


class StepClock:
    """A streamer that timestamps every `put`: generate puts the prompt, then each new token after its step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def setup(args):
    import torch

    dtype = common.setup_torch(args)
    torch.manual_seed(args.seed)
    pair = common.build_pair(args, dtype)
    photo = common.photographs()[args.photo]
    inputs = pair.processor(
        text=[PROMPT] * args.batch_size,
        images=[[photo]] * args.batch_size,
        do_image_splitting=args.split,
        padding=True,
        return_tensors="pt",
    )
    inputs = common.to_device(dict(inputs), args.device, dtype)
    generate_kwargs = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    records = {"ours": [], "Idefics2": []}

    def runner(name, model):
        def run():
            clock = StepClock()
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**inputs, **generate_kwargs, streamer=clock)
            # from the call, not from the streamer's first put: Idefics2 encodes the images before that put
            records[name].append(([start, *clock.times[1:]], out))
            return out

        return run

    runners = {"ours": runner("ours", pair.ours), "Idefics2": runner("Idefics2", pair.theirs)}
    return pair, inputs, runners, records


def main() -> None:
    args = parse_args()
    pair, inputs, runners, records = setup(args)
    if args.memory_worker:
        common.memory_worker(args, runners)
        return

    common.time_interleaved(runners, repeats=args.repeats, warmup=args.warmup, device=args.device)
    prefills, steps, totals = {}, {}, {}  # per run, in round order
    for name, runs in records.items():
        timed = runs[args.warmup :]  # the warm-up runs are recorded too
        prefills[name] = [times[1] - times[0] for times, _ in timed]
        steps[name] = [common.median([b - a for a, b in zip(times[1:], times[2:])]) for times, _ in timed]
        totals[name] = [times[-1] - times[0] for times, _ in timed]
    prefill = {name: common.median(values) for name, values in prefills.items()}
    step = {name: common.median(values) for name, values in steps.items()}
    total = {name: common.median(values) for name, values in totals.items()}
    prefill_ratio = common.paired_ratio(prefills["Idefics2"], prefills["ours"])
    decode_ratio = common.paired_ratio(steps["Idefics2"], steps["ours"])
    total_ratio = common.paired_ratio(totals["Idefics2"], totals["ours"])
    ours_ids, theirs_ids = records["ours"][-1][1], records["Idefics2"][-1][1]
    new_tokens = ours_ids.shape[1] - inputs["input_ids"].shape[1]
    same = ours_ids.shape == theirs_ids.shape and bool((ours_ids == theirs_ids).all())
    if ours_ids.shape != theirs_ids.shape:
        raise SystemExit(f"different lengths generated: {tuple(ours_ids.shape)} vs {tuple(theirs_ids.shape)}")
    matching = int((ours_ids == theirs_ids)[:, inputs["input_ids"].shape[1] :].sum())

    image_tokens = int((inputs["input_ids"][0] == pair.ours.config.image_token_id).sum())
    label = common.bench_label("generate", args)
    config = (
        f"bench_prefill_decode: batch {args.batch_size} × one photograph ({args.photo}, splitting "
        f"{'on' if args.split else 'off'}), prompt {inputs['input_ids'].shape[1]} tokens of which {image_tokens} "
        f"visual, pixel_values {tuple(inputs['pixel_values'].shape)}; greedy, {new_tokens} new tokens "
        f"(min = max = {args.new_tokens})"
    )
    print(config)
    print(common.size_line(args))
    print(common.run_line(args, pair.attn))
    print(
        f"parity: generated tokens identical: {same} ({matching} of {ours_ids.shape[0] * new_tokens} new tokens equal"
        f"{'; in half precision, rounding differences may flip near-tied greedy choices' if not same else ''})\n"
    )
    rows = [
        common.comparison_row(label, "prefill (vision + prompt → 1st token)", prefill["ours"],
                              prefill["Idefics2"], unit="s", higher_is_better=False, target=1.0, config=config,
                              ratio=prefill_ratio),
        common.comparison_row(label, "decode tokens/s", args.batch_size / step["ours"],
                              args.batch_size / step["Idefics2"], unit="tok/s", higher_is_better=True, target=1.0,
                              config=config, ratio=decode_ratio),
        common.comparison_row(label, f"whole generate ({new_tokens} tokens)", total["ours"], total["Idefics2"],
                              unit="s", higher_is_better=False, target=None, config=config, ratio=total_ratio),
    ]  # fmt: skip
    rows += common.memory_row(args, runners, label, config)
    common.print_comparisons(rows)
    print(f"\ndecode step median: ours {step['ours'] * 1e3:.2f} ms, Idefics2 {step['Idefics2'] * 1e3:.2f} ms")
    common.write_json(args, rows)
    if not same and args.dtype == "fp32":
        raise SystemExit("the two models generated different tokens in float32")


if __name__ == "__main__":
    main()
