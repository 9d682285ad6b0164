"""Convert an Idefics2 checkpoint into our fully autoregressive VLM (Idefics2 paper, section 3.1).

Our `AutoregressiveVLMForConditionalGeneration` is Idefics2's architecture with the same attribute names,
so the key map is (almost) the identity; what it adds is a strict description of what an Idefics2
checkpoint may hold. The pieces, in the order a conversion uses them:

- `IDEFICS2_KEY_MAP`: `(regex, replacement)` rules tried in order against the whole source key
  (`re.fullmatch`); the first match wins; replacement `None` drops a key on purpose. The vision tower's
  rules are SigLIP's (`vlmforge.conversion.siglip`) under the `model.vision_model.` prefix.
- `convert_state_dict(state_dict, expected_keys=...)`: pure, no I/O; an unknown source key, or a missing or
  unexpected target key, raises `ValueError`.
- `convert_config(idefics2_config)`: `Idefics2Config` → `AutoregressiveVLMConfig`.
- `convert_processor(src, config)`: the source's tokenizer, image processor settings and chat template
  → our `VLMProcessor`, its prompt layout taken from the converted config.
- `convert_idefics2_checkpoint(src, dst)`: a checkpoint folder (config.json + safetensors, sharded or not)
  → a vlmforge checkpoint folder (model, `VLMProcessor`, generation config), written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, Idefics2Config
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from vlmforge.conversion.checkpoint_io import atomic_output_dir, check_destination, load_weights
from vlmforge.conversion.generation_config import chat_generation_config
from vlmforge.conversion.siglip import SIGLIP_KEY_MAP, KeyMap, rename_state_dict, vision_config_from_siglip
from vlmforge.modeling.configuration_autoregressive_vlm import AutoregressiveVLMConfig
from vlmforge.modeling.modeling_autoregressive_vlm import AutoregressiveVLMForConditionalGeneration
from vlmforge.processing.image_processing_vlm import VLMImageProcessor
from vlmforge.processing.processing_vlm import VLMProcessor

logger = logging.get_logger(__name__)

_VISION_PREFIX = r"model\.vision_model\."
_PERCEIVER_LEAVES = (
    r"latents"
    r"|norm\.weight"
    r"|layers\.\d+\.(?:input_latents_norm|input_context_norm|post_attention_layernorm)\.weight"
    r"|layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)\.weight"
    r"|layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)\.weight"
)

IDEFICS2_KEY_MAP: KeyMap = [
    # vision tower: SigLIP's renaming rules, with SigLIP's optional prefix replaced by Idefics2's mandatory
    # one; SigLIP's drop rules are not inherited (an Idefics2 vision tower has no pooling head)
    *[
        (_VISION_PREFIX + pattern.removeprefix(r"(?:vision_model\.)?"), "model.vision_model." + target)
        for pattern, target in SIGLIP_KEY_MAP
        if target is not None
    ],
    # connector: SwiGLU modality projection, then the perceiver resampler — same names on both sides
    (r"model\.connector\.(modality_projection\.(?:gate_proj|up_proj|down_proj)\.weight)", r"model.connector.\1"),
    (rf"model\.connector\.(perceiver_resampler\.(?:{_PERCEIVER_LEAVES}))", r"model.connector.\1"),
    # dropped: rotary frequencies are recomputed from the config (some older LM checkpoints stored them)
    (r"model\.text_model\.(?:.+\.)?rotary_emb\.inv_freq", None),
    # language model: transformers' own class on both sides (`AutoModel.from_config(text_config)`), so its
    # keys pass through unchanged; the strict load checks them against the class
    (r"model\.text_model\.(.+)", r"model.text_model.\1"),
    (r"lm_head\.weight", "lm_head.weight"),
]

# A source folder holding any of these has a tokenizer (and so can get a processor)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Keys of an Idefics2 image processor config that name classes rather than settings
_IMAGE_PROCESSOR_BOOKKEEPING = {"image_processor_type", "processor_class", "_processor_class", "auto_map"}

_TIED_KEY, _EMBED_KEY = "lm_head.weight", "model.text_model.embed_tokens.weight"


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, expected_keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Idefics2ForConditionalGeneration keys → AutoregressiveVLMForConditionalGeneration keys; no I/O.

    Args:
        state_dict: an Idefics2 state dict (as `Idefics2ForConditionalGeneration.state_dict()` or its
            safetensors files hold it).
        expected_keys: the target model's keys (`model.state_dict().keys()`); when given, a missing or
            unexpected target key raises too.

    Raises:
        ValueError: a key no rule of `IDEFICS2_KEY_MAP` describes, two keys mapping to one, or a
            missing/unexpected target key.
    """
    return rename_state_dict(state_dict, IDEFICS2_KEY_MAP, source_name="Idefics2", expected_keys=expected_keys)


def convert_config(idefics2_config: Idefics2Config | Mapping) -> AutoregressiveVLMConfig:
    """Our `AutoregressiveVLMConfig` from an `Idefics2Config` (or its dict): same vision, perceiver and LM.

    The perceiver works at the LM's width in both models; a perceiver `hidden_size` that differs from the
    LM's means a broken config and raises `ValueError`.
    """
    if isinstance(idefics2_config, Mapping):
        idefics2_config = Idefics2Config(**{k: v for k, v in idefics2_config.items() if k != "model_type"})
    vision, perceiver = idefics2_config.vision_config, idefics2_config.perceiver_config
    text = idefics2_config.text_config
    if perceiver.hidden_size != text.hidden_size:
        raise ValueError(
            f"Idefics2 perceiver_config.hidden_size={perceiver.hidden_size} differs from text_config.hidden_size="
            f"{text.hidden_size}; Idefics2 runs its perceiver at the LM's width, so the checkpoint is inconsistent."
        )
    vision_config = vision_config_from_siglip(vision)  # Idefics2VisionConfig has SigLIP's fields
    connector_config = dict(
        pooling="perceiver",
        n_latents=perceiver.resampler_n_latents,
        depth=perceiver.resampler_depth,
        num_attention_heads=perceiver.resampler_n_heads,
        num_key_value_heads=perceiver.num_key_value_heads,
        head_dim=perceiver.resampler_head_dim,
        hidden_act=perceiver.hidden_act,
        rms_norm_eps=perceiver.rms_norm_eps,
        attention_dropout=float(perceiver.attention_dropout),
        initializer_range=perceiver.initializer_range,
    )
    return AutoregressiveVLMConfig(
        vision_config=vision_config,
        connector_config=connector_config,
        text_config=text.to_dict(),
        image_token_id=idefics2_config.image_token_id,
        tie_word_embeddings=idefics2_config.tie_word_embeddings,
        use_cache=idefics2_config.use_cache,
        dtype=idefics2_config.dtype,
    )


def _build_converted_model(
    idefics2_config: Idefics2Config, state_dict: dict[str, torch.Tensor]
) -> AutoregressiveVLMForConditionalGeneration:
    """Our model holding exactly the converted weights (strict load; no random initialisation), to save.

    Built on the meta device, so its non-persistent buffers (rotary frequencies) stay there: fine for
    `save_pretrained`, which writes parameters and persistent buffers only; reload the saved folder to run it.
    """
    config = convert_config(idefics2_config)
    with torch.device("meta"):  # skeleton only: every parameter is replaced by a checkpoint tensor below
        model = AutoregressiveVLMForConditionalGeneration(config)
    expected_keys = set(model.state_dict())
    tied = config.tie_word_embeddings
    if tied:
        # a tied head is saved once, as the embedding; it is re-tied after loading
        expected_keys.discard(_TIED_KEY)
        state_dict = {k: v for k, v in state_dict.items() if k != _TIED_KEY}
    converted = convert_state_dict(state_dict, expected_keys=expected_keys)
    if tied:
        converted[_TIED_KEY] = converted[_EMBED_KEY]
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as error:  # shape mismatches: the config does not describe these weights
        raise ValueError(f"The Idefics2 weights do not fit the converted config: {error}") from error
    if tied:
        model.tie_weights()
    return model.eval()


def _image_processor_settings(src: Path) -> dict | None:
    """The Idefics2 image processor settings saved in `src` (preprocessor_config.json or nested in
    processor_config.json), restricted to the ones `VLMImageProcessor` takes; None when `src` has none."""
    try:
        saved, _ = VLMImageProcessor.get_image_processor_dict(src)
    except OSError:  # transformers' "no image processor config here"
        return None
    accepted = VLMImageProcessor.valid_kwargs.__annotations__
    ignored = sorted(set(saved) - set(accepted) - _IMAGE_PROCESSOR_BOOKKEEPING)
    if ignored:
        logger.warning(f"{src}: image processor settings {ignored} have no VLMImageProcessor equivalent; ignored.")
    return {key: value for key, value in saved.items() if key in accepted}


def convert_processor(src: str | Path, config: AutoregressiveVLMConfig) -> VLMProcessor | None:
    """Our `VLMProcessor` for a converted Idefics2 checkpoint: the source's settings, the converted config's layout.

    The tokenizer is the source's; the image processor takes the source's Idefics2 image processor settings (size,
    do_image_splitting, mean/std, resample, ...) and the chat template is the source's (processor or tokenizer
    config), so the processor reproduces `Idefics2Processor`'s inputs. `image_seq_len`, the patch size and the
    image token ids come from `config` (`VLMProcessor.from_model_config`), the one source of truth.

    Without image processor files, the default `VLMImageProcessor` and our Idefics2-format chat template are used;
    without a tokenizer no processor can be built: returns None, with a warning.

    Raises:
        ValueError: the tokenizer's image token ids are not the config's (see `VLMProcessor.check_model_config`).
    """
    src = Path(src)
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        logger.warning(
            f"{src} has no tokenizer ({', '.join(TOKENIZER_FILES)}): the converted checkpoint gets no processor, and "
            "its generation config cannot stop at <end_of_utterance>. Add a tokenizer and build one with "
            "VLMProcessor.from_model_config(config, VLMImageProcessor(), tokenizer)."
        )
        return None
    tokenizer = AutoTokenizer.from_pretrained(src)
    settings = _image_processor_settings(src)
    if settings is None:
        logger.warning(
            f"{src} has no image processor config; the converted checkpoint gets VLMImageProcessor's defaults."
        )
    processor_dict, _ = ProcessorMixin.get_processor_dict(src)
    source_seq_len = processor_dict.get("image_seq_len")
    if source_seq_len is not None and source_seq_len != config.image_seq_len:
        logger.warning(
            f"{src}: the processor's image_seq_len={source_seq_len} disagrees with the model's "
            f"{config.image_seq_len} perceiver latents; the converted processor uses the model's."
        )
    chat_template = processor_dict.get("chat_template") or tokenizer.chat_template  # None: Idefics2's format
    image_processor = VLMImageProcessor(**(settings or {}))
    return VLMProcessor.from_model_config(config, image_processor, tokenizer, chat_template=chat_template)


def convert_idefics2_checkpoint(src: str | Path, dst: str | Path, *, allow_pickle: bool = False) -> Path:
    """Convert the Idefics2 checkpoint folder `src` into a vlmforge checkpoint folder `dst`.

    Reads `config.json` and the weights (`*.safetensors`, sharded or not; pickled `pytorch_model*.bin` only
    with `allow_pickle=True`), converts and loads them strictly into `AutoregressiveVLMForConditionalGeneration`,
    and saves it with `save_pretrained`, together with:

    - our `VLMProcessor` (`convert_processor`): the source's tokenizer, image processor settings and chat
      template, so `AutoProcessor.from_pretrained(dst)` gives `Idefics2Processor`'s inputs; skipped, with a
      warning, when the source has no tokenizer;
    - a generation config (the source's `generation_config.json`, else the model's) whose EOS ids include the
      tokenizer's EOS and `<end_of_utterance>` (`chat_generation_config`), so `generate` stops after a turn.

    Everything is written beside `dst` under a temporary name and renamed into place, so `dst` either appears
    complete or not at all.

    Returns:
        `dst` as a `Path`.

    Raises:
        ValueError: `dst` exists and is not an empty folder; `src` is not an Idefics2 checkpoint; the weights
            are pickled without `allow_pickle`, unreadable, or do not match the config; the tokenizer's image
            token ids are not the config's.
    """
    src, dst = Path(src), Path(dst)
    check_destination(dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a checkpoint folder: it has no config.json.")
    model_type = json.loads((src / "config.json").read_text()).get("model_type")
    if model_type != "idefics2":
        raise ValueError(f"{src}/config.json has model_type={model_type!r}; expected 'idefics2'.")

    idefics2_config = Idefics2Config.from_pretrained(src)
    model = _build_converted_model(idefics2_config, load_weights(src, allow_pickle=allow_pickle))
    processor = convert_processor(src, model.config)
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    if processor is not None:
        model.generation_config = chat_generation_config(processor.tokenizer, model.generation_config)

    with atomic_output_dir(dst) as staging:
        model.save_pretrained(staging)  # weights, config.json, generation_config.json
        if processor is not None:
            processor.save_pretrained(staging)
    logger.info(f"Converted Idefics2 checkpoint {src} → {dst}.")
    return dst


__all__ = [
    "IDEFICS2_KEY_MAP",
    "TOKENIZER_FILES",
    "convert_config",
    "convert_idefics2_checkpoint",
    "convert_processor",
    "convert_state_dict",
]
