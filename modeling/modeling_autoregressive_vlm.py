"""The fully autoregressive VLM (Idefics2 paper, section 3.1, Findings 2 and 4).

vision encoder → connector (projection + perceiver) → the visual tokens replace the `<image>` placeholder
embeddings → any transformers decoder LM → `lm_head`. The LM is `AutoModel.from_config(text_config)`:
its attention, cache and kernels are transformers' own.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput, logging

from .configuration_autoregressive_vlm import AutoregressiveVLMConfig
from .modeling_connector import Connector
from .modeling_vision_encoder import VisionEncoder
from .modeling_vision_stack import VisionLanguagePreTrainedModel, dummy_image_tokens, encode_images, pack_per_sample

logger = logging.get_logger(__name__)


@dataclass
class ImageFeaturesOutput(ModelOutput):
    """Visual tokens of a batch, ready to replace its `<image>` placeholders.

    image_features: (B, T, text_hidden) — sample b's visual tokens, its images in order, right-padded to the
        longest sample's T.
    image_features_mask: (B, T) bool — True on real tokens; row b holds as many Trues as sample b has
        `<image>` placeholders.
    """

    image_features: torch.Tensor | None = None
    image_features_mask: torch.Tensor | None = None


@dataclass
class AutoregressiveVLMModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the visual tokens that were spliced in, (B, T, text_hidden)."""

    image_features: torch.Tensor | None = None


@dataclass
class AutoregressiveVLMCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the visual tokens that were spliced in, (B, T, text_hidden)."""

    image_features: torch.Tensor | None = None


class AutoregressiveVLMPreTrainedModel(VisionLanguagePreTrainedModel):
    config_class = AutoregressiveVLMConfig
    config: AutoregressiveVLMConfig
    _no_split_modules = ["VisionEncoderLayer", "PerceiverLayer"]


class AutoregressiveVLMModel(AutoregressiveVLMPreTrainedModel):
    """Vision encoder, connector and text backbone, without the LM head.

    Attribute names (`vision_model`, `connector`, `text_model`) are checkpoint keys shared with Idefics2.
    """

    def __init__(self, config: AutoregressiveVLMConfig) -> None:
        super().__init__(config)
        self.vision_model = VisionEncoder._from_config(config.vision_config)
        self.connector = Connector._from_config(
            config.connector_config, vision_hidden_size=config.vision_config.hidden_size, text_config=config.text_config
        )
        self.text_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def get_image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None, **kwargs
    ) -> ImageFeaturesOutput:
        """Encode a batch of images into visual tokens, once, for one or many forward/generate calls.

        Args:
            pixel_values: (B, N_img, C, H, W) — images padded to the batch's H × W, and samples padded to
                N_img with all-zero images, which are skipped. (N, C, H, W) is read as one image per sample.
            pixel_attention_mask: (B, N_img, H, W) (or (N, H, W)), True/1 on real pixels; all real if omitted.
            kwargs: `packed=True/False` forces the packed or the padded vision path (default: packed when the
                batch holds padding and the backend is not eager; see `encode_images`).

        Returns:
            `ImageFeaturesOutput`: `image_features` (B, T, text_hidden) and `image_features_mask` (B, T).
            Pass both (e.g. `**output`) to `forward`/`generate` instead of `pixel_values`.
        """
        per_image, is_real = encode_images(
            self.vision_model, self.connector, pixel_values, pixel_attention_mask, **kwargs
        )
        features, slots = pack_per_sample(per_image, is_real, hidden_size=self.config.text_config.hidden_size)
        return ImageFeaturesOutput(image_features=features, image_features_mask=slots >= 0)

    def _image_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: where the `<image>` placeholders are, from ids or, without ids, from their embedding."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(image_token)).all(dim=-1)

    def merge_image_features(
        self,
        inputs_embeds: torch.Tensor,
        placeholder_mask: torch.Tensor,
        image_features: torch.Tensor,
        image_features_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Write the visual tokens over the placeholder embeddings: (B, S, D) in, (B, S, D) out."""
        if image_features.ndim != 3 or image_features.shape[0] != inputs_embeds.shape[0]:
            raise ValueError(
                f"image_features must be (batch={inputs_embeds.shape[0]}, tokens, hidden), got "
                f"{tuple(image_features.shape)}; use get_image_features() to build them."
            )
        if image_features_mask is None:
            image_features_mask = torch.ones(image_features.shape[:2], dtype=torch.bool, device=image_features.device)
        placeholders = placeholder_mask.sum(dim=1)  # (B,)
        features = image_features_mask.sum(dim=1).to(placeholders.device)
        if not torch.equal(placeholders, features):
            sample = int((placeholders != features).nonzero()[0])
            raise ValueError(
                f"Sample {sample} has {int(placeholders[sample])} <image> placeholder tokens but its images give "
                f"{int(features[sample])} visual tokens (placeholders per sample: {placeholders.tolist()}, "
                f"visual tokens per sample: {features.tolist()}). Likely causes: the prompt was truncated inside "
                f"an image's placeholders, or the processor and the model disagree on image_seq_len "
                f"(model: {self.config.image_seq_len}) or on image splitting."
            )
        valid = image_features[image_features_mask.to(image_features.device)]  # (total_tokens, D)
        inputs_embeds = inputs_embeds.clone()
        inputs_embeds[placeholder_mask] = valid.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds

    def _zero_through_vision_path(self) -> torch.Tensor:
        """A 0-d zero that depends on every vision-encoder and connector parameter (see `dummy_image_tokens`)."""
        return 0.0 * dummy_image_tokens(self.vision_model, self.connector).sum()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_features_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> AutoregressiveVLMModelOutput:
        """Run the LM on text whose `<image>` placeholders carry visual tokens.

        input_ids (B, S) or inputs_embeds (B, S, D); pixel_values (B, N_img, C, H, W) with
        pixel_attention_mask (B, N_img, H, W), or precomputed image_features (B, T, D) with
        image_features_mask (B, T) from `get_image_features`. Returns last_hidden_state (B, S, D) and the cache.
        In training (grad enabled), a batch without images still runs the vision path on one dummy image and adds
        exactly 0 to the text, so that data-parallel processes agree on which parameters get gradients.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass pixel_values or precomputed image_features, not both.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, S, D)

        if pixel_values is not None:
            encoded = self.get_image_features(pixel_values, pixel_attention_mask)
            image_features, image_features_mask = encoded.image_features, encoded.image_features_mask
        if image_features is not None:
            placeholder_mask = self._image_placeholder_mask(input_ids, inputs_embeds)
            inputs_embeds = self.merge_image_features(
                inputs_embeds, placeholder_mask, image_features, image_features_mask
            )
        if self.training and torch.is_grad_enabled() and (image_features is None or image_features.shape[1] == 0):
            zero = self._zero_through_vision_path()  # no image in the batch: the vision path still gets a gradient
            inputs_embeds = inputs_embeds + zero.to(inputs_embeds.device, inputs_embeds.dtype)

        kwargs["return_dict"] = True
        outputs = self.text_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return AutoregressiveVLMModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=image_features,
        )


class AutoregressiveVLMForConditionalGeneration(AutoregressiveVLMPreTrainedModel, GenerationMixin):
    """`AutoregressiveVLMModel` with a language-modelling head; loss from `labels`; `generate`.

    In `generate`, images are encoded once, at prefill; decode steps use the LM's KV cache only.
    """

    _tied_weights_keys = {"lm_head.weight": "model.text_model.embed_tokens.weight"}

    def __init__(self, config: AutoregressiveVLMConfig) -> None:
        super().__init__(config)
        self.model = AutoregressiveVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None, **kwargs
    ) -> ImageFeaturesOutput:
        """See `AutoregressiveVLMModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, pixel_attention_mask, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_features_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> AutoregressiveVLMCausalLMOutput:
        """As `AutoregressiveVLMModel.forward`, plus logits (B, S, vocab) and, with `labels` (B, S), the
        next-token loss (label -100 is ignored; mask image placeholders and padding in the collator)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            image_features=image_features,
            image_features_mask=image_features_mask,
            use_cache=use_cache,
            **kwargs,
        )
        logits, loss = self.logits_and_loss(outputs.last_hidden_state, labels, logits_to_keep, **kwargs)
        return AutoregressiveVLMCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=outputs.image_features,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs) -> dict:
        """transformers drops pixel inputs after prefill; precomputed image features must go too, since
        decode steps feed one new token and no placeholders."""
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and model_inputs.get("use_cache", True):
            model_inputs.pop("image_features", None)
            model_inputs.pop("image_features_mask", None)
        return model_inputs


__all__ = [
    "AutoregressiveVLMForConditionalGeneration",
    "AutoregressiveVLMModel",
    "AutoregressiveVLMPreTrainedModel",
    "ImageFeaturesOutput",
]
