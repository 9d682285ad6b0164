"""save_pretrained → from_pretrained round trips, through our classes and the Auto classes; missing weights
are initialised by `_init_weights`, not left as the meta device's garbage."""

import pytest
import torch
from conftest import image_prompt, random_images, tiny_autoregressive_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText

import vlmforge

LATENTS_KEY = "model.connector.perceiver_resampler.latents"


def prompt_with_images():
    return dict(input_ids=torch.tensor([image_prompt(2, 4)]), pixel_values=random_images(2)[None])


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def saved(tmp_path):
    model = tiny_autoregressive_model("qwen2")
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize(
    "loader",
    [
        vlmforge.AutoregressiveVLMForConditionalGeneration,
        AutoModelForImageTextToText,
        vlmforge.AutoModelForVision2Seq,
    ],
    ids=lambda loader: loader.__name__,
)
def test_round_trip_reproduces_outputs_exactly(saved, loader):
    model, path = saved
    inputs = prompt_with_images()

    loaded = loader.from_pretrained(path).eval()

    assert type(loaded) is vlmforge.AutoregressiveVLMForConditionalGeneration
    assert type(loaded.config.text_config) is type(model.config.text_config)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_auto_model_loads_the_base_model(saved):
    model, path = saved
    inputs = prompt_with_images()

    base = AutoModel.from_pretrained(path).eval()

    assert type(base) is vlmforge.AutoregressiveVLMModel
    with torch.no_grad():
        expected = model.model(**inputs).last_hidden_state
        actual = base(**inputs).last_hidden_state
    assert torch.equal(actual, expected)


def test_tied_word_embeddings_survive_a_round_trip(tmp_path):
    model = tiny_autoregressive_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)

    loaded = vlmforge.AutoregressiveVLMForConditionalGeneration.from_pretrained(tmp_path).eval()

    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert torch.equal(logits(loaded, prompt_with_images()), logits(model, prompt_with_images()))


def test_missing_perceiver_latents_are_initialised_not_garbage(saved):
    model, path = saved
    weights = load_file(path / "model.safetensors")
    del weights[LATENTS_KEY]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})

    loaded = vlmforge.AutoregressiveVLMForConditionalGeneration.from_pretrained(path)

    latents = loaded.get_parameter(LATENTS_KEY).detach()
    assert latents.shape == model.get_parameter(LATENTS_KEY).shape
    assert torch.isfinite(latents).all()
    assert not (latents == latents.flatten()[0]).all()  # identical latents could never become different queries
    assert not torch.equal(latents[0], latents[1])
    assert 0.5 < latents.std().item() < 2.0  # drawn from N(0, 1) by Connector._init_weights
    # everything that was in the file loaded as saved
    for name, tensor in weights.items():
        assert torch.equal(loaded.get_parameter(name).detach(), tensor), name
