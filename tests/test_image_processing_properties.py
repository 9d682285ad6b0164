"""Property test: any size from 1 to 3000 px, any PIL mode or array kind, splitting on or off — the processor either
returns a valid batch whose sub-image sizes and token count are the ones `sub_image_sizes` / `num_image_tokens`
predicted before processing, or raises the promised ValueError. Nothing else."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmforge.processing.image_processing_vlm import VLMImageProcessor
from vlmforge.processing.image_transforms import sub_image_sizes

# Low enough that the largest sizes drawn (3000 × 3000 = 9 M pixels) trip it, so the property covers that error too.
PIXEL_LIMIT = 4_000_000
KINDS = [
    "RGB",
    "L",
    "LA",
    "RGBA",
    "P",
    "1",
    "CMYK",
    "I;16",
    "np_hwc_uint8",
    "np_chw_rgba_uint8",
    "np_gray_float32",
    "torch_chw_uint8",
]


def make_image(kind: str, height: int, width: int):
    """An image of `kind` and size, from a stretched gradient (cheap even at 3000 × 3000)."""
    gray = Image.linear_gradient("L").resize((width, height), Image.NEAREST)
    if kind == "I;16":
        return Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    if kind in ("LA", "RGBA"):
        image = gray.convert(kind)
        image.putalpha(gray.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
        return image
    if kind in ("RGB", "L", "P", "1", "CMYK"):
        return gray.convert(kind)
    levels = np.asarray(gray)
    if kind == "np_hwc_uint8":
        return np.stack([levels, levels[::-1], 255 - levels], axis=-1)
    if kind == "np_chw_rgba_uint8":
        return np.stack([levels, levels, levels, 255 - levels])
    if kind == "np_gray_float32":
        return levels.astype(np.float32) / 255
    return torch.from_numpy(np.stack([levels] * 3).copy())


def real_sizes(mask: np.ndarray) -> list[tuple[int, int]]:
    """(h, w) of each sub-image's ones in its (H, W) mask, after checking they form a top-left rectangle."""
    sizes = []
    for sub in mask:
        rows, cols = int(sub.any(axis=1).sum()), int(sub.any(axis=0).sum())
        assert sub[:rows, :cols].all() and sub.sum() == rows * cols
        sizes.append((rows, cols))
    return sizes


@pytest.fixture(scope="module")
def processor() -> VLMImageProcessor:
    return VLMImageProcessor()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    height=st.integers(1, 3000),
    width=st.integers(1, 3000),
    kind=st.sampled_from(KINDS),
    split=st.booleans(),
)
@example(height=1, width=1, kind="RGB", split=True)  # too small to split
@example(height=2, width=2, kind="1", split=True)  # smallest splittable
@example(height=3000, width=3000, kind="L", split=False)  # over the pixel limit
@example(height=1, width=3000, kind="np_hwc_uint8", split=False)  # thin: width → 980, height raised to 378
@example(height=1015, width=522, kind="RGBA", split=True)  # float truncation in the tall branch
def test_output_matches_prediction_or_promised_error(processor, height, width, kind, split):
    image = make_image(kind, height, width)
    layout = {"np_hwc_uint8": "channels_last", "np_chw_rgba_uint8": "channels_first"}.get(kind, "channels_first")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, PIXEL_LIMIT
    try:
        out = processor([[image]], do_image_splitting=split, input_data_format=layout, return_tensors="np")
    except ValueError as error:
        # the only errors allowed: over the pixel limit, or too small to split — and exactly when they apply
        assert "sample 0, image 0" in str(error)
        if height * width > PIXEL_LIMIT:
            assert "decompression-bomb" in str(error)
        else:
            assert split and min(height, width) < 2 and "cannot be split" in str(error)
            with pytest.raises(ValueError, match="cannot be split"):
                processor.num_image_tokens(height, width, image_seq_len=64, do_image_splitting=split)
        return
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert height * width <= PIXEL_LIMIT and not (split and min(height, width) < 2)

    pixels, mask = out["pixel_values"][0], out["pixel_attention_mask"][0]
    predicted = sub_image_sizes(height, width, shortest_edge=378, longest_edge=980, do_image_splitting=split)
    assert len(predicted) == (5 if split else 1)
    assert real_sizes(mask) == predicted
    assert pixels.shape == (len(predicted), 3, *mask.shape[1:]) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all() and pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert not pixels[np.broadcast_to(mask[:, None] == 0, pixels.shape)].any()  # padding stays zero

    from_mask = sum((h // 14) * (w // 14) for h, w in real_sizes(mask))
    assert processor.num_image_tokens(height, width, image_seq_len=None, do_image_splitting=split) == from_mask
    assert processor.num_image_tokens(height, width, image_seq_len=64, do_image_splitting=split) == 64 * len(mask)
