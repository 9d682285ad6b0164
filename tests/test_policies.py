"""Training policies: each policy trains exactly the parameters it should (by part), every LoRA tensor gets a
non-zero gradient, an adapter changes the output, and parameter groups give the connector its own learning rate."""

import re

import pytest
import torch
from conftest import tiny_autoregressive_model, tiny_cross_attention_model
from PIL import Image
from test_collator import processor_for

from vlmforge.training import (
    POLICIES,
    VLMDataCollator,
    apply_training_policy,
    parameter_groups,
    special_token_ids,
    trainable_parameter_names,
)
from vlmforge.training.policies import named_parameters_by_part

FUSIONS = {
    "autoregressive": lambda: tiny_autoregressive_model(),
    # non-zero gates: with the default zero gates no gradient reaches the vision encoder at step one
    "cross_attention": lambda: tiny_cross_attention_model(gate_init=0.5),
}
TOKEN_IDS = [97, 98, 99]  # the toy tokenizer's <end_of_utterance>, <fake_token_around_image>, <image>
VISION_TARGETS = r"\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.lora_[AB]\."
TEXT_TARGETS = r"\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.lora_[AB]\."


def policy_model(fusion: str, vision: str, text: str, **kwargs):
    model = FUSIONS[fusion]()
    kwargs = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "new_token_ids": TOKEN_IDS, "verbose": False, **kwargs}
    return apply_training_policy(model, vision=vision, text=text, **kwargs)


@pytest.fixture(scope="module")
def batches():
    """One collated batch per fusion: an image question with its answer, and a text-only chat."""
    red = Image.new("RGB", (40, 30), (200, 10, 10))
    samples = [
        {"images": [red], "texts": [{"user": "What colour?", "assistant": "red"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    return {fusion: VLMDataCollator(processor_for(fusion))(samples) for fusion in FUSIONS}


def expected_trainable(names_by_part: dict[str, set[str]], vision: str, text: str) -> dict[str, set[str]]:
    """What a policy must train, part by part, from the names alone."""

    def base(names):
        return {n for n in names if "lora_" not in n and "trainable_tokens" not in n}

    vision_names = names_by_part["vision_encoder"]
    text_names = names_by_part["language_model"]
    expected = {
        "connector": names_by_part["connector"],  # always
        "cross_attention": names_by_part["cross_attention"],  # always (empty for the autoregressive fusion)
        "vision_encoder": {
            "frozen": set(),
            "lora": {n for n in vision_names if re.search(VISION_TARGETS, n)},
            "full": base(vision_names),
        }[vision],
        "language_model": {
            "frozen": {n for n in text_names if "trainable_tokens_delta" in n},
            "lora": {n for n in text_names if re.search(TEXT_TARGETS, n) or "trainable_tokens_delta" in n},
            "full": base(text_names),
        }[text],
    }
    return expected


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("vision", POLICIES)
@pytest.mark.parametrize("text", POLICIES)
def test_each_policy_trains_exactly_its_parameters(fusion, vision, text):
    model = policy_model(fusion, vision, text)
    all_names = {part: {n for n, _ in named} for part, named in named_parameters_by_part(model).items()}
    trainable = trainable_parameter_names(model)
    expected = expected_trainable(all_names, vision, text)
    assert set(trainable) <= {*expected, "other"} and not trainable.get("other")
    for part, names in expected.items():
        assert trainable[part] == names, part
    # sanity of the expectations themselves: the parts are non-empty where they must be
    assert expected["connector"]
    assert bool(expected["cross_attention"]) == (fusion == "cross_attention")
    assert (len(expected["vision_encoder"]) > 0) == (vision != "frozen")
    if vision == "lora":
        assert len(expected["vision_encoder"]) == 2 * 6 * 2  # 2 layers × (q, k, v, out, fc1, fc2) × (A, B)
    if text == "lora":
        layers = model.config.text_config.num_hidden_layers
        assert len(expected["language_model"]) == layers * 7 * 2 + 2  # + the embed_tokens and lm_head token rows
    if text == "frozen":
        assert len(expected["language_model"]) == 2
    # no adapter lands in the connector or the cross-attention blocks (they have q_proj … down_proj too)
    assert not [n for n in all_names["connector"] | all_names["cross_attention"] if "lora_" in n]


def loss_and_backward(model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_every_lora_tensor_gets_a_gradient_and_the_adapter_changes_the_output(fusion, batches):
    """LoRA's B starts at zero, so step one sends gradient to every B (and to no A: dL/dA = Bᵀ·… = 0); after one
    optimizer step B ≠ 0 and every A and B has a non-zero gradient. Trainable token rows too."""
    torch.manual_seed(0)
    model = policy_model(fusion, "lora", "lora").train()
    batch = batches[fusion]
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base_logits)  # identity at initialisation

    loss_and_backward(model, batch)
    for name, parameter in lora.items():
        assert parameter.grad is not None, name
        if "lora_B" in name:
            assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad.abs().sum() == 0, name

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    loss_and_backward(model, batch)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_gradient = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_gradient  # every trainable tensor: LoRA A and B, token rows, connector, cross-attention
    assert [n for n in trainable if "trainable_tokens_delta" in n]

    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            disabled = model(**batch).logits
    assert (adapted - disabled).abs().max() > 1e-4  # the trained adapter changes the output


def test_summary_names_the_adapters_and_counts(capsys):
    model = apply_training_policy(
        tiny_autoregressive_model(), vision="lora", text="lora", lora_r=2, new_token_ids=TOKEN_IDS
    )
    out = capsys.readouterr().out
    assert "vision=lora, text=lora" in out
    assert "model.text_model.layers.*.self_attn.q_proj  (×2)" in out
    assert "model.vision_model.encoder.layers.*.mlp.fc1  (×2)" in out
    assert "model.text_model.embed_tokens  (×1)" in out and "lm_head  (×1)" in out
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"Trainable parameters: {trainable:,} of" in out


def test_frozen_backbones_without_lora(capsys):
    model = apply_training_policy(tiny_autoregressive_model(), vision="frozen", text="full", verbose=False)
    assert type(model).__name__ == "AutoregressiveVLMForConditionalGeneration"  # nothing for PEFT to do
    assert capsys.readouterr().out == ""


def test_special_token_ids_of_the_processor():
    assert special_token_ids(processor_for("autoregressive")) == TOKEN_IDS


def test_parameter_groups():
    model = policy_model("cross_attention", "lora", "lora")
    groups = parameter_groups(model, connector_lr=1e-3, backbone_lr=1e-5, weight_decay=0.1)
    by_part = named_parameters_by_part(model)
    fast = {id(p) for part in ("connector", "cross_attention") for _, p in by_part[part]}
    seen = [id(p) for group in groups for p in group["params"]]
    assert len(seen) == len(set(seen))  # no parameter twice
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}  # every trainable one once
    for group in groups:
        assert {id(p) in fast for p in group["params"]} == {group["lr"] == 1e-3}
        decayed = group["name"] in ("connector", "backbone")
        for parameter in group["params"]:
            assert group["weight_decay"] == (0.1 if parameter.ndim >= 2 and decayed else 0.0)
    token_rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert all(g["weight_decay"] == 0.0 for g in groups for p in g["params"] if any(p is t for t in token_rows))
    torch.optim.AdamW(groups)  # a valid optimizer spec


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="vision='lorra' is not a policy"):
        apply_training_policy(tiny_autoregressive_model(), vision="lorra", text="frozen")
    model = policy_model("autoregressive", "frozen", "lora")
    with pytest.raises(ValueError, match="already wrapped by PEFT"):
        apply_training_policy(model, vision="frozen", text="lora")
    with pytest.raises(ValueError, match="new_token_ids"):
        policy_model("autoregressive", "frozen", "frozen", new_token_ids=[1000])
    with pytest.raises(TypeError, match="not a vlmforge VLM"):
        apply_training_policy(torch.nn.Linear(2, 2), vision="frozen", text="frozen")
