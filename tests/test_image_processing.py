"""VLMImageProcessor: parity with transformers' Idefics2 image processor, the resize/split/pad rules on hand-sized
inputs, every input kind and PIL mode, every promised error, and the save/load round trip."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_transforms import normalize, rescale
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

from vlmforge.modeling.configuration_autoregressive_vlm import AutoregressiveVLMConfig
from vlmforge.processing.image_processing_vlm import VLMImageProcessor
from vlmforge.processing.image_transforms import (
    normalization_chain,
    normalization_lut,
    resize_output_size,
    split_boxes,
    sub_image_cost,
    sub_image_sizes,
    write_normalized,
    write_through_lut,
)

PHOTO = Path(__file__).resolve().parents[1] / "vlmforge" / "assets" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """The bundled photograph (512 × 600, width × height) and images derived from it at test time."""
    photo = Image.open(PHOTO).convert("RGB")
    alpha = Image.linear_gradient("L").rotate(90).resize(photo.size)  # opaque on one side, transparent on the other
    rgba = photo.copy()
    rgba.putalpha(alpha)
    images = {
        "photo": photo,
        "portrait": photo.crop((56, 0, 456, 600)),  # 400 × 600
        "landscape": photo.crop((0, 100, 512, 400)),  # 512 × 300
        "small": photo.resize((200, 150), Image.BICUBIC),  # both edges < 378
        "odd": photo.crop((3, 5, 404, 382)),  # 401 × 377: odd sizes, uneven crops
        "wide_large": photo.resize((1100, 1000), Image.BICUBIC),  # width > 980
        "tall_large": photo.resize((600, 1100), Image.BICUBIC),  # height > 980
        "gray": photo.convert("L"),
        "rgba": rgba,
    }
    for image in images.values():
        image.load()
    return images


@pytest.fixture(scope="module")
def ours() -> VLMImageProcessor:
    return VLMImageProcessor()


@pytest.fixture(scope="module")
def theirs() -> Idefics2ImageProcessorPil:
    return Idefics2ImageProcessorPil()


def assert_same_output(a, b) -> None:
    """Same keys, shapes, dtypes, masks; pixel_values bit-identical (stronger than the promised max |diff| 1e-5)."""
    assert set(a.keys()) == set(b.keys()) == {"pixel_values", "pixel_attention_mask"}
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert a[key].dtype == b[key].dtype, key
    assert torch.equal(a["pixel_attention_mask"], b["pixel_attention_mask"])
    diff = (a["pixel_values"] - b["pixel_values"]).abs().max().item()
    assert diff <= 1e-5
    assert torch.equal(a["pixel_values"], b["pixel_values"])


# --- parity with transformers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_parity_with_transformers_on_photographs(photos, ours, theirs, split):
    """Bit-identical to Idefics2ImageProcessorPil on real photographs of every shape, gray and RGBA included, in a
    batch with 2, 0, 1 and 4 images per sample, splitting off and on.

    Both resample with the same PIL call on the same 8-bit pixels, and our normalization reproduces transformers'
    float64-then-float32 arithmetic exactly, so there is no difference to allow for. RGBA: transformers' image
    processor composites alpha on white (`convert_to_rgb`), as we do, so the gradient-alpha photo matches too.
    """
    batch = [
        [photos["portrait"], photos["landscape"]],
        [],
        [photos["small"]],
        [photos["wide_large"], photos["gray"], photos["rgba"], photos["odd"]],
    ]
    a = ours(batch, do_image_splitting=split, return_tensors="pt")
    b = theirs(batch, do_image_splitting=split, return_tensors="pt")
    assert_same_output(a, b)
    per_image = 5 if split else 1
    assert a["pixel_values"].shape[:3] == (4, 4 * per_image, 3)
    assert a["pixel_values"].dtype == torch.float32 and a["pixel_attention_mask"].dtype == torch.int64
    # sample 1 is text-only: all its slots are padding images, zeros with an all-zero mask (as transformers)
    assert not a["pixel_values"][1].any() and not a["pixel_attention_mask"][1].any()


def test_parity_tall_image_and_numpy_inputs(photos, ours, theirs):
    """Height > 980 takes the other branch of the resize rule; numpy inputs (HWC, CHW, RGBA) match too."""
    hwc = np.asarray(photos["photo"])
    rgba_hwc = np.asarray(photos["rgba"])
    batch = [[photos["tall_large"]], [hwc], [np.ascontiguousarray(hwc.transpose(2, 0, 1))], [rgba_hwc]]
    assert_same_output(ours(batch, return_tensors="pt"), theirs(batch, return_tensors="pt"))


@pytest.mark.parametrize("return_tensors", ["np", None])
def test_return_tensors_numpy_and_none(photos, ours, return_tensors):
    out = ours([[photos["small"]], [photos["odd"], photos["landscape"]]], return_tensors=return_tensors)
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].dtype == np.float32
    assert isinstance(out["pixel_attention_mask"], np.ndarray) and out["pixel_attention_mask"].dtype == np.int64
    assert out["pixel_values"].shape == (2, 2, 3, 378, 512)


# --- the rules, on hand-sized inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((600, 512), (600, 512)),  # within bounds: unchanged
        ((100, 100), (378, 378)),  # both edges raised
        ((300, 512), (378, 512)),  # only the short edge raised: the aspect ratio changes
        ((2000, 1000), (980, 490)),  # tall: height → 980, width follows
        ((1000, 2000), (490, 980)),  # wide: width → 980, height follows
        ((1000, 1000), (980, 980)),  # square goes through the width branch
        ((10, 3000), (378, 980)),  # thin: 980 / 300 = 3 px, raised to 378
        ((1001, 1500), (653, 980)),  # 653.98...: truncated, not rounded
        ((900, 1008), (874, 980)),  # 980 / (1008 / 900) is 874.999... in floating point: truncates to 874
        ((1015, 522), (980, 503)),  # 980 * (522 / 1015) is 503.999...: the tall branch truncates to 503
        ((1, 1), (378, 378)),
    ],
)
def test_resize_rule_matches_idefics2(size, expected):
    assert resize_output_size(*size, shortest_edge=378, longest_edge=980) == expected


def test_resize_rule_against_transformers_function():
    """Our rule is transformers' function, float artefacts included, over a grid of awkward sizes."""
    from transformers.image_utils import SizeDict
    from transformers.models.idefics2.image_processing_pil_idefics2 import get_resize_output_image_size

    sizes = SizeDict(shortest_edge=378, longest_edge=980)
    for height in (1, 2, 377, 378, 379, 979, 980, 981, 1015, 2999):
        for width in (1, 3, 261, 522, 900, 980, 981, 1008, 3000):
            ref = get_resize_output_image_size(np.empty((1, height, width), np.uint8), sizes)
            assert resize_output_size(height, width, shortest_edge=378, longest_edge=980) == ref, (height, width)


def test_split_boxes_and_sub_image_sizes_hand_sized():
    # 5 × 7 (height × width): crops meet at (2, 3); the bottom and right crops take the odd pixel
    assert split_boxes(5, 7) == [(0, 0, 2, 3), (0, 3, 2, 7), (2, 0, 5, 3), (2, 3, 5, 7), (0, 0, 5, 7)]
    sizes = sub_image_sizes(5, 7, shortest_edge=3, longest_edge=6, do_image_splitting=True)
    # crops 2×3, 2×4, 3×3, 3×4 → short edges raised to 3; the whole 5×7 → width 6, height int(6 / 1.4) = 4
    assert sizes == [(3, 3), (3, 4), (3, 3), (3, 4), (4, 6)]
    assert sub_image_sizes(5, 7, shortest_edge=3, longest_edge=6, do_image_splitting=False) == [(4, 6)]
    assert sub_image_sizes(5, 7, shortest_edge=3, longest_edge=6, do_image_splitting=True, do_resize=False) == [
        (2, 3),
        (2, 4),
        (3, 3),
        (3, 4),
        (5, 7),
    ]
    with pytest.raises(ValueError, match="at least 2 × 2"):
        split_boxes(1, 7)


def test_split_pixels_and_padding_hand_sized():
    """Without resize, rescale and normalize, pixel_values are the raw levels: each crop lands top-left in its
    slot, padded with zeros; the mask marks exactly its extent; a shorter sample gets all-zero padding images."""
    levels = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6) * 10  # (H, W) gray
    big = np.full((3, 8), 7, dtype=np.uint8)
    processor = VLMImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    out = processor([[levels], [big]], do_image_splitting=True, return_tensors="np")
    pixels, mask = out["pixel_values"], out["pixel_attention_mask"]
    assert pixels.shape == (2, 5, 3, 4, 8) and mask.shape == (2, 5, 4, 8)
    crops = [levels[:2, :3], levels[:2, 3:], levels[2:, :3], levels[2:, 3:], levels]
    for n, crop in enumerate(crops):
        h, w = crop.shape
        for channel in range(3):  # gray → RGB repeats the level
            np.testing.assert_array_equal(pixels[0, n, channel, :h, :w], crop)
        assert not pixels[0, n, :, h:].any() and not pixels[0, n, :, :, w:].any()
        assert mask[0, n, :h, :w].all() and mask[0, n].sum() == h * w
    # sample 1: a 3 × 8 image splits into 1×4, 1×4, 2×4, 2×4 crops and the whole 3×8
    assert [(int(m[:, 0].sum()), int(m[0].sum())) for m in mask[1]] == [(1, 4), (1, 4), (2, 4), (2, 4), (3, 8)]


def test_normalization_lut_is_transformers_arithmetic():
    levels = np.arange(256, dtype=np.uint8)[None, None]  # (1, 1, 256) as a CHW one-channel image
    rescaled = levels.astype(np.float64) * (1 / 255)
    expected = ((rescaled.astype(np.float32) - np.float32(0.5)) / np.float32(0.5))[0, 0]
    lut = normalization_lut(rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert lut.shape == (3, 256) and lut.dtype == np.float32
    np.testing.assert_array_equal(lut[1], expected)
    np.testing.assert_array_equal(
        normalization_lut(rescale_factor=None, image_mean=None, image_std=None)[2], np.arange(256, dtype=np.float32)
    )


# rescale_factor, image_mean, image_std; None skips the step, as do_rescale / do_normalize = False do
NORMALIZATIONS = {
    "idefics2": (1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": (1 / 255, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
    "clip": (1 / 255, tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)),
    "rescale only": (1 / 255, None, None),
    "normalize only": (None, (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)),
    "neither": (None, None, None),
    "odd factor": (0.0039215689, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # 1 / factor is no float32 divisor of it
}
CHAIN_STEPS = {"idefics2": 2, "imagenet": 3, "clip": 3, "rescale only": 1, "normalize only": 2, "neither": 0}


def transformers_arithmetic(image: np.ndarray, rescale_factor, image_mean, image_std) -> np.ndarray:
    """(3, H, W) uint8 → float32 through transformers' own rescale and normalize, as its PIL processor calls them."""
    out = image.astype(np.float32)
    if rescale_factor is not None:
        out = rescale(image, rescale_factor, data_format="channels_first", input_data_format="channels_first")
    if image_mean is not None:
        out = normalize(out, image_mean, image_std, data_format="channels_first", input_data_format="channels_first")
    return out


@pytest.mark.parametrize("name", list(NORMALIZATIONS))
def test_normalization_chain_is_transformers_arithmetic_or_absent(name):
    """The chain, when there is one, and the table fallback both give transformers' pixels bit for bit, on an image
    holding every level in every channel, read through strided channel views and written into a padded slice."""
    rescale_factor, image_mean, image_std = NORMALIZATIONS[name]
    settings = {"rescale_factor": rescale_factor, "image_mean": image_mean, "image_std": image_std}
    rng = np.random.default_rng(0)
    levels = np.concatenate([np.arange(256), rng.integers(0, 256, 32 * 40 - 256)])
    image = np.stack([rng.permutation(levels).reshape(32, 40) for _ in range(3)], axis=-1).astype(np.uint8)
    planes = [image[:, :, channel] for channel in range(3)]  # (32, 40) strided views of (32, 40, 3)
    expected = transformers_arithmetic(np.ascontiguousarray(image.transpose(2, 0, 1)), **settings)

    chain = normalization_chain(**settings)
    assert (chain is None) if name == "odd factor" else len(chain) == CHAIN_STEPS[name]
    writers = [lambda out: write_through_lut(out, planes, normalization_lut(**settings))]
    if chain is not None:
        writers.append(lambda out: write_normalized(out, planes, chain))
    for write in writers:
        out = np.zeros((3, 35, 44), dtype=np.float32)
        write(out)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out[:, :32, :40], expected)
        assert not out[:, 32:].any() and not out[:, :, 40:].any()  # the padding is left alone


@pytest.mark.parametrize("name", ["clip", "odd factor"])
def test_parity_with_other_normalization_settings(photos, name):
    """End to end with a three-step chain (CLIP's mean and std) and with the table fallback (an odd factor)."""
    rescale_factor, image_mean, image_std = NORMALIZATIONS[name]
    settings = {"rescale_factor": rescale_factor, "image_mean": list(image_mean), "image_std": list(image_std)}
    batch = [[photos["portrait"]], [photos["small"], photos["odd"]]]
    a = VLMImageProcessor(**settings)(batch, return_tensors="pt")
    assert_same_output(a, Idefics2ImageProcessorPil(**settings)(batch, return_tensors="pt"))


def test_parity_without_padding(photos, ours, theirs):
    """When every sub-image has the batch's size nothing is padded, and the output is written without a zero fill
    first: every element must still be written. The 200 × 150 image splits into five 378 × 378 sub-images."""
    mirrored = photos["landscape"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for batch, split in (([[photos["landscape"]], [mirrored]], False), ([[photos["small"]], [photos["small"]]], True)):
        a, b = ours(batch, do_image_splitting=split, return_tensors="pt"), theirs(batch, do_image_splitting=split)
        assert a["pixel_attention_mask"].all()
        assert_same_output(a, b.convert_to_tensors("pt"))


def test_thread_count_does_not_change_the_output(photos, ours):
    """Sub-images run on torch's thread count, largest first; the batch is the same on 1 thread as on 3."""
    assert sub_image_cost((0, 0, 1800, 1536), (980, 836)) > sub_image_cost((0, 0, 300, 256), (378, 378))
    batch = [[photos["small"], photos["wide_large"]], [photos["odd"]], [], [photos["tall_large"], photos["rgba"]]]
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outputs.append(ours(batch, do_image_splitting=True, return_tensors="pt"))
    finally:
        torch.set_num_threads(before)
    for key in ("pixel_values", "pixel_attention_mask"):
        assert torch.equal(outputs[0][key], outputs[1][key])


def test_splitting_per_call_overrides_instance(photos):
    processor = VLMImageProcessor(do_image_splitting=True)
    assert processor(photos["small"], return_tensors="pt")["pixel_values"].shape[1] == 5
    assert processor(photos["small"], do_image_splitting=False, return_tensors="pt")["pixel_values"].shape[1] == 1
    assert VLMImageProcessor()(photos["small"], do_image_splitting=True)["pixel_values"].shape[1] == 5


def test_num_image_tokens(photos, ours):
    # 600 × 512 stays as is: 42 × 36 full patches of 14 px; pooled: 64 per sub-image
    assert ours.num_image_tokens(600, 512, image_seq_len=None) == 42 * 36
    assert ours.num_image_tokens(600, 512, image_seq_len=64) == 64
    assert ours.num_image_tokens(600, 512, image_seq_len=64, do_image_splitting=True) == 5 * 64
    # split: four 300 × 256 crops → 378 × 378 (27 × 27 patches each), plus the whole image
    assert ours.num_image_tokens(600, 512, image_seq_len=None, do_image_splitting=True) == 4 * 27 * 27 + 42 * 36
    assert ours.num_image_tokens(600, 512, image_seq_len=None, patch_size=16) == 37 * 32
    # ... and it is what the mask of a processed image says
    out = ours(photos["odd"], do_image_splitting=True, return_tensors="pt")
    from_mask = sum((int(m[:, 0].sum()) // 14) * (int(m[0].sum()) // 14) for m in out["pixel_attention_mask"][0])
    assert ours.num_image_tokens(377, 401, image_seq_len=None, do_image_splitting=True) == from_mask
    with pytest.raises(ValueError, match="cannot be split"):
        ours.num_image_tokens(1, 500, image_seq_len=64, do_image_splitting=True)


# --- input kinds and PIL modes ------------------------------------------------------------------------------------


def _palette_with_transparency(photo: Image.Image) -> Image.Image:
    image = photo.convert("P", palette=Image.ADAPTIVE, colors=64)
    image.info["transparency"] = 0  # palette index 0 is see-through
    return image


MODES = {
    "RGB": lambda photo: photo,
    "L": lambda photo: photo.convert("L"),
    "LA": lambda photo: photo.convert("LA"),
    "P": lambda photo: photo.convert("P", palette=Image.ADAPTIVE, colors=64),
    "P+transparency": _palette_with_transparency,
    "RGBA": lambda photo: photo.convert("RGBA"),
    "CMYK": lambda photo: photo.convert("CMYK"),
    "1": lambda photo: photo.convert("1"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_pil_mode_matches_transformers(photos, ours, theirs, mode):
    image = MODES[mode](photos["small"])
    assert_same_output(ours(image, return_tensors="pt"), theirs(image, return_tensors="pt"))


def test_16_bit_gray_is_scaled_not_clipped(photos, ours):
    """I;16 (16-bit gray PNGs): scaled 65535 → 255, so it gives the 8-bit image's pixels. transformers (PIL's
    convert) clips at 255 instead, turning almost every pixel white: the one mode where we differ, on purpose."""
    gray = photos["small"].convert("L")
    wide = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert wide.mode == "I;16"
    a, b = ours(wide, return_tensors="pt"), ours(gray, return_tensors="pt")
    assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_transparent_pixels_become_white(ours):
    clear = Image.new("RGBA", (20, 30), (0, 0, 0, 0))
    assert (ours(clear, return_tensors="pt")["pixel_values"] == 1.0).all()  # white, normalized
    clear_array = np.zeros((30, 20, 4), dtype=np.uint8)
    assert (ours(clear_array, return_tensors="pt")["pixel_values"] == 1.0).all()


def test_array_and_tensor_inputs_equal_the_pil_image(photos, ours):
    """HWC/CHW, uint8/float (levels / 255, any float dtype), numpy or torch: all the same pixels as the PIL image."""
    image = photos["odd"]
    expected = ours(image, do_image_splitting=True, return_tensors="pt")["pixel_values"]
    hwc = np.asarray(image)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    inputs = {
        "hwc uint8": hwc,
        "chw uint8": chw,
        "hwc float64": hwc / 255.0,
        "chw float32": (chw / 255.0).astype(np.float32),
        "torch chw uint8": torch.from_numpy(chw),
        "torch hwc float32": torch.from_numpy(hwc.copy()).float() / 255,
        "torch chw bfloat16 gray": torch.from_numpy(np.array(image.convert("L"))[None]).to(torch.bfloat16) / 255,
    }
    for name, array in inputs.items():
        got = ours(array, do_image_splitting=True, return_tensors="pt")["pixel_values"]
        if "gray" in name:
            gray = ours(image.convert("L"), do_image_splitting=True, return_tensors="pt")["pixel_values"]
            # bfloat16 keeps 8 significant bits, so a level may come back one off: 2 / 255 after normalization
            assert (got - gray).abs().max() <= 2 / 255 + 1e-6, name
        else:
            assert torch.equal(got, expected), name
    explicit = ours(hwc[:3], input_data_format="channels_last", return_tensors="pt")  # (3, 401, 3): ambiguous
    assert explicit["pixel_attention_mask"][0, 0].sum() == 378 * 401


def test_batch_structures(photos, ours):
    a, b = photos["small"], photos["landscape"]
    assert ours(a)["pixel_values"].shape[:2] == (1, 1)
    assert ours([a, b])["pixel_values"].shape[:2] == (1, 2)  # a flat list is one sample, as in transformers
    assert ours([[a], [a, b], []])["pixel_values"].shape[:2] == (3, 2)
    stack = np.stack([np.asarray(a)] * 3)  # (N, H, W, C): one sample of N images
    assert ours(stack)["pixel_values"].shape[:2] == (1, 3)
    assert ours([stack, stack[:2]])["pixel_values"].shape[:2] == (2, 3)
    assert ours([[], []])["pixel_values"].shape == (2, 0, 3, 0, 0)  # text-only batch


def test_bytes_and_paths_are_decoded(photos, ours, tmp_path):
    buffer = io.BytesIO()
    photos["small"].save(buffer, format="PNG")
    path = tmp_path / "small.png"
    path.write_bytes(buffer.getvalue())
    expected = ours(photos["small"], return_tensors="pt")["pixel_values"]
    for source in (buffer.getvalue(), str(path), path):
        assert torch.equal(ours(source, return_tensors="pt")["pixel_values"], expected)


# --- bad input ----------------------------------------------------------------------------------------------------


def _png_bytes(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.open(PHOTO).save(buffer, format="JPEG")
    return buffer.getvalue()[:2000]


GOOD = np.zeros((20, 20, 3), dtype=np.uint8)
BAD_INPUTS = {
    "int": (42, TypeError, "expected a PIL.Image.Image"),
    "dict": ({"image": GOOD}, TypeError, "got builtins.dict"),
    "uint16 array": (np.zeros((20, 20, 3), np.uint16), TypeError, "uint8 array"),
    "int64 tensor": (torch.zeros(3, 20, 20, dtype=torch.int64), TypeError, "dtype int64"),
    "empty PIL": (Image.new("RGB", (0, 10)), ValueError, "empty"),
    "empty array": (np.zeros((0, 5, 3), np.uint8), ValueError, "empty"),
    "float above 1": (np.full((10, 10, 3), 1.5), ValueError, r"\[0, 1\]"),
    "float below 0": (np.full((10, 10, 3), -0.1, np.float32), ValueError, r"\[0, 1\]"),
    "NaN": (np.full((10, 10, 3), np.nan), ValueError, r"\[0, 1\]"),
    "2 channels": (np.zeros((10, 10, 2), np.uint8), ValueError, "channels"),
    "5 channels": (np.zeros((5, 10, 10), np.uint8), ValueError, "channels"),
    "1-D": (np.zeros(10, np.uint8), ValueError, "expected an"),
    "corrupt bytes": (b"definitely not an image", ValueError, "could not read"),
    "truncated jpeg": (_truncated_jpeg(), ValueError, "could not be decoded"),
    "missing file": ("/nonexistent/picture.png", ValueError, "could not read"),
    "url": ("https://example.com/cat.png", ValueError, "URLs are not fetched"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_names_sample_and_image(ours, name):
    bad, error, message = BAD_INPUTS[name]
    with pytest.raises(error, match=message) as raised:
        ours([[GOOD], [GOOD, bad]])
    assert "sample 1, image 1" in str(raised.value)


def test_decompression_bomb_limit(ours, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for bomb in (Image.new("L", (40, 30)), np.zeros((30, 40), np.uint8), torch.zeros(3, 30, 40), _png_bytes()):
        with pytest.raises(ValueError, match="decompression-bomb") as raised:
            ours([[], [bomb]])
        assert "sample 1, image 0" in str(raised.value)
    assert ours(np.zeros((25, 40), np.uint8))["pixel_values"].shape[1] == 1  # exactly at the limit: accepted


def test_too_small_to_split_is_refused(ours):
    with pytest.raises(ValueError, match="sample 0, image 1: A 1 × 9"):
        ours([np.zeros((5, 5), np.uint8), np.zeros((1, 9), np.uint8)], do_image_splitting=True)
    assert ours(np.zeros((1, 9), np.uint8))["pixel_values"].shape[1] == 1  # fine without splitting


def test_bad_structures_and_settings(ours):
    with pytest.raises(TypeError, match="mixes per-sample lists"):
        ours([[GOOD], GOOD])
    with pytest.raises(ValueError, match=r"\[\[\]\]"):
        ours([])
    with pytest.raises(ValueError, match="sample 0, image 0: expected an"):
        ours([[np.zeros((2, 10, 10, 3), np.uint8)]])  # a stack inside a sample's list
    with pytest.raises(ValueError, match="shortest_edge"):
        VLMImageProcessor(size={"height": 224, "width": 224})
    with pytest.raises(ValueError, match="do_pad=False"):
        ours(GOOD, do_pad=False)
    with pytest.raises(ValueError, match="sample 0, image 1: float images .* do_rescale=False"):
        ours([GOOD, GOOD / 255.0], do_rescale=False)


# --- save / load --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(photos, tmp_path):
    processor = VLMImageProcessor(
        do_image_splitting=True,
        size={"shortest_edge": 224, "longest_edge": 448},
        image_mean=[0.4, 0.45, 0.5],
        image_std=[0.2, 0.25, 0.3],
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "VLMImageProcessor"
    assert saved["do_image_splitting"] is True and saved["size"] == {"shortest_edge": 224, "longest_edge": 448}

    AutoImageProcessor.register(
        AutoregressiveVLMConfig, image_processor_classes={"pil": VLMImageProcessor}, exist_ok=True
    )
    for loaded in (VLMImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is VLMImageProcessor
        assert loaded.to_dict() == processor.to_dict()
        assert loaded.do_image_splitting is True
        assert dict(loaded.size) == {"shortest_edge": 224, "longest_edge": 448}
        assert tuple(loaded.image_mean) == (0.4, 0.45, 0.5) and tuple(loaded.image_std) == (0.2, 0.25, 0.3)
        batch = [[photos["odd"]], [photos["small"], photos["rgba"]]]
        a, b = processor(batch, return_tensors="pt"), loaded(batch, return_tensors="pt")
        assert a["pixel_values"].shape[1] == 10
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["pixel_attention_mask"], b["pixel_attention_mask"])


def test_loads_as_remote_code_without_vlmforge(tmp_path):
    """processing/ ships as Hub remote code: the saved folder carries both files and loads with
    trust_remote_code=True in a fresh interpreter that never imports vlmforge."""
    import os
    import subprocess
    import sys

    VLMImageProcessor.register_for_auto_class("AutoImageProcessor")
    try:
        VLMImageProcessor(do_image_splitting=True).save_pretrained(tmp_path / "checkpoint")
    finally:
        VLMImageProcessor._auto_class = None  # keep other tests' saved configs free of auto_map
    assert {p.name for p in (tmp_path / "checkpoint").iterdir()} >= {"image_processing_vlm.py", "image_transforms.py"}
    script = (
        "import sys, numpy as np\n"
        "from transformers import AutoImageProcessor\n"
        f"p = AutoImageProcessor.from_pretrained({str(tmp_path / 'checkpoint')!r}, trust_remote_code=True)\n"
        "out = p(np.zeros((30, 40, 3), np.uint8), return_tensors='pt')\n"
        "assert type(p).__name__ == 'VLMImageProcessor' and 'transformers_modules' in type(p).__module__\n"
        "assert tuple(out['pixel_values'].shape) == (1, 5, 3, 378, 378), out['pixel_values'].shape\n"
        "assert not [m for m in sys.modules if m == 'vlmforge' or m.startswith('vlmforge.')]\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
