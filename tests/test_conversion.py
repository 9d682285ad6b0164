"""Idefics2 checkpoint conversion: the key map is strict, the folder conversion round-trips, refuses what it
must (existing destination, pickled weights, foreign checkpoints) and never leaves a half-written folder."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessorPil,
    Idefics2Processor,
)

import vlmforge
from conftest import IMAGE_TOKEN_ID, VOCAB_SIZE, tiny_idefics2_config
from vlmforge.conversion import idefics2 as conversion
from vlmforge.conversion.idefics2 import convert_config, convert_idefics2_checkpoint, convert_state_dict
from vlmforge.toy_tokenizer import build_toy_tokenizer


def tiny_idefics2(*, tie_word_embeddings: bool = False, seed: int = 0) -> Idefics2ForConditionalGeneration:
    """A tiny random Mistral-based Idefics2 on a 56 px (4 × 4 patch) position table."""
    torch.manual_seed(seed)
    config = tiny_idefics2_config("mistral", image_size=56, tie_word_embeddings=tie_word_embeddings)
    model = Idefics2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # Idefics2 initialises its latents to ones; make them distinct
        model.model.connector.perceiver_resampler.latents.normal_()
    return model


def save_idefics2_checkpoint(folder: Path, model: Idefics2ForConditionalGeneration, **save_kwargs) -> Path:
    """An Idefics2 checkpoint folder as the Hub holds one: weights, config, tokenizer and processor files."""
    model.save_pretrained(folder, **save_kwargs)
    processor = Idefics2Processor(
        image_processor=Idefics2ImageProcessorPil(size={"shortest_edge": 28, "longest_edge": 56}),
        tokenizer=build_toy_tokenizer(VOCAB_SIZE),
        image_seq_len=4,
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

    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
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
    """The model is already written to the staging folder when copying the tokenizer fails."""

    def failing_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(conversion.shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        convert_idefics2_checkpoint(idefics2_folder, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert leftovers(tmp_path) == []
