"""`VLMProcessor`: image processor + tokenizer + chat template (Idefics2 paper, sections 3 and 4, Findings 4–6).

One call turns images and text into model inputs: the images go through the image processor (native resolution,
optional 4 crops + whole image), and every `<image>` in the text becomes the fusion architecture's placeholders
(`prompt_expansion.py`), counted from what the image processor actually produced under the *per-call* settings:

    autoregressive:   <image>  →  <fake_token_around_image> <image>×image_seq_len <fake_token_around_image>
                                  per (sub-)image
    cross-attention:  <image>  →  <image> (one marker per image), plus `image_attention_mask` (B, T, N)

`image_seq_len` (None: one token per real 14 px patch, for `pooling="none"`), `patch_size` and the fusion type
come from the model config (`VLMProcessor.from_model_config`); `from_pretrained` re-checks them, and the image
token ids, against a `config.json` saved beside the processor, so a processor and a model can never silently
disagree on how many placeholders an image gets.
"""

import json
import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin
from transformers.utils import cached_file

from .prompt_expansion import (
    END_OF_UTTERANCE_TOKEN,
    FAKE_IMAGE_TOKEN,
    IMAGE_SPECIAL_TOKENS,
    IMAGE_TOKEN,
    PROMPT_EXPANSIONS,
    ImageTokenIds,
    prompt_expansion_class,
)

# Idefics2's chat format (`User:<image>Question<end_of_utterance>\nAssistant: Answer<end_of_utterance>\n`),
# rendering exactly what the idefics2-8b template renders, plus: string content, empty content, and a
# `{% generation %}` block around each assistant answer so `return_assistant_tokens_mask=True` marks it
# (its <end_of_utterance> included: the model must learn to stop).
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<end_of_utterance>' -}}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if content is string -%}{%- set content = [{'type': 'text', 'text': content}] -%}{%- endif -%}"
    "{{- message['role'] | capitalize -}}"
    "{%- if content and content[0]['type'] == 'image' -%}{{- ':' -}}{%- else -%}{{- ': ' -}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render_content(content) -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- render_content(content) -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


class VLMImagesKwargs(ImagesKwargs, total=False):
    """
    do_image_splitting (`bool`, *optional*):
        Split each image into 4 crops + the whole image for this call; drives the pixels *and* the placeholders.
    """

    do_image_splitting: bool | None


class VLMProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: VLMImagesKwargs


def processor_settings_from_config(config: Any) -> dict:
    """The processor settings a model config dictates: its one source of truth for the prompt layout.

    Works for any of our model configs (autoregressive or cross-attention): `image_seq_len` is the config's
    (None when the connector does not pool, because every real patch of each sub-image then becomes a token),
    `patch_size` the vision encoder's, `fusion` the config's `model_type`.
    """
    expansion = prompt_expansion_class(config.model_type)
    pooled = config.connector_config.pooling != "none"
    return {
        "image_seq_len": config.image_seq_len if pooled else None,
        "patch_size": config.vision_config.patch_size,
        "fusion": config.model_type,
        "fusion_options": expansion.options_from_config(config) or None,
    }


class VLMProcessor(ProcessorMixin):
    r"""Image processor + tokenizer + chat template for vlmforge models (and Idefics2 checkpoints).

    Args:
        image_processor: a `VLMImageProcessor` (any transformers image processor with Idefics2's output
            layout and a `do_image_splitting` option works).
        tokenizer: any transformers tokenizer; `<fake_token_around_image>`, `<image>` and
            `<end_of_utterance>` are added when missing (resize the model's embeddings afterwards).
        image_seq_len (`int` or `None`, defaults to 64): visual tokens per (sub-)image; `None` means one per real
            `patch_size` patch (connector without pooling). Take it from the model: `from_model_config`.
        patch_size (`int`, defaults to 14): the vision encoder's patch side (used when `image_seq_len` is None).
        fusion (`str`, defaults to `"vlmforge_autoregressive"`): the model config's `model_type`; selects the
            prompt form in `PROMPT_EXPANSIONS`.
        fusion_options (`dict`, *optional*): options of that prompt form (set from the model config).
        chat_template (`str`, *optional*): Jinja template; defaults to Idefics2's format (`CHAT_TEMPLATE`).

    Call: `processor(images=..., text=..., do_image_splitting=..., padding=..., return_tensors="pt")` returns
    `input_ids`, `attention_mask`, `pixel_values` (B, N_img, 3, H, W) and `pixel_attention_mask` (B, N_img, H, W);
    for the cross-attention fusion also `image_attention_mask` (B, T, N_img), 1 where a token may see a sub-image.
    """

    valid_processor_kwargs = VLMProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_len: int | None = 64,
        patch_size: int = 14,
        fusion: str = "vlmforge_autoregressive",
        fusion_options: dict | None = None,
        chat_template: str | None = None,
    ) -> None:
        if image_seq_len is not None and (not isinstance(image_seq_len, int) or image_seq_len < 1):
            raise ValueError(
                f"image_seq_len must be a positive int or None (one token per patch), got {image_seq_len!r}."
            )
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}.")
        if tokenizer is None:
            raise ValueError("VLMProcessor needs a tokenizer.")
        missing = [token for token in IMAGE_SPECIAL_TOKENS if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        self.image_seq_len = image_seq_len
        self.patch_size = patch_size
        self.fusion = fusion
        self.fusion_options = fusion_options
        self.image_token, self.fake_image_token, self.end_of_utterance_token = (
            IMAGE_TOKEN,
            FAKE_IMAGE_TOKEN,
            END_OF_UTTERANCE_TOKEN,
        )
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.fake_image_token_id = tokenizer.convert_tokens_to_ids(FAKE_IMAGE_TOKEN)
        self.end_of_utterance_token_id = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE_TOKEN)
        token_ids = ImageTokenIds(self.image_token_id, self.fake_image_token_id, self.end_of_utterance_token_id)
        self.prompt_expansion = prompt_expansion_class(fusion)(token_ids, **(fusion_options or {}))
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    # ---- the model config: one source of truth --------------------------------------------------------------

    @classmethod
    def from_model_config(cls, config: Any, image_processor, tokenizer, chat_template: str | None = None):
        """A processor whose prompt layout is the model's: image_seq_len, patch size and fusion from `config`.

        Raises ValueError if the tokenizer's image token ids are not the config's.
        """
        settings = processor_settings_from_config(config)
        processor = cls(image_processor, tokenizer, chat_template=chat_template, **settings)
        processor.check_model_config(config)
        return processor

    def check_model_config(self, config: Any) -> None:
        """Raise ValueError, listing every difference, if this processor would build prompts `config` can't use."""
        expected = processor_settings_from_config(config)
        expected["image_token_id"] = config.image_token_id
        differences = [
            f"{name}: processor {getattr(self, name)!r}, model {value!r}"
            for name, value in expected.items()
            if getattr(self, name) != value
        ]
        vocab_size = config.get_text_config().vocab_size
        ids = (self.fake_image_token_id, self.image_token_id, self.end_of_utterance_token_id)
        too_large = {token: i for token, i in zip(IMAGE_SPECIAL_TOKENS, ids) if i >= vocab_size}
        if too_large:
            differences.append(f"token ids {too_large} are outside the model's vocabulary (vocab_size={vocab_size})")
        if differences:
            raise ValueError(
                f"The processor does not match the model config ({config.model_type}): {'; '.join(differences)}. "
                "Build the processor with VLMProcessor.from_model_config(config, image_processor, tokenizer) so that "
                "the model config is the one source of these settings."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "VLMProcessor":
        """Load as transformers does, then check the processor against a model `config.json` in the same place.

        A checkpoint folder holds both; if the config is one of ours and disagrees on image_seq_len, patch size,
        fusion or image token ids, this raises a ValueError instead of returning a processor whose prompts the
        model would reject (or silently misread).
        """
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        config = _model_config_beside(pretrained_model_name_or_path, **kwargs)
        if config is not None:
            processor.check_model_config(config)
        return processor

    # ---- processing ------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """Process a batch: `text` a string or list of strings; `images` one image, a flat list (assigned to the
        `<image>` tokens in order), or one list per sample (empty for a text-only sample). An image is a PIL image,
        a numpy array or torch tensor (HWC or CHW), encoded bytes, or a local file path.
        """
        if images is None and text is None:
            raise ValueError("VLMProcessor needs `text`, `images` or both.")
        merged = self._merge_kwargs(VLMProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        return_offsets = text_kwargs.pop("return_text_replacement_offsets", merged["return_text_replacement_offsets"])
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", merged["return_mm_token_type_ids"])

        texts = _text_batch(text)
        batch_images = _nest_images(images, texts)
        data, plans = {}, [[] for _ in texts or []]
        if batch_images is not None and any(batch_images):
            do_image_splitting = images_kwargs.pop("do_image_splitting", None)
            if do_image_splitting is None:
                do_image_splitting = self.image_processor.do_image_splitting
            # the image processor decodes bytes and paths and rejects bad images, naming the sample and image
            image_inputs = self.image_processor(batch_images, do_image_splitting=do_image_splitting, **images_kwargs)
            data.update(image_inputs)
            if texts is not None:
                plans = self._sub_image_tokens(image_inputs, [len(s) for s in batch_images], do_image_splitting)
        if texts is not None:
            expanded = [self.prompt_expansion.expand(sample, plan) for sample, plan in zip(texts, plans)]
            prompts = [prompt for prompt, _ in expanded]
            text_inputs = self.tokenizer(prompts, **text_kwargs)
            self._check_placeholders_survived(prompts, text_inputs["input_ids"], text_kwargs)
            data.update(text_inputs)
            images_per_sample = [len(plan) for plan in plans]
            if any(images_per_sample):
                # every image of a batch has the same number of sub-images (1, or 5 when splitting)
                sub_images_per_image = next(len(image) for plan in plans for image in plan)
                data.update(
                    self.prompt_expansion.image_inputs(
                        text_inputs["input_ids"],
                        attention_mask=text_inputs.get("attention_mask"),
                        images_per_sample=images_per_sample,
                        sub_images_per_image=sub_images_per_image,
                    )
                )
            if return_offsets:
                data["text_replacement_offsets"] = [offsets for _, offsets in expanded]
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = self.create_mm_token_type_ids(text_inputs["input_ids"])
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _sub_image_tokens(self, image_inputs: dict, images_per_sample: list[int], split: bool) -> list[list[list[int]]]:
        """Visual tokens of every sub-image of every image: plans[sample][image] = [n per sub-image]."""
        sub_images = 5 if split else 1
        pixel_values = image_inputs["pixel_values"]
        if len(pixel_values) and len(pixel_values[0]) != max(images_per_sample) * sub_images:
            raise ValueError(
                f"The image processor returned {len(pixel_values[0])} sub-images per sample; expected "
                f"{max(images_per_sample) * sub_images} ({max(images_per_sample)} images × {sub_images}) with "
                f"do_image_splitting={split}."
            )
        if self.image_seq_len is not None:
            return [[[self.image_seq_len] * sub_images for _ in range(n)] for n in images_per_sample]
        # no pooling: every patch whose pixels are all real becomes a token, as the model's patch mask says
        mask = image_inputs.get("pixel_attention_mask")
        if mask is None:
            raise ValueError(
                "image_seq_len=None (one token per patch) needs the image processor's pixel_attention_mask "
                "(do_pad=True)."
            )
        mask = np.asarray(mask).astype(bool)  # (B, N, H, W)
        heights, widths = mask.any(axis=-1).sum(axis=-1), mask.any(axis=-2).sum(axis=-1)  # (B, N)
        patches = (heights // self.patch_size) * (widths // self.patch_size)
        return [
            [patches[s, k * sub_images : (k + 1) * sub_images].tolist() for k in range(n)]
            for s, n in enumerate(images_per_sample)
        ]

    def _check_placeholders_survived(self, prompts: list[str], input_ids: list[list[int]], text_kwargs: dict) -> None:
        """Truncation must never cut inside (or drop) an image's placeholders: the model would misplace its features."""
        for s, (prompt, ids) in enumerate(zip(prompts, input_ids)):
            ids = list(ids)
            for token, token_id in self.prompt_expansion.placeholder_tokens.items():
                if ids.count(token_id) == prompt.count(token):
                    continue
                needed = sum(prompt.count(t) for t in self.prompt_expansion.placeholder_tokens)
                add_special = text_kwargs.get("add_special_tokens", True)
                full_length = len(self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
                limit = text_kwargs.get("max_length") or self.tokenizer.model_max_length
                raise ValueError(
                    f"Sample {s}: truncation to max_length={limit} would cut into its images' placeholders: its "
                    f"images need {needed} placeholder tokens and the whole sample {full_length} tokens, but the "
                    f"limit is {limit}. Raise max_length, shorten the text, pass fewer images, or use "
                    "do_image_splitting=False."
                )

    def num_image_tokens(self, height: int, width: int, do_image_splitting: bool | None = None) -> int:
        """Visual tokens an image of this size costs with this processor's settings, before processing it."""
        return self.image_processor.num_image_tokens(
            height,
            width,
            image_seq_len=self.image_seq_len,
            patch_size=self.patch_size,
            do_image_splitting=do_image_splitting,
        )


# ---- input normalisation: every error names the sample ----------------------------------------------------------

_SINGLE_IMAGE_TYPES = (Image.Image, np.ndarray, torch.Tensor, bytes, bytearray, str, os.PathLike)


def _is_stack(images: Any) -> bool:
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4


def _is_sample_list(images: Any) -> bool:
    """One sample's images: a list of them, or a stacked (N, ...) array."""
    return isinstance(images, (list, tuple)) or _is_stack(images)


def _text_batch(text) -> list[str] | None:
    if text is None:
        return None
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}.")
    for s, sample in enumerate(texts):
        if not isinstance(sample, str):
            raise TypeError(f"Sample {s}: text must be a string, got {type(sample).__name__}.")
    return list(texts)


def _nest_images(images, texts: list[str] | None) -> list[list[Any]] | None:
    """One list of images per sample, checked against the `<image>` count of each sample's text."""
    counts = None if texts is None else [sample.count(IMAGE_TOKEN) for sample in texts]
    if images is None:
        for s, count in enumerate(counts or []):
            if count:
                raise ValueError(f"Sample {s}: the text has {count} {IMAGE_TOKEN} tokens but no images were given.")
        return None
    if _is_stack(images):
        images = list(images)  # (N, ...) stacked same-size images
    if isinstance(images, _SINGLE_IMAGE_TYPES):
        nested = [[images]]
    elif isinstance(images, (list, tuple)) and images and all(_is_sample_list(x) for x in images):
        nested = [list(sample) for sample in images]
    elif isinstance(images, (list, tuple)) and not any(isinstance(x, (list, tuple)) for x in images):
        nested = [list(images)] if counts is None else _split_flat_images(list(images), counts)
    else:
        raise TypeError(
            "images must be one image, a flat list of images, or one list of images per sample; got "
            f"{type(images).__name__} mixing lists and images."
        )
    if counts is not None:
        if len(nested) != len(counts):
            raise ValueError(
                f"Got image lists for {len(nested)} samples but {len(counts)} texts; give one list per text."
            )
        for s, (count, sample) in enumerate(zip(counts, nested)):
            if count != len(sample):
                raise ValueError(
                    f"Sample {s}: the text has {count} {IMAGE_TOKEN} tokens but {len(sample)} images were given "
                    f"for it; expected one {IMAGE_TOKEN} per image."
                )
    return nested


def _split_flat_images(images: list[Any], counts: list[int]) -> list[list[Any]]:
    """Assign a flat list of images to the samples' `<image>` tokens, in order."""
    nested, start = [], 0
    for s, count in enumerate(counts):
        if start + count > len(images):
            raise ValueError(
                f"Sample {s}: its text has {count} {IMAGE_TOKEN} tokens but only {len(images) - start} of the "
                f"{len(images)} images are left for it (a flat image list is assigned to the {IMAGE_TOKEN} tokens "
                f"in order; the texts hold {sum(counts)})."
            )
        nested.append(images[start : start + count])
        start += count
    if start != len(images):
        raise ValueError(
            f"{len(images)} images were given but the texts hold only {sum(counts)} {IMAGE_TOKEN} tokens "
            f"(per sample: {counts}); expected one {IMAGE_TOKEN} per image."
        )
    return nested


def _model_config_beside(path: str | os.PathLike, **kwargs) -> Any | None:
    """The model config saved next to a processor, if it is one of ours (model types with a prompt form)."""
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
    config_file = cached_file(
        path,
        "config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if config_file is None:
        return None
    with open(config_file, encoding="utf-8") as file:
        model_type = json.load(file).get("model_type")
    if model_type not in PROMPT_EXPANSIONS:
        return None
    return AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code"), **hub_kwargs)


__all__ = ["CHAT_TEMPLATE", "VLMProcessor", "processor_settings_from_config"]
