"""`VLMDataCollator`: conversations with images → a training batch with labels (Idefics2 paper, section 3.3:
instruction fine-tuning computes the loss on the answers only).

Each sample goes through the processor's chat template (`VLMProcessor.apply_chat_template`), so training sees
exactly the prompt format that inference builds:
`User:<image>…<end_of_utterance>\\nAssistant: …<end_of_utterance>\\n`.
The template's `{% generation %}` blocks mark each assistant answer *and* its closing `<end_of_utterance>` (the
model must learn to stop); everything else — role names, user turns, system prompts, image placeholders,
`<fake_token_around_image>` and padding — gets label -100, the only value transformers' loss ignores.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100

_INLINE_IMAGE_KEYS = ("image", "url", "path", "base64")


class VLMDataCollator:
    r"""Collate samples into `input_ids`, `attention_mask`, `labels`, `pixel_values`, `pixel_attention_mask` (and,
    for the cross-attention fusion, `image_attention_mask`) through a `VLMProcessor` and its chat template.

    Accepted samples (a batch may mix both):

    - the_cauldron schema: `{"images": [img, ...], "texts": [{"user": str, "assistant": str}, ...]}`. The images
      go at the start of the first user turn (as in Idefics2's fine-tuning); other keys (e.g. `"source"`) are
      ignored.
    - chat schema: `{"messages": [{"role": ..., "content": str | [parts]}, ...]}` with image parts
      `{"type": "image", "image": img}` inline, or bare `{"type": "image"}` parts filled in order from the sample's
      `"images"` list.

    An image is anything the processor takes (PIL image, array, tensor, bytes, local path).

    Args:
        processor: a `VLMProcessor` (built with `VLMProcessor.from_model_config(config, ...)` for the model trained).
        assistant_only_loss (`bool`, defaults to `True`): supervise only the assistant answers, each with its
            `<end_of_utterance>`; `False` supervises every text token (image placeholders and padding never).
        max_length (`int`, *optional*): truncate longer samples (right side). Truncation that would cut into an
            image's placeholders raises a `ValueError` naming the sample (the processor's check).
        do_image_splitting (`bool`, *optional*): per-call override of the image processor's setting.
        padding_side (`str`, *optional*): `"right"` (default for training) or `"left"`.
        pad_to_multiple_of (`int`, *optional*): pad the sequence length to a multiple of this.

    Returns (from `__call__`): a `BatchFeature` of tensors; `labels` (B, S) long, -100 where no loss is taken.

    Use with `transformers.Trainer`: pass `data_collator=VLMDataCollator(processor)` and set
    `TrainingArguments(remove_unused_columns=False, ...)` — otherwise Trainer drops the `images`/`texts`/`messages`
    columns (they are not arguments of the model's `forward`) before the collator sees them.

    Use with TRL's `SFTTrainer`: pass `data_collator=VLMDataCollator(processor)`, `processing_class=processor`
    and `SFTConfig(remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, ...)`, so that TRL
    neither tokenizes the dataset itself nor drops its raw columns. (TRL is not a dependency; the names are
    those of TRL's `SFTConfig`.)
    """

    def __init__(
        self,
        processor,
        *,
        assistant_only_loss: bool = True,
        max_length: int | None = None,
        do_image_splitting: bool | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}.")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}.")
        self.processor = processor
        self.assistant_only_loss = assistant_only_loss
        self.max_length = max_length
        self.do_image_splitting = do_image_splitting
        self.padding_side = padding_side or "right"
        self.pad_to_multiple_of = pad_to_multiple_of
        # ids that never carry loss, whatever the mode: image placeholders and the tokens framing them
        # (padding is found by the attention mask, not by id: a pad id may double as a real token)
        self.unsupervised_ids = sorted({processor.image_token_id, processor.fake_image_token_id})

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> Any:
        if not samples:
            raise ValueError("VLMDataCollator got an empty batch.")
        conversations = [to_conversation(sample, index) for index, sample in enumerate(samples)]
        processor_kwargs: dict[str, Any] = {
            "padding": True,
            "padding_side": self.padding_side,
        }
        if self.pad_to_multiple_of is not None:
            processor_kwargs["pad_to_multiple_of"] = self.pad_to_multiple_of
        if self.max_length is not None:
            processor_kwargs.update(truncation=True, max_length=self.max_length)
        if self.do_image_splitting is not None:
            processor_kwargs["do_image_splitting"] = self.do_image_splitting
        batch = self.processor.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=self.assistant_only_loss,
            return_tensors="pt",
            processor_kwargs=processor_kwargs,
        )
        batch["labels"] = self.labels(batch["input_ids"], batch["attention_mask"], batch.pop("assistant_masks", None))
        empty = (batch["labels"] == IGNORE_INDEX).all(dim=1).nonzero()[:, 0].tolist()
        if empty:
            # a batch with no supervised token at all has a 0/0 loss (NaN); name the samples before that happens
            logger.warning_once(
                f"VLMDataCollator: samples {empty} of a batch carry no loss (no assistant turn, or max_length="
                f"{self.max_length} cut it off)."
            )
        return batch

    def labels(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, assistant_masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, S) labels: `input_ids` with -100 on padding, image tokens and (given a mask) non-assistant tokens."""
        supervised = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(self.unsupervised_ids))
        if self.assistant_only_loss:
            if assistant_masks is None:
                raise ValueError("assistant_only_loss=True needs the chat template's assistant masks.")
            supervised &= torch.as_tensor(assistant_masks).bool()
        return input_ids.masked_fill(~supervised, IGNORE_INDEX)


def supervised_fraction(batch: Mapping[str, Any]) -> float:
    """Share of the batch's real (non-padding) tokens that carry loss: labels != -100 over attention_mask == 1.

    The labels are the inputs (transformers shifts them inside the loss), so this counts target tokens.
    """
    labels = torch.as_tensor(batch["labels"])
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        real = torch.ones_like(labels, dtype=torch.bool)
    else:
        real = torch.as_tensor(attention_mask).bool()
    total = int(real.sum())
    return float(((labels != IGNORE_INDEX) & real).sum()) / total if total else 0.0


# ---- sample schemas → one conversation --------------------------------------------------------------------------


def to_conversation(sample: Mapping[str, Any], index: int = 0) -> list[dict]:
    """One sample (the_cauldron or chat schema) → a chat-template conversation with every image inline."""
    if not isinstance(sample, Mapping):
        raise TypeError(f"Sample {index}: expected a dict, got {type(sample).__name__}.")
    if "messages" in sample:
        return _chat_conversation(sample, index)
    if "texts" in sample:
        return _cauldron_conversation(sample, index)
    raise ValueError(
        f"Sample {index} has keys {sorted(sample)}; expected the chat schema {{'messages': [...]}} (images inline or "
        "in an 'images' list) or the_cauldron schema {'images': [...], 'texts': [{'user': ..., 'assistant': ...}]}."
    )


def _images_of(sample: Mapping[str, Any], index: int) -> list:
    images = sample.get("images")
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        images = [images]
    return list(images)


def _cauldron_conversation(sample: Mapping[str, Any], index: int) -> list[dict]:
    texts = sample["texts"]
    if isinstance(texts, Mapping):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError(
            f"Sample {index}: 'texts' must be a non-empty list of {{'user': ..., 'assistant': ...}} turns."
        )
    images = _images_of(sample, index)
    conversation = []
    for turn_index, turn in enumerate(texts):
        if not isinstance(turn, Mapping) or "user" not in turn or "assistant" not in turn:
            raise ValueError(
                f"Sample {index}, turn {turn_index}: expected a dict with 'user' and 'assistant', got {turn!r:.200}."
            )
        content = [{"type": "image", "image": image} for image in (images if turn_index == 0 else [])]
        content.append({"type": "text", "text": str(turn["user"])})
        conversation.append({"role": "user", "content": content})
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": str(turn["assistant"])}]})
    return conversation


def _chat_conversation(sample: Mapping[str, Any], index: int) -> list[dict]:
    messages = sample["messages"]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"Sample {index}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}}.")
    pending = _images_of(sample, index)
    given = len(pending)
    conversation = []
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"Sample {index}: every message needs a 'role' and 'content', got {message!r:.200}.")
        content = message.get("content")
        if content is None:
            content = []
        if isinstance(content, str):
            conversation.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content:
            part = dict(part)  # never modify the dataset's dicts
            if part.get("type") == "image" and not any(key in part for key in _INLINE_IMAGE_KEYS):
                if not pending:
                    raise ValueError(
                        f"Sample {index}: its messages have more image parts than the {given} images in its 'images' "
                        "list; give each {'type': 'image'} part an image inline or one entry in 'images'."
                    )
                part["image"] = pending.pop(0)
            parts.append(part)
        conversation.append({"role": message["role"], "content": parts})
    if pending:
        raise ValueError(
            f"Sample {index}: {len(pending)} of its {given} 'images' have no {{'type': 'image'}} part in its messages; "
            "expected one image part per image."
        )
    return conversation


__all__ = ["IGNORE_INDEX", "VLMDataCollator", "supervised_fraction", "to_conversation"]
