"""The chat template: Idefics2's format, string for string, plus assistant masks through `{% generation %}`."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Idefics2Processor
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

import vlmforge
from vlmforge import VLMImageProcessor, VLMProcessor
from vlmforge.toy_tokenizer import build_toy_tokenizer

PHOTO = Path(vlmforge.__file__).parent / "assets" / "grace_hopper.jpg"

# The chat template of HuggingFaceM4/idefics2-8b (its processor/tokenizer config), the format we reproduce.
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def user(*parts):
    return {"role": "user", "content": list(parts)}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMAGE = {"type": "image"}


def text(value):
    return {"type": "text", "text": value}


CONVERSATIONS = {
    "one image": [user(IMAGE, text("What is in this image?"))],
    "two images": [user(text("Compare "), IMAGE, text(" and "), IMAGE, text(", please."))],
    "adjacent images": [user(IMAGE, IMAGE, text("Same person?"))],
    "text only": [user(text("Hello there!"))],
    "several turns": [
        {"role": "system", "content": [text("Answer briefly.")]},
        user(IMAGE, text("Who is this?")),
        assistant("A naval officer."),
        user(text("What is she wearing?"), IMAGE),
        assistant("A uniform with medals."),
    ],
}


@pytest.fixture(scope="module")
def photo():
    image = Image.open(PHOTO)
    image.load()
    return image


@pytest.fixture
def processor():
    return VLMProcessor(VLMImageProcessor(), build_toy_tokenizer(100), image_seq_len=4)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_renders_exactly_like_idefics2(processor, name, add_generation_prompt):
    reference = Idefics2Processor(
        image_processor=Idefics2ImageProcessorPil(),
        tokenizer=build_toy_tokenizer(100),
        image_seq_len=4,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
    conversation = CONVERSATIONS[name]
    ours = processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert ours == reference.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)


def test_the_format_by_hand(processor):
    rendered = processor.apply_chat_template(CONVERSATIONS["several turns"], add_generation_prompt=True)
    assert rendered == (
        "System: Answer briefly.<end_of_utterance>\n"
        "User:<image>Who is this?<end_of_utterance>\n"
        "Assistant: A naval officer.<end_of_utterance>\n"
        "User: What is she wearing?<image><end_of_utterance>\n"
        "Assistant: A uniform with medals.<end_of_utterance>\n"
        "Assistant:"
    )
    assert processor.apply_chat_template([user(text("Hi"))]) == "User: Hi<end_of_utterance>\n"


def test_string_content_renders_as_one_text_part(processor):
    as_parts = [user(text("Hello")), assistant("Hi!")]
    as_strings = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]
    assert processor.apply_chat_template(as_strings) == processor.apply_chat_template(as_parts)


def test_tokenized_with_inline_images_equals_calling_the_processor(processor, photo):
    gray = photo.convert("L")
    conversation = [user({"type": "image", "image": photo}, text("Describe"), {"type": "image", "image": gray})]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = "User:<image>Describe<image><end_of_utterance>\nAssistant:"
    expected = processor(text=prompt, images=[[photo, gray]], return_tensors="pt")
    assert set(inputs) == set(expected)
    for key in expected:
        assert torch.equal(inputs[key], expected[key]), key
    ids_only = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    assert ids_only == expected["input_ids"].tolist()


def test_assistant_mask_covers_exactly_the_answers(processor, photo):
    """Answers and their <end_of_utterance> are 1; user turns, role names, images and padding are 0 — also when
    image placeholders before an answer shift every character offset."""
    conversations = [
        [
            user({"type": "image", "image": photo}, text("Who is this?")),
            assistant("A naval officer."),
            user(text("Her rank?")),
            assistant("Rear admiral."),
        ],
        [user(text("Hi")), assistant("Hello.")],
    ]
    out = processor.apply_chat_template(
        conversations,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    masks = out["assistant_masks"]
    assert masks.shape == out["input_ids"].shape
    answers = [processor.decode(ids[mask.bool()]) for ids, mask in zip(out["input_ids"], masks)]
    assert answers[0].split() == "a naval officer.<end_of_utterance> rear admiral.<end_of_utterance>".split()
    assert answers[1].strip() == "hello.<end_of_utterance>"  # the toy tokenizer lowercases
    assert not masks[out["input_ids"] == 99].any()  # no image placeholder is an answer token
    assert not masks[out["attention_mask"] == 0].any()  # nor is padding
