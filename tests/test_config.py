"""Configs: validation names the offending values, derived fields, serialisation round trips, defaults."""

import copy
import json

import pytest
from conftest import (
    IMAGE_TOKEN_ID,
    VOCAB_SIZE,
    tiny_autoregressive_config,
    tiny_connector_config,
    tiny_text_config,
    tiny_vision_config,
)
from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config

import vlmforge


@pytest.mark.parametrize("image_token_id", [VOCAB_SIZE, VOCAB_SIZE + 7, -1])
def test_image_token_id_outside_vocab_raises(image_token_id):
    with pytest.raises(ValueError, match=rf"image_token_id={image_token_id}\b.*vocab_size={VOCAB_SIZE}\b"):
        tiny_autoregressive_config(image_token_id=image_token_id)


def test_last_token_of_vocab_is_a_valid_image_token():
    assert tiny_autoregressive_config(image_token_id=VOCAB_SIZE - 1).image_token_id == VOCAB_SIZE - 1


def test_bad_pooling_raises():
    with pytest.raises(ValueError, match=r"pooling='mean'.*perceiver.*none"):
        vlmforge.ConnectorConfig(**tiny_connector_config(pooling="mean"))
    # and through the VLM config, where users meet it
    with pytest.raises(ValueError, match=r"pooling='avg'"):
        tiny_autoregressive_config(connector_config=tiny_connector_config(pooling="avg"))


def test_perceiver_heads_not_multiple_of_kv_heads_raises():
    with pytest.raises(ValueError, match=r"num_attention_heads=6\b.*num_key_value_heads=4\b"):
        tiny_autoregressive_config(connector_config=tiny_connector_config(num_attention_heads=6, num_key_value_heads=4))


def test_vision_hidden_not_divisible_by_heads_raises():
    with pytest.raises(ValueError, match=r"hidden_size=30\b.*num_attention_heads=4\b"):
        vlmforge.VisionEncoderConfig(**tiny_vision_config(hidden_size=30, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"hidden_size=36\b.*num_attention_heads=8\b"):
        tiny_autoregressive_config(vision_config=tiny_vision_config(hidden_size=36, num_attention_heads=8))


@pytest.mark.parametrize("n_latents", [4, 7])
def test_image_seq_len_is_n_latents_with_perceiver(n_latents):
    config = tiny_autoregressive_config(connector_config=tiny_connector_config(n_latents=n_latents))
    assert config.image_seq_len == n_latents


@pytest.mark.parametrize(("image_size", "patch_size", "expected"), [(56, 14, 16), (70, 14, 25), (64, 16, 16)])
def test_image_seq_len_is_full_image_patches_without_pooling(image_size, patch_size, expected):
    config = tiny_autoregressive_config(
        vision_config=tiny_vision_config(image_size=image_size, patch_size=patch_size),
        connector_config=tiny_connector_config(pooling="none"),
    )
    assert config.image_seq_len == expected


@pytest.mark.parametrize(
    ("text_model_type", "text_config_class"),
    [("llama", LlamaConfig), ("mistral", MistralConfig), ("qwen2", Qwen2Config)],
)
def test_to_dict_from_dict_round_trip(text_model_type, text_config_class):
    config = tiny_autoregressive_config(
        text_model_type, connector_config=tiny_connector_config(n_latents=5), tie_word_embeddings=True
    )
    as_dict = config.to_dict()
    pristine = copy.deepcopy(as_dict)
    restored = vlmforge.AutoregressiveVLMConfig.from_dict(as_dict)

    assert as_dict == pristine, "from_dict mutated its argument"
    assert restored.to_dict() == pristine
    assert isinstance(restored.vision_config, vlmforge.VisionEncoderConfig)
    assert isinstance(restored.connector_config, vlmforge.ConnectorConfig)
    assert isinstance(restored.text_config, text_config_class)
    assert restored.image_seq_len == 5
    assert restored.text_config.tie_word_embeddings is True
    # and through JSON, as save_pretrained writes it
    from_json = vlmforge.AutoregressiveVLMConfig.from_dict(json.loads(config.to_json_string()))
    assert from_json.to_dict() == pristine


def test_config_save_load_through_auto_config(tmp_path):
    config = tiny_autoregressive_config("mistral")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, vlmforge.AutoregressiveVLMConfig)
    assert isinstance(loaded.text_config, MistralConfig)
    assert loaded.to_dict() | {"_name_or_path": ""} == config.to_dict() | {"_name_or_path": ""}


def test_default_text_config_is_llama_with_room_for_image_tokens():
    config = vlmforge.AutoregressiveVLMConfig()
    assert isinstance(config.text_config, LlamaConfig)
    assert config.text_config.model_type == "llama"
    assert config.image_token_id < config.text_config.vocab_size
    # the paper's defaults: perceiver pooling to 64 tokens, SigLIP-so400m at 980 px
    assert config.connector_config.pooling == "perceiver"
    assert config.image_seq_len == 64
    assert (config.vision_config.hidden_size, config.vision_config.image_size) == (1152, 980)


def test_text_config_given_as_config_object():
    text_config = Qwen2Config(**{k: v for k, v in tiny_text_config("qwen2").items() if k != "model_type"})
    config = vlmforge.AutoregressiveVLMConfig(
        vision_config=tiny_vision_config(),
        connector_config=tiny_connector_config(),
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
    )
    assert isinstance(config.text_config, Qwen2Config)
    assert config.text_config.hidden_size == 32
