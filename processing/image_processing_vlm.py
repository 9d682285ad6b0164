"""`VLMImageProcessor`: native-resolution images, optionally split into 4 crops + the whole image.

Implements the image side of Findings 5 and 6 of the Idefics2 paper (Laurençon et al., 2024): aspect ratio kept,
shortest edge ≥ 378 px, longest edge ≤ 980 px, and `do_image_splitting` switchable per call. Outputs match
transformers' `Idefics2ImageProcessorPil` bit for bit on 8-bit images (see `image_transforms`), and run 2.5-7x
faster on one thread (benchmarks/bench_processor.py): images stay 8-bit, as contiguous R, G, B planes, until a
short exact float32 chain writes them, normalized, straight into the preallocated padded batch; sub-images are
resampled in parallel, largest first.
"""

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ChannelDimension, PILImageResampling
from transformers.processing_utils import ImagesKwargs, Unpack

from .image_transforms import (
    array_to_rgb,
    count_image_tokens,
    normalizer,
    pil_to_rgb,
    resized_sub_image,
    sub_image_boxes,
    sub_image_cost,
    sub_image_sizes,
)

_CHANNEL_COUNTS = (1, 3, 4)
_EXPECTED_TYPES = "a PIL.Image.Image, a numpy.ndarray, a torch.Tensor, encoded image bytes or a local file path"


class VLMImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_image_splitting (`bool`, *optional*, defaults to `self.do_image_splitting`):
        Whether to split every image into 4 crops followed by the whole image (5 sub-images per image).
    """

    do_image_splitting: bool


class VLMImageProcessor(PilBackend):
    """Idefics2-compatible image processor: PIL + numpy, no torchvision needed.

    Input (`images`): one image, a flat list of images (one sample), or one list per sample (`[]` for a
    text-only sample). An image is a PIL image of any mode, a numpy array or torch tensor — (H, W), (H, W, C) or
    (C, H, W) with C in {1, 3, 4}, uint8 or float in [0, 1] (4 channels = RGBA) — or encoded image bytes or a
    local file path. A 4-D array is a stack of images for one sample. Alpha is composited on white. The channel
    axis is inferred as transformers does (first when ambiguous); `input_data_format` overrides it.

    Resampling runs in PIL on 8-bit RGB, as in transformers, so float inputs are quantized to 8 bits
    (round(x * 255)): `levels / 255` gives exactly the pixels of `levels`. Floats must lie in [0, 1] and keep
    do_rescale=True (transformers' Idefics2 processor instead rescales floats a second time unless
    do_rescale=False). 16-bit gray (I;16) is scaled to 8 bits where transformers clips it.

    Output: `BatchFeature` with
        pixel_values          (B, N, 3, H, W) float32: every sample's sub-images (5 per image when splitting:
                              4 crops then the whole image; else 1), each resized, rescaled, normalized and
                              padded bottom/right with zeros to the batch's largest H and W; samples with fewer
                              than N sub-images are padded with all-zero images;
        pixel_attention_mask  (B, N, H, W) int64: 1 on real pixels, 0 on padding (all 0 for padding images).

    Sub-images are resampled and written on `torch.get_num_threads()` threads, like a torch op (PIL and numpy
    release the GIL; DataLoader workers set torch to 1 thread, so workers stay single-threaded).

    Bad input raises `TypeError` (unsupported type) or `ValueError` (empty image, image over PIL's
    decompression-bomb limit, float values outside [0, 1], wrong channel count, unreadable bytes), naming the
    sample and image index.
    """

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_pad = True
    do_convert_rgb = True
    do_image_splitting = False
    size = {"shortest_edge": 378, "longest_edge": 980}
    default_to_square = False
    model_input_names = ["pixel_values", "pixel_attention_mask"]
    valid_kwargs = VLMImageProcessorKwargs

    def __init__(self, **kwargs: Unpack[VLMImageProcessorKwargs]):
        super().__init__(**kwargs)
        _check_settings(**{name: getattr(self, name, None) for name in self._valid_kwargs_names})

    def preprocess(self, images, **kwargs: Unpack[VLMImageProcessorKwargs]) -> BatchFeature:
        """Process `images` (see the class docstring); any setting may be overridden per call."""
        return super().preprocess(images, **kwargs)

    def _preprocess_image_like_inputs(self, images, *args, **kwargs) -> BatchFeature:
        # transformers' base `preprocess` has merged the per-call kwargs with the instance attributes and
        # standardized `size`; we take over from raw images, skipping its per-image float pipeline.
        _check_settings(**kwargs)
        return self._process(images, **kwargs)

    def num_image_tokens(
        self,
        height: int,
        width: int,
        *,
        image_seq_len: int | None,
        patch_size: int = 14,
        do_image_splitting: bool | None = None,
    ) -> int:
        """Visual tokens an image of `height` × `width` pixels costs under this processor's settings.

        `image_seq_len` is the connector's tokens per sub-image (e.g. 64 perceiver latents); `None` means no
        pooling, one token per full `patch_size` patch of each resized sub-image. `do_image_splitting=None` uses
        the instance setting. Raises ValueError for sizes the processor would refuse (empty, or < 2 px to split).
        """
        split = self.do_image_splitting if do_image_splitting is None else do_image_splitting
        sizes = sub_image_sizes(
            height,
            width,
            shortest_edge=self.size["shortest_edge"],
            longest_edge=self.size["longest_edge"],
            do_image_splitting=split,
            do_resize=self.do_resize,
        )
        return count_image_tokens(sizes, image_seq_len=image_seq_len, patch_size=patch_size)

    def _process(
        self,
        images,
        *,
        do_resize: bool,
        size,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        do_image_splitting: bool,
        input_data_format=None,
        return_tensors=None,
        **_: Any,
    ) -> BatchFeature:
        channels_first = (
            None if input_data_format is None else (ChannelDimension(input_data_format) == ChannelDimension.FIRST)
        )
        plans = plan_sub_images(
            images,
            size=size,
            do_resize=do_resize,
            do_rescale=do_rescale,
            do_image_splitting=do_image_splitting,
            channels_first=channels_first,
        )
        num_images = max(len(plan) for plan in plans)
        sub_sizes = [out_size for plan in plans for _, _, out_size in plan]
        max_height = max((h for h, _ in sub_sizes), default=0)
        max_width = max((w for _, w in sub_sizes), default=0)
        padded = any(len(plan) < num_images for plan in plans) or any(
            out_size != (max_height, max_width) for out_size in sub_sizes
        )
        # without padding every element is written below, so skip the zero fill: calloc clears reused memory in full
        allocate = np.zeros if padded else np.empty
        pixel_values = allocate((len(plans), num_images, 3, max_height, max_width), dtype=np.float32)
        pixel_attention_mask = allocate((len(plans), num_images, max_height, max_width), dtype=np.int64)
        write_pixels = normalizer(
            rescale_factor if do_rescale else None,
            _per_channel(image_mean) if do_normalize else None,
            _per_channel(image_std) if do_normalize else None,
        )

        def write(task: tuple[int, int, Any, tuple, tuple[int, int]]) -> None:
            i, n, source, box, (height, width) = task
            planes = resized_sub_image(source, box, (height, width), resample=resample)  # 3 × (h, w) uint8
            write_pixels(pixel_values[i, n], planes)  # (3, H, W) float32
            pixel_attention_mask[i, n, :height, :width] = 1

        tasks = [(i, n, *step) for i, plan in enumerate(plans) for n, step in enumerate(plan)]
        # PIL's resize and numpy's ufuncs release the GIL, and every task writes its own slice of the batch;
        # like a torch op, use torch's thread count (DataLoader workers set it to 1)
        num_threads = min(torch.get_num_threads(), len(tasks))
        if num_threads > 1:
            # largest first, so that a big image does not start last and leave the other threads idle at the end
            tasks.sort(key=lambda task: sub_image_cost(task[3], task[4]), reverse=True)
            with ThreadPoolExecutor(max_workers=num_threads) as pool:
                list(pool.map(write, tasks))
        else:
            for task in tasks:
                write(task)
        data = {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask}
        return BatchFeature(data=data, tensor_type=return_tensors)


def _per_channel(values) -> tuple[float, ...] | None:
    """image_mean / image_std (one float or one per channel) as a tuple, the hashable form `normalizer` caches."""
    return None if values is None else tuple(np.asarray(values, dtype=np.float64).reshape(-1).tolist())


def plan_sub_images(
    images, *, size, do_resize: bool, do_rescale: bool, do_image_splitting: bool, channels_first: bool | None
) -> list[list[tuple]]:
    """Validate every input image; per sample, the (RGB source, crop box, output size) of each sub-image, in order.

    Only sizes are computed here, so every error surfaces before any pixel is resampled.
    """
    plans = []
    for i, sample in enumerate(nest_images(images)):
        plan = []
        for j, image in enumerate(sample):
            where = f"images: sample {i}, image {j}"
            if not do_rescale and _is_float_array(image):
                raise ValueError(
                    f"{where}: float images are read as values in [0, 1] and rescaled like 8-bit levels, so "
                    "do_rescale=False would leave them 255 times too large. Keep do_rescale=True for float inputs "
                    "(transformers wants do_rescale=False for pre-scaled floats; this processor does not)."
                )
            source = load_rgb(image, where=where, channels_first=channels_first)
            height, width = (source.height, source.width) if isinstance(source, Image.Image) else source.shape[:2]
            try:
                boxes = sub_image_boxes(height, width, do_image_splitting=do_image_splitting)
                sizes = sub_image_sizes(
                    height,
                    width,
                    shortest_edge=size.shortest_edge,
                    longest_edge=size.longest_edge,
                    do_image_splitting=do_image_splitting,
                    do_resize=do_resize,
                )
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
            plan.extend(zip([source] * len(boxes), boxes, sizes, strict=True))
        plans.append(plan)
    return plans


def _check_settings(
    *,
    size=None,
    image_mean=None,
    image_std=None,
    do_convert_rgb=None,
    do_pad=None,
    do_center_crop=None,
    pad_size=None,
    data_format=None,
    **_: Any,
) -> None:
    """Refuse settings this processor cannot honour, instead of silently ignoring them."""
    edges = dict(size) if size is not None else {}
    if set(edges) != {"shortest_edge", "longest_edge"} or not 1 <= edges["shortest_edge"] <= edges["longest_edge"]:
        raise ValueError(
            "size must be {'shortest_edge': int, 'longest_edge': int} with 1 <= shortest_edge <= longest_edge "
            f"(Idefics2's resize rule), got {edges}."
        )
    for name, value in (("image_mean", image_mean), ("image_std", image_std)):
        if value is not None and np.asarray(value).size not in (1, 3):
            raise ValueError(f"{name} must be one float or one per RGB channel, got {value}.")
    if image_std is not None and np.any(np.asarray(image_std) == 0):
        raise ValueError(f"image_std must not contain 0, got {image_std}.")
    if do_convert_rgb is False:
        raise ValueError("do_convert_rgb=False is not supported: the vision encoder takes RGB images.")
    if do_pad is False:
        raise ValueError("do_pad=False is not supported: the model takes padded batches with pixel_attention_mask.")
    if do_center_crop or pad_size is not None:
        raise ValueError("do_center_crop and pad_size are not supported: images keep their aspect ratio.")
    if data_format is not None and ChannelDimension(data_format) != ChannelDimension.FIRST:
        raise ValueError(f"data_format must be channels_first (pixel_values are (B, N, 3, H, W)), got {data_format}.")


def _is_float_array(image) -> bool:
    if isinstance(image, np.ndarray):
        return np.issubdtype(image.dtype, np.floating)
    return isinstance(image, torch.Tensor) and image.is_floating_point()


def nest_images(images) -> list[list]:
    """One list of images per sample, from any of the accepted batch structures (see `VLMImageProcessor`)."""
    if images is None:
        raise ValueError(f"images is None; expected {_EXPECTED_TYPES}, a list of them, or one list per sample.")
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [list(images)]  # (N, ...) stack: one sample of N images, as transformers reads it
    if not isinstance(images, (list, tuple)):
        return [[images]]
    if len(images) == 0:
        raise ValueError(
            "images is an empty list: pass one list per sample, e.g. [[]] for one text-only sample, "
            "or leave images out."
        )
    nested = [isinstance(sample, (list, tuple)) for sample in images]
    if all(nested):
        return [list(sample) for sample in images]
    if any(nested):
        first_list, first_image = nested.index(True), nested.index(False)
        raise TypeError(
            f"images mixes per-sample lists (element {first_list}) with single images (element {first_image}, "
            f"{type(images[first_image]).__name__}); pass one list per sample, or a flat list for one sample."
        )
    if all(isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4 for image in images):
        return [list(stack) for stack in images]  # a list of (N, ...) stacks: one sample each
    return [list(images)]


def load_rgb(image, *, where: str, channels_first: bool | None = None) -> "Image.Image | np.ndarray":
    """Validate one input image and return it as an RGB PIL image or an (H, W, 3) uint8 array.

    `where` ("images: sample i, image j") starts every error message.
    """
    if isinstance(image, (bytes, bytearray, str, os.PathLike)):
        image = _open_encoded(image, where=where)
    if isinstance(image, Image.Image):
        _check_pixel_count(image.height, image.width, where=where)
        try:
            image.load()  # decode now, so a truncated or corrupt file fails here, naming its sample
            return pil_to_rgb(image)
        except (OSError, ValueError, SyntaxError) as error:
            raise ValueError(f"{where}: the image could not be decoded ({error}).") from error
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, where=where, channels_first=channels_first)
    raise TypeError(f"{where}: expected {_EXPECTED_TYPES}, got {type(image).__module__}.{type(image).__qualname__}.")


def _open_encoded(source, *, where: str) -> Image.Image:
    """Open encoded bytes or a local file with PIL (header only: pixels are decoded after the size checks)."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ValueError(f"{where}: URLs are not fetched ({source}); download the image and pass it or its path.")
    what = f"{len(source)} bytes" if isinstance(source, (bytes, bytearray)) else f"file {os.fspath(source)!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # _check_pixel_count raises instead
            return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{where}: {error} Downscale the image or raise PIL.Image.MAX_IMAGE_PIXELS.") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"{where}: could not read an image from {what} ({error}).") from error


def _check_pixel_count(height: int, width: int, *, where: str) -> None:
    if height < 1 or width < 1:
        raise ValueError(
            f"{where}: the image is empty ({height} × {width} pixels, height × width); expected at least 1 × 1."
        )
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > limit:
        raise ValueError(
            f"{where}: {height} × {width} = {height * width} pixels exceeds PIL's decompression-bomb limit of "
            f"{limit} (PIL.Image.MAX_IMAGE_PIXELS); downscale the image, or raise the limit for trusted input."
        )


def _array_to_rgb(array: np.ndarray, *, where: str, channels_first: bool | None) -> np.ndarray:
    """Validate an array image (dtype, layout, channels, size, range) and convert it with `array_to_rgb`."""
    if not (array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"{where}: expected a uint8 array (0..255) or a float array (0..1), got dtype {array.dtype}.")
    if array.ndim not in (2, 3):
        raise ValueError(f"{where}: expected an (H, W), (H, W, C) or (C, H, W) image, got shape {array.shape}.")
    if array.ndim == 3:
        if channels_first is None:
            # transformers' rule (infer_channel_dimension_format): channels first when ambiguous
            channels_first = array.shape[0] in _CHANNEL_COUNTS or array.shape[-1] not in _CHANNEL_COUNTS
        channels = array.shape[0] if channels_first else array.shape[-1]
        if channels not in _CHANNEL_COUNTS:
            raise ValueError(
                f"{where}: expected 1 (gray), 3 (RGB) or 4 (RGBA) channels on the first or last axis, "
                f"got shape {array.shape}."
            )
    height, width = array.shape[-2:] if array.ndim == 3 and channels_first else array.shape[:2]
    _check_pixel_count(height, width, where=where)
    if array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        if not (0.0 <= low and high <= 1.0):  # also catches NaN
            raise ValueError(
                f"{where}: float images must hold values in [0, 1], got [{low}, {high}]; pass uint8 for 0..255 images."
            )
    return array_to_rgb(array, channels_first=bool(channels_first))


__all__ = ["VLMImageProcessor"]
