"""VLMDataCollator: labels checked token by token on small hand-written samples — both schemas, both fusions —
plus supervised_fraction, the non-assistant-only mode, truncation and bad samples."""

import pytest
import torch
from conftest import tiny_autoregressive_config, tiny_cross_attention_config
from PIL import Image

from vlmforge import VLMImageProcessor, VLMProcessor
from vlmforge.toy_tokenizer import build_toy_tokenizer
from vlmforge.training import IGNORE_INDEX, VLMDataCollator, supervised_fraction

SMALL = {"shortest_edge": 28, "longest_edge": 56}  # tiny images keep the tests fast
F, I, E = "<fake_token_around_image>", "<image>", "<end_of_utterance>"


def processor_for(fusion: str) -> VLMProcessor:
    config = tiny_autoregressive_config() if fusion == "autoregressive" else tiny_cross_attention_config()
    return VLMProcessor.from_model_config(config, VLMImageProcessor(size=SMALL), build_toy_tokenizer(100))


@pytest.fixture(scope="module")
def red() -> Image.Image:
    return Image.new("RGB", (40, 30), (200, 10, 10))


def tokens(processor, ids) -> list[str]:
    return processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def supervised_tokens(processor, batch, row: int) -> list[str]:
    labels = batch["labels"][row]
    return tokens(processor, labels[labels != IGNORE_INDEX])


# The toy tokenizer lowercases and splits characters; "User:<image>What colour?<end_of_utterance>\nAssistant: red…"
USER_PREFIX = ["<s>", "▁", "u", "s", "er", ":"]
QUESTION = ["▁w", "hat", "▁c", "o", "l", "ou", "r", "?", E, "▁", "\n"]
ASSISTANT = ["a", "s", "s", "is", "t", "an", "t", ":"]
ANSWER = ["▁re", "d", E]
IMAGE_TOKENS = {"autoregressive": [F, I, I, I, I, F], "cross_attention": [I]}  # 4 latents per image; one marker


@pytest.mark.parametrize("fusion", ["autoregressive", "cross_attention"])
def test_cauldron_sample_by_hand(fusion, red):
    processor = processor_for(fusion)
    sample = {"images": [red], "texts": [{"user": "What colour?", "assistant": "red"}], "source": "ignored"}
    batch = VLMDataCollator(processor)([sample])

    expected = USER_PREFIX + IMAGE_TOKENS[fusion] + QUESTION + ASSISTANT + ANSWER + ["▁", "\n"]
    assert tokens(processor, batch["input_ids"][0]) == expected
    # exactly the answer and its <end_of_utterance> carry loss, at their own positions (labels are not shifted)
    answer_start = len(expected) - 5
    expected_labels = [IGNORE_INDEX] * len(expected)
    expected_labels[answer_start : answer_start + 3] = batch["input_ids"][0, answer_start : answer_start + 3].tolist()
    assert batch["labels"][0].tolist() == expected_labels
    assert supervised_tokens(processor, batch, 0) == ANSWER
    assert batch["pixel_values"].shape[:2] == (1, 1)
    if fusion == "cross_attention":
        marker = expected.index(I)
        assert batch["image_attention_mask"].shape == (1, len(expected), 1)
        assert batch["image_attention_mask"][0, :, 0].tolist() == [0] * marker + [1] * (len(expected) - marker)
    else:
        assert "image_attention_mask" not in batch


@pytest.mark.parametrize("fusion", ["autoregressive", "cross_attention"])
def test_chat_schema_gives_the_same_batch(fusion, red):
    """Images in an "images" list with bare image parts, or inline: the same batch as the_cauldron schema."""
    processor = processor_for(fusion)
    collator = VLMDataCollator(processor)
    cauldron = {"images": [red], "texts": [{"user": "What colour?", "assistant": "red"}]}
    listed = {
        "images": [red],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "red"},
        ],
    }
    inline = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ]
    }
    reference = collator([cauldron])
    for sample in (listed, inline):
        batch = collator([sample])
        assert set(batch) == set(reference)
        for key in reference:
            assert torch.equal(batch[key], reference[key]), key
    assert listed["messages"][0]["content"][0] == {"type": "image"}  # the dataset's dicts are not modified


def test_multi_turn_and_padding(red):
    """Every assistant turn is supervised with its <end_of_utterance>; system and user turns, role names, the
    image placeholders and the padding of the shorter sample are not."""
    processor = processor_for("autoregressive")
    samples = [
        {
            "images": [red],
            "texts": [{"user": "What colour?", "assistant": "red"}, {"user": "Sure?", "assistant": "yes"}],
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
    ]
    batch = VLMDataCollator(processor)(samples)
    assert supervised_tokens(processor, batch, 0) == ANSWER + ["y", "es", E]  # "▁" alone is not part of the answer
    assert supervised_tokens(processor, batch, 1) == ["h", "e", "l", "l", "o", E]
    padding = batch["attention_mask"] == 0
    assert padding[1].any() and not padding[0].any()  # right padding of the text-only sample
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    # the text-only sample gets an all-zero padding image, which the model skips
    assert batch["pixel_values"].shape[:2] == (2, 1) and not batch["pixel_values"][1].any()
    # hand count: 3 + 3 answer tokens of 60 real ones in sample 0; 6 of 46 in sample 1
    real = batch["attention_mask"].sum(dim=1).tolist()
    assert real == [60, 46]
    assert supervised_fraction(batch) == pytest.approx((6 + 6) / (60 + 46))


@pytest.mark.parametrize("fusion", ["autoregressive", "cross_attention"])
def test_all_text_mode_still_masks_images_and_padding(fusion, red):
    processor = processor_for(fusion)
    samples = [
        {"images": [red], "texts": [{"user": "What colour?", "assistant": "red"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    batch = VLMDataCollator(processor, assistant_only_loss=False)(samples)
    image_ids = torch.tensor([processor.image_token_id, processor.fake_image_token_id])
    placeholders = torch.isin(batch["input_ids"], image_ids)
    expected = batch["input_ids"].masked_fill(placeholders | (batch["attention_mask"] == 0), IGNORE_INDEX)
    assert torch.equal(batch["labels"], expected)
    assert supervised_tokens(processor, batch, 0) == USER_PREFIX + QUESTION + ASSISTANT + ANSWER + ["▁", "\n"]
    real = int(batch["attention_mask"].sum())
    assert supervised_fraction(batch) == pytest.approx((real - int(placeholders.sum())) / real)


def test_supervised_fraction_by_hand():
    batch = {
        "labels": torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }
    assert supervised_fraction(batch) == pytest.approx(3 / 7)
    assert supervised_fraction({"labels": torch.tensor([[-100, 1]])}) == 0.5


def test_truncation(red):
    processor = processor_for("autoregressive")
    long_answer = {"images": [red], "texts": [{"user": "What colour?", "assistant": "red " * 20}]}
    batch = VLMDataCollator(processor, max_length=36)([long_answer])  # 31 tokens come before the answer
    assert batch["input_ids"].shape == (1, 36)
    # the answer's start survives
    assert supervised_tokens(processor, batch, 0) == ["▁re", "d", "▁re", "d", "▁re"]
    with pytest.raises(ValueError, match="cut into its images' placeholders"):
        VLMDataCollator(processor, max_length=8)([long_answer])


def test_bad_samples_are_named(red):
    collator = VLMDataCollator(processor_for("autoregressive"))
    good = {"images": [red], "texts": [{"user": "a", "assistant": "b"}]}
    with pytest.raises(ValueError, match="Sample 1 has keys"):
        collator([good, {"prompt": "x"}])
    with pytest.raises(ValueError, match="Sample 0, turn 0"):
        collator([{"images": [], "texts": [{"question": "a"}]}])
    too_many = {"images": [red, red], "messages": [{"role": "user", "content": [{"type": "image"}]}]}
    with pytest.raises(ValueError, match="Sample 0: 1 of its 2 'images'"):
        collator([too_many])
    too_few = {"messages": [{"role": "user", "content": [{"type": "image"}]}]}
    with pytest.raises(ValueError, match="more image parts than the 0 images"):
        collator([too_few])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])
