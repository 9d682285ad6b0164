"""VLMProcessor for the cross-attention fusion: one `<image>` marker per image and `image_attention_mask`
(B, T, N_sub-images) from the marker positions and the image rule, checked on hand-sized prompts; then
processor → tiny cross-attention model → forward and generate on the photograph."""

import json
from pathlib import Path

import pytest
import torch
from conftest import image_attention_mask_for, tiny_cross_attention_config, tiny_cross_attention_model
from PIL import Image
from transformers import AutoProcessor

import vlmforge
from vlmforge import VLMImageProcessor, VLMProcessor
from vlmforge.processing.prompt_expansion import CrossAttentionPromptExpansion, ImageTokenIds
from vlmforge.toy_tokenizer import build_toy_tokenizer

PHOTO = Path(vlmforge.__file__).parent / "assets" / "grace_hopper.jpg"
IMAGE_ID, PAD_ID = 99, 0
SMALL = {"shortest_edge": 60, "longest_edge": 100}  # small sub-images keep the tests fast


def cross_attention_config(image_rule: str = "latest") -> vlmforge.CrossAttentionVLMConfig:
    return tiny_cross_attention_config(image_rule=image_rule)


def processor_for(image_rule: str = "latest", config=None) -> VLMProcessor:
    config = config or cross_attention_config(image_rule)
    return VLMProcessor.from_model_config(config, VLMImageProcessor(size=SMALL), build_toy_tokenizer(100))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    image = Image.open(PHOTO)
    image.load()
    return image


def rows(*patterns: str) -> list[list[int]]:
    """Per-image mask rows written as strings: rows("10", "01") → [[1, 0], [0, 1]]."""
    return [[int(c) for c in pattern] for pattern in patterns]


def per_sub_image(mask: list[list[int]], sub_images: int) -> list[list[int]]:
    """Per-image columns → per-sub-image columns: the sub-images of one image share their image's column."""
    return [[value for value in row for _ in range(sub_images)] for row in mask]


# The batch: two images with text between and after, one image inside text, and a text-only sample.
#   "<image>cat<image> dog" → <s> I ▁c at I ▁do g
#   "a<image>b"             → <s> ▁a I ▁ b
#   "the cat"               → <s> ▁the ▁c at
TEXTS = ["<image>cat<image> dog", "a<image>b", "the cat"]
IDS = [[1, 99, 50, 53, 99, 63, 15], [1, 35, 99, 33, 10], [1, 38, 50, 53]]
# per-image rows of the unpadded samples, per rule
EXPECTED = {
    "latest": [
        rows("00", "10", "10", "10", "01", "01", "01"),
        rows("00", "00", "10", "10", "10"),
        rows("00", "00", "00", "00"),
    ],
    "all_previous": [
        rows("00", "10", "10", "10", "11", "11", "11"),  # after the second marker both images are visible
        rows("00", "00", "10", "10", "10"),
        rows("00", "00", "00", "00"),
    ],
}


def pad(values: list, length: int, fill, side: str) -> list:
    padding = [fill] * (length - len(values))
    return padding + values if side == "left" else values + padding


@pytest.mark.parametrize("image_rule", ["latest", "all_previous"])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_markers_and_image_attention_mask_by_hand(photo, image_rule, split, padding_side):
    images = [[photo, photo.convert("L")], [photo.resize((300, 200))], []]
    kwargs = dict(do_image_splitting=split, padding=True, padding_side=padding_side, return_tensors="pt")
    out = processor_for(image_rule)(text=TEXTS, images=images, **kwargs)
    sub_images = 5 if split else 1
    n_columns = 2 * sub_images  # the largest sample has 2 images; the others get padding sub-images

    assert out["input_ids"].tolist() == [pad(ids, 7, PAD_ID, padding_side) for ids in IDS]
    assert out["attention_mask"].tolist() == [pad([1] * len(ids), 7, 0, padding_side) for ids in IDS]
    assert out["pixel_values"].shape[1] == n_columns
    assert out["image_attention_mask"].shape == (3, 7, n_columns)
    expected = [
        pad(per_sub_image(mask, sub_images), 7, [0] * n_columns, padding_side) for mask in EXPECTED[image_rule]
    ]
    assert out["image_attention_mask"].tolist() == expected


@pytest.mark.parametrize("image_rule", ["latest", "all_previous"])
@pytest.mark.parametrize("split", [False, True])
def test_mask_is_the_one_the_model_tests_assume(photo, image_rule, split):
    """conftest's `image_attention_mask_for` (the model tests' reference) agrees on a left-padded batch."""
    kwargs = dict(do_image_splitting=split, padding=True, padding_side="left", return_tensors="pt")
    out = processor_for(image_rule)(text=TEXTS, images=[[photo, photo], [photo], []], **kwargs)
    reference = image_attention_mask_for(out["input_ids"], image_rule, sub_images=5 if split else 1)
    assert torch.equal(out["image_attention_mask"], reference)


def test_one_marker_per_image_whatever_the_splitting(photo):
    processor = processor_for()
    for split in (False, True):
        out = processor(text="<image>a<image>", images=[[photo, photo]], do_image_splitting=split)
        assert out["input_ids"][0].count(IMAGE_ID) == 2
    assert processor.prompt_expansion.expand("x<image>y", [[4] * 5])[0] == "x<image> y"


def test_text_tokens_are_those_of_the_autoregressive_form(photo):
    """Both fusions see the same text tokens around an image (the paper compares them on the same data)."""
    texts = ["User:<image>What is this?<end_of_utterance>\nAssistant:", "Compare<image><image>them"]
    images = [[photo], [photo, photo]]
    autoregressive = VLMProcessor(VLMImageProcessor(size=SMALL), build_toy_tokenizer(100), image_seq_len=4)
    expected = autoregressive(text=texts, images=images, do_image_splitting=True)["input_ids"]
    cross = processor_for()(text=texts, images=images, do_image_splitting=True)["input_ids"]
    image_ids = (IMAGE_ID, autoregressive.fake_image_token_id)
    assert [[i for i in ids if i not in image_ids] for ids in cross] == [
        [i for i in ids if i not in image_ids] for ids in expected
    ]


def test_text_only_batch_has_no_image_inputs():
    out = processor_for()(text=["hello", "the cat"], padding=True)
    assert "image_attention_mask" not in out and "pixel_values" not in out


# ---- bad input ------------------------------------------------------------------------------------------------


def test_marker_count_other_than_image_count_raises(photo):
    with pytest.raises(ValueError, match=r"Sample 0: the text has 1 <image> tokens but 2 images"):
        processor_for()(text="<image>a", images=[[photo, photo]])
    # ids that reach the mask without the processor's expansion (built by hand, or cut elsewhere)
    expansion = CrossAttentionPromptExpansion(ImageTokenIds(image=IMAGE_ID, fake_image=98, end_of_utterance=97))
    with pytest.raises(ValueError, match=r"Sample 1: the token ids hold 1 <image> markers but 2 images"):
        expansion.image_inputs(
            [[1, 99, 5], [1, 99, 5]], attention_mask=None, images_per_sample=[1, 2], sub_images_per_image=5
        )


def test_padding_tokens_never_count_as_markers():
    expansion = CrossAttentionPromptExpansion(ImageTokenIds(image=IMAGE_ID, fake_image=98, end_of_utterance=97))
    out = expansion.image_inputs(
        [[99, 99, 1, 99, 5]], attention_mask=[[0, 0, 1, 1, 1]], images_per_sample=[1], sub_images_per_image=1
    )
    assert out["image_attention_mask"] == [rows("0", "0", "0", "1", "1")]


def test_truncation_never_drops_a_marker(photo):
    with pytest.raises(ValueError, match=r"Sample 0: truncation to max_length=3 would cut into its images"):
        processor_for()(text="the cat sat<image>", images=photo, truncation=True, max_length=3)
    cut = processor_for()(text="<image>the cat sat", images=photo, truncation=True, max_length=4)
    assert cut["input_ids"][0][:2] == [1, IMAGE_ID] and len(cut["image_attention_mask"][0]) == 4


def test_unknown_image_rule_raises():
    """The config rejects one too; this guards a hand-edited processor_config.json."""
    with pytest.raises(ValueError, match=r"image_rule must be one of \('latest', 'all_previous'\), got 'newest'"):
        VLMProcessor(
            VLMImageProcessor(),
            build_toy_tokenizer(100),
            fusion="vlmforge_cross_attention",
            fusion_options={"image_rule": "newest"},
        )


# ---- the model config is the one source of the rule -----------------------------------------------------------


def test_from_model_config_takes_the_rule():
    processor = processor_for("all_previous")
    assert processor.fusion == "vlmforge_cross_attention"
    assert processor.fusion_options == {"image_rule": "all_previous"}
    assert processor.prompt_expansion.image_rule == "all_previous"
    with pytest.raises(ValueError, match=r"fusion_options: processor \{'image_rule': 'all_previous'\}, model"):
        processor.check_model_config(cross_attention_config("latest"))


def test_save_and_load_keep_the_rule(photo, tmp_path):
    config = cross_attention_config("all_previous")
    config.save_pretrained(tmp_path)
    processor = processor_for(config=config)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["fusion"] == "vlmforge_cross_attention" and saved["fusion_options"] == {"image_rule": "all_previous"}

    batch = dict(text=TEXTS, images=[[photo, photo], [photo], []], padding=True, return_tensors="pt")
    expected = processor(**batch)
    for load in (VLMProcessor.from_pretrained, AutoProcessor.from_pretrained):
        loaded = load(tmp_path)
        assert type(loaded) is VLMProcessor and loaded.prompt_expansion.image_rule == "all_previous"
        actual = loaded(**batch)
        assert set(actual) == set(expected)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key


def test_loading_beside_a_model_with_the_other_rule_raises(tmp_path):
    cross_attention_config("latest").save_pretrained(tmp_path)
    processor_for("all_previous").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"fusion_options: processor \{'image_rule': 'all_previous'\}"):
        VLMProcessor.from_pretrained(tmp_path)


# ---- chat template --------------------------------------------------------------------------------------------


def test_chat_template_gives_the_cross_attention_inputs(photo):
    processor = processor_for()
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": "Who is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A naval officer."}]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image", "image": photo}]},
    ]
    out = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        return_tensors="pt",
        processor_kwargs={"do_image_splitting": True},
    )
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    expected = processor(text=prompt, images=[[photo, photo]], do_image_splitting=True, return_tensors="pt")
    for key in expected:
        assert torch.equal(out[key], expected[key]), key

    ids, mask = out["input_ids"][0], out["image_attention_mask"][0]  # (T,), (T, 10)
    first, second = (ids == IMAGE_ID).nonzero().flatten().tolist()
    assert mask[:first].sum() == 0
    assert mask[first:second, :5].all() and mask[first:second, 5:].sum() == 0
    assert mask[second:, 5:].all() and mask[second:, :5].sum() == 0
    answer = processor.decode(ids[out["assistant_masks"][0].bool()])
    assert answer.split() == "a naval officer.<end_of_utterance>".split()


# ---- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_processor_to_model_generate_on_the_photograph(photo, split):
    model = tiny_cross_attention_model(gate_init=0.5)  # open gates: the image reaches the logits
    model.generation_config.eos_token_id = None  # a random model: always generate the full length
    processor = VLMProcessor.from_model_config(model.config, VLMImageProcessor(), build_toy_tokenizer(100))
    content = [{"type": "image", "image": photo}, {"type": "text", "text": "Who is this?"}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"do_image_splitting": split},
    )
    prompt_length = inputs["input_ids"].shape[1]
    assert inputs["image_attention_mask"].shape == (1, prompt_length, 5 if split else 1)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert logits.shape == (1, prompt_length, 100)
    assert generated.shape == (1, prompt_length + 4)
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])
    assert isinstance(processor.decode(generated[0, prompt_length:]), str)


@pytest.mark.parametrize("image_rule", ["latest", "all_previous"])
def test_the_model_reads_each_image_from_its_marker_on(photo, image_rule):
    """Swap the second image: the logits change from its marker on and not before (the LM's self-attention
    carries an image past the next marker, so "latest" shows in the cross-attention mask, not in the logits).
    A text-only sample in the same left-padded batch is untouched."""
    model = tiny_cross_attention_model(gate_init=0.5, image_rule=image_rule)
    processor = VLMProcessor.from_model_config(model.config, VLMImageProcessor(size=SMALL), build_toy_tokenizer(100))
    texts = ["the cat<image>sat on<image>the mat", "the cat"]

    def logits(second_image):
        images = [[photo, second_image], []]
        inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            return inputs["input_ids"], model(**inputs).logits

    ids, original = logits(photo)
    _, swapped = logits(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("L"))
    second = (ids[0] == IMAGE_ID).nonzero().flatten().tolist()[1]
    changed = (original[0] - swapped[0]).abs().amax(dim=-1) > 1e-4  # (T,)
    assert changed.tolist() == [t >= second for t in range(len(changed))]
    torch.testing.assert_close(original[1], swapped[1], rtol=0, atol=0)
