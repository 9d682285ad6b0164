"""generate() with images: greedy / sampling / beam search, cache equivalence, images encoded once,
left-padded batches, precomputed image features, every text backbone."""

import pytest
import torch
from conftest import CallCounter, image_prompt, left_pad, random_images, tiny_autoregressive_model

NEW_TOKENS = 6
N_LATENTS = 4


def generating_model(text_model_type: str = "llama", seed: int = 0):
    """A tiny model that never stops early: no eos, so every sequence gets exactly NEW_TOKENS tokens."""
    model = tiny_autoregressive_model(text_model_type, seed=seed)
    model.generation_config.eos_token_id = None
    return model


def one_prompt():
    return dict(input_ids=torch.tensor([image_prompt(2, N_LATENTS)]), pixel_values=random_images(2)[None])


def recomputed_greedy(model, input_ids, pixel_values, steps: int = NEW_TOKENS) -> torch.Tensor:
    """Greedy decoding the slow way: the whole sequence, images included, re-run for every token."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False).logits
            input_ids = torch.cat([input_ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return input_ids


@pytest.mark.parametrize("text_model_type", ["llama", "mistral", "qwen2"])
def test_greedy_cached_equals_uncached_equals_recompute(text_model_type):
    model = generating_model(text_model_type)
    inputs = one_prompt()

    cached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)

    assert cached.shape == (1, inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, recomputed_greedy(model, **inputs))


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = generating_model()
    inputs = one_prompt()

    def sample(seed, **kwargs):
        torch.manual_seed(seed)
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, **kwargs)

    first, again, other_seed = sample(0), sample(0), sample(1)
    greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)

    assert first.shape == greedy.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)  # a near-uniform tiny LM: two seeds agreeing is vanishingly rare
    assert torch.equal(sample(0, top_k=1), greedy)


def test_beam_search_scores_match_recomputed_log_probs():
    model = generating_model()
    inputs = one_prompt()
    prompt_len = inputs["input_ids"].shape[1]

    with CallCounter(model.model.vision_model) as encoder:
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            num_beams=2,
            num_return_sequences=2,
            length_penalty=0.0,  # sequences_scores = plain sum of the generated tokens' log-probs
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )

    assert encoder.calls == 1
    assert out.sequences.shape == (2, prompt_len + NEW_TOKENS)
    assert not torch.equal(out.sequences[0], out.sequences[1])
    with torch.no_grad():
        logits = model(input_ids=out.sequences, pixel_values=inputs["pixel_values"].expand(2, -1, -1, -1, -1)).logits
    log_probs = logits[:, prompt_len - 1 : -1].log_softmax(-1)  # (2, NEW_TOKENS, V): predicts the new tokens
    expected = log_probs.gather(-1, out.sequences[:, prompt_len:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, expected, atol=1e-4, rtol=0)
    assert out.sequences_scores[0] >= out.sequences_scores[1]


@pytest.mark.parametrize(
    "mode", [dict(do_sample=False), dict(do_sample=True), dict(num_beams=2, do_sample=False)], ids=str
)
def test_vision_encoder_runs_once_per_generate(mode):
    model = generating_model()
    with CallCounter(model.model.vision_model) as encoder:
        model.generate(**one_prompt(), max_new_tokens=NEW_TOKENS, **mode)
    assert encoder.calls == 1


def batch_of_two():
    """Prompts of different lengths with 2 and 1 images; the missing image is all-zero padding."""
    prompts = [image_prompt(2, N_LATENTS), image_prompt(1, N_LATENTS, text=(5,))]
    images = random_images(3)
    pixel_values = torch.zeros(2, 2, 3, 56, 56)
    pixel_values[0], pixel_values[1, 0] = images[:2], images[2]
    return prompts, pixel_values


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = generating_model()
    prompts, pixel_values = batch_of_two()
    input_ids, attention_mask = left_pad(prompts)
    assert len(prompts[0]) != len(prompts[1])

    batched = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
    )

    for row, (prompt, images) in enumerate(zip(prompts, [pixel_values[:1], pixel_values[1:, :1]])):
        alone = model.generate(
            input_ids=torch.tensor([prompt]), pixel_values=images, max_new_tokens=NEW_TOKENS, do_sample=False
        )
        assert torch.equal(batched[row, -NEW_TOKENS:], alone[0, -NEW_TOKENS:]), row


def test_generate_from_precomputed_image_features_equals_from_pixels():
    model = generating_model()
    prompts, pixel_values = batch_of_two()
    input_ids, attention_mask = left_pad(prompts)
    text = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False)

    with torch.no_grad():
        features = model.get_image_features(pixel_values)
    with CallCounter(model.model.vision_model) as encoder:
        from_features = model.generate(**text, **features)
    from_pixels = model.generate(**text, pixel_values=pixel_values)

    assert encoder.calls == 0
    assert torch.equal(from_features, from_pixels)


def test_beam_search_from_precomputed_image_features_equals_from_pixels():
    """generate expands (B, ...) model kwargs per beam: features (B, T, D) and their mask must expand alike."""
    model = tiny_autoregressive_model()
    input_ids = torch.tensor([image_prompt(1, model.config.image_seq_len)])
    torch.manual_seed(3)
    pixel_values = torch.randn(1, 1, 3, 56, 42)
    from_pixels = model.generate(input_ids=input_ids, pixel_values=pixel_values, num_beams=2, max_new_tokens=5)
    features = model.get_image_features(pixel_values)
    from_features = model.generate(input_ids=input_ids, **features, num_beams=2, max_new_tokens=5)
    assert torch.equal(from_features, from_pixels)
