"""Behaviour of the fully autoregressive VLM's forward pass: backbone identity on text, shapes, loss,
image/placeholder bookkeeping, precomputed image features, gradients, checkpointing, attention backends."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FAKE_IMAGE_TOKEN_ID,
    IMAGE_TOKEN_ID,
    VOCAB_SIZE,
    CallCounter,
    image_prompt,
    left_pad,
    random_images,
    tiny_autoregressive_model,
    tiny_connector_config,
)
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

import vlmforge

TEXT_BACKBONES = ["llama", "mistral", "qwen2"]
N_LATENTS = 4  # tiny_connector_config's n_latents: visual tokens per image with the perceiver
# Rows of a padded batch and the same rows run alone go through differently shaped matmuls (and RoPE at
# shifted absolute positions with left padding), so they agree to float32 rounding, not bit for bit.
BATCH_TOLERANCE = dict(atol=1e-5, rtol=0)


def prompt_with_image_tokens(tokens_per_image: list[int], text=(5, 6, 7)) -> list[int]:
    """Like `image_prompt`, but each image may have its own number of visual tokens (pooling="none")."""
    ids = [1, *text]
    for count in tokens_per_image:
        ids += [FAKE_IMAGE_TOKEN_ID] + [IMAGE_TOKEN_ID] * count
    return ids + [FAKE_IMAGE_TOKEN_ID, 8, 9]


def assert_names_counts(error: Exception, placeholders: int, visual_tokens: int) -> None:
    message = str(error)
    for count in (placeholders, visual_tokens):
        assert re.search(rf"\b{count}\b", message), f"{count} not in: {message}"


def padded_batch_with_images():
    """Two left-padded prompts with 2 and 1 images; the second sample's missing image is all-zero padding,
    and its real image covers only the top-left 42 × 28 pixels (pixel_attention_mask)."""
    input_ids, attention_mask = left_pad([image_prompt(2, N_LATENTS), image_prompt(1, N_LATENTS, text=(5,))])
    pixel_values = torch.zeros(2, 2, 3, 56, 56)
    pixel_attention_mask = torch.zeros(2, 2, 56, 56, dtype=torch.bool)
    pixel_values[0] = random_images(2, seed=1)
    pixel_attention_mask[0] = True
    pixel_values[1, 0, :, :42, :28] = random_images(1, 42, 28, seed=2)[0]
    pixel_attention_mask[1, 0, :42, :28] = True
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        pixel_attention_mask=pixel_attention_mask,
    )


# --- text-only identity with the bare backbone ----------------------------------------------------------


@pytest.mark.parametrize("text_model_type", TEXT_BACKBONES)
def test_text_only_input_gives_exactly_the_backbone_logits(text_model_type):
    vlm = tiny_autoregressive_model(text_model_type)
    backbone = AutoModelForCausalLM.from_config(copy.deepcopy(vlm.config.text_config)).eval()
    backbone.model.load_state_dict(vlm.model.text_model.state_dict())
    backbone.lm_head.load_state_dict(vlm.lm_head.state_dict())
    assert type(backbone.model) is type(vlm.model.text_model)
    input_ids, attention_mask = left_pad([[1, 5, 6, 7, 8, 9, 10], [1, 11, 12]])

    with torch.no_grad():
        expected = backbone(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = vlm(input_ids=input_ids, attention_mask=attention_mask).logits

    assert torch.equal(actual, expected)


# --- shapes and loss ------------------------------------------------------------------------------------


def test_forward_shapes():
    model = tiny_autoregressive_model()
    inputs = padded_batch_with_images()
    batch, seq_len = inputs["input_ids"].shape

    with torch.no_grad():
        out = model(**inputs)

    assert out.logits.shape == (batch, seq_len, VOCAB_SIZE)
    assert out.image_features.shape == (batch, 2 * N_LATENTS, model.config.text_config.hidden_size)
    assert out.cache.get_seq_length() == seq_len
    assert out.loss is None


def test_loss_is_shifted_cross_entropy_ignoring_only_minus_100():
    model = tiny_autoregressive_model()
    inputs = padded_batch_with_images()
    labels = inputs["input_ids"].clone()
    # the collator masks image placeholders and padding; any other label, even pad or <image> ids, counts
    labels[inputs["attention_mask"] == 0] = -100
    labels[0, 5:7] = -100
    labels[1, -1] = 0
    assert (labels == IMAGE_TOKEN_ID).any() and (labels == 0).any()

    with torch.no_grad():
        out = model(**inputs, labels=labels)

    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB_SIZE).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)


# --- placeholders vs image features ---------------------------------------------------------------------


def test_placeholder_and_image_feature_mismatch_names_both_counts():
    model = tiny_autoregressive_model()
    # three images give 12 visual tokens; the prompt was truncated inside the third image: 11 placeholders
    input_ids = torch.tensor([image_prompt(3, N_LATENTS)])
    last_placeholder = int((input_ids[0] == IMAGE_TOKEN_ID).nonzero()[-1])
    input_ids = torch.cat([input_ids[:, :last_placeholder], input_ids[:, last_placeholder + 1 :]], dim=1)
    pixel_values = random_images(3)[None]

    with pytest.raises(ValueError) as from_pixels:
        model(input_ids=input_ids, pixel_values=pixel_values)
    with pytest.raises(ValueError) as from_features:
        model(input_ids=input_ids, **model.get_image_features(pixel_values))

    assert_names_counts(from_pixels.value, 11, 12)
    assert_names_counts(from_features.value, 11, 12)


def test_all_zero_padding_images_are_skipped():
    model = tiny_autoregressive_model()
    images = random_images(3)
    two_images = image_prompt(2, N_LATENTS, text=(5,))
    one_image = image_prompt(1, N_LATENTS, text=(5, 6, 7, 10, 11, 12))  # same length: no text padding
    assert len(two_images) == len(one_image)
    pixel_values = torch.zeros(2, 2, 3, 56, 56)
    pixel_values[0] = images[:2]
    pixel_values[1, 0] = images[2]

    with torch.no_grad(), CallCounter(model.model.vision_model) as encoder:
        batched = model(input_ids=torch.tensor([two_images, one_image]), pixel_values=pixel_values).logits
        padded_alone = model(input_ids=torch.tensor([one_image]), pixel_values=pixel_values[1:]).logits
        alone = model(input_ids=torch.tensor([one_image]), pixel_values=images[2][None, None]).logits

    assert encoder.batch_sizes == [3, 1, 1]  # the padding images never reach the encoder
    assert torch.equal(padded_alone, alone)
    torch.testing.assert_close(batched[1], alone[0], **BATCH_TOLERANCE)


def test_text_only_row_in_a_batch_with_images():
    model = tiny_autoregressive_model()
    with_image = image_prompt(1, N_LATENTS)
    text_only = [1, 5, 6, 7, 8, 9, 10]
    input_ids, attention_mask = left_pad([with_image, text_only])
    image = random_images(1)
    pixel_values = torch.zeros(2, 1, 3, 56, 56)
    pixel_values[0] = image

    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        image_alone = model(input_ids=torch.tensor([with_image]), pixel_values=image[None]).logits
        text_alone = model(input_ids=torch.tensor([text_only])).logits

    torch.testing.assert_close(batched[0], image_alone[0], **BATCH_TOLERANCE)
    torch.testing.assert_close(batched[1, -len(text_only) :], text_alone[0], **BATCH_TOLERANCE)


def test_pooling_none_gives_one_token_per_real_patch():
    model = tiny_autoregressive_model(connector_config=tiny_connector_config(pooling="none"))
    assert model.config.image_seq_len == 16  # a full 56 × 56 image: 4 × 4 patches of 14 px
    small = random_images(1, 28, 42, seed=3)[0]  # 2 × 3 patches
    pixel_values = torch.zeros(1, 2, 3, 56, 56)
    pixel_attention_mask = torch.zeros(1, 2, 56, 56, dtype=torch.bool)
    pixel_values[0, 0] = random_images(1)[0]
    pixel_attention_mask[0, 0] = True
    pixel_values[0, 1, :, :28, :42] = small
    pixel_attention_mask[0, 1, :28, :42] = True

    with torch.no_grad():
        features = model.get_image_features(pixel_values, pixel_attention_mask)
        small_alone = model.get_image_features(small[None, None])
        out = model(
            input_ids=torch.tensor([prompt_with_image_tokens([16, 6])]),
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
        )

    assert features.image_features_mask.sum().item() == 16 + 6
    assert small_alone.image_features.shape[1] == 6
    # padding patches are masked out of attention: the small image's tokens do not depend on the padding
    torch.testing.assert_close(features.image_features[0, 16:22], small_alone.image_features[0], **BATCH_TOLERANCE)
    assert out.logits.shape == (1, len(prompt_with_image_tokens([16, 6])), VOCAB_SIZE)
    with pytest.raises(ValueError) as mismatch:
        model(
            input_ids=torch.tensor([prompt_with_image_tokens([16, 16])]),
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
        )
    assert_names_counts(mismatch.value, 32, 22)


# --- precomputed image features -------------------------------------------------------------------------


def test_precomputed_image_features_give_the_same_logits_as_pixels():
    model = tiny_autoregressive_model()
    inputs = padded_batch_with_images()
    pixels = {k: inputs.pop(k) for k in ("pixel_values", "pixel_attention_mask")}

    with torch.no_grad():
        features = model.get_image_features(**pixels)
        assert isinstance(features, vlmforge.ImageFeaturesOutput)
        assert features.image_features_mask.sum(dim=1).tolist() == [2 * N_LATENTS, N_LATENTS]
        from_pixels = model(**inputs, **pixels).logits
        from_features = model(**inputs, **features).logits

    assert torch.equal(from_features, from_pixels)


# --- gradients and checkpointing ------------------------------------------------------------------------


def _logits_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    out.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return out.logits.detach(), grads


def _training_inputs():
    inputs = padded_batch_with_images()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return dict(inputs, labels=labels.masked_fill(labels == IMAGE_TOKEN_ID, -100))


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny_autoregressive_model().train()
    _, grads = _logits_and_grads(model, _training_inputs())

    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    for part in ("model.vision_model.", "model.connector.perceiver_resampler.latents", "model.text_model.", "lm_head."):
        assert any(name.startswith(part) for name in trainable), part
    without_gradient = [name for name in trainable if name not in grads or not grads[name].abs().sum() > 0]
    assert without_gradient == []


def _checkpointed_layers(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, GradientCheckpointingLayer)]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("enable", "checkpointing_kwargs", "reentrant"),
    [
        ("gradient_checkpointing_enable", None, False),  # the name users know (deprecated in transformers 5)
        ("activation_checkpointing_enable", None, False),  # what Trainer calls
        ("activation_checkpointing_enable", {"preserve_rng_state": False}, False),  # other kwargs keep the default
        ("activation_checkpointing_enable", {"use_reentrant": True}, True),  # an explicit choice wins
    ],
)
def test_gradient_checkpointing_changes_nothing_and_is_non_reentrant(
    enable, checkpointing_kwargs, reentrant, monkeypatch
):
    model = tiny_autoregressive_model().train()  # tiny configs have dropout 0
    inputs = _training_inputs()
    reference_logits, reference_grads = _logits_and_grads(model, inputs)

    # spy on torch's checkpoint: transformers binds it (in a functools.partial) when checkpointing is enabled
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        calls.append(kwargs)
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    monkeypatch.setattr("transformers.modeling_utils.checkpoint", spy, raising=False)
    getattr(model, enable)(checkpointing_kwargs)
    logits, grads = _logits_and_grads(model, inputs)

    # vision encoder, perceiver and text decoder layers: 2 each, each checkpointed once per forward
    assert len(_checkpointed_layers(model)) == 6
    assert len(calls) == 6
    assert all(call.get("use_reentrant") is reentrant for call in calls), calls
    torch.testing.assert_close(logits, reference_logits, atol=1e-6, rtol=0)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=0, msg=name)


# --- attention backends ---------------------------------------------------------------------------------


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of torch's scaled_dot_product_attention (transformers' "sdpa" backend)."""
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    return calls


def _backends(model) -> tuple[str, str, str]:
    parts = model.model.vision_model, model.model.connector, model.model.text_model
    return tuple(part.config._attn_implementation for part in parts)


def _real_token_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[inputs["attention_mask"].bool()]  # padding rows are backend-specific


def test_eager_and_sdpa_agree_on_a_padded_batch_with_images(tmp_path, sdpa_calls):
    tiny_autoregressive_model().save_pretrained(tmp_path)
    model_class = vlmforge.AutoregressiveVLMForConditionalGeneration
    eager = model_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = model_class.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert _backends(eager) == ("eager", "eager", "eager")
    assert _backends(sdpa) == ("sdpa", "sdpa", "sdpa")
    inputs = padded_batch_with_images()

    eager_logits = _real_token_logits(eager, inputs)
    assert len(sdpa_calls) == 0
    sdpa_logits = _real_token_logits(sdpa, inputs)
    # vision: 2 layers × 3 images (padded images are encoded packed: on CPU, one call per image), perceiver: 2 layers,
    # text: 2 layers
    assert len(sdpa_calls) == 2 * 3 + 2 + 2

    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-5, rtol=0)


def test_attn_implementation_per_sub_config(tmp_path, sdpa_calls):
    tiny_autoregressive_model().save_pretrained(tmp_path)
    model_class = vlmforge.AutoregressiveVLMForConditionalGeneration
    eager = model_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    mixed = model_class.from_pretrained(
        tmp_path,
        attn_implementation={"vision_config": "eager", "connector_config": "sdpa", "text_config": "eager", "": "eager"},
    ).eval()
    assert mixed.config._attn_implementation == "eager"
    assert (
        mixed.config.vision_config._attn_implementation,
        mixed.config.connector_config._attn_implementation,
        mixed.config.text_config._attn_implementation,
    ) == ("eager", "sdpa", "eager")
    assert _backends(mixed) == ("eager", "sdpa", "eager")
    inputs = padded_batch_with_images()

    eager_logits = _real_token_logits(eager, inputs)
    mixed_logits = _real_token_logits(mixed, inputs)

    assert len(sdpa_calls) == 2  # only the perceiver's 2 layers ran sdpa
    torch.testing.assert_close(mixed_logits, eager_logits, atol=1e-5, rtol=0)
