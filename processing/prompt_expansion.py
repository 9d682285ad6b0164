"""Prompt expansion: how a fusion architecture writes its images into the text (Idefics2 paper, section 3.1).

The user writes one `<image>` per image. Each fusion architecture turns it into its own placeholders:

- fully autoregressive (`AutoregressivePromptExpansion`): `<fake_token_around_image>` + `<image>`×n per
  (sub-)image, adjacent fake tokens merged, exactly as transformers' `Idefics2Processor` writes them; the model
  overwrites the `<image>` embeddings with the visual tokens;
- cross-attention (`CrossAttentionPromptExpansion`): one `<image>` marker per image (per group of sub-images
  when splitting) plus an `image_attention_mask` that says which text token may attend to which sub-image,
  built from the marker positions in the final, padded token ids.

Each form is a small strategy class registered under its config's `model_type` in `PROMPT_EXPANSIONS`, so the
processor picks one with a dict lookup, never an `if` ladder. A new form subclasses `PromptExpansion`,
implements `replacement` (and, if it needs more model inputs, `image_inputs`), and decorates
itself with `@register_prompt_expansion`.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

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

    def image_inputs(
        self,
        input_ids: list[list[int]],
        *,
        attention_mask: list[list[int]] | None,
        images_per_sample: list[int],
        sub_images_per_image: int,
    ) -> dict:
        """Model inputs that relate the tokens to the processed sub-images (none by default).

        Called only when the batch has images. It sees how they lie in `pixel_values` (B, N, 3, H, W): image k
        of a sample is sub-images `k * sub_images_per_image` … `(k + 1) * sub_images_per_image - 1`, and
        N = max(images_per_sample) * sub_images_per_image (samples with fewer images are padded with blank
        sub-images). `attention_mask` (None if the caller asked for none) marks padding tokens with 0.
        """
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


IMAGE_RULES = ("latest", "all_previous")


@register_prompt_expansion
class CrossAttentionPromptExpansion(PromptExpansion):
    """One `<image>` marker per image, and `image_attention_mask` for the cross-attention blocks.

    The visual tokens never enter the text: the model's cross-attention blocks read them, and the marker only
    records *where* in the text an image appears (Flamingo, Idefics1). With splitting, the image's 5 sub-images
    share one marker: they are one image to the text. Unlike Idefics1 we write no `<fake_token_around_image>`
    around the marker; a single learned token already delimits the image, and the fake tokens would only cost
    two positions per image. The text tokens around the marker are tokenized exactly as in the autoregressive
    form (same word-boundary space), so both fusions train on the same text tokens (the paper's Finding 2
    compares them on the same data).

    `image_attention_mask[b, t, n]` is 1 where token t of sample b may attend to sub-image n:

    - `image_rule="latest"` (Flamingo, Idefics1): t sees only the image of the last marker at or before t;
    - `image_rule="all_previous"`: t sees every image whose marker is at or before t.

    Tokens before the first marker, text-only samples, padding tokens and padding sub-images get zeros, so the
    model can give those tokens exactly zero from cross-attention.
    """

    model_type = "vlmforge_cross_attention"

    def __init__(self, token_ids: ImageTokenIds, *, image_rule: str = "latest") -> None:
        if image_rule not in IMAGE_RULES:
            raise ValueError(f"image_rule must be one of {IMAGE_RULES}, got {image_rule!r}.")
        super().__init__(token_ids)
        self.image_rule = image_rule

    @classmethod
    def options_from_config(cls, config: Any) -> dict:
        return {"image_rule": config.image_rule}

    def replacement(self, sub_image_tokens: list[int], *, before: str, after: str) -> str:
        # the autoregressive form's word-boundary rule, so the text after an image tokenizes the same in both forms
        if after and not after[0].isspace() and after[0] != "<":
            return IMAGE_TOKEN + " "
        return IMAGE_TOKEN

    def image_inputs(
        self,
        input_ids: list[list[int]],
        *,
        attention_mask: list[list[int]] | None,
        images_per_sample: list[int],
        sub_images_per_image: int,
    ) -> dict:
        """`image_attention_mask`: per sample a (T, N) list of 0/1 rows, N = max(images_per_sample) × sub-images.

        Computed from the final token ids, so left and right padding both come out right. Raises ValueError
        if a sample's marker count differs from its image count (e.g. ids built by hand or cut elsewhere).
        """
        n_columns = max(images_per_sample, default=0) * sub_images_per_image
        image_of_column = np.arange(n_columns) // sub_images_per_image  # (N,): the image each sub-image is of
        masks = []
        for s, (ids, n_images) in enumerate(zip(input_ids, images_per_sample)):
            ids = np.asarray(ids)
            real = np.ones(len(ids), bool) if attention_mask is None else np.asarray(attention_mask[s], bool)
            is_marker = (ids == self.token_ids.image) & real  # (T,)
            n_markers = int(is_marker.sum())
            if n_markers != n_images:
                raise ValueError(
                    f"Sample {s}: the token ids hold {n_markers} {IMAGE_TOKEN} markers but {n_images} images were "
                    f"given; the cross-attention prompt needs exactly one {IMAGE_TOKEN} marker per image."
                )
            # index of the latest image at or before each token: -1 before the first marker, so those rows stay zero
            latest = np.cumsum(is_marker) - 1  # (T,)
            if self.image_rule == "latest":
                mask = latest[:, None] == image_of_column[None, :]  # (T, N)
            else:
                mask = latest[:, None] >= image_of_column[None, :]  # (T, N)
            # latest < n_images, so the padding sub-images of a sample with fewer images are never selected
            masks.append((mask & real[:, None]).astype(np.int64).tolist())
        return {"image_attention_mask": masks}


__all__ = [
    "END_OF_UTTERANCE_TOKEN",
    "FAKE_IMAGE_TOKEN",
    "IMAGE_RULES",
    "IMAGE_SPECIAL_TOKENS",
    "IMAGE_TOKEN",
    "PROMPT_EXPANSIONS",
    "AutoregressivePromptExpansion",
    "CrossAttentionPromptExpansion",
    "ImageTokenIds",
    "PromptExpansion",
    "prompt_expansion_class",
    "register_prompt_expansion",
]
