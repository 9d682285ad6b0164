"""The generation config every vlmforge checkpoint carries: `generate` stops at the end of a chat turn.

Idefics2's chat format ends every turn with `<end_of_utterance>` (`User:<image>…<end_of_utterance>\\nAssistant:`),
so a chat model answers and then emits `<end_of_utterance>`, not the tokenizer's `</s>`. Unless that id is an EOS
id of the checkpoint's `generation_config.json`, `generate` runs on into an invented next turn until
`max_new_tokens`. Everything that writes a checkpoint (the Idefics2 converter, the demo, the builder) calls
`chat_generation_config` so that no checkpoint leaves without it.
"""

from __future__ import annotations

import copy

from transformers import GenerationConfig, PreTrainedTokenizerBase

from vlmforge.processing.prompt_expansion import END_OF_UTTERANCE_TOKEN


def chat_generation_config(
    tokenizer: PreTrainedTokenizerBase, base: GenerationConfig | None = None
) -> GenerationConfig:
    """A copy of `base` whose `eos_token_id` also holds the tokenizer's EOS id and `<end_of_utterance>`'s id.

    Args:
        tokenizer: the checkpoint's tokenizer (as its `VLMProcessor` holds it, `<end_of_utterance>` included).
        base: the generation config to extend (the model's, or the source checkpoint's); a default one when None.

    Returns:
        A new `GenerationConfig`: `eos_token_id` is a list — `base`'s EOS ids first, then the tokenizer's, then
        `<end_of_utterance>`'s, without repeats; `pad_token_id` and `bos_token_id` are the tokenizer's where
        `base` has none. `base` is left unchanged.

    Raises:
        ValueError: the tokenizer has no `<end_of_utterance>` token (build the `VLMProcessor` first: it adds it).
    """
    vocab = tokenizer.get_vocab()
    if END_OF_UTTERANCE_TOKEN not in vocab:
        raise ValueError(
            f"The tokenizer has no {END_OF_UTTERANCE_TOKEN} token, so generation could not stop at the end of a turn. "
            "Use the tokenizer of a VLMProcessor, which adds the token (then resize the model's embeddings)."
        )
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    existing = config.eos_token_id
    existing = [] if existing is None else [existing] if isinstance(existing, int) else list(existing)
    candidates = [*existing, tokenizer.eos_token_id, vocab[END_OF_UTTERANCE_TOKEN]]
    config.eos_token_id = list(dict.fromkeys(i for i in candidates if i is not None))
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    config._from_model_config = False  # chosen on purpose, not derived from config.json: say so in the file
    return config


__all__ = ["chat_generation_config"]
