"""VLMProcessor: parity with transformers' Idefics2Processor on real photographs, per-call image splitting,
placeholders from the model config, bad input, truncation, save/load, and processor → model → generate."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_autoregressive_config, tiny_autoregressive_model
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, Idefics2Processor, PreTrainedTokenizerFast
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

import vlmforge
from vlmforge import VLMImageProcessor, VLMProcessor
from vlmforge.processing.processing_vlm import CHAT_TEMPLATE
from vlmforge.processing.prompt_expansion import (
    PROMPT_EXPANSIONS,
    AutoregressivePromptExpansion,
    ImageTokenIds,
    PromptExpansion,
)
from vlmforge.toy_tokenizer import build_toy_tokenizer

PHOTO = Path(vlmforge.__file__).parent / "assets" / "grace_hopper.jpg"
SEQ_LEN = 4  # small, so that the expected placeholder strings stay short
IMAGE_ID, FAKE_ID, EOU_ID = 99, 98, 97  # the toy tokenizer's last three ids


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """The real photograph (512 × 600, width × height) and derived sizes, aspect ratios and modes."""
    photo = Image.open(PHOTO)
    photo.load()
    return {
        "photo": photo,
        "landscape": photo.resize((1400, 500)),  # longest edge over 980: shrunk, aspect ratio kept
        "portrait": photo.crop((100, 0, 400, 600)),
        "small": photo.resize((160, 200)),  # under 378 px: both edges raised to 378
        "grayscale": photo.convert("L").resize((450, 333)),
        "odd": photo.resize((777, 391)),  # odd sizes: the right and bottom crops are one pixel larger
    }


def ours(split: bool = False, image_seq_len: int | None = SEQ_LEN, **kwargs) -> VLMProcessor:
    return VLMProcessor(VLMImageProcessor(do_image_splitting=split, **kwargs), build_toy_tokenizer(100), image_seq_len)


def theirs(split: bool = False) -> Idefics2Processor:
    """transformers' processor, built offline: its PIL image processor and the toy tokenizer."""
    image_processor = Idefics2ImageProcessorPil(do_image_splitting=split)
    return Idefics2Processor(image_processor=image_processor, tokenizer=build_toy_tokenizer(100), image_seq_len=SEQ_LEN)


def assert_same_inputs(mine, reference, *, pixels: bool = True) -> None:
    assert torch.equal(mine["input_ids"], reference["input_ids"])
    assert torch.equal(mine["attention_mask"], reference["attention_mask"])
    if pixels:
        assert mine["pixel_values"].shape == reference["pixel_values"].shape
        assert torch.equal(mine["pixel_attention_mask"].long(), reference["pixel_attention_mask"].long())
        assert (mine["pixel_values"] - reference["pixel_values"]).abs().max() <= 1e-5


# ---- the prompt expansion, by hand -----------------------------------------------------------------------------

F, I = "<fake_token_around_image>", "<image>"


def test_autoregressive_expansion_by_hand():
    expansion = AutoregressivePromptExpansion(ImageTokenIds(image=99, fake_image=98, end_of_utterance=97))
    text, offsets = expansion.expand("a<image><image>b <image>", [[2], [1], [2, 1]])
    # adjacent images share a fake token; a word glued to a closing fake token gets a space; sub-images of one
    # image share theirs too
    assert text == f"a{F}{I}{I}{F}{I}{F} b {F}{I}{I}{F}{I}{F}"
    assert [o["span"] for o in offsets] == [(1, 8), (8, 15), (17, 24)]
    assert [text[slice(*o["new_span"])] for o in offsets] == [o["replacement"] for o in offsets]
    assert offsets[1]["replacement"] == f"{I}{F} "
    with pytest.raises(ValueError, match="2 <image> tokens but 1 images"):
        expansion.expand("<image><image>", [[4]])


def test_a_new_prompt_form_plugs_in_by_registration(photos, monkeypatch):
    """The cross-attention form's path: a PromptExpansion subclass registered under its config's model_type is
    picked by VLMProcessor(fusion=...), its options travel in processor_config.json, its extra inputs come out."""

    class OneMarkerPerImage(PromptExpansion):
        model_type = "test_one_marker"

        def __init__(self, token_ids, *, rule="latest"):
            super().__init__(token_ids)
            self.rule = rule

        def replacement(self, sub_image_tokens, *, before, after):
            return I

        def image_inputs(self, input_ids, *, attention_mask, images_per_sample, sub_images_per_image):
            return {"marker_count": [list(ids).count(self.token_ids.image) for ids in input_ids]}

    monkeypatch.setitem(PROMPT_EXPANSIONS, OneMarkerPerImage.model_type, OneMarkerPerImage)
    processor = VLMProcessor(
        VLMImageProcessor(), build_toy_tokenizer(100), fusion="test_one_marker", fusion_options={"rule": "all_previous"}
    )
    out = processor(text=["<image>a<image>", "b"], images=[[photos["small"]] * 2, []], do_image_splitting=True)
    assert processor.prompt_expansion.rule == "all_previous"
    assert out["marker_count"] == [2, 0] and len(out["pixel_values"][0]) == 10
    assert processor.to_dict()["fusion_options"] == {"rule": "all_previous"}


# ---- parity with transformers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_matches_idefics2_processor(photos, split, padding_side):
    """Different image counts per sample (one text-only), adjacent images, every size and aspect ratio, padding."""
    texts = [
        "User:<image>What is in this picture?<end_of_utterance>\nAssistant:",
        "Compare<image><image>them, then <image> read this.",
        "no image here",
        "<image>",
    ]
    images = [
        [photos["photo"]],
        [photos["landscape"], photos["portrait"], photos["grayscale"]],
        [],
        [photos["small"]],
    ]
    kwargs = dict(padding=True, padding_side=padding_side, return_tensors="pt")
    mine = ours(split)(text=texts, images=images, **kwargs)
    reference = theirs(split)(text=texts, images=images, **kwargs)

    assert_same_inputs(mine, reference)
    sub_images = 5 if split else 1
    assert mine["pixel_values"].shape[:3] == (4, 3 * sub_images, 3)
    assert (mine["input_ids"] == IMAGE_ID).sum(dim=1).tolist() == [n * sub_images * SEQ_LEN for n in (1, 3, 0, 1)]
    padded_at = 0 if padding_side == "left" else -1
    assert mine["attention_mask"][2, padded_at] == 0  # the short text-only sample is padded on the asked side


@pytest.mark.parametrize("name", ["photo", "landscape", "portrait", "small", "grayscale", "odd"])
def test_each_photograph_matches_idefics2_with_splitting(photos, name):
    text = "User:<image>Describe it.<end_of_utterance>\nAssistant:"
    mine = ours(True)(text=text, images=photos[name], return_tensors="pt")
    reference = theirs(True)(text=text, images=photos[name], return_tensors="pt")
    assert_same_inputs(mine, reference)


def test_flat_image_list_is_assigned_to_samples_in_order(photos):
    texts = ["<image>one", "two<image><image>"]
    flat = [photos["photo"], photos["small"], photos["portrait"]]
    mine = ours()(text=texts, images=flat, padding=True, return_tensors="pt")
    reference = theirs()(text=texts, images=flat, padding=True, return_tensors="pt")
    assert_same_inputs(mine, reference)
    nested = ours()(text=texts, images=[flat[:1], flat[1:]], padding=True, return_tensors="pt")
    assert_same_inputs(mine, nested)


def test_rgba_differs_from_idefics2_processor_by_design(photos):
    """transformers is inconsistent on alpha: Idefics2ImageProcessorPil composites it on white, but
    Idefics2Processor first calls `load_image`, which drops it (`convert("RGB")`). We follow the image processor,
    so on RGBA input our pixels equal Idefics2ImageProcessorPil's and differ from Idefics2Processor's where the
    image is transparent; the token ids are the same."""
    rgba = photos["photo"].convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))  # transparent on the left
    rgba.putalpha(Image.fromarray(alpha))
    text = "<image>What is this?"

    mine = ours()(text=text, images=rgba, return_tensors="pt")
    processor_reference = theirs()(text=text, images=rgba, return_tensors="pt")
    image_processor_reference = Idefics2ImageProcessorPil()(rgba, return_tensors="pt")

    assert torch.equal(mine["input_ids"], processor_reference["input_ids"])
    assert (mine["pixel_values"] - image_processor_reference["pixel_values"]).abs().max() <= 1e-5
    assert (mine["pixel_values"] - processor_reference["pixel_values"]).abs().max() > 0.5  # alpha dropped there
    white_composite = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    assert_same_inputs(mine, theirs()(text=text, images=white_composite, return_tensors="pt"))


# ---- per-call image splitting drives pixels and text ---------------------------------------------------------


def test_per_call_splitting_expands_five_sub_images(photos):
    """Ours: a per-call do_image_splitting=True gives 5 sub-images and 5 placeholder groups. transformers'
    Idefics2Processor expands the text from its instance attribute, so the same call gives 5 sub-images but
    placeholders for 1 (a prompt its model then rejects)."""
    text = "<image>Read the text."
    mine = ours(split=False)(text=text, images=photos["photo"], do_image_splitting=True, return_tensors="pt")
    reference = theirs(split=False)(text=text, images=photos["photo"], do_image_splitting=True, return_tensors="pt")

    assert mine["pixel_values"].shape[1] == reference["pixel_values"].shape[1] == 5
    assert (mine["input_ids"] == IMAGE_ID).sum() == 5 * SEQ_LEN
    assert (mine["input_ids"] == FAKE_ID).sum() == 6  # F I.. F I.. F I.. F I.. F I.. F: neighbours share one
    assert (reference["input_ids"] == IMAGE_ID).sum() == SEQ_LEN  # transformers' mismatch

    # and the other way round: an instance that splits, switched off for one call
    unsplit = ours(split=True)(text=text, images=photos["photo"], do_image_splitting=False, return_tensors="pt")
    assert unsplit["pixel_values"].shape[1] == 1 and (unsplit["input_ids"] == IMAGE_ID).sum() == SEQ_LEN
    assert_same_inputs(unsplit, theirs(split=False)(text=text, images=photos["photo"], return_tensors="pt"))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("image_seq_len", [SEQ_LEN, None])
def test_placeholder_count_equals_num_image_tokens(photos, split, image_seq_len):
    """Placeholders equal what `num_image_tokens` promises before processing; with image_seq_len=None (no
    pooling) each sub-image gets one token per full 14 px patch of its real (unpadded) size."""
    processor = ours(split, image_seq_len)
    for name in ("photo", "landscape", "small", "odd"):
        image = photos[name]
        out = processor(text=f"<image>{name}", images=image, return_tensors="pt")
        assert (out["input_ids"] == IMAGE_ID).sum() == processor.num_image_tokens(image.height, image.width)
    if image_seq_len is None:  # the patch rule, by hand, on the unsplit 512 × 600 photograph: 36 × 42 patches
        out = ours(False, None)(text="<image>", images=photos["photo"], return_tensors="pt")
        assert (out["input_ids"] == IMAGE_ID).sum() == (512 // 14) * (600 // 14)


# ---- the model config is the one source of truth -------------------------------------------------------------


def test_from_model_config_takes_image_seq_len_patch_size_and_fusion():
    config = tiny_autoregressive_config()
    processor = VLMProcessor.from_model_config(config, VLMImageProcessor(), build_toy_tokenizer(100))
    assert (processor.image_seq_len, processor.patch_size, processor.fusion) == (
        config.image_seq_len,
        config.vision_config.patch_size,
        "vlmforge_autoregressive",
    )
    unpooled = tiny_autoregressive_config(connector_config={"pooling": "none"})
    assert VLMProcessor.from_model_config(unpooled, VLMImageProcessor(), build_toy_tokenizer(100)).image_seq_len is None


def test_from_model_config_rejects_a_tokenizer_with_other_image_ids():
    config = tiny_autoregressive_config(image_token_id=5)
    with pytest.raises(ValueError, match=r"image_token_id: processor 99, model 5"):
        VLMProcessor.from_model_config(config, VLMImageProcessor(), build_toy_tokenizer(100))


def test_loading_beside_a_disagreeing_model_config_raises(tmp_path):
    config = tiny_autoregressive_config()  # 4 perceiver latents
    config.save_pretrained(tmp_path)
    ours(image_seq_len=8).save_pretrained(tmp_path)
    for load in (VLMProcessor.from_pretrained, AutoProcessor.from_pretrained):
        with pytest.raises(ValueError, match=r"image_seq_len: processor 8, model 4"):
            load(tmp_path)


def test_missing_image_tokens_are_added_in_idefics2_order():
    """A tokenizer without the three tokens gets them as special tokens: fake, image, end of utterance."""
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    processor = VLMProcessor(VLMImageProcessor(), PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>"))
    assert (processor.fake_image_token_id, processor.image_token_id, processor.end_of_utterance_token_id) == (3, 4, 5)
    ids = processor(text="hello <image> world", images=Image.new("RGB", (20, 20)))["input_ids"][0]
    assert ids == [1, 3] + [4] * 64 + [3, 2]


# ---- bad input: the error names the sample and what was expected ----------------------------------------------


def photo_bytes() -> bytes:
    return PHOTO.read_bytes()


def corrupt_bytes(photo):
    return [[photo], [b"definitely not an image"]]


def truncated_jpeg(photo):
    return [[photo], [photo_bytes()[:5000]]]


def zero_size_image(photo):
    return [[photo], [Image.new("RGB", (0, 7))]]


# case: (texts, images from the small photograph, error type, message pattern)
BAD_INPUTS = {
    "more <image> than images": (["<image>a", "<image><image>b"], lambda photo: [[photo], [photo]], ValueError,
                                 r"Sample 1: the text has 2 <image> tokens but 1 images"),
    "flat list too short": (["<image>a", "<image>b"], lambda photo: [photo], ValueError,
                            r"Sample 1: its text has 1 <image> tokens but only 0"),
    "flat list too long": (["<image>a"], lambda photo: [photo, photo], ValueError, r"2 images were given"),
    "text without its images": (["a", "<image>b"], lambda photo: None, ValueError, r"Sample 1: .*no images"),
    "corrupt bytes": (["<image>", "<image>"], corrupt_bytes, ValueError, r"sample 1, image 0"),
    "truncated jpeg": (["<image>", "<image>"], truncated_jpeg, ValueError, r"sample 1, image 0"),
    "missing file": (["<image>"], lambda photo: [["/nonexistent/cat.jpg"]], ValueError, r"sample 0, image 0"),
    "zero-size image": (["<image>", "<image>"], zero_size_image, ValueError, r"sample 1, image 0.*empty"),
    "empty array": (["<image>"], lambda photo: [[np.zeros((0, 10, 3), np.uint8)]], ValueError, r"sample 0, image 0"),
    "unsupported type": (["a", "<image>"], lambda photo: [[], [object()]], TypeError, r"sample 1, image 0"),
    "text not a string": ([b"<image>"], lambda photo: None, TypeError, r"Sample 0: text must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_the_sample(photos, case):
    texts, make_images, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=re.compile(message, re.IGNORECASE)):
        ours()(text=texts, images=make_images(photos["small"]))


def test_image_over_the_decompression_bomb_limit(photos, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # the small photo (32,000 px) passes, 307,200 px do not
    for big in (photos["photo"], photo_bytes()):
        with pytest.raises(ValueError, match=r"(?i)sample 1, image 0.*decompression.bomb"):
            ours()(text=["<image>", "<image>"], images=[[photos["small"]], [big]])


def test_truncation_never_cuts_into_image_placeholders(photos):
    text = "<image>" + " what is in this picture?" * 3
    full = ours()(text=text, images=photos["photo"])["input_ids"][0]
    placeholders = SEQ_LEN + 2  # fake, 4 × image, fake
    message = rf"Sample 0: .*need {placeholders} placeholder tokens.*{len(full)} tokens.*limit is 5"
    with pytest.raises(ValueError, match=message):
        ours()(text=text, images=photos["photo"], truncation=True, max_length=5)
    # cutting text only is fine
    cut = ours()(text=text, images=photos["photo"], truncation=True, max_length=len(full) - 3)["input_ids"][0]
    assert cut == full[:-3]
    # with the image at the end, the left side may go but not the placeholders
    with pytest.raises(ValueError, match=r"Sample 0"):
        ours()(text="hello there<image>", images=photos["photo"], truncation=True, max_length=4, truncation_side="left")


# ---- decode, save/load ---------------------------------------------------------------------------------------


def test_decode_and_batch_decode(photos):
    processor = ours()
    out = processor(text=["<image>the cat", "hello"], images=[[photos["small"]], []], padding=True)
    decoded = processor.batch_decode(out["input_ids"], skip_special_tokens=True)
    assert [d.strip() for d in decoded] == ["the cat", "hello"]
    assert "<fake_token_around_image><image>" in processor.decode(out["input_ids"][0])


def test_save_and_load_reproduce_the_outputs(photos, tmp_path):
    config = tiny_autoregressive_config(connector_config={"pooling": "perceiver", "n_latents": 6, "depth": 1})
    config.save_pretrained(tmp_path)
    image_processor = VLMImageProcessor(do_image_splitting=True, size={"shortest_edge": 200, "longest_edge": 500})
    processor = VLMProcessor.from_model_config(config, image_processor, build_toy_tokenizer(100))
    processor.save_pretrained(tmp_path)

    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_seq_len"] == 6 and saved["image_processor"]["do_image_splitting"] is True

    batch = dict(text=["<image>hi <image>", "bye"], images=[[photos["photo"], photos["odd"]], []], padding=True)
    expected = processor(**batch, return_tensors="pt")
    for load in (VLMProcessor.from_pretrained, AutoProcessor.from_pretrained):
        loaded = load(tmp_path)
        assert type(loaded) is VLMProcessor and type(loaded.image_processor) is VLMImageProcessor
        assert loaded.image_seq_len == 6 and loaded.image_processor.do_image_splitting is True
        assert loaded.chat_template == CHAT_TEMPLATE
        assert_same_inputs(loaded(**batch, return_tensors="pt"), expected)
        unsplit = dict(batch, do_image_splitting=False, return_tensors="pt")
        assert_same_inputs(loaded(**unsplit), processor(**unsplit))


# ---- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_processor_to_model_generate_on_the_photograph(photos, split):
    model = tiny_autoregressive_model()
    model.generation_config.eos_token_id = None  # a random model: always generate the full length
    processor = VLMProcessor.from_model_config(model.config, VLMImageProcessor(), build_toy_tokenizer(100))
    content = [{"type": "image", "image": photos["photo"]}, {"type": "text", "text": "Who is this?"}]
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"do_image_splitting": split},
    )
    assert inputs["pixel_values"].shape[1] == (5 if split else 1)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert generated.shape == (1, prompt_length + 4)
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])
    assert isinstance(processor.decode(generated[0, prompt_length:]), str)


def test_unpooled_model_accepts_the_per_patch_placeholders(photos):
    """pooling="none": the processor counts each sub-image's real patches exactly as the model's patch mask does."""
    model = tiny_autoregressive_model(connector_config={"pooling": "none"})
    image_processor = VLMImageProcessor(size={"shortest_edge": 60, "longest_edge": 100})
    processor = VLMProcessor.from_model_config(model.config, image_processor, build_toy_tokenizer(100))
    inputs = processor(
        text=["<image>a <image>", "<image>b"],
        images=[[photos["landscape"], photos["portrait"]], [photos["odd"]]],
        do_image_splitting=True,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**inputs).logits  # raises if placeholders and visual tokens disagree
    assert logits.shape[:2] == inputs["input_ids"].shape
