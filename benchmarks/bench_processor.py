"""Images per second: our `VLMImageProcessor` beside transformers' Idefics2 PIL image processor, same photographs.

Run: `.venv/bin/python benchmarks/bench_processor.py` (options: --repeats, --batch-size, --threads).

The photographs are the bundled grace_hopper.jpg (512 × 600) at the sizes users send: as is, a portrait and a
landscape crop, smaller than 378 px, and upscaled past 980 px. Both processors get the same decoded PIL images
(decoding is not timed) in batches of `--batch-size` samples of one image, with return_tensors="pt", splitting
off and on. Each figure is the best of `--repeats` timed passes over all photographs, after one warm-up pass.
The parity columns are the max abs difference of pixel_values and whether the masks are equal, on the same batch.
"ceiling" is the ratio a one-thread processor would reach if it did nothing but the PIL crops and resizes that
bit-identical output requires (the same calls transformers makes) and read their pixels out: no single-thread
speed-up can exceed it. What separates ours from it is mostly memory: the padded float32 batch and int64 mask are
fresh memory, zeroed (by the kernel or by calloc) before it is written.
"""

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

from vlmforge.processing.image_processing_vlm import VLMImageProcessor, plan_sub_images
from vlmforge.processing.image_transforms import resized_sub_image

PHOTO = Path(__file__).resolve().parents[1] / "vlmforge" / "assets" / "grace_hopper.jpg"


def photographs() -> dict[str, Image.Image]:
    """Decoded RGB photographs of the sizes users send, derived from the bundled one (width × height in names)."""
    photo = Image.open(PHOTO).convert("RGB")
    images = {
        "512x600 original": photo,
        "400x600 portrait": photo.crop((56, 0, 456, 600)),
        "512x300 landscape": photo.crop((0, 100, 512, 400)),
        "256x300 small": photo.resize((256, 300), Image.BICUBIC),
        "1536x1800 large": photo.resize((1536, 1800), Image.BICUBIC),
    }
    for image in images.values():
        image.load()
    return images


def images_per_second(runners: dict, batches: list[list[list[Image.Image]]], *, split: bool, repeats: int) -> dict:
    """Input images per second (not sub-images) of each runner over all batches.

    The runners take turns within every pass, so load from other processes hits them alike; each keeps its best
    pass of `repeats`, after one warm-up pass.
    """
    num_images = sum(len(sample) for batch in batches for sample in batch)
    best = dict.fromkeys(runners, float("inf"))
    for attempt in range(repeats + 1):
        for name, run in runners.items():
            start = time.perf_counter()
            for batch in batches:
                run(batch, split)
            elapsed = time.perf_counter() - start
            if attempt > 0:
                best[name] = min(best[name], elapsed)
    return {name: num_images / seconds for name, seconds in best.items()}


def with_threads(processor, threads: int):
    """Run `processor` with torch's thread count (which ours uses for its sub-images) set to `threads`."""

    def run(batch, split):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return processor(batch, do_image_splitting=split, return_tensors="pt")
        finally:
            torch.set_num_threads(before)

    return run


def resize_only(processor):
    """Only the PIL crops and resizes both processors must do to be bit-identical, and reading the pixels out of PIL:
    the ceiling for any single-thread speed-up."""

    def run(batch, split):
        plans = plan_sub_images(
            batch,
            size=processor.size,
            do_resize=True,
            do_rescale=True,
            do_image_splitting=split,
            channels_first=None,
        )
        for plan in plans:
            for source, box, out_size in plan:
                resized_sub_image(source, box, out_size, resample=processor.resample)

    return run


def parity(ours, theirs, batch, *, split: bool) -> tuple[float, bool]:
    a = ours(batch, do_image_splitting=split, return_tensors="pt")
    b = theirs(batch, do_image_splitting=split, return_tensors="pt")
    if a["pixel_values"].shape != b["pixel_values"].shape:
        return float("inf"), False
    diff = (a["pixel_values"] - b["pixel_values"]).abs().max().item()
    return diff, bool(torch.equal(a["pixel_attention_mask"], b["pixel_attention_mask"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per figure (the best one counts)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples (one image each) per processor call")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for ours (torch's)")
    args = parser.parse_args()

    ours, theirs = VLMImageProcessor(), Idefics2ImageProcessorPil()
    runners = {
        "transformers": lambda batch, split: theirs(batch, do_image_splitting=split, return_tensors="pt"),
        "ours_1": with_threads(ours, 1),
        "ours_n": with_threads(ours, args.threads),
        "resize": resize_only(ours),
    }
    photos = photographs()
    print(
        f"transformers {type(theirs).__name__} vs vlmforge {type(ours).__name__}: input images/s, batches of "
        f"{args.batch_size}, return_tensors='pt', best of {args.repeats}; ours on 1 thread and on {args.threads}"
    )
    header = f"{'photograph':<18} {'split':<5} {'transformers':>12} {'ours 1 thr':>10} {'ratio':>6} "
    print(header + f"{f'ours {args.threads} thr':>10} {'ratio':>6} {'max|diff|':>9} {'masks':>5} {'ceiling':>7}")
    summary = []
    for split in (False, True):
        cases = {name: [[[photo]] * args.batch_size] for name, photo in photos.items()}
        # all photographs in one call: a realistic batch of varied sizes, padded together
        cases["mixed batch"] = [[[photo] for photo in photos.values()]]
        for name, batches in cases.items():
            ips = images_per_second(runners, batches, split=split, repeats=args.repeats)
            diff, masks_equal = parity(ours, theirs, batches[0], split=split)
            ratio_1, ratio_n = ips["ours_1"] / ips["transformers"], ips["ours_n"] / ips["transformers"]
            print(
                f"{name:<18} {str(split):<5} {ips['transformers']:>12.1f} {ips['ours_1']:>10.1f} {ratio_1:>5.2f}x "
                f"{ips['ours_n']:>10.1f} {ratio_n:>5.2f}x {diff:>9.1e} {str(masks_equal):>5} "
                f"{ips['resize'] / ips['transformers']:>6.2f}x"
            )
            if name == "mixed batch":
                summary.append(
                    f"splitting {'on' if split else 'off'}: {ratio_1:.2f}x (1 thread), "
                    f"{ratio_n:.2f}x ({args.threads} threads)"
                )
    print("mixed batch, ours over transformers: " + "; ".join(summary))


if __name__ == "__main__":
    main()
