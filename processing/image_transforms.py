"""Small pure functions behind `VLMImageProcessor` (paper §3.2 and §4.2, Findings 5 and 6).

Findings 5 and 6 of "What matters when building vision-language models?" (Laurençon et al., 2024): images keep
their aspect ratio and native resolution (longest edge up to 980 px, shortest at least 378 px) and may be split
into 4 crops plus the whole image. Every rule here reproduces transformers' Idefics2 image processor
(`models/idefics2/image_processing_pil_idefics2.py`) to the pixel, so that checkpoints converted from Idefics2
see identical inputs:

- the image is split *before* resizing, and each crop (and the whole image) is resized on its own;
- the resize keeps the aspect ratio only while it shrinks the longest edge; each edge is then clamped to at
  least `shortest_edge` independently (a 300 × 256 crop becomes 378 × 378);
- rescale and normalize are the float64-then-float32 arithmetic of transformers. A pixel's result depends only on
  its uint8 level and channel, so the table of all 256 levels (`normalization_lut`) is the reference; a shorter
  float32 chain of divisions and subtractions (`normalization_chain`) replaces the lookup wherever it reproduces
  that whole table bit for bit, which proves it exact for every image.

Sizes are (height, width) throughout; PIL's own (width, height) tuples appear only at the PIL call sites.
"""

import functools
from collections.abc import Callable, Sequence

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


# A normalization chain: numpy ufuncs applied in order to every channel, each with one float32 constant per channel
# (3,); the first reads the uint8 pixels, the others work in place on the float32 output. () only converts.
NormalizationChain = tuple[tuple[np.ufunc, np.ndarray], ...]


def normalization_chain(
    *,
    rescale_factor: float | None,
    image_mean: Sequence[float] | None,
    image_std: Sequence[float] | None,
) -> NormalizationChain | None:
    """The shortest float32 chain that gives `normalization_lut` bit for bit on every uint8 level, or None.

    Candidates, shortest first (a division by 1 or a subtraction of 0 is left out):
      v / (std / rescale_factor) - mean / std   two passes; exact for mean = std = 0.5 (Idefics2's and SigLIP's);
      (v / (1 / rescale_factor) - mean) / std   transformers' own steps, with the rescale as a float32 division.
    A candidate is kept only if it reproduces the whole table, all 256 levels of every channel: as each output
    pixel depends only on its level and channel, that proves it exact for every image. Arguments are as for
    `normalization_lut`.
    """
    scale = np.float64(1.0 if rescale_factor is None else rescale_factor)
    with np.errstate(divide="ignore", invalid="ignore"):  # a 0 factor or std gives inf / nan: refused below
        if image_mean is None:
            candidates = [[(np.divide, np.full(3, 1 / scale))]]
        else:
            mean = np.broadcast_to(np.asarray(image_mean, dtype=np.float64).reshape(-1), (3,))
            std = np.broadcast_to(np.asarray(image_std, dtype=np.float64).reshape(-1), (3,))
            candidates = [
                [(np.divide, std / scale), (np.subtract, mean / std)],
                [(np.divide, np.full(3, 1 / scale)), (np.subtract, mean), (np.divide, std)],
            ]
    lut = normalization_lut(rescale_factor=rescale_factor, image_mean=image_mean, image_std=image_std)
    levels = [np.arange(256, dtype=np.uint8)[None, :]] * 3  # (1, 256) per channel: every level
    result = np.empty((3, 1, 256), dtype=np.float32)
    identity = {np.divide: 1.0, np.subtract: 0.0}
    for steps in candidates:
        chain = tuple((op, values.astype(np.float32)) for op, values in steps if np.any(values != identity[op]))
        with np.errstate(all="ignore"):
            write_normalized(result, levels, chain)
        if np.array_equal(result[:, 0], lut):
            return chain
    return None


@functools.lru_cache(maxsize=16)
def normalizer(
    rescale_factor: float | None, image_mean: tuple[float, ...] | None, image_std: tuple[float, ...] | None
) -> Callable[[np.ndarray, Sequence[np.ndarray]], None]:
    """`write(out, planes)` for these settings: the exact `normalization_chain` if one exists, else the table lookup.

    Arguments are as for `normalization_lut`, as tuples (the result is cached per settings); `write` takes the
    (3, H, W) float32 output and the image's three (h, w) uint8 planes, as `write_normalized` does.
    """
    settings = {"rescale_factor": rescale_factor, "image_mean": image_mean, "image_std": image_std}
    chain = normalization_chain(**settings)
    if chain is None:
        return functools.partial(write_through_lut, lut=normalization_lut(**settings))
    return functools.partial(write_normalized, chain=chain)


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
) -> list[np.ndarray]:
    """Crop `box` (top, left, bottom, right) out of an RGB image, resize it to `size` (height, width), and return
    its R, G and B planes: three (h, w) uint8 arrays.

    `source` is an RGB PIL image or an (H, W, 3) uint8 array. A crop already at its target size is not resampled,
    which is what PIL's `resize` gives for it too. PIL's `split` hands out each plane contiguous, which numpy
    then converts to float32 several times faster than a channel interleaved with the two others.
    """
    top, left, bottom, right = box
    height, width = size
    if isinstance(source, np.ndarray):
        crop = source[top:bottom, left:right]
        if crop.shape[:2] == (height, width):
            return [crop[:, :, channel] for channel in range(3)]  # views of the array
        crop = Image.fromarray(np.ascontiguousarray(crop))  # (h, w, 3) uint8: RGB
    else:
        full = (top, left, bottom, right) == (0, 0, source.height, source.width)
        crop = source if full else source.crop((left, top, right, bottom))
    if crop.size != (width, height):
        crop = crop.resize((width, height), resample=resample)
    return [np.asarray(plane) for plane in crop.split()]


def sub_image_cost(box: tuple[int, int, int, int], size: tuple[int, int]) -> int:
    """Relative work of one sub-image: pixels read from the `box` (top, left, bottom, right) plus pixels written.

    Resampling reads the box and writes `size` (height, width) pixels, which are then normalized and stored;
    used to start the largest sub-images first.
    """
    top, left, bottom, right = box
    return (bottom - top) * (right - left) + size[0] * size[1]


def write_normalized(out: np.ndarray, planes: Sequence[np.ndarray], chain: NormalizationChain) -> None:
    """Write an image's R, G, B `planes` ((h, w) uint8 each), through `chain`, into the top-left of `out` (3, H, W).

    Each plane is written once straight into its strided slice of the float32 `out` (the first ufunc casts as it
    reads, computing in float32), then updated in place by the rest of the chain.
    """
    height, width = planes[0].shape
    for channel, plane in enumerate(planes):
        source, target = plane, out[channel, :height, :width]  # (h, w) uint8 → (h, w) float32
        if not chain:
            np.copyto(target, source)
        for op, constants in chain:
            op(source, constants[channel], out=target, dtype=np.float32)
            source = target


def write_through_lut(out: np.ndarray, planes: Sequence[np.ndarray], lut: np.ndarray) -> None:
    """Write an image's R, G, B `planes` ((h, w) uint8 each), through the (3, 256) `lut`, into the top-left of `out`.

    The fallback for settings that no `normalization_chain` reproduces exactly; slower, as numpy first casts every
    index to intp.
    """
    height, width = planes[0].shape
    for channel, plane in enumerate(planes):
        # mode="clip" lets numpy gather straight into the strided slice without a bounds-checked buffer;
        # uint8 indices never leave 0..255, so clipping never triggers
        np.take(lut[channel], plane, out=out[channel, :height, :width], mode="clip")
