"""generate() with the cross-attention VLM: cached = uncached = recomputed, images encoded and projected to
keys/values once per generate, the image mask growing with the text, left-padded batches, precomputed image
keys/values, beams, and unknown keywords refused."""

import pytest
import torch
from conftest import (
    FAKE_IMAGE_TOKEN_ID,
    IMAGE_TOKEN_ID,
    CallCounter,
    image_attention_mask_for,
    left_pad,
    marker_prompt,
    random_images,
    tiny_cross_attention_model,
)

NEW_TOKENS = 6
GATE = 0.5
MARKER_IDS = [IMAGE_TOKEN_ID, FAKE_IMAGE_TOKEN_ID]


def generating_model(text_model_type: str = "llama", rule: str = "latest"):
    """Open gates (the images matter) and no eos, so every sequence gets exactly NEW_TOKENS tokens. The image
    marker tokens are suppressed: a random model may pick one, and a generated marker would be a new image."""
    model = tiny_cross_attention_model(text_model_type, gate_init=GATE, image_rule=rule)
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = MARKER_IDS
    return model


def one_prompt(rule: str = "latest") -> dict:
    input_ids = torch.tensor([marker_prompt(2)])
    return dict(
        input_ids=input_ids,
        pixel_values=random_images(2)[None],
        image_attention_mask=image_attention_mask_for(input_ids, rule),
    )


def recomputed_greedy(model, input_ids, pixel_values, image_attention_mask, steps: int = NEW_TOKENS):
    """Greedy decoding the slow way: everything, images included, re-run for every token; a new token sees the
    images the token before it saw."""
    with torch.no_grad():
        for _ in range(steps):
            out = model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                image_attention_mask=image_attention_mask,
                use_cache=False,
            )
            logits = out.logits[:, -1].clone()
            logits[:, MARKER_IDS] = float("-inf")  # as generation_config.suppress_tokens does
            input_ids = torch.cat([input_ids, logits.argmax(-1, keepdim=True)], dim=1)
            image_attention_mask = torch.cat([image_attention_mask, image_attention_mask[:, -1:]], dim=1)
    return input_ids


@pytest.mark.parametrize(
    ("text_model_type", "rule"), [("llama", "latest"), ("mistral", "all_previous"), ("qwen2", "latest")]
)
def test_greedy_cached_equals_uncached_equals_recompute(text_model_type, rule):
    model = generating_model(text_model_type, rule)
    inputs = one_prompt(rule)

    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cached = model.generate(**inputs, use_cache=True, **greedy)
    uncached = model.generate(**inputs, use_cache=False, **greedy)
    without_images = model.generate(input_ids=inputs["input_ids"], **greedy)

    assert cached.sequences.shape == (1, inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences, recomputed_greedy(model, **inputs))
    assert all((with_ != without).any() for with_, without in zip(cached.logits, without_images.logits))


def projection_counters(model) -> list[CallCounter]:
    """The vision encoder and every block's image key and value projections."""
    modules = [model.model.vision_model]
    for block in model.model.cross_attention_blocks:
        modules += [block.cross_attn.k_proj, block.cross_attn.v_proj]
    return [CallCounter(module) for module in modules]


@pytest.mark.parametrize(
    "mode",
    [
        dict(do_sample=False),
        dict(do_sample=False, use_cache=False),
        dict(do_sample=True),
        dict(num_beams=2, do_sample=False),
    ],
    ids=str,
)
def test_images_are_encoded_and_projected_once_per_generate(mode):
    model = generating_model()
    counters = projection_counters(model)
    try:
        model.generate(**one_prompt(), max_new_tokens=NEW_TOKENS, **mode)
    finally:
        for counter in counters:
            counter.__exit__()
    assert [counter.calls for counter in counters] == [1] * 5  # encoder + 2 blocks × (k_proj, v_proj)


def test_beam_search_scores_match_recomputed_log_probs():
    model = generating_model()
    inputs = one_prompt()
    prompt_len = inputs["input_ids"].shape[1]

    out = model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        num_beams=2,
        num_return_sequences=2,
        length_penalty=0.0,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )

    mask = inputs["image_attention_mask"]
    mask = torch.cat([mask, mask[:, -1:].expand(-1, NEW_TOKENS, -1)], dim=1).expand(2, -1, -1)
    with torch.no_grad():
        pixel_values = inputs["pixel_values"].expand(2, -1, -1, -1, -1)
        logits = model(input_ids=out.sequences, pixel_values=pixel_values, image_attention_mask=mask).logits
    log_probs = logits[:, prompt_len - 1 : -1].log_softmax(-1)
    expected = log_probs.gather(-1, out.sequences[:, prompt_len:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, expected, atol=1e-4, rtol=0)


def batch_of_two(rule: str = "latest"):
    """Prompts of different lengths with 2 and 1 images; the missing image is all-zero padding."""
    prompts = [marker_prompt(2), marker_prompt(1, text=(5,))]
    pixel_values = torch.zeros(2, 2, 3, 56, 56)
    pixel_values[0], pixel_values[1, 0] = random_images(2), random_images(1, seed=3)[0]
    return prompts, pixel_values


@pytest.mark.parametrize("rule", ["latest", "all_previous"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(rule):
    model = generating_model(rule=rule)
    prompts, pixel_values = batch_of_two(rule)
    input_ids, attention_mask = left_pad(prompts)
    assert len(prompts[0]) != len(prompts[1])

    batched = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_attention_mask=image_attention_mask_for(input_ids, rule, num_slots=2),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
    )

    for row, (prompt, images) in enumerate(zip(prompts, [pixel_values[:1], pixel_values[1:, :1]])):
        alone_ids = torch.tensor([prompt])
        alone = model.generate(
            input_ids=alone_ids,
            pixel_values=images,
            image_attention_mask=image_attention_mask_for(alone_ids, rule),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
        assert torch.equal(batched[row, -NEW_TOKENS:], alone[0, -NEW_TOKENS:]), row


@pytest.mark.parametrize(
    "mode", [dict(do_sample=False), dict(num_beams=2, num_return_sequences=2, do_sample=False)], ids=str
)
def test_generate_from_precomputed_image_key_values_equals_from_pixels(mode):
    model = generating_model()
    prompts, pixel_values = batch_of_two()
    input_ids, attention_mask = left_pad(prompts)
    text = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        image_attention_mask=image_attention_mask_for(input_ids, num_slots=2),
        max_new_tokens=NEW_TOKENS,
        **mode,
    )

    with torch.no_grad():
        image_key_values = model.get_image_key_values(pixel_values)
    with CallCounter(model.model.vision_model) as encoder:
        from_key_values = model.generate(**text, image_key_values=image_key_values)
    from_pixels = model.generate(**text, pixel_values=pixel_values)

    assert encoder.calls == 0
    assert torch.equal(from_key_values, from_pixels)


def test_generate_refuses_keywords_forward_does_not_declare():
    model = generating_model()
    inputs = one_prompt()
    with pytest.raises(ValueError, match="image_mask"):
        model.generate(**inputs, image_mask=inputs["image_attention_mask"], max_new_tokens=2)
