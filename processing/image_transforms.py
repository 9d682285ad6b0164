"""Small pure functions behind `VLMImageProcessor` (paper §3.2 and §4.2, Findings 5 and 6).

Findings 5 and 6 of "What matters when building vision-language models?" (Laurençon et al., 2024): images keep
their aspect ratio and native resolution (longest edge up to 980 px, shortest at least 378 px) and may be split
into 4 crops plus the whole image. Every rule here reproduces transformers' Idefics2 image processor
(`models/idefics2/image_processing_pil_idefics2.py`) to the pixel, so that checkpoints converted from Idefics2
see identical inputs:

- the image is split *before* resizing, and each crop (and the whole image) is resized on its own;
- the resize keeps the aspect ratio only while it shrinks the longest edge; each edge is then clamped to at
  least `shortest_edge` independently (a 300 × 256 crop becomes 378 × 378);
- rescale and normalize are the float64-then-float32 arithmetic of transformers, tabulated once per uint8
  value (`normalization_lut`), which makes them one table lookup per pixel with bit-identical results.

Sizes are (height, width) throughout; PIL's own (width, height) tuples appear only at the PIL call sites.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image

# 16-bit grayscale modes: PIL's own conversion to RGB clips them at 255 (a 16-bit photograph turns white), so
# these are scaled to 8 bits instead (65535 → 255). This is the one mode where we differ from transformers.
I16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def resize_output_size(height: int, width: int, *, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """The (height, width) an image of this size is resized to: transformers' Idefics2 rule, rounding included.

    When the longest edge exceeds `longest_edge` it becomes `longest_edge` and the other edge follows the aspect
    ratio, truncated (`int`); then each edge is raised to at least `shortest_edge` on its own, which can change
    the aspect ratio of thin images (10 × 1000 → 378 × 980).
    """
    if height < 1 or width < 1:
        raise ValueError(f"An image must be at least 1 × 1 pixel to resize, got height={height}, width={width}.")
    aspect_ratio = width / height
    if width >= height and width > longest_edge:
        width = longest_edge
        height = int(width / aspect_ratio)
    elif height > width and height > longest_edge:
        height = longest_edge
        width = int(height * aspect_ratio)
    return max(height, shortest_edge), max(width, shortest_edge)


def split_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The (top, left, bottom, right) boxes of Idefics2's split: 4 crops in reading order, then the whole image.

    The crops meet at (height // 2, width // 2), so with odd sizes the right and bottom crops are one pixel larger.
    Raises ValueError below 2 × 2 pixels, where a crop would be empty.
    """
    if height < 2 or width < 2:
        raise ValueError(
            f"A {height} × {width} (height × width) image cannot be split into 4 crops: splitting needs at least "
            "2 × 2 pixels. Pass do_image_splitting=False for such images."
        )
    mid_h, mid_w = height // 2, width // 2
    return [
        (0, 0, mid_h, mid_w),
        (0, mid_w, mid_h, width),
        (mid_h, 0, height, mid_w),
        (mid_h, mid_w, height, width),
        (0, 0, height, width),
    ]


def sub_image_boxes(height: int, width: int, *, do_image_splitting: bool) -> list[tuple[int, int, int, int]]:
    """The (top, left, bottom, right) box of every sub-image, in output order: 5 when splitting, else 1."""
    if height < 1 or width < 1:
        raise ValueError(f"An image must be at least 1 × 1 pixel, got height={height}, width={width}.")
    return split_boxes(height, width) if do_image_splitting else [(0, 0, height, width)]


def sub_image_sizes(
    height: int,
    width: int,
    *,
    shortest_edge: int,
    longest_edge: int,
    do_image_splitting: bool,
    do_resize: bool = True,
) -> list[tuple[int, int]]:
    """The (height, width) of every sub-image an image of this size becomes, in output order.

    Splitting gives 5 sub-images (top-left, top-right, bottom-left, bottom-right crop, then the whole image),
    otherwise 1. These are the sizes the processor writes before padding, so they are also the extents of the
    ones in `pixel_attention_mask`.
    """
    boxes = sub_image_boxes(height, width, do_image_splitting=do_image_splitting)
    sizes = [(bottom - top, right - left) for top, left, bottom, right in boxes]
    if not do_resize:
        return sizes
    return [resize_output_size(h, w, shortest_edge=shortest_edge, longest_edge=longest_edge) for h, w in sizes]


def count_image_tokens(sizes: Sequence[tuple[int, int]], *, image_seq_len: int | None, patch_size: int = 14) -> int:
    """Visual tokens for sub-images of these sizes: `image_seq_len` each, or one per full patch without pooling.

    Without pooling the vision encoder keeps the patches whose pixels are all real, so a sub-image of h × w
    pixels gives (h // patch_size) * (w // patch_size) tokens.
    """
    if image_seq_len is not None:
        return image_seq_len * len(sizes)
    return sum((h // patch_size) * (w // patch_size) for h, w in sizes)


def normalization_lut(
    *,
    rescale_factor: float | None,
    image_mean: Sequence[float] | None,
    image_std: Sequence[float] | None,
) -> np.ndarray:
    """(3, 256) float32: the rescaled, normalized value of every uint8 level, per RGB channel.

    Reproduces transformers' arithmetic exactly — rescale in float64, cast to float32, then (x - mean) / std in
    float32 — so a table lookup gives bit-identical pixels. `None` skips a step (do_rescale / do_normalize False).
    """
    levels = np.arange(256, dtype=np.float64)
    if rescale_factor is not None:
        levels = levels * rescale_factor
    levels = np.broadcast_to(levels.astype(np.float32), (3, 256))
    if image_mean is None:
        return np.ascontiguousarray(levels)
    mean = np.broadcast_to(np.asarray(image_mean, dtype=np.float32).reshape(-1), (3,))[:, None]
    std = np.broadcast_to(np.asarray(image_std, dtype=np.float32).reshape(-1), (3,))[:, None]
    return np.ascontiguousarray((levels - mean) / std)


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB, compositing transparency on white, as transformers' `convert_to_rgb` does.

    Alpha (LA, RGBA, PA, P or RGB with a `transparency` key) is composited on a white background with
    `Image.alpha_composite`. 16-bit grayscale (I;16*) is scaled to 8 bits (see `I16_MODES`); every other mode
    (L, 1, P, CMYK, YCbCr, I, F, ...) goes through PIL's own `convert("RGB")`.
    """
    if image.mode in I16_MODES:
        levels = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def array_to_rgb(array: np.ndarray, *, channels_first: bool) -> np.ndarray:
    """(H, W) or channels-first/last array with 1, 3 or 4 channels, uint8 or float in [0, 1] → (H, W, 3) uint8.

    Callers validate dtype, range and layout first. Float images are quantized to 8 bits (round(x * 255)),
    because resampling runs in PIL on 8-bit images, as in transformers; a uint8 image divided by 255 therefore
    gives exactly the pixels of the uint8 image. Four channels are RGBA, composited on white with transformers'
    formula (alpha * rgb + (1 - alpha) * white, rounded).
    """
    if array.ndim == 2:
        array = array[:, :, None]
    elif channels_first:
        array = np.moveaxis(array, 0, -1)  # (C, H, W) → (H, W, C)
    is_float = np.issubdtype(array.dtype, np.floating)
    if array.shape[-1] == 4:
        white = 1.0 if is_float else 255.0
        alpha = array[..., 3:4].astype(np.float64) / white
        array = alpha * array[..., :3] + (1.0 - alpha) * white
        if not is_float:
            array = np.round(array).astype(np.uint8)
    if is_float:
        array = np.rint(np.asarray(array, dtype=np.float64) * 255.0).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def resized_sub_image(
    source: "Image.Image | np.ndarray",
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    *,
    resample: int,
) -> np.ndarray:
    """Crop `box` (top, left, bottom, right) out of an RGB image and resize it to `size` (height, width).

    `source` is an RGB PIL image or an (H, W, 3) uint8 array. Returns (h, w, 3) uint8 (a view when nothing
    changes). A crop already at its target size is not resampled, which is what PIL's `resize` gives for it too.
    """
    top, left, bottom, right = box
    height, width = size
    if isinstance(source, np.ndarray):
        crop = source[top:bottom, left:right]
        if crop.shape[:2] == (height, width):
            return crop
        crop = Image.fromarray(np.ascontiguousarray(crop))  # (h, w, 3) uint8: RGB
    else:
        full = (top, left, bottom, right) == (0, 0, source.height, source.width)
        crop = source if full else source.crop((left, top, right, bottom))
        if crop.size == (width, height):
            return np.asarray(crop)
    return np.asarray(crop.resize((width, height), resample=resample))


def write_normalized(out: np.ndarray, image: np.ndarray, lut: np.ndarray) -> None:
    """Write the (h, w, 3) uint8 `image`, through the (3, 256) `lut`, into the top-left of `out` (3, H, W)."""
    height, width = image.shape[:2]
    for channel in range(3):
        # mode="clip" lets numpy gather straight into the strided slice without a bounds-checked buffer;
        # uint8 indices never leave 0..255, so clipping never triggers
        np.take(lut[channel], image[:, :, channel], out=out[channel, :height, :width], mode="clip")
