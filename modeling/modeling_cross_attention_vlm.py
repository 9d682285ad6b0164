"""The cross-attention VLM (Idefics2 paper, section 3.1, Finding 2; Flamingo; Idefics1).

vision encoder → connector → visual tokens, which the text attends to through tanh-gated cross-attention blocks
run before every n-th decoder layer of any transformers LM (`gated_cross_attention.py`) → `lm_head`. The text
carries one `<image>` marker per image; `image_attention_mask` (B, T, N_img) says which images each token sees.

Checkpoint keys: `model.vision_model.*` and `model.connector.*` as in the autoregressive model;
`model.text_model.*` exactly the bare LM's keys, so a text-only checkpoint loads unchanged;
`model.cross_attention_blocks.{k}.*` for the new blocks; `lm_head.*`.

In `generate`, images are encoded once, at prefill, and each block projects them to its keys/values once, inside
its own forward: they travel from step to step as the `image_key_values` model keyword, beside the LM's own KV cache.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration_cross_attention_vlm import CrossAttentionVLMConfig
from .gated_cross_attention import CrossAttentionInputs, GatedCrossAttentionBlock, fuse_cross_attention
from .modeling_connector import Connector
from .modeling_vision_encoder import VisionEncoder
from .modeling_vision_stack import VisionLanguagePreTrainedModel, dummy_image_tokens, encode_images, pack_per_sample


@dataclass
class ImageKeyValues(ModelOutput):
    """A batch of encoded images, as the cross-attention blocks consume them; compute once, reuse at every step.

    image_states: (B, M, D) — each sample's visual tokens, its images one after the other; M is the most of any
        sample, the rest padding.
    token_slots: (B, M) long — the `pixel_values` slot each visual token came from; -1 on padding.
    real_images: (B, N_img) bool — the slots that held a real (not all-zero) image.
    key_values: per block, (key, value), each (B, H_kv, M, Dh), as the blocks projected `image_states` in a forward
        call outside training; None before any (`get_image_key_values` leaves them to the first call).
    """

    image_states: torch.Tensor | None = None
    token_slots: torch.Tensor | None = None
    real_images: torch.Tensor | None = None
    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None

    def repeat_interleave(self, repeats: int) -> "ImageKeyValues":
        """Each sample `repeats` times in a row, as `generate` expands prompts for beams and return sequences."""
        key_values = None
        if self.key_values is not None:
            key_values = tuple(tuple(t.repeat_interleave(repeats, dim=0) for t in pair) for pair in self.key_values)
        return ImageKeyValues(
            image_states=self.image_states.repeat_interleave(repeats, dim=0),
            token_slots=self.token_slots.repeat_interleave(repeats, dim=0),
            real_images=self.real_images.repeat_interleave(repeats, dim=0),
            key_values=key_values,
        )


@dataclass
class CrossAttentionVLMModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the `ImageKeyValues` the blocks attended to (pass them to the next step)."""

    image_key_values: ImageKeyValues | None = None


@dataclass
class CrossAttentionVLMCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the `ImageKeyValues` the blocks attended to (pass them to the next step)."""

    image_key_values: ImageKeyValues | None = None


class CrossAttentionVLMPreTrainedModel(VisionLanguagePreTrainedModel):
    config_class = CrossAttentionVLMConfig
    config: CrossAttentionVLMConfig
    _no_split_modules = ["VisionEncoderLayer", "PerceiverLayer", "GatedCrossAttentionBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GatedCrossAttentionBlock):
            init.constant_(module.attn_gate, self.config.gate_init)
            init.constant_(module.mlp_gate, self.config.gate_init)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Enable (non-reentrant) activation checkpointing; reentrant checkpointing is refused.

        The image keys/values reach the decoder layers as keyword arguments, and reentrant checkpointing only
        differentiates through positional ones: the backward pass would fail on the way to the connector.
        """
        if (activation_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "CrossAttentionVLM supports only non-reentrant activation checkpointing (use_reentrant=False, the "
                "default): the images reach its decoder layers as keyword arguments, which reentrant checkpointing "
                "cannot differentiate through."
            )
        super().activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)


def images_per_sample(image_attention_mask: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """(B,) images per sample: runs of real slots whose `image_attention_mask` columns are identical.

    The processor gives the sub-images of one split image the same column, and two images never share one
    (their markers sit at different tokens), so each run is one image and its one `<image>` marker.
    """
    counts = []
    for columns, real in zip(image_attention_mask.bool().transpose(1, 2), real_images):  # (N_img, S), (N_img,)
        columns = columns[real]
        new_image = (columns[1:] != columns[:-1]).any(dim=1)  # (R - 1,): slot r starts another image
        counts.append(int(new_image.sum()) + 1 if len(columns) else 0)
    return torch.tensor(counts, device=real_images.device)


class CrossAttentionVLMModel(CrossAttentionVLMPreTrainedModel):
    """Vision encoder, connector, and the text backbone with gated cross-attention blocks; no LM head.

    `text_model` is `AutoModel.from_config(text_config)` with its decoder layers 0, n, 2n, … fused in place
    (`fuse_cross_attention`): its modules, hooks and state-dict keys are the bare LM's. The blocks are
    `cross_attention_blocks[k]`, run by the k-th fused layer with what `forward` hands every decoder layer.
    """

    def __init__(self, config: CrossAttentionVLMConfig) -> None:
        super().__init__(config)
        self.vision_model = VisionEncoder._from_config(config.vision_config)
        self.connector = Connector._from_config(
            config.connector_config, vision_hidden_size=config.vision_config.hidden_size, text_config=config.text_config
        )
        self.text_model = AutoModel.from_config(config.text_config)
        self.cross_attention_blocks = nn.ModuleList(
            GatedCrossAttentionBlock(config) for _ in config.cross_attention_layers
        )
        layers = getattr(self.text_model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"CrossAttentionVLMModel: the text model {type(self.text_model).__name__} keeps no decoder layers in "
                f"`.layers`; cross-attention fusion supports decoders that do (Llama, Mistral, Qwen2, Gemma, Phi, …)."
            )
        for index, layer_index in enumerate(config.cross_attention_layers):
            fuse_cross_attention(layers[layer_index], index)
        # device maps must not split a fused decoder layer either
        fused_names = {type(layers[i]).__name__ for i in config.cross_attention_layers}
        self._no_split_modules = [*self._no_split_modules, *fused_names]
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def get_image_key_values(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None, **kwargs
    ) -> ImageKeyValues:
        """Encode images once for many forward/generate calls.

        Args:
            pixel_values: (B, N_img, C, H, W) — images padded to the batch's H × W, and samples padded to N_img
                with all-zero images, which are skipped. (N, C, H, W) is read as one image per sample.
            pixel_attention_mask: (B, N_img, H, W) (or (N, H, W)), True/1 on real pixels; all real if omitted.

        Returns:
            `ImageKeyValues`; pass it as `image_key_values=` to `forward`/`generate` instead of `pixel_values`. The
            blocks project it to their keys/values in the first forward call, whose output's `image_key_values`
            carries them: pass that one to later calls to skip the projection too (`generate` does).
        """
        tokens, real_images = encode_images(
            self.vision_model, self.connector, pixel_values, pixel_attention_mask, **kwargs
        )
        features, token_slots = pack_per_sample(tokens, real_images, hidden_size=self.config.text_config.hidden_size)
        return ImageKeyValues(image_states=features, token_slots=token_slots, real_images=real_images)

    def _dummy_cross_attention_inputs(self, inputs_embeds: torch.Tensor) -> CrossAttentionInputs:
        """Blocks inputs for a training batch without images: every block attends to one dummy image that no token
        sees, so it adds exactly 0 and every vision-encoder, connector and block parameter gets a zero gradient.

        Data-parallel training (DDP without `find_unused_parameters`, as Trainer sets it under activation
        checkpointing) waits for a gradient of every trainable parameter in every process: a batch without images
        would leave the image path out of one process's graph and hang the others. Under FSDP the blocks must also
        run where they run with images, inside their decoder layers, or the processes' all-gathers fall out of step.
        """
        batch, seq_len, _ = inputs_embeds.shape
        features = dummy_image_tokens(self.vision_model, self.connector)  # (T, D)
        features = features.to(inputs_embeds.device)[None].expand(batch, -1, -1)  # (B, T, D)
        return CrossAttentionInputs(
            blocks=self.cross_attention_blocks,
            image_states=features,
            key_values=None,
            attention_mask=inputs_embeds.new_zeros(batch, 1, seq_len, features.shape[1]),  # (B, 1, S, T)
            has_image=inputs_embeds.new_zeros(batch, seq_len, 1),  # no token sees it: each block adds 0
            keep_key_values=False,
        )

    def _image_marker_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: where the `<image>` markers are, from ids or, without ids, from their embedding."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(image_token)).all(dim=-1)

    @staticmethod
    def _check_image_attention_mask(
        image_attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor, num_image_slots: int, images_given: str
    ) -> None:
        """`image_attention_mask` must be (B, S, N_img) for the text and the images given."""
        expected = (*inputs_embeds.shape[:2], num_image_slots)
        if image_attention_mask is None:
            raise ValueError(
                f"{images_given} needs an image_attention_mask of shape (batch, text tokens, images) = {expected}: "
                f"which images each text token sees (VLMProcessor returns it)."
            )
        if tuple(image_attention_mask.shape) != expected:
            raise ValueError(
                f"image_attention_mask has shape {tuple(image_attention_mask.shape)}, expected (batch, text tokens, "
                f"images) = {expected} for text of shape {tuple(inputs_embeds.shape[:2])} and {images_given}."
            )

    def _check_markers_match_images(
        self, input_ids, inputs_embeds, image_attention_mask: torch.Tensor, real_images: torch.Tensor
    ) -> None:
        """Each sample needs one `<image>` marker per image (per group of sub-images of a split image)."""
        markers = self._image_marker_mask(input_ids, inputs_embeds).sum(dim=1).to(real_images.device)  # (B,)
        images = images_per_sample(image_attention_mask.to(real_images.device), real_images)  # (B,)
        if not torch.equal(markers, images):
            sample = int((markers != images).nonzero()[0])
            raise ValueError(
                f"Sample {sample} has {int(markers[sample])} <image> markers but {int(images[sample])} images "
                f"(markers per sample: {markers.tolist()}, images per sample: {images.tolist()}; the sub-images of "
                f"one split image count once: they share an image_attention_mask column). Likely causes: the prompt "
                f"was truncated past an image's marker, or the text's <image> markers and the images disagree."
            )

    def _cross_attention_inputs(
        self, image_key_values: ImageKeyValues, image_attention_mask: torch.Tensor, inputs_embeds: torch.Tensor
    ) -> CrossAttentionInputs | None:
        """Expand the (B, S, N_img) image mask to the visual tokens, once per forward call for all blocks; the masks
        are in the dtype and on the device of the text's (B, S, D) `inputs_embeds`."""
        dtype = inputs_embeds.dtype
        token_slots = image_key_values.token_slots.to(inputs_embeds.device)  # (B, M)
        if token_slots.shape[1] == 0:  # no real image in the whole batch
            return None
        image_attention_mask = image_attention_mask.to(device=token_slots.device, dtype=torch.bool)
        batch, seq_len, _ = image_attention_mask.shape
        gather_index = token_slots.clamp(min=0)[:, None, :].expand(batch, seq_len, -1)  # (B, S, M)
        visible = torch.gather(image_attention_mask, 2, gather_index) & (token_slots >= 0)[:, None, :]  # (B, S, M)
        has_image = visible.any(dim=-1, keepdim=True)  # (B, S, 1)
        # a token that sees no image attends to every token instead (its result is multiplied by 0): an all-masked
        # softmax row would be NaN in half precision, and 0 · NaN is not 0
        allowed = (visible | ~has_image)[:, None]  # (B, 1, S, M)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
        return CrossAttentionInputs(
            blocks=self.cross_attention_blocks,
            image_states=image_key_values.image_states,
            key_values=image_key_values.key_values,
            attention_mask=mask,
            has_image=has_image.to(dtype),
            keep_key_values=not (self.training and torch.is_grad_enabled()),  # training reuses nothing
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        image_key_values: ImageKeyValues | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CrossAttentionVLMModelOutput:
        """Run the LM, its fused blocks attending to the images each token may see.

        input_ids (B, S) or inputs_embeds (B, S, D); pixel_values (B, N_img, C, H, W) with pixel_attention_mask
        (B, N_img, H, W), or precomputed `image_key_values` from `get_image_key_values`; image_attention_mask
        (B, S, N_img), 1 where token s sees image slot n. Without images, exactly the bare LM; a token whose
        mask row is all zero passes every block unchanged.
        When pixel_values are encoded, each sample must hold one `<image>` marker per image, an image being a run
        of real slots with identical mask columns (the sub-images of a split image; see `images_per_sample`);
        a mismatch, or a mask of the wrong shape, raises a ValueError naming both sides.
        In training (grad enabled), a batch without images still runs the vision path and every block on one dummy
        image and adds exactly 0 to the text, so that data-parallel processes agree on which parameters get gradients.
        Returns last_hidden_state (B, S, D), the cache and the `image_key_values` used.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if pixel_values is not None and image_key_values is not None:
            raise ValueError("Pass pixel_values or precomputed image_key_values, not both.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, S, D)

        if pixel_values is not None:
            num_slots = pixel_values.shape[1] if pixel_values.ndim == 5 else 1
            given = f"pixel_values of shape {tuple(pixel_values.shape)} ({num_slots} image slots)"
            self._check_image_attention_mask(image_attention_mask, inputs_embeds, num_slots, given)
            image_key_values = self.get_image_key_values(pixel_values, pixel_attention_mask)
            self._check_markers_match_images(
                input_ids, inputs_embeds, image_attention_mask, image_key_values.real_images
            )
        elif image_key_values is not None:
            num_slots = image_key_values.real_images.shape[1]
            given = f"image_key_values of {num_slots} image slots"
            self._check_image_attention_mask(image_attention_mask, inputs_embeds, num_slots, given)
        elif image_attention_mask is not None and image_attention_mask.bool().any():
            raise ValueError("image_attention_mask lets tokens see images, but no pixel_values or image_key_values.")

        cross_attention_inputs = None
        if image_key_values is not None:
            cross_attention_inputs = self._cross_attention_inputs(image_key_values, image_attention_mask, inputs_embeds)
        sees_images = cross_attention_inputs is not None
        if self.training and torch.is_grad_enabled() and cross_attention_inputs is None:
            # no image in the batch: the image path still runs, adding 0, and gets a (zero) gradient
            cross_attention_inputs = self._dummy_cross_attention_inputs(inputs_embeds)
        kwargs["return_dict"] = True
        outputs = self.text_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            cross_attention_inputs=cross_attention_inputs,
            **kwargs,
        )
        if sees_images and image_key_values.key_values is None:
            # what the blocks projected, for the next call on the same images (the next generation step)
            image_key_values = ImageKeyValues(
                image_states=image_key_values.image_states,
                token_slots=image_key_values.token_slots,
                real_images=image_key_values.real_images,
                key_values=cross_attention_inputs.all_key_values(),
            )
        return CrossAttentionVLMModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_key_values=image_key_values,
        )


class CrossAttentionVLMForConditionalGeneration(CrossAttentionVLMPreTrainedModel, GenerationMixin):
    """`CrossAttentionVLMModel` with a language-modelling head; loss from `labels`; `generate`.

    In `generate`, images are encoded and projected to keys/values once, at prefill; every later step reuses
    them (`image_key_values`), and `image_attention_mask` grows by one row per new token, a copy of the last
    row: a generated token sees the images the token before it saw.
    """

    _tied_weights_keys = {"lm_head.weight": "model.text_model.embed_tokens.weight"}

    def __init__(self, config: CrossAttentionVLMConfig) -> None:
        super().__init__(config)
        self.model = CrossAttentionVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_key_values(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None, **kwargs
    ) -> ImageKeyValues:
        """See `CrossAttentionVLMModel.get_image_key_values`."""
        return self.model.get_image_key_values(pixel_values, pixel_attention_mask, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        image_key_values: ImageKeyValues | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CrossAttentionVLMCausalLMOutput:
        """As `CrossAttentionVLMModel.forward`, plus logits (B, S, vocab) and, with `labels` (B, S), the
        next-token loss (label -100 is ignored; mask image markers and padding in the collator)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            image_attention_mask=image_attention_mask,
            image_key_values=image_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        logits, loss = self.logits_and_loss(outputs.last_hidden_state, labels, logits_to_keep, **kwargs)
        return CrossAttentionVLMCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_key_values=outputs.image_key_values,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs) -> dict:
        """After prefill the images are `image_key_values`: never encode them again, even without a cache.
        The image mask keeps the rows of the tokens this step feeds."""
        if not is_first_iteration and kwargs.get("image_key_values") is not None:
            kwargs.pop("pixel_values", None)
            kwargs.pop("pixel_attention_mask", None)
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        image_attention_mask = model_inputs.get("image_attention_mask")
        if image_attention_mask is not None:
            text = model_inputs.get("input_ids")
            text = model_inputs["inputs_embeds"] if text is None else text
            model_inputs["image_attention_mask"] = image_attention_mask[:, -text.shape[1] :]
        return model_inputs

    def _update_model_kwargs_for_generation(
        self, outputs: ModelOutput, model_kwargs: dict, is_encoder_decoder: bool = False, num_new_tokens: int = 1
    ) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if outputs.get("image_key_values") is not None:
            model_kwargs["image_key_values"] = outputs["image_key_values"]
        image_attention_mask = model_kwargs.get("image_attention_mask")
        if image_attention_mask is not None:
            new_rows = image_attention_mask[:, -1:].expand(-1, num_new_tokens, -1)
            model_kwargs["image_attention_mask"] = torch.cat([image_attention_mask, new_rows], dim=1)
        return model_kwargs

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs
    ):
        # generate expands tensors only; precomputed image keys/values are a nested output
        image_key_values = model_kwargs.pop("image_key_values", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if image_key_values is not None:
            model_kwargs["image_key_values"] = (
                image_key_values.repeat_interleave(expand_size) if expand_size > 1 else image_key_values
            )
        return input_ids, model_kwargs


__all__ = [
    "CrossAttentionVLMForConditionalGeneration",
    "CrossAttentionVLMModel",
    "CrossAttentionVLMPreTrainedModel",
    "ImageKeyValues",
]
