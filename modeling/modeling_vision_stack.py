"""The vision stack both fusions share (Idefics2 paper, section 3.2, Findings 2, 4 and 5).

pixel_values → `VisionEncoder` (native resolution, patch masks) → `Connector` (projection + perceiver) → one
sequence of visual tokens per real image. The autoregressive fusion splices those tokens into the text; the
cross-attention fusion lets the text attend to them. Both models also share the `PreTrainedModel` flags and the
checkpointing default defined here, so the two architectures differ only in their fusion files.
"""

import torch
from torch import nn
from transformers import PreTrainedModel

from .parameter_breakdown import ParameterBreakdown, parameter_breakdown


class VisionLanguagePreTrainedModel(PreTrainedModel):
    """Flags and defaults shared by the autoregressive and the cross-attention VLM (config_class is per fusion)."""

    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = "cache"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Enable activation checkpointing; non-reentrant unless `{"use_reentrant": True}` is passed.

        transformers 5 routes the deprecated `gradient_checkpointing_enable` (and Trainer) here; overriding
        that old name instead would make it the entry point and break `every_n_layers`/`offload`.
        """
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        super().activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    def parameter_breakdown(self) -> ParameterBreakdown:
        """Parameters per part (vision encoder, connector, cross-attention, language model, lm_head)."""
        return parameter_breakdown(self)

    def logits_and_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.LongTensor | None,
        logits_to_keep: int | torch.Tensor,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head of a `...ForConditionalGeneration`: (B, S, D) hidden states → logits (B, S', vocab),
        S' = S or the `logits_to_keep` positions, and the next-token loss when `labels` (B, S) are given
        (only label -100 is ignored)."""
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        if labels is None:
            return logits, None
        vocab_size = self.config.text_config.vocab_size
        return logits, self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)


def patch_mask_from_pixel_mask(pixel_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, H, W) pixel mask → (N, H // p, W // p): a patch is real when all of its pixels are."""
    patches = pixel_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)  # (N, h, w, p, p)
    return patches.flatten(3).all(dim=-1)


def encode_images(
    vision_model: PreTrainedModel,
    connector: PreTrainedModel,
    pixel_values: torch.Tensor,
    pixel_attention_mask: torch.Tensor | None = None,
    *,
    packed: bool | None = None,
    **kwargs,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encode the real images of a batch into visual tokens.

    Args:
        pixel_values: (B, N_img, C, H, W) — images padded to the batch's H × W, and samples padded to N_img with
            all-zero images, which are skipped. (N, C, H, W) is read as one image per sample.
        pixel_attention_mask: (B, N_img, H, W) (or (N, H, W)), True/1 on real pixels; all real if omitted.
        packed: encode the real patches packed into one sequence (True) or padded to the batch's grid (False);
            by default, whichever `vision_model.packing_pays_off` for this batch. The two agree to float rounding.

    Returns:
        `(tokens, is_real)`: `tokens[i]` is (tokens_i, text_hidden) for the i-th real image in (sample, slot)
        order; `is_real` (B, N_img) bool marks the slots that held a real image.
    """
    if pixel_values.ndim == 4:
        pixel_values = pixel_values[:, None]
        pixel_attention_mask = None if pixel_attention_mask is None else pixel_attention_mask[:, None]
    if pixel_values.ndim != 5:
        raise ValueError(
            f"pixel_values must be (batch, images, channels, height, width), got shape {tuple(pixel_values.shape)}."
        )
    batch, max_images, channels, height, width = pixel_values.shape
    if pixel_attention_mask is not None and pixel_attention_mask.shape != (batch, max_images, height, width):
        raise ValueError(
            f"pixel_attention_mask has shape {tuple(pixel_attention_mask.shape)}, expected "
            f"{(batch, max_images, height, width)} to match pixel_values {tuple(pixel_values.shape)}."
        )
    images = pixel_values.reshape(batch * max_images, channels, height, width).to(vision_model.dtype)
    # padding images (samples with fewer images than N_img) are all zeros: never encode them
    is_real = (images != 0).flatten(1).any(dim=1)  # (B * N_img,)
    if pixel_attention_mask is None:
        pixel_mask = torch.ones(batch * max_images, height, width, dtype=torch.bool, device=images.device)
    else:
        pixel_mask = pixel_attention_mask.reshape(batch * max_images, height, width).bool()
    if not bool(is_real.any()):  # only padding slots (e.g. a collated batch of text-only samples)
        return [], is_real.view(batch, max_images)
    patch_mask = patch_mask_from_pixel_mask(pixel_mask[is_real], vision_model.config.patch_size)

    if packed is None:
        packed = vision_model.packing_pays_off(patch_mask)

    encoded = vision_model(images[is_real], patch_attention_mask=patch_mask, packed=packed, **kwargs)
    if packed:  # (1, T, D): the connector projects the real patches only, then unpacks them for the perceiver
        tokens = connector(encoded.last_hidden_state, packed_sequences=encoded.packed_sequences, **kwargs)
    else:  # (N, h * w, D)
        tokens = connector(encoded.last_hidden_state, patch_mask.flatten(1), **kwargs)  # list of (tokens_i, D)
    return tokens, is_real.view(batch, max_images)


def dummy_image_tokens(vision_model: PreTrainedModel, connector: PreTrainedModel) -> torch.Tensor:
    """(T, text_hidden) visual tokens of one patch-sized all-ones image, for training steps without images.

    Data-parallel training (DDP without `find_unused_parameters`) waits for a gradient of every trainable parameter
    in every process: a batch without images would leave the vision path out of one process's graph and hang the
    others. The fusions add 0 × these tokens, which changes no value and gives that path an exactly-zero gradient.
    """
    vision = vision_model.config
    device = vision_model.device  # the meta device when a device map offloads it: its hooks move the inputs
    shape = (1, 1, vision.num_channels, vision.patch_size, vision.patch_size)  # (B, N_img, C, p, p)
    pixels = torch.ones(shape, device=None if device.type == "meta" else device)
    tokens, _ = encode_images(vision_model, connector, pixels)
    return tokens[0]


def pack_per_sample(
    tokens: list[torch.Tensor], is_real: torch.Tensor, *, hidden_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each sample's image tokens, its images in slot order, right-padded to the longest sample.

    Args:
        tokens: `encode_images`' per-image tokens, each (tokens_i, hidden_size), in (sample, slot) order.
        is_real: (B, N_img) bool, which slots those images came from.

    Returns:
        `(features, slots)`: features (B, T, hidden_size), zeros on padding; slots (B, T) long, the `pixel_values`
        slot (0 … N_img - 1) each token came from, -1 on padding.
    """
    dtype = tokens[0].dtype if tokens else torch.get_default_dtype()
    slot_of_image = is_real.nonzero()[:, 1]  # (num_real,) slot of each real image, in (sample, slot) order
    per_sample, per_sample_slots, start = [], [], 0
    for count in is_real.sum(dim=1).tolist():
        images = tokens[start : start + count]
        per_sample.append(torch.cat(images) if images else is_real.new_zeros(0, hidden_size, dtype=dtype))
        per_sample_slots.append(
            torch.cat([slot_of_image[start + i].expand(len(image)) for i, image in enumerate(images)])
            if images
            else slot_of_image.new_zeros(0)
        )
        start += count
    features = nn.utils.rnn.pad_sequence(per_sample, batch_first=True)  # (B, T, D)
    slots = nn.utils.rnn.pad_sequence(per_sample_slots, batch_first=True, padding_value=-1)  # (B, T)
    return features, slots


__all__ = [
    "VisionLanguagePreTrainedModel",
    "dummy_image_tokens",
    "encode_images",
    "pack_per_sample",
    "patch_mask_from_pixel_mask",
]
