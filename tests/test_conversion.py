"""Idefics2 checkpoint conversion: the key map is strict, the folder conversion round-trips (model, our
VLMProcessor reproducing Idefics2Processor, a generation config that stops at <end_of_utterance>), refuses what it
must (existing destination, pickled weights, foreign checkpoints) and never leaves a half-written folder."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessorPil,
    Idefics2Processor,
)

import vlmforge
from conftest import FAKE_IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, VOCAB_SIZE, tiny_idefics2_config
from vlmforge.conversion import idefics2 as conversion
from vlmforge.conversion.idefics2 import convert_config, convert_idefics2_checkpoint, convert_state_dict
from vlmforge.processing.processing_vlm import CHAT_TEMPLATE
from vlmforge.toy_tokenizer import build_toy_tokenizer

PHOTO = Path(vlmforge.__file__).parent / "assets" / "grace_hopper.jpg"
END_OF_UTTERANCE_ID, EOS_ID = VOCAB_SIZE - 3, 2  # the toy tokenizer's ids
# The chat template of HuggingFaceM4/idefics2-8b, as its processor config holds it
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tiny_idefics2(*, tie_word_embeddings: bool = False, seed: int = 0) -> Idefics2ForConditionalGeneration:
    """A tiny random Mistral-based Idefics2 on a 56 px (4 × 4 patch) position table."""
    torch.manual_seed(seed)
    config = tiny_idefics2_config("mistral", image_size=56, tie_word_embeddings=tie_word_embeddings)
    model = Idefics2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # Idefics2 initialises its latents to ones; make them distinct
        model.model.connector.perceiver_resampler.latents.normal_()
    return model


def save_idefics2_checkpoint(
    folder: Path,
    model: Idefics2ForConditionalGeneration,
    *,
    do_image_splitting: bool = False,
    chat_template: str | None = None,
    **save_kwargs,
) -> Path:
    """An Idefics2 checkpoint folder as the Hub holds one: weights, config, tokenizer and processor files.

    The image processor's settings differ from VLMImageProcessor's defaults (size, resample), so a converter
    that dropped them would show.
    """
    model.save_pretrained(folder, **save_kwargs)
    image_processor = Idefics2ImageProcessorPil(
        size={"shortest_edge": 28, "longest_edge": 56}, resample=3, do_image_splitting=do_image_splitting
    )
    processor = Idefics2Processor(
        image_processor=image_processor,
        tokenizer=build_toy_tokenizer(VOCAB_SIZE),
        image_seq_len=4,
        chat_template=chat_template,
    )
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def idefics2_model():
    return tiny_idefics2()


@pytest.fixture(scope="module")
def idefics2_folder(tmp_path_factory, idefics2_model) -> Path:
    return save_idefics2_checkpoint(tmp_path_factory.mktemp("idefics2") / "src", idefics2_model)


def expected_keys(idefics2_model) -> set[str]:
    return set(vlmforge.AutoregressiveVLMForConditionalGeneration(convert_config(idefics2_model.config)).state_dict())


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith(".partial")]


# ---- the pure key map ------------------------------------------------------------------------------------


def test_convert_state_dict_covers_every_key(idefics2_model):
    source = idefics2_model.state_dict()
    converted = convert_state_dict(source, expected_keys=expected_keys(idefics2_model))
    assert converted.keys() == source.keys()  # the names are Idefics2's by design
    assert all(converted[key] is source[key] for key in source)


@pytest.mark.parametrize(
    "bad_key",
    [
        "model.connector.perceiver_resampler.layers.0.self_attn.rotary.weight",
        "model.vision_model.head.probe_typo",
        "model.image_newline",
        "vision_model.embeddings.patch_embedding.weight",  # SigLIP's prefix, not Idefics2's
    ],
)
def test_convert_state_dict_unknown_key_raises(idefics2_model, bad_key):
    state_dict = dict(idefics2_model.state_dict())
    state_dict[bad_key] = torch.zeros(1)
    with pytest.raises(ValueError, match="match no conversion rule"):
        convert_state_dict(state_dict)


def test_convert_state_dict_missing_key_raises(idefics2_model):
    state_dict = dict(idefics2_model.state_dict())
    del state_dict["model.connector.perceiver_resampler.latents"]
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \['model.connector.perceiver_resampler.latents'\]"):
        convert_state_dict(state_dict, expected_keys=expected_keys(idefics2_model))


def test_convert_state_dict_unexpected_target_key_raises(idefics2_model):
    """A text-model key passes the map (the LM is open-ended), so the expected keys must catch it."""
    state_dict = dict(idefics2_model.state_dict())
    state_dict["model.text_model.layers.7.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected key"):
        convert_state_dict(state_dict, expected_keys=expected_keys(idefics2_model))


def test_convert_config_fields(idefics2_model):
    config = convert_config(idefics2_model.config)
    connector = config.connector_config
    assert (connector.n_latents, connector.depth, connector.num_attention_heads) == (4, 2, 4)
    assert (connector.num_key_value_heads, connector.head_dim, connector.pooling) == (2, 8, "perceiver")
    assert connector.rms_norm_eps == idefics2_model.config.perceiver_config.rms_norm_eps
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (56, 14)
    assert config.text_config.model_type == "mistral"
    assert (config.image_token_id, config.tie_word_embeddings, config.image_seq_len) == (IMAGE_TOKEN_ID, False, 4)
    assert convert_config(idefics2_model.config.to_dict()).to_dict() == config.to_dict()


# ---- the checkpoint folder --------------------------------------------------------------------------------


def test_round_trip_through_folders(tmp_path, idefics2_model, idefics2_folder):
    dst = convert_idefics2_checkpoint(idefics2_folder, tmp_path / "converted")
    assert dst == tmp_path / "converted"
    assert leftovers(tmp_path) == []

    ours = vlmforge.AutoModelForVision2Seq.from_pretrained(dst)
    assert isinstance(ours, vlmforge.AutoregressiveVLMForConditionalGeneration)
    reference = idefics2_model.state_dict()
    assert ours.state_dict().keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in ours.state_dict().items())

    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "generation_config.json"):
        assert (dst / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID

    ids = torch.tensor([[1, 5, 6, 98, *[IMAGE_TOKEN_ID] * 4, 98, 7]])
    pixel_values = torch.randn(1, 1, 3, 56, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = idefics2_model(input_ids=ids, pixel_values=pixel_values).logits
        actual = ours.eval()(input_ids=ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_sharded_checkpoint_converts(tmp_path, idefics2_model):
    src = save_idefics2_checkpoint(tmp_path / "src", idefics2_model, max_shard_size="40KB")
    assert len(list(src.glob("*.safetensors"))) > 1 and (src / "model.safetensors.index.json").is_file()
    dst = convert_idefics2_checkpoint(src, tmp_path / "dst")
    ours = vlmforge.AutoModelForVision2Seq.from_pretrained(dst)
    assert all(torch.equal(value, idefics2_model.state_dict()[key]) for key, value in ours.state_dict().items())


def test_tied_embeddings_convert(tmp_path):
    model = tiny_idefics2(tie_word_embeddings=True)
    src = save_idefics2_checkpoint(tmp_path / "src", model)
    ours = vlmforge.AutoModelForVision2Seq.from_pretrained(convert_idefics2_checkpoint(src, tmp_path / "dst"))
    assert ours.config.tie_word_embeddings
    assert ours.lm_head.weight.data_ptr() == ours.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(ours.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_empty_destination_folder_is_accepted(tmp_path, idefics2_folder):
    (tmp_path / "dst").mkdir()
    convert_idefics2_checkpoint(idefics2_folder, tmp_path / "dst")
    assert (tmp_path / "dst" / "config.json").is_file()


def test_existing_destination_refused(tmp_path, idefics2_folder):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="already exists"):
        convert_idefics2_checkpoint(idefics2_folder, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_pickled_weights_refused_unless_allowed(tmp_path, idefics2_model, idefics2_folder):
    src = tmp_path / "src"
    shutil.copytree(idefics2_folder, src)
    (src / "model.safetensors").unlink()
    torch.save(idefics2_model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        convert_idefics2_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()

    dst = convert_idefics2_checkpoint(src, tmp_path / "dst", allow_pickle=True)
    assert (dst / "model.safetensors").is_file() and not (dst / "pytorch_model.bin").exists()


def test_foreign_checkpoint_refused(tmp_path, idefics2_folder):
    src = tmp_path / "src"
    shutil.copytree(idefics2_folder, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ValueError, match="expected 'idefics2'"):
        convert_idefics2_checkpoint(src, tmp_path / "dst")


def test_config_that_does_not_describe_the_weights_refused(tmp_path, idefics2_folder):
    src = tmp_path / "src"
    shutil.copytree(idefics2_folder, src)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit the converted config"):
        convert_idefics2_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_corrupt_source_leaves_no_destination(tmp_path, idefics2_folder):
    src = tmp_path / "src"
    shutil.copytree(idefics2_folder, src)
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    with pytest.raises(ValueError, match="Could not read weights"):
        convert_idefics2_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_no_destination(tmp_path, idefics2_folder, monkeypatch):
    """The model is already written to the staging folder when saving the processor fails."""
    written = []

    def failing_save(processor, folder, **kwargs):
        written.extend(p.name for p in Path(folder).iterdir())
        raise OSError("disk full")

    monkeypatch.setattr(conversion.VLMProcessor, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_idefics2_checkpoint(idefics2_folder, tmp_path / "dst")
    assert "model.safetensors" in written
    assert not (tmp_path / "dst").exists()
    assert leftovers(tmp_path) == []


def test_tokenizer_that_disagrees_with_the_config_refused(tmp_path, idefics2_model):
    """A tokenizer whose <image> id is not the config's image_token_id: no processor could build valid prompts."""
    src = save_idefics2_checkpoint(tmp_path / "src", idefics2_model)
    build_toy_tokenizer(VOCAB_SIZE + 20).save_pretrained(src)  # <image> becomes id 119, the config says 99
    with pytest.raises(ValueError, match="does not match the model config"):
        convert_idefics2_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert leftovers(tmp_path) == []


# ---- the processor and the generation config the converted checkpoint carries ------------------------------


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    image = Image.open(PHOTO)
    image.load()
    return image


@pytest.mark.parametrize("do_image_splitting", [False, True])
def test_converted_processor_reproduces_idefics2_processor(tmp_path, idefics2_model, photo, do_image_splitting):
    """AutoProcessor on the converted folder gives our VLMProcessor, with the source's settings and chat template,
    and the same inputs as transformers' Idefics2Processor on the source folder; the converted model then gives
    the Idefics2 model's logits on them."""
    src = save_idefics2_checkpoint(
        tmp_path / "src", idefics2_model, do_image_splitting=do_image_splitting, chat_template=IDEFICS2_CHAT_TEMPLATE
    )
    dst = convert_idefics2_checkpoint(src, tmp_path / "dst")
    ours, theirs = AutoProcessor.from_pretrained(dst), Idefics2Processor.from_pretrained(src)
    assert type(ours) is vlmforge.VLMProcessor
    assert type(AutoImageProcessor.from_pretrained(dst)) is vlmforge.VLMImageProcessor
    for name in ("size", "resample", "do_image_splitting", "image_mean", "image_std", "rescale_factor"):
        assert getattr(ours.image_processor, name) == getattr(theirs.image_processor, name), name
    assert (ours.image_seq_len, ours.image_token_id, ours.chat_template) == (4, IMAGE_TOKEN_ID, IDEFICS2_CHAT_TEMPLATE)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(messages, add_generation_prompt=True)
    texts = [prompt, "Compare<image> and<image>"]
    images = [[photo], [photo.convert("L"), photo.crop((0, 0, 512, 300))]]
    mine = ours(text=texts, images=images, padding=True, return_tensors="pt")
    reference = theirs(text=texts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(mine["input_ids"], reference["input_ids"])
    assert torch.equal(mine["attention_mask"], reference["attention_mask"])
    assert torch.equal(mine["pixel_attention_mask"].bool(), reference["pixel_attention_mask"].bool())
    assert (mine["pixel_values"] - reference["pixel_values"]).abs().max() <= 1e-5
    sub_images = 5 if do_image_splitting else 1
    assert (mine["input_ids"][0] == IMAGE_TOKEN_ID).sum() == sub_images * 4

    model = vlmforge.AutoModelForVision2Seq.from_pretrained(dst).eval()
    with torch.no_grad():
        expected = idefics2_model(**reference).logits
        actual = model(**mine).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_converted_generation_config_stops_at_end_of_utterance(tmp_path, idefics2_model):
    """The source's generation settings survive; its EOS ids gain the tokenizer's EOS and <end_of_utterance>."""
    src = save_idefics2_checkpoint(tmp_path / "src", idefics2_model)
    GenerationConfig(eos_token_id=3, max_new_tokens=7).save_pretrained(src)
    dst = convert_idefics2_checkpoint(src, tmp_path / "dst")
    generation_config = GenerationConfig.from_pretrained(dst)
    assert generation_config.eos_token_id == [3, EOS_ID, END_OF_UTTERANCE_ID]
    assert (generation_config.max_new_tokens, generation_config.pad_token_id) == (7, 0)
    model = vlmforge.AutoModelForVision2Seq.from_pretrained(dst)
    assert END_OF_UTTERANCE_ID in model.generation_config.eos_token_id


def test_source_with_a_tokenizer_but_no_processor_gets_the_default_one(tmp_path, idefics2_model, caplog):
    src = tmp_path / "src"
    idefics2_model.save_pretrained(src)
    build_toy_tokenizer(VOCAB_SIZE).save_pretrained(src)
    with caplog.at_level(logging.WARNING, logger=conversion.logger.name):
        dst = convert_idefics2_checkpoint(src, tmp_path / "dst")
    assert "no image processor config" in caplog.text
    processor = AutoProcessor.from_pretrained(dst)
    assert processor.image_processor.to_dict() == vlmforge.VLMImageProcessor().to_dict()
    assert processor.chat_template == CHAT_TEMPLATE and processor.image_seq_len == 4
    assert GenerationConfig.from_pretrained(dst).eos_token_id == [EOS_ID, END_OF_UTTERANCE_ID]


def test_source_without_a_tokenizer_converts_the_model_and_warns(tmp_path, idefics2_model, caplog):
    src = tmp_path / "src"
    idefics2_model.save_pretrained(src)
    with caplog.at_level(logging.WARNING, logger=conversion.logger.name):
        dst = convert_idefics2_checkpoint(src, tmp_path / "dst")
    assert "has no tokenizer" in caplog.text and "gets no processor" in caplog.text
    assert not (dst / "processor_config.json").exists() and not (dst / "tokenizer.json").exists()
    ours = vlmforge.AutoModelForVision2Seq.from_pretrained(dst)
    assert all(torch.equal(value, idefics2_model.state_dict()[key]) for key, value in ours.state_dict().items())


def test_processor_image_seq_len_comes_from_the_model_config(tmp_path, idefics2_model, caplog):
    """A source processor that disagrees with the perceiver (a broken checkpoint) is corrected, loudly."""
    src = save_idefics2_checkpoint(tmp_path / "src", idefics2_model)
    processor_config = json.loads((src / "processor_config.json").read_text())
    (src / "processor_config.json").write_text(json.dumps({**processor_config, "image_seq_len": 8}))
    with caplog.at_level(logging.WARNING, logger=conversion.logger.name):
        dst = convert_idefics2_checkpoint(src, tmp_path / "dst")
    assert "image_seq_len=8 disagrees" in caplog.text
    processor = AutoProcessor.from_pretrained(dst)
    ids = processor(text="<image>", images=[Image.new("RGB", (30, 30))])["input_ids"][0]
    assert ids.count(IMAGE_TOKEN_ID) == 4 and ids.count(FAKE_IMAGE_TOKEN_ID) == 2
