"""Vision encoder + connector: our `get_image_features` beside Idefics2's, same weights, same photographs.

Run: `.venv/bin/python benchmarks/bench_vision.py` (about a minute on 2 shared CPU cores; options: --device cuda,
--dtype bf16, --attn, --no-split, --photos, --repeats, the model-size flags, --preset idefics2; --help lists them).

A random `Idefics2ForConditionalGeneration` is converted to our `AutoregressiveVLMForConditionalGeneration` by the
production converter (identical weights). Our `VLMProcessor` at Idefics2's real settings (shortest edge ≥ 378,
longest ≤ 980, 14 px patches, image splitting on: 4 crops + the whole image) turns a batch of photographs of mixed
aspect ratios — one per sample; on CPU a 400 × 600 portrait and a 512 × 300 landscape, on CUDA also a small and a
wide one — into one padded `pixel_values` (B, 5, 3, H, W) batch with `pixel_attention_mask`; both models encode
exactly that batch into visual tokens (vision encoder, modality projection, perceiver):

    ours:      model.get_image_features(pixel_values, pixel_attention_mask)
    Idefics2:  model.get_image_features(pixel_values, pixel_attention_mask)

The batch's sub-images differ in size, so a padded encoder computes many padding patches (the first line says how
many): that is the work a native-resolution (packed) encoder can skip. Timing: torch.inference_mode; the parity run
warms up, then the models take turns; medians, and the ratio is the median of the per-round ratios. Parity: the max
|Δ| between the two models' visual tokens. Peak memory: growth over one call (CPU: peak RSS of a fresh process per
model; CUDA: max_memory_allocated).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under `python -P`

import _common as common  # noqa: E402

PHOTOS = {
    "cpu": "400x600 portrait,512x300 landscape",
    "cuda": "400x600 portrait,512x300 landscape,256x300 small,980x420 wide",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=5, warmup=0)  # the parity run warms up
    parser.add_argument("--no-split", action="store_true", help="image splitting off (default: on)")
    parser.add_argument(
        "--photos",
        help=f"comma-separated photographs, one per sample, from: {', '.join(common.photographs())} (default: "
        f"{PHOTOS['cpu']!r} on CPU, {PHOTOS['cuda']!r} on CUDA)",
    )
    args = parser.parse_args(argv)
    if args.photos is None:
        args.photos = PHOTOS["cpu" if args.device == "cpu" else "cuda"]
    return args


def setup(args):
    import torch

    dtype = common.setup_torch(args)
    torch.manual_seed(args.seed)
    pair = common.build_pair(args, dtype)
    photos = common.photographs()
    images = [[photos[name.strip()]] for name in args.photos.split(",")]
    pixels = pair.processor.image_processor(images, do_image_splitting=not args.no_split, return_tensors="pt")
    pixels = common.to_device(dict(pixels), args.device, dtype)

    def ours():
        with torch.inference_mode():
            return pair.ours.get_image_features(pixels["pixel_values"], pixels["pixel_attention_mask"])

    def theirs():
        with torch.inference_mode():
            return pair.theirs.get_image_features(pixels["pixel_values"], pixels["pixel_attention_mask"])

    return pair, pixels, {"ours": ours, "Idefics2": theirs}


def main() -> None:
    args = parse_args()
    pair, pixels, runners = setup(args)
    if args.memory_worker:
        common.memory_worker(args, runners)
        return

    ours_out, theirs_out = runners["ours"](), runners["Idefics2"]()
    ours_tokens = ours_out.image_features[ours_out.image_features_mask]
    theirs_tokens = __import__("torch").cat(theirs_out.pooler_output)
    parity = (ours_tokens.float() - theirs_tokens.float()).abs().max().item()

    times = common.time_interleaved(runners, repeats=args.repeats, warmup=args.warmup, device=args.device)
    seconds = {name: common.median(values) for name, values in times.items()}
    ratio = common.paired_ratio(times["Idefics2"], times["ours"])
    stats = common.patch_statistics(pixels, args.patch_size)
    images = len(args.photos.split(","))
    per_second = {name: images / s for name, s in seconds.items()}

    label = common.bench_label("vision", args)
    config = (
        f"bench_vision: {images} photographs ({args.photos}), splitting {'off' if args.no_split else 'on'} → "
        f"pixel_values {tuple(pixels['pixel_values'].shape)}; {stats['sub_images']} sub-images, "
        f"{stats['real_patches']} real patches of {stats['computed_patches']} in the padded batch "
        f"({1 - stats['real_patches'] / stats['computed_patches']:.0%} padding); {len(ours_tokens)} visual tokens"
    )
    print(config)
    print(common.size_line(args))
    print(common.run_line(args, pair.attn))
    print(f"parity: max |Δ visual tokens| = {parity:.2e} (token magnitude {theirs_tokens.abs().max().item():.2f})\n")

    rows = [
        common.comparison_row(label, "vision+connector time", seconds["ours"], seconds["Idefics2"], unit="s",
                              higher_is_better=False, target=1.5, config=config, ratio=ratio),
        common.comparison_row(label, "images/s", per_second["ours"], per_second["Idefics2"], unit="img/s",
                              higher_is_better=True, target=None, config=config, ratio=ratio),
    ]  # fmt: skip
    rows += common.memory_row(args, runners, label, config)
    common.report(args, rows, times)


if __name__ == "__main__":
    main()
