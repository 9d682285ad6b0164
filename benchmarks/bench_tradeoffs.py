"""The Idefics2 paper's trade-offs as measured costs on our model: visual tokens and prefill time per setting.

Run: `.venv/bin/python benchmarks/bench_tradeoffs.py` (about a minute on 2 CPU cores; options: --device cuda,
--dtype bf16, --attn, --photos, --repeats, the model-size flags, --preset idefics2; --help lists them).

Our `AutoregressiveVLMForConditionalGeneration` only (random weights; the same vision encoder and LM weights in
both connector variants). Starting from the paper's final recipe — perceiver pooling (64 latents), native
resolution and aspect ratio (Idefics2's resize: shortest edge ≥ 378, longest ≤ 980), no splitting — one setting
changes per row:

- pooling:    none — every real 14 px patch becomes a visual token (Finding 4's baseline);
- resolution: square — every image resized to 980 × 980, or 378 × 378 (processor `size` with shortest = longest
              edge), instead of its native size (Finding 5);
- splitting:  on — 4 crops + the whole image, 5 sub-images per image (Finding 6).

Each row: the sub-images and the patches the vision encoder computes (real ones; padding skipped or not per the
model's own choice), the visual tokens the LM reads, the prompt length, and prefill time: one forward pass of the
batch, images included, keeping only the last position's logits (`logits_to_keep=1`, what `generate` does at
prefill), under torch.inference_mode; medians over `--repeats` runs, the settings taking turns, after a warm-up.
The batch holds one prompt per photograph (default: the bundled 512 × 600 photograph and a 512 × 300 crop).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under `python -P`

import _common as common  # noqa: E402

PROMPT = "User:<image>Describe the picture in one sentence.<end_of_utterance>\nAssistant:"
NATIVE = {"shortest_edge": 378, "longest_edge": 980}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=3, warmup=1)
    parser.add_argument(
        "--photos",
        default="512x600 original,512x300 landscape",
        help=f"comma-separated photographs, one prompt each, from: {', '.join(common.photographs())}",
    )
    return parser.parse_args(argv)


def settings() -> dict[str, dict]:
    """Row name → (pooling, processor size, splitting); the first row is the baseline the others are priced
    against."""
    return {
        "perceiver-64, native, no split (baseline)": dict(pooling="perceiver", size=NATIVE, split=False),
        "pooling none": dict(pooling="none", size=NATIVE, split=False),
        "square 980 × 980": dict(pooling="perceiver", size={"shortest_edge": 980, "longest_edge": 980}, split=False),
        "square 378 × 378": dict(pooling="perceiver", size={"shortest_edge": 378, "longest_edge": 378}, split=False),
        "splitting on (4 crops + whole)": dict(pooling="perceiver", size=NATIVE, split=True),
    }


def build_models(args, dtype) -> tuple[dict, object]:
    """Our model with perceiver pooling and with none: the same vision encoder, projection and LM weights."""
    import torch

    from vlmforge.conversion.idefics2 import convert_config
    from vlmforge.modeling.configuration_autoregressive_vlm import AutoregressiveVLMConfig
    from vlmforge.modeling.modeling_autoregressive_vlm import AutoregressiveVLMForConditionalGeneration

    tokenizer = common.tokenizer_for(args.vocab_size)
    perceiver_config = convert_config(common.idefics2_config(args, tokenizer))
    none_config = AutoregressiveVLMConfig(
        vision_config=perceiver_config.vision_config.to_dict(),
        connector_config={**perceiver_config.connector_config.to_dict(), "pooling": "none"},
        text_config=perceiver_config.text_config.to_dict(),
        image_token_id=perceiver_config.image_token_id,
        tie_word_embeddings=False,
    )
    models = {}
    for pooling, config in (("perceiver", perceiver_config), ("none", none_config)):
        with torch.device(args.device):
            model = AutoregressiveVLMForConditionalGeneration(config)
        common.randomise(model, args.seed)  # seeded by name: the same weights wherever the names are shared
        model.to(dtype).eval()
        common.set_attention(model, args.attn)
        models[pooling] = model
    return models, tokenizer


def setup(args):
    import torch

    dtype = common.setup_torch(args)
    torch.manual_seed(args.seed)
    models, tokenizer = build_models(args, dtype)
    photos = common.photographs()
    images = [[photos[name.strip()]] for name in args.photos.split(",")]
    runners, rows = {}, {}
    for name, setting in settings().items():
        model = models[setting["pooling"]]
        processor = common.make_processor(model.config, tokenizer, size=setting["size"])
        inputs = processor(
            text=[PROMPT] * len(images), images=images, do_image_splitting=setting["split"], padding=True,
            return_tensors="pt",
        )  # fmt: skip
        stats = common.patch_statistics(inputs, args.patch_size)
        rows[name] = dict(
            stats,
            visual_tokens=int((inputs["input_ids"] == model.config.image_token_id).sum()),
            prompt_length=inputs["input_ids"].shape[1],
            pixels=tuple(inputs["pixel_values"].shape[-2:]),
        )
        inputs = common.to_device(dict(inputs), args.device, dtype)

        def prefill(model=model, inputs=inputs):
            with torch.inference_mode():
                return model(**inputs, logits_to_keep=1)

        runners[name] = prefill
    attn = {pooling: model.config._attn_implementation for pooling, model in models.items()}
    return runners, rows, attn


def main() -> None:
    args = parse_args()
    runners, rows, attn = setup(args)
    if args.memory_worker:
        common.memory_worker(args, runners)
        return
    times = common.time_interleaved(runners, repeats=args.repeats, warmup=args.warmup, device=args.device)
    seconds = {name: common.median(values) for name, values in times.items()}
    baseline = next(iter(rows))
    images = len(args.photos.split(","))
    label = common.bench_label("tradeoffs", args)
    config = f"bench_tradeoffs: our model only; batch of {images} prompts, one photograph each ({args.photos})"
    print(config)
    print(common.size_line(args))
    print(common.run_line(args, {f"ours ({pooling})": impl for pooling, impl in attn.items()}, turns="settings"))
    print()
    table = []
    json_rows = []
    for name, row in rows.items():
        tokens_ratio = row["visual_tokens"] / rows[baseline]["visual_tokens"]
        time_ratio = seconds[name] / seconds[baseline]
        table.append([
            name, row["sub_images"], f"{row['pixels'][0]}×{row['pixels'][1]}", row["real_patches"],
            row["computed_patches"], row["visual_tokens"], f"{tokens_ratio:.2f}×", row["prompt_length"],
            f"{seconds[name] * 1e3:.1f}", f"{time_ratio:.2f}×",
        ])  # fmt: skip
        json_rows.append(
            dict(bench=label, metric=name, ours=seconds[name], unit="s", ratio=None, target=None, config=config,
                 ours_text=f"{seconds[name] * 1e3:.1f} ms", theirs_text="(ours only)",
                 note=f"{row['visual_tokens']} visual tokens ({tokens_ratio:.2f}×), prefill {time_ratio:.2f}× base")
        )  # fmt: skip
    common.print_table(
        ["setting", "sub-images", "padded H×W", "real patches", "padded patches", "visual tokens", "× base",
         "prompt len", "prefill ms", "× base"],
        table,
    )  # fmt: skip
    print(
        "\n'padded patches': the batch's padded grid, what a padded encoder computes; where our encoder skips "
        "padding (its packed path), its cost follows 'real patches'."
    )
    common.write_json(args, json_rows)


if __name__ == "__main__":
    main()
