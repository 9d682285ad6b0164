"""A tiny tokenizer built offline in milliseconds, for the demo and the tests.

Nothing can be downloaded from a model hub here, yet a processor needs a tokenizer. This one is a
character-level BPE trained on a built-in English paragraph, with the Idefics2 special tokens appended as
the last three ids: `<end_of_utterance>` = vocab_size - 3, `<fake_token_around_image>` = vocab_size - 2,
`<image>` = vocab_size - 1. It is not a language tokenizer for real models.
"""

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

IMAGE_SPECIAL_TOKENS = ("<end_of_utterance>", "<fake_token_around_image>", "<image>")
BASE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

_CORPUS = """
User: what do you see in this image? Assistant: a woman in a navy uniform with medals, looking at the camera.
The photograph shows a person in front of a flag. Describe the picture in one sentence. How many people are there?
What colour is the background? Read the text in the image. Is it day or night? The cat sits on the mat near the door.
Vision and language models answer questions about images, read documents, charts and screens, and describe scenes.
"""


def build_toy_tokenizer(vocab_size: int = 100, *, extra_corpus: str = "") -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` of exactly `vocab_size` ids, the three image tokens last.

    Ids 0-3 are `<pad>`, `<s>` (bos), `</s>` (eos) and `<unk>`. Training is deterministic, so two calls
    give the same ids. `extra_corpus` is trained on as well, weighted like the built-in paragraph, so a task's
    own words (e.g. `synthetic_vqa.vocabulary_text()`) become whole tokens when `vocab_size` allows.
    """
    corpus = _CORPUS + extra_corpus
    reserved = len(BASE_SPECIAL_TOKENS) + len(IMAGE_SPECIAL_TOKENS)
    alphabet = sorted(set(corpus.lower()) - {" ", "\n"})
    if vocab_size < reserved + len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the special tokens and the {len(alphabet)}-character alphabet "
            f"need at least {reserved + len(alphabet)} ids."
        )
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(IMAGE_SPECIAL_TOKENS),
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator([corpus] * 4, trainer=trainer)
    # a small corpus can run out of merges before the target size: pad with unused filler tokens
    missing = vocab_size - len(IMAGE_SPECIAL_TOKENS) - tokenizer.get_vocab_size()
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(missing)])
    tokenizer.add_special_tokens(list(IMAGE_SPECIAL_TOKENS))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(IMAGE_SPECIAL_TOKENS),
    )
    fast.add_bos_token = True
    return fast
