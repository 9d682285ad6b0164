"""Prompt expansion: how a fusion architecture writes its images into the text (Idefics2 paper, section 3.1).

The user writes one `<image>` per image. Each fusion architecture turns it into its own placeholders:

- fully autoregressive (`AutoregressivePromptExpansion`): `<fake_token_around_image>` + `<image>`×n per
  (sub-)image, adjacent fake tokens merged, exactly as transformers' `Idefics2Processor` writes them; the model
  overwrites the `<image>` embeddings with the visual tokens;
- cross-attention (issue 4): one marker per image plus an `image_attention_mask` built from the token ids.

Each form is a small strategy class registered under its config's `model_type` in `PROMPT_EXPANSIONS`, so the
processor picks one with a dict lookup, never an `if` ladder. A new form subclasses `PromptExpansion`,
implements `replacement` (and, if it needs more model inputs, `extra_inputs`), and decorates itself with
`@register_prompt_expansion`.
"""

from dataclasses import dataclass
from typing import Any

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
# Idefics2's order when a tokenizer lacks them: fake and image first, then end of utterance
IMAGE_SPECIAL_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN)


@dataclass(frozen=True)
class ImageTokenIds:
    """Token ids of the three special tokens, as the processor's tokenizer assigns them."""

    image: int
    fake_image: int
    end_of_utterance: int


class PromptExpansion:
    """Strategy: one fusion architecture's way of writing images into a prompt.

    Subclasses set `model_type` (the model config's) and implement `replacement`; `expand` does the
    bookkeeping that every form shares (placeholder order, character offsets for assistant masks).
    Options that come from the model config (e.g. the cross-attention image rule) arrive as keyword
    arguments of `__init__`, returned by `options_from_config`, and travel in `processor_config.json`.
    """

    model_type: str = ""

    def __init__(self, token_ids: ImageTokenIds) -> None:
        self.token_ids = token_ids

    @classmethod
    def options_from_config(cls, config: Any) -> dict:
        """Strategy options a model config dictates (saved with the processor and checked on load)."""
        return {}

    @property
    def placeholder_tokens(self) -> dict[str, int]:
        """Tokens whose count in `input_ids` must equal their count in the expanded text (truncation check)."""
        return {IMAGE_TOKEN: self.token_ids.image}

    def replacement(self, sub_image_tokens: list[int], *, before: str, after: str) -> str:
        """The text that replaces one `<image>`.

        Args:
            sub_image_tokens: visual tokens of each of the image's sub-images (5 with splitting, else 1).
            before: the already-expanded text in front of this placeholder.
            after: the raw text behind it.
        """
        raise NotImplementedError

    def expand(self, sample: str, images: list[list[int]]) -> tuple[str, list[dict]]:
        """Replace the i-th `<image>` of `sample` by the placeholders of `images[i]`.

        Returns the expanded text and, per placeholder, transformers' replacement-offset record
        (`type`, `span`, `new_span`, `text`, `replacement`), which `apply_chat_template` uses to shift
        assistant masks past the expansion.
        """
        pieces = sample.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(images):
            raise ValueError(
                f"The text has {len(pieces) - 1} {IMAGE_TOKEN} tokens but {len(images)} images were given."
            )
        expanded, offsets = [pieces[0]], []
        position, new_position = len(pieces[0]), len(pieces[0])
        for sub_image_tokens, after in zip(images, pieces[1:]):
            before = next((piece for piece in reversed(expanded) if piece), "")
            text = self.replacement(sub_image_tokens, before=before, after=after)
            offsets.append(
                {
                    "type": "image",
                    "span": (position, position + len(IMAGE_TOKEN)),
                    "new_span": (new_position, new_position + len(text)),
                    "text": IMAGE_TOKEN,
                    "replacement": text,
                }
            )
            expanded += [text, after]
            position += len(IMAGE_TOKEN) + len(after)
            new_position += len(text) + len(after)
        return "".join(expanded), offsets

    def extra_inputs(self, input_ids: list[list[int]], *, images_per_sample: list[int]) -> dict:
        """Model inputs besides `input_ids` that this form derives from the token ids (none by default)."""
        return {}


PROMPT_EXPANSIONS: dict[str, type[PromptExpansion]] = {}


def register_prompt_expansion(cls: type[PromptExpansion]) -> type[PromptExpansion]:
    """Class decorator: make `cls` the prompt form of models whose config has `model_type == cls.model_type`."""
    if not cls.model_type:
        raise ValueError(f"{cls.__name__} must set `model_type` to the model config's model_type.")
    PROMPT_EXPANSIONS[cls.model_type] = cls
    return cls


def prompt_expansion_class(fusion: str) -> type[PromptExpansion]:
    """The strategy class registered for a model type; a ValueError listing the known ones otherwise."""
    if fusion not in PROMPT_EXPANSIONS:
        raise ValueError(f"No prompt expansion for model type {fusion!r}; known: {sorted(PROMPT_EXPANSIONS)}.")
    return PROMPT_EXPANSIONS[fusion]


@register_prompt_expansion
class AutoregressivePromptExpansion(PromptExpansion):
    """`<fake_token_around_image>` `<image>`×n per sub-image, fake tokens shared between neighbours.

    Reproduces `Idefics2Processor`: an image with sub-images of n₁…n₅ tokens becomes
    `F I×n₁ F I×n₂ F … I×n₅ F`; an image right after another one reuses its closing `F`; a closing `F`
    followed by a character that is neither whitespace nor `<` gets a space after it, so the next word
    keeps its word-boundary tokenization. (transformers also merges fake tokens the user typed literally;
    we only merge the ones we write.)
    """

    model_type = "vlmforge_autoregressive"

    @property
    def placeholder_tokens(self) -> dict[str, int]:
        return {IMAGE_TOKEN: self.token_ids.image, FAKE_IMAGE_TOKEN: self.token_ids.fake_image}

    def replacement(self, sub_image_tokens: list[int], *, before: str, after: str) -> str:
        body = FAKE_IMAGE_TOKEN.join(IMAGE_TOKEN * n for n in sub_image_tokens)
        # a sub-image without tokens would leave two fake tokens side by side: merge them as transformers does
        text = f"{FAKE_IMAGE_TOKEN}{body}{FAKE_IMAGE_TOKEN}".replace(FAKE_IMAGE_TOKEN * 2, FAKE_IMAGE_TOKEN)
        if before.endswith(FAKE_IMAGE_TOKEN):
            text = text[len(FAKE_IMAGE_TOKEN) :]
        if after.startswith(FAKE_IMAGE_TOKEN):
            text = text[: -len(FAKE_IMAGE_TOKEN)]
        elif after and not after[0].isspace() and after[0] != "<":
            text += " "
        return text


__all__ = [
    "END_OF_UTTERANCE_TOKEN",
    "FAKE_IMAGE_TOKEN",
    "IMAGE_SPECIAL_TOKENS",
    "IMAGE_TOKEN",
    "PROMPT_EXPANSIONS",
    "AutoregressivePromptExpansion",
    "ImageTokenIds",
    "PromptExpansion",
    "prompt_expansion_class",
    "register_prompt_expansion",
]
