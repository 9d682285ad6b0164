"""Behaviour of the cross-attention VLM's forward pass: backbone identity with zero gates, which tokens each
image reaches under both image rules, text-only rows, input checks, precomputed image keys/values, gradients,
checkpointing, attention backends, checkpoint keys, save/load and loading a text-only LM checkpoint."""

import copy
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    IMAGE_TOKEN_ID,
    VOCAB_SIZE,
    image_attention_mask_for,
    left_pad,
    marker_prompt,
    random_images,
    tiny_cross_attention_config,
    tiny_cross_attention_model,
    tiny_text_config,
)
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.modeling_layers import GradientCheckpointingLayer

import vlmforge

TEXT_BACKBONES = ["llama", "mistral", "qwen2"]
N_LATENTS = 4
GATE = 0.5  # non-zero gates: the blocks change the output


def backbone_of(vlm):
    """The bare causal LM with the VLM's LM weights: `model.text_model` loads into it strictly."""
    backbone = AutoModelForCausalLM.from_config(copy.deepcopy(vlm.config.text_config)).eval()
    backbone.model.load_state_dict(vlm.model.text_model.state_dict(), strict=True)
    backbone.lm_head.load_state_dict(vlm.lm_head.state_dict())
    return backbone


def inputs_with_images(n_images: int = 3, rule: str = "latest", seed: int = 0) -> dict:
    input_ids = torch.tensor([marker_prompt(n_images)])
    return dict(
        input_ids=input_ids,
        pixel_values=random_images(n_images, seed=seed)[None],
        image_attention_mask=image_attention_mask_for(input_ids, rule),
    )


def padded_batch(rule: str = "latest") -> dict:
    """Two left-padded prompts with 2 and 1 images (the missing image is all-zero padding); the second one's
    image covers only 42 × 28 pixels."""
    input_ids, attention_mask = left_pad([marker_prompt(2), marker_prompt(1, text=(5,))])
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
        image_attention_mask=image_attention_mask_for(input_ids, rule),
    )


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# --- structure and checkpoint keys ----------------------------------------------------------------------


def test_blocks_sit_before_every_nth_layer_and_the_lm_keeps_its_keys():
    vlm = tiny_cross_attention_model(text_config=tiny_text_config(num_hidden_layers=5))
    bare = AutoModel.from_config(copy.deepcopy(vlm.config.text_config))
    layers = vlm.model.text_model.layers

    assert vlm.config.cross_attention_layers == [0, 2, 4]
    assert len(vlm.model.cross_attention_blocks) == 3
    assert [getattr(layer, "cross_attention_index", None) for layer in layers] == [0, None, 1, None, 2]
    assert all(isinstance(layer, type(bare.layers[0])) for layer in layers)  # still the LM's own layer class
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in layers)
    assert vlm.model.text_model.state_dict().keys() == bare.state_dict().keys()
    vision_and_head = ("model.vision_model.", "model.connector.", "lm_head.")
    new_keys = {k for k in vlm.state_dict() if not k.startswith(vision_and_head)}
    new_keys -= {f"model.text_model.{k}" for k in bare.state_dict()}
    assert new_keys and all(k.startswith("model.cross_attention_blocks.") for k in new_keys)
    assert {"model.cross_attention_blocks.0.attn_gate", "model.cross_attention_blocks.0.mlp_gate"} <= new_keys


def test_gates_start_at_gate_init_and_the_defaults_follow_the_paper():
    assert all(
        torch.equal(gate, torch.zeros(1))
        for name, gate in tiny_cross_attention_model().named_parameters()
        if name.endswith("_gate")
    )
    config = vlmforge.CrossAttentionVLMConfig()
    assert (config.image_rule, config.cross_attention_every_n_layers, config.gate_init) == ("latest", 4, 0.0)
    assert config.cross_attention_layers == list(range(0, config.text_config.num_hidden_layers, 4))
    assert config.image_seq_len == config.connector_config.n_latents == 64


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (dict(image_rule="newest"), "newest"),
        (dict(cross_attention_every_n_layers=0), "cross_attention_every_n_layers=0"),
        (dict(cross_attention_every_n_layers=4), "num_hidden_layers=3"),
        (dict(image_token_id=VOCAB_SIZE), f"vocab_size={VOCAB_SIZE}"),
    ],
)
def test_config_rejects_bad_values(overrides, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        tiny_cross_attention_config(**overrides)


def test_config_round_trips_through_auto_config(tmp_path):
    config = tiny_cross_attention_config("qwen2", image_rule="all_previous", gate_init=0.25)
    config.save_pretrained(tmp_path)
    loaded = vlmforge.CrossAttentionVLMConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "vlmforge_cross_attention"
    assert (loaded.image_rule, loaded.gate_init, loaded.cross_attention_layers) == ("all_previous", 0.25, [0, 2])
    assert loaded.text_config.model_type == "qwen2"


def test_fused_model_survives_deepcopy_and_pickle():
    model = tiny_cross_attention_model(gate_init=GATE)
    inputs = inputs_with_images()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.model.text_model.layers[0]) is type(model.model.text_model.layers[0])
        assert torch.equal(logits(clone, inputs), logits(model, inputs))


# --- identity with the bare backbone ----------------------------------------------------------------------


@pytest.mark.parametrize("text_model_type", TEXT_BACKBONES)
def test_zero_gates_give_exactly_the_backbone_logits(text_model_type):
    vlm = tiny_cross_attention_model(text_model_type)
    backbone = backbone_of(vlm)
    inputs = padded_batch()

    with torch.no_grad():
        expected = backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    with_images = logits(vlm, inputs)
    text_only = logits(vlm, dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))

    assert torch.equal(with_images, expected)
    assert torch.equal(text_only, expected)


@pytest.mark.parametrize("text_model_type", TEXT_BACKBONES)
def test_tokens_that_see_no_image_get_exactly_the_backbone_logits(text_model_type):
    vlm = tiny_cross_attention_model(text_model_type, gate_init=GATE)
    backbone = backbone_of(vlm)
    with_image = marker_prompt(1)
    text_only = [1, 5, 6, 7, 8, 9, 10, 12]
    input_ids, attention_mask = left_pad([with_image, text_only])
    pixel_values = torch.zeros(2, 1, 3, 56, 56)
    pixel_values[0] = random_images(1)
    image_attention_mask = image_attention_mask_for(input_ids)
    assert image_attention_mask[1].sum() == 0

    actual = logits(
        vlm,
        dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_attention_mask=image_attention_mask,
        ),
    )
    with torch.no_grad():
        expected = backbone(input_ids=input_ids, attention_mask=attention_mask).logits

    sees_image = image_attention_mask.any(dim=-1)  # (B, T)
    assert torch.equal(actual[1], expected[1])  # the text-only row
    assert torch.equal(actual[~sees_image], expected[~sees_image])  # and the tokens before the first marker
    assert (actual[sees_image] != expected[sees_image]).any(dim=-1).all()  # the gates are open: images matter


# --- which tokens an image reaches --------------------------------------------------------------------------


def changed_tokens(model, inputs, other, module=None) -> list[bool]:
    """Which tokens of sample 0 get different logits (or, given `module`, a different output of it)."""
    outputs = []
    for batch in (inputs, other):
        captured = []
        # a block returns (hidden states, its image key/value)
        handle = module.register_forward_hook(lambda m, a, out: captured.append(out[0])) if module else None
        out = logits(model, batch)
        outputs.append(captured[0] if module else out)
        if handle:
            handle.remove()
    return (outputs[0] != outputs[1]).any(dim=-1)[0].tolist()


@pytest.mark.parametrize("rule", ["latest", "all_previous"])
def test_changing_one_image_changes_exactly_the_tokens_that_see_it(rule):
    """An image reaches, through the blocks, exactly the tokens its rule lets see it: the first block's output
    changes from image k's marker up to image k + 1's ("latest") or to the end ("all_previous"). The LM's own
    self-attention then carries that to every later token, so the logits change from image k's marker on and
    never before it."""
    model = tiny_cross_attention_model(gate_init=GATE, image_rule=rule)
    inputs = inputs_with_images(3, rule)
    seq_len = inputs["input_ids"].shape[1]
    markers = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[:, 0].tolist()
    k = 1
    other = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    other["pixel_values"][0, k] = random_images(1, seed=7)[0]

    first_block = changed_tokens(model, inputs, other, module=model.model.cross_attention_blocks[0])
    changed_logits = changed_tokens(model, inputs, other)

    end = markers[k + 1] if rule == "latest" else seq_len
    assert first_block == [markers[k] <= t < end for t in range(seq_len)]
    assert changed_logits == [markers[k] <= t for t in range(seq_len)]


def test_sub_images_of_one_split_image_share_its_marker():
    model = tiny_cross_attention_model(gate_init=GATE)
    input_ids = torch.tensor([marker_prompt(2)])
    image_attention_mask = image_attention_mask_for(input_ids, sub_images=5)
    pixel_values = random_images(10)[None]  # 2 images × (4 crops + the whole image)
    assert image_attention_mask.shape == (1, input_ids.shape[1], 10)

    out = logits(model, dict(input_ids=input_ids, pixel_values=pixel_values, image_attention_mask=image_attention_mask))

    assert out.shape == (1, input_ids.shape[1], VOCAB_SIZE)


# --- shapes, loss, precomputed image keys/values --------------------------------------------------------------


def test_forward_shapes_and_loss():
    model = tiny_cross_attention_model(gate_init=GATE)
    inputs = padded_batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[labels == IMAGE_TOKEN_ID] = -100
    batch, seq_len = inputs["input_ids"].shape

    with torch.no_grad():
        out = model(**inputs, labels=labels)

    assert out.logits.shape == (batch, seq_len, VOCAB_SIZE)
    assert out.cache.get_seq_length() == seq_len
    key, value = out.image_key_values.key_values[0]
    assert key.shape == value.shape == (batch, 2, 2 * N_LATENTS, 8)  # (B, kv heads, visual tokens, head dim)
    assert out.image_key_values.token_slots.tolist() == [[0] * 4 + [1] * 4, [0] * 4 + [-1] * 4]
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB_SIZE), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)


def test_only_inference_keeps_the_blocks_image_key_values():
    """Training reuses no image keys/values, and keeping them would hold them past activation checkpointing."""
    model = tiny_cross_attention_model(gate_init=GATE).train()
    trained = model(**padded_batch()).image_key_values
    assert trained.key_values is None and trained.image_states is not None
    model.eval()
    with torch.no_grad():
        kept = model(**padded_batch()).image_key_values.key_values
    assert len(kept) == len(model.model.cross_attention_blocks)


def test_precomputed_image_key_values_give_the_same_logits_as_pixels():
    model = tiny_cross_attention_model(gate_init=GATE)
    inputs = padded_batch()
    pixels = {k: inputs.pop(k) for k in ("pixel_values", "pixel_attention_mask")}

    with torch.no_grad():
        image_key_values = model.get_image_key_values(**pixels)
    assert isinstance(image_key_values, vlmforge.ImageKeyValues)

    from_key_values = logits(model, dict(inputs, image_key_values=image_key_values))
    assert torch.equal(from_key_values, logits(model, dict(inputs, **pixels)))


# --- input checks ----------------------------------------------------------------------------------------------


def assert_names(error: Exception, *values) -> None:
    message = str(error)
    for value in values:
        assert str(value) in message, f"{value} not in: {message}"


def test_wrong_image_attention_mask_shape_names_both_shapes():
    model = tiny_cross_attention_model()
    inputs = inputs_with_images(3)
    seq_len = inputs["input_ids"].shape[1]

    with pytest.raises(ValueError) as too_few_images:
        model(**dict(inputs, image_attention_mask=inputs["image_attention_mask"][..., :2]))
    with pytest.raises(ValueError) as too_few_tokens:
        model(**dict(inputs, image_attention_mask=inputs["image_attention_mask"][:, 1:]))
    with pytest.raises(ValueError) as missing:
        model(**dict(inputs, image_attention_mask=None))

    assert_names(too_few_images.value, (1, seq_len, 2), (1, seq_len, 3))
    assert_names(too_few_tokens.value, (1, seq_len - 1, 3), (1, seq_len, 3))
    assert_names(missing.value, "image_attention_mask", (1, seq_len, 3))


def test_marker_count_must_match_image_count():
    model = tiny_cross_attention_model()
    inputs = inputs_with_images(3)
    # the prompt was truncated after the second image's marker: 2 markers, 3 images
    truncated = inputs["input_ids"][:, : int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[-1])]
    # and a marker without an image: 4 markers, 3 images
    extra = torch.cat([inputs["input_ids"], torch.tensor([[IMAGE_TOKEN_ID, 12]])], dim=1)

    pixel_values = inputs["pixel_values"]

    with pytest.raises(ValueError) as too_few_markers:
        mask = image_attention_mask_for(truncated, num_slots=3)
        model(input_ids=truncated, pixel_values=pixel_values, image_attention_mask=mask)
    with pytest.raises(ValueError) as too_many_markers:
        mask = image_attention_mask_for(extra)[..., :3]
        model(input_ids=extra, pixel_values=pixel_values, image_attention_mask=mask)
    with pytest.raises(ValueError) as split_images:  # 2 split images (10 sub-images) but 1 marker
        one_marker = torch.tensor([marker_prompt(1)])
        mask = image_attention_mask_for(one_marker, sub_images=5, num_slots=10)
        mask[0, -1, 5:] = 1
        model(input_ids=one_marker, pixel_values=random_images(10)[None], image_attention_mask=mask)

    assert_names(too_few_markers.value, "2 <image> markers but 3 images")
    assert_names(too_many_markers.value, "4 <image> markers but 3 images")
    assert_names(split_images.value, "1 <image> markers but 2 images")


def test_images_and_precomputed_key_values_are_exclusive_and_masks_need_images():
    model = tiny_cross_attention_model()
    inputs = inputs_with_images(1)
    with torch.no_grad():
        image_key_values = model.get_image_key_values(inputs["pixel_values"])

    with pytest.raises(ValueError, match="not both"):
        model(**inputs, image_key_values=image_key_values)
    with pytest.raises(ValueError, match="no pixel_values or image_key_values"):
        model(input_ids=inputs["input_ids"], image_attention_mask=inputs["image_attention_mask"])


# --- gradients and checkpointing -----------------------------------------------------------------------------


def _training_inputs() -> dict:
    inputs = padded_batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return dict(inputs, labels=labels.masked_fill(labels == IMAGE_TOKEN_ID, -100))


def _logits_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    out.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return out.logits.detach(), grads


def test_every_trainable_parameter_gets_a_gradient_once_the_gates_are_open():
    model = tiny_cross_attention_model(gate_init=GATE).train()
    _, grads = _logits_and_grads(model, _training_inputs())

    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    without_gradient = [name for name in trainable if name not in grads or not grads[name].abs().sum() > 0]
    assert without_gradient == []
    for name in (
        "model.cross_attention_blocks.1.attn_gate",
        "model.cross_attention_blocks.0.cross_attn.k_proj.weight",
        "model.connector.perceiver_resampler.latents",
        "model.vision_model.embeddings.patch_embedding.weight",
    ):
        assert name in grads


def test_closed_gates_still_learn_but_pass_no_gradient_upstream():
    model = tiny_cross_attention_model().train()  # gates at 0: tanh'(0) = 1, but tanh(0) · anything = 0
    _, grads = _logits_and_grads(model, _training_inputs())

    gates = [name for name in grads if name.endswith("_gate")]
    assert len(gates) == 4 and all(grads[name].abs().item() > 0 for name in gates)
    upstream = [name for name in grads if name.startswith(("model.vision_model.", "model.connector."))]
    assert upstream and all(torch.count_nonzero(grads[name]) == 0 for name in upstream)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_changes_nothing(enable, monkeypatch):
    model = tiny_cross_attention_model(gate_init=GATE).train()
    inputs = _training_inputs()
    reference_logits, reference_grads = _logits_and_grads(model, inputs)

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        calls.append(kwargs)
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    monkeypatch.setattr("transformers.modeling_utils.checkpoint", spy, raising=False)
    getattr(model, enable)()
    logits_, grads = _logits_and_grads(model, inputs)

    # 2 vision + 2 perceiver + 3 decoder layers (2 of them fused with their block), each checkpointed once
    assert len(calls) == 7 and all(call.get("use_reentrant") is False for call in calls)
    torch.testing.assert_close(logits_, reference_logits, atol=1e-6, rtol=0)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=0, msg=name)


def test_reentrant_checkpointing_is_refused():
    model = tiny_cross_attention_model()
    with pytest.raises(ValueError, match="non-reentrant"):
        model.activation_checkpointing_enable({"use_reentrant": True})


# --- attention backends ---------------------------------------------------------------------------------------


def test_eager_and_sdpa_agree(tmp_path, monkeypatch):
    tiny_cross_attention_model(gate_init=GATE).save_pretrained(tmp_path)
    model_class = vlmforge.CrossAttentionVLMForConditionalGeneration
    eager = model_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = model_class.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    inputs = padded_batch("all_previous")
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)

    eager_logits = logits(eager, inputs)[inputs["attention_mask"].bool()]
    assert calls == []
    sdpa_logits = logits(sdpa, inputs)[inputs["attention_mask"].bool()]

    # vision (2 layers × 3 images: padded images are encoded packed, on CPU one call per image), perceiver,
    # decoder layers, cross-attention blocks
    assert len(calls) == 2 * 3 + 2 + 3 + 2
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-5, rtol=0)


def test_hidden_states_and_attentions_cover_every_decoder_layer():
    model = tiny_cross_attention_model(gate_init=GATE, attn_implementation="eager")
    with torch.no_grad():
        out = model(**inputs_with_images(), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 + 1
    assert len(out.attentions) == 3


# --- save / load --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = tiny_cross_attention_model("mistral", gate_init=GATE)
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize(
    "loader",
    [vlmforge.CrossAttentionVLMForConditionalGeneration, AutoModelForImageTextToText, vlmforge.AutoModelForVision2Seq],
    ids=lambda loader: loader.__name__,
)
def test_round_trip_reproduces_outputs_exactly(saved, loader):
    model, path = saved
    loaded = loader.from_pretrained(path).eval()
    assert type(loaded) is vlmforge.CrossAttentionVLMForConditionalGeneration
    assert torch.equal(logits(loaded, inputs_with_images()), logits(model, inputs_with_images()))


def test_auto_model_loads_the_base_model(saved):
    model, path = saved
    base = AutoModel.from_pretrained(path).eval()
    assert type(base) is vlmforge.CrossAttentionVLMModel
    inputs = inputs_with_images()
    with torch.no_grad():
        assert torch.equal(base(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)


def test_missing_blocks_load_as_closed_gates_not_garbage(tmp_path):
    model = tiny_cross_attention_model()
    with torch.no_grad():
        for name, gate in model.named_parameters():
            if name.endswith("_gate"):
                gate.fill_(GATE)  # as if trained; the config still says gate_init=0
    model.save_pretrained(tmp_path)
    path = tmp_path
    weights = load_file(path / "model.safetensors")
    weights = {k: v for k, v in weights.items() if ".cross_attention_blocks." not in k}
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})

    loaded = vlmforge.CrossAttentionVLMForConditionalGeneration.from_pretrained(path).eval()

    blocks = loaded.model.cross_attention_blocks
    assert all(torch.equal(p, torch.zeros(1)) for n, p in blocks.named_parameters() if n.endswith("_gate"))
    assert all(torch.isfinite(p).all() for p in blocks.parameters())
    assert blocks[0].cross_attn.q_proj.weight.std() > 0
    inputs = inputs_with_images()
    assert torch.equal(logits(loaded, inputs), logits(backbone_of(model), dict(input_ids=inputs["input_ids"])))


@pytest.mark.parametrize("text_model_type", TEXT_BACKBONES)
def test_a_text_only_lm_checkpoint_loads_unchanged(tmp_path, text_model_type):
    torch.manual_seed(3)
    text_config = tiny_text_config(text_model_type)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text_config.pop("model_type"), **text_config)).eval()
    lm.save_pretrained(tmp_path)  # what a user has: a plain causal-LM checkpoint
    config = tiny_cross_attention_config(text_model_type, text_config=lm.config.to_dict())

    vlm = vlmforge.CrossAttentionVLMForConditionalGeneration.from_pretrained(
        tmp_path, config=config, key_mapping={r"^model\.": "model.text_model."}
    ).eval()

    for name, tensor in lm.state_dict().items():
        target = name.replace("model.", "model.text_model.", 1) if name.startswith("model.") else name
        assert torch.equal(vlm.state_dict()[target], tensor), name
    input_ids = torch.tensor([marker_prompt(2)])
    mask = image_attention_mask_for(input_ids)
    inputs = dict(input_ids=input_ids, pixel_values=random_images(2)[None], image_attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(logits(vlm, inputs), lm(input_ids=input_ids).logits)
