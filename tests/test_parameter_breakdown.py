"""Parameters per part for both fusions: the parts add up, each part is what it says, and cross-attention's
extra cost is exactly its blocks (Idefics2 paper, Finding 2)."""

import pytest
from conftest import tiny_autoregressive_model, tiny_cross_attention_model, tiny_text_config

import vlmforge

PARTS = ["vision_encoder", "connector", "cross_attention", "language_model", "lm_head"]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "build", [tiny_autoregressive_model, tiny_cross_attention_model], ids=["autoregressive", "cross_attention"]
)
def test_parts_add_up_to_the_model_and_match_its_modules(build):
    model = build()
    breakdown = model.parameter_breakdown()
    blocks = getattr(model.model, "cross_attention_blocks", None)

    assert list(breakdown.total) == PARTS
    assert breakdown.num_parameters == model.num_parameters() == count(model)
    assert breakdown.total == {
        "vision_encoder": count(model.model.vision_model),
        "connector": count(model.model.connector),
        "cross_attention": count(blocks) if blocks is not None else 0,
        "language_model": count(model.model.text_model),
        "lm_head": count(model.lm_head),
    }
    assert breakdown.trainable == breakdown.total
    assert vlmforge.parameter_breakdown(model.model).total == dict(breakdown.total, lm_head=0)


def test_cross_attention_costs_exactly_its_blocks():
    autoregressive = tiny_autoregressive_model().parameter_breakdown()
    cross_attention = tiny_cross_attention_model(text_config=tiny_text_config()).parameter_breakdown()  # 2 layers
    hidden, kv_width, intermediate = 32, 2 * 8, 64  # tiny_text_config: 4 heads, 2 kv heads of 8, MLP 64
    per_block = (
        2 * hidden  # two RMSNorms
        + 2 * hidden * hidden  # q_proj, o_proj
        + 2 * hidden * kv_width  # k_proj, v_proj
        + 3 * hidden * intermediate  # gated SwiGLU MLP
        + 2  # the two tanh gates
    )

    assert cross_attention.total["cross_attention"] == 1 * per_block  # 2 layers, a block every 2: before layer 0
    assert cross_attention.num_parameters - autoregressive.num_parameters == per_block
    assert {k: v for k, v in cross_attention.total.items() if k != "cross_attention"} == {
        k: v for k, v in autoregressive.total.items() if k != "cross_attention"
    }


def test_frozen_parts_and_tied_head():
    model = tiny_cross_attention_model(tie_word_embeddings=True)
    model.model.vision_model.requires_grad_(False)
    model.model.text_model.requires_grad_(False)

    breakdown = model.parameter_breakdown()

    assert breakdown.total["lm_head"] == 0  # the tied head is the embedding, counted in the language model
    assert breakdown.num_parameters == model.num_parameters()
    assert breakdown.trainable["vision_encoder"] == breakdown.trainable["language_model"] == 0
    assert breakdown.trainable["cross_attention"] == breakdown.total["cross_attention"] > 0
    assert breakdown.num_trainable == breakdown.total["connector"] + breakdown.total["cross_attention"]
    table = str(breakdown)
    assert all(part in table for part in PARTS) and f"{breakdown.num_parameters:,}" in table
