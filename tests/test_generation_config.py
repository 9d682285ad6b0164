"""Checkpoints stop generating at <end_of_utterance>: `chat_generation_config` and what `generate` does with it."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast

import vlmforge
from conftest import VOCAB_SIZE, image_prompt, left_pad, random_images, tiny_autoregressive_model
from vlmforge.conversion.generation_config import chat_generation_config
from vlmforge.toy_tokenizer import build_toy_tokenizer

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
END_OF_UTTERANCE_ID = VOCAB_SIZE - 3  # the toy tokenizer's


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer(VOCAB_SIZE)


def test_eos_ids_are_the_tokenizers_and_end_of_utterance(tokenizer):
    config = chat_generation_config(tokenizer)
    assert config.eos_token_id == [EOS_ID, END_OF_UTTERANCE_ID]
    assert (config.pad_token_id, config.bos_token_id) == (PAD_ID, BOS_ID)


def test_the_base_configs_settings_and_eos_ids_are_kept_first_without_repeats(tokenizer):
    base = GenerationConfig(eos_token_id=5, pad_token_id=7, max_new_tokens=9)
    config = chat_generation_config(tokenizer, base)
    assert config.eos_token_id == [5, EOS_ID, END_OF_UTTERANCE_ID]
    assert (config.pad_token_id, config.max_new_tokens) == (7, 9)
    assert base.eos_token_id == 5  # a copy: the caller's config is unchanged
    again = chat_generation_config(tokenizer, config)
    assert again.eos_token_id == [5, EOS_ID, END_OF_UTTERANCE_ID]


def test_a_tokenizer_without_end_of_utterance_is_refused():
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")), eos_token="</s>"
    )
    with pytest.raises(ValueError, match="no <end_of_utterance> token"):
        chat_generation_config(plain)


class ScriptedTokens(LogitsProcessor):
    """Forces row b to emit script[b][t] at generation step t, whatever the (random) model prefers."""

    def __init__(self, scripts: list[list[int]], prompt_length: int) -> None:
        self.scripts, self.prompt_length = scripts, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        for row, script in enumerate(self.scripts):
            forced[row, script[step]] = 0.0
        return forced


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, tokenizer):
    """A tiny model saved with the generation config every vlmforge checkpoint writer gives it."""
    folder = tmp_path_factory.mktemp("checkpoint")
    model = tiny_autoregressive_model()
    model.generation_config = chat_generation_config(tokenizer, model.generation_config)
    model.save_pretrained(folder)
    return folder


def generate_scripted(model, scripts, **generate_kwargs) -> list[list[int]]:
    """Greedy generation from two prompts with one image each; returns the new tokens of each row."""
    input_ids, attention_mask = left_pad([image_prompt(1, 4), image_prompt(1, 4, text=(5, 6, 7, 8, 9))])
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=random_images(2).unsqueeze(1),  # (B, 1 image, 3, H, W)
            logits_processor=LogitsProcessorList([ScriptedTokens(scripts, input_ids.shape[1])]),
            do_sample=False,
            max_new_tokens=6,
            **generate_kwargs,
        )
    return output[:, input_ids.shape[1] :].tolist()


def test_generate_stops_each_row_at_end_of_utterance(saved_checkpoint):
    model = vlmforge.AutoModelForVision2Seq.from_pretrained(saved_checkpoint).eval()
    assert GenerationConfig.from_pretrained(saved_checkpoint).eos_token_id == [EOS_ID, END_OF_UTTERANCE_ID]
    scripts = [[5, END_OF_UTTERANCE_ID, 6, 6, 6, 6], [5, 6, 7, END_OF_UTTERANCE_ID, 6, 6]]
    # row 0 is padded once it has stopped; generation ends when row 1 emits <end_of_utterance> too
    assert generate_scripted(model, scripts) == [
        [5, END_OF_UTTERANCE_ID, PAD_ID, PAD_ID],
        [5, 6, 7, END_OF_UTTERANCE_ID],
    ]
    # the tokenizer's own EOS still stops generation
    assert generate_scripted(model, [[EOS_ID] * 6, [5, EOS_ID, 6, 6, 6, 6]]) == [[EOS_ID, PAD_ID], [5, EOS_ID]]


def test_without_end_of_utterance_in_the_eos_ids_generation_runs_on(saved_checkpoint):
    """The control: with only the tokenizer's EOS (what checkpoints carried before), <end_of_utterance> is just a
    token and generation runs to max_new_tokens — so the test above is the generation config's doing."""
    model = vlmforge.AutoModelForVision2Seq.from_pretrained(saved_checkpoint).eval()
    scripts = [[5, END_OF_UTTERANCE_ID, 6, 6, 6, 6], [5, 6, 7, END_OF_UTTERANCE_ID, 6, 6]]
    assert generate_scripted(model, scripts, eos_token_id=EOS_ID) == scripts
