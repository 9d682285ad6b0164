"""Build a VLM from a pretrained SigLIP encoder and a pretrained causal LM (Idefics2 paper, sections 2–3).

The paper's first lesson (Finding 1) is that a VLM stands on its unimodal backbones. `build_vlm` takes a
transformers SigLIP folder and a transformers causal-LM folder and writes a checkpoint of either fusion
(Finding 2) whose backbones hold exactly the source weights and whose new parts are freshly initialised:

1. vision: the SigLIP tower (a full `SiglipModel` loses its text tower and logit scale/bias), its square
   position table interpolated bicubically to the grid of `image_size` (27 × 27 at 384 px → 70 × 70 at 980 px),
   so the encoder starts out adapted to native resolution (Finding 5) — `interpolate_position_embeddings`;
2. text: the LM loaded by transformers (strict: any missing, unexpected or mis-shaped key raises), its tokenizer
   given `<fake_token_around_image>`, `<image>` and `<end_of_utterance>`, and its embeddings (and an untied
   `lm_head`) given one row per new token, each the mean of the original rows — `add_image_tokens_and_resize`.
   Every other row is untouched, so on text-only input the built model's logits over the LM's original
   vocabulary are the LM's;
3. the new parts — connector (projection + perceiver, Finding 4) and, for cross-attention, the gated blocks —
   get their values from the model's `_init_weights`, exactly as `from_pretrained` initialises any parameter
   missing from a checkpoint (perceiver latents N(0, 1), cross-attention gates zero);
4. the checkpoint: weights, config, `VLMProcessor` (tokenizer, image processor, Idefics2 chat template,
   `image_seq_len` from the model config) and a generation config that stops at `<end_of_utterance>` and the
   LM's EOS — written into a temporary folder beside `output_dir` and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging as std_logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from vlmforge.conversion.checkpoint_io import atomic_output_dir, check_destination, load_weights, weight_files
from vlmforge.conversion.generation_config import chat_generation_config
from vlmforge.conversion.siglip import convert_siglip_state_dict, vision_config_from_siglip
from vlmforge.modeling.configuration_connector import POOLING_CHOICES
from vlmforge.modeling.configuration_vision_encoder import VisionEncoderConfig
from vlmforge.modeling.modeling_vision_encoder import VisionEncoder
from vlmforge.processing.image_processing_vlm import VLMImageProcessor
from vlmforge.processing.processing_vlm import CHAT_TEMPLATE, VLMProcessor
from vlmforge.processing.prompt_expansion import IMAGE_SPECIAL_TOKENS

logger = logging.get_logger(__name__)

SIGLIP_MODEL_TYPES = ("siglip_vision_model", "siglip")
# Keys of a full `SiglipModel` that are not its vision tower: dropped on purpose
_SIGLIP_NON_VISION_PREFIXES = ("text_model.", "logit_scale", "logit_bias")
# Idefics2's image processor keeps the shortest edge at 378 px at least (Finding 5)
_SHORTEST_EDGE = 378


@dataclass(frozen=True)
class Fusion:
    """Where a fusion's config and model classes live, and which of its parameters are new (regexes on keys)."""

    config_module: str
    config_class: str
    model_module: str
    model_class: str
    new_parameters: tuple[str, ...]

    def classes(self) -> tuple[type, type]:
        config_module = importlib.import_module(self.config_module)
        model_module = importlib.import_module(self.model_module)
        return getattr(config_module, self.config_class), getattr(model_module, self.model_class)


FUSIONS = {
    "autoregressive": Fusion(
        "vlmforge.modeling.configuration_autoregressive_vlm",
        "AutoregressiveVLMConfig",
        "vlmforge.modeling.modeling_autoregressive_vlm",
        "AutoregressiveVLMForConditionalGeneration",
        new_parameters=(r"model\.connector\.",),
    ),
    "cross_attention": Fusion(
        "vlmforge.modeling.configuration_cross_attention_vlm",
        "CrossAttentionVLMConfig",
        "vlmforge.modeling.modeling_cross_attention_vlm",
        "CrossAttentionVLMForConditionalGeneration",
        new_parameters=(r"model\.connector\.", r"model\.cross_attention_blocks\."),
    ),
}


# ---- pure helpers ---------------------------------------------------------------------------------------------


def interpolate_position_embeddings(weight: torch.Tensor, new_side: int) -> torch.Tensor:
    """Resample a square position table to `new_side` × `new_side` positions, bicubically.

    Args:
        weight: (side * side, D), row-major: row `i * side + j` is grid cell (i, j).

    Returns:
        (new_side * new_side, D), row-major, in `weight`'s dtype. Exactly
        `F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False, antialias=False)` on
        the (1, D, side, side) grid, computed in float32 — what transformers' SigLIP does to interpolate its
        position encoding. `align_corners=False` treats every table entry as a cell of the unit square, which is how
        the encoder reads the table (patch (i, j) of an h × w grid takes the cell holding i/h, j/w). A table that
        already has `new_side` positions per side is returned as a copy, unchanged.

    Raises:
        ValueError: `weight` is not 2-D with a square number of rows, or `new_side` < 1.
    """
    if weight.ndim != 2:
        raise ValueError(f"The position table must be (positions, hidden), got shape {tuple(weight.shape)}.")
    side = round(weight.shape[0] ** 0.5)
    if side * side != weight.shape[0]:
        raise ValueError(f"The position table has {weight.shape[0]} rows, not a square grid (side × side).")
    if new_side < 1:
        raise ValueError(f"new_side must be at least 1, got {new_side}.")
    if new_side == side:
        return weight.clone()
    hidden = weight.shape[1]
    grid = weight.float().reshape(side, side, hidden).permute(2, 0, 1)[None]  # (1, D, side, side)
    resized = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False, antialias=False)
    return resized[0].permute(1, 2, 0).reshape(new_side * new_side, hidden).to(weight.dtype)  # (new_side², D)


def mean_resized_rows(weight: torch.Tensor, *, vocab_size: int, new_token_ids: Sequence[int]) -> torch.Tensor:
    """(V, D) → (vocab_size, D): rows in `new_token_ids` and rows ≥ V hold the mean of the V original rows.

    The mean is taken in float32 and cast to `weight`'s dtype; every other row is copied unchanged. A new token's
    embedding then sits at the centre of the existing ones, and an untied output row gives it the average logit,
    so the new tokens neither dominate nor vanish at the start of training.
    """
    old_size = weight.shape[0]
    if vocab_size < old_size:
        raise ValueError(f"vocab_size={vocab_size} would drop rows of a {old_size}-row embedding matrix.")
    mean = weight.float().mean(dim=0).to(weight.dtype)  # (D,)
    resized = torch.cat([weight, mean.expand(vocab_size - old_size, -1)]) if vocab_size > old_size else weight.clone()
    resized[list(new_token_ids)] = mean
    return resized


@dataclass
class ResizedVocabulary:
    """The embeddings after `add_image_tokens_and_resize`.

    input_embeddings: (vocab_size, D); output_embeddings: (vocab_size, D), or None for a tied head;
    new_rows: the row ids that now hold the mean (the added tokens' ids, and any rows appended beyond them).
    """

    input_embeddings: torch.Tensor
    output_embeddings: torch.Tensor | None
    vocab_size: int
    new_rows: list[int]


def add_image_tokens_and_resize(
    tokenizer: PreTrainedTokenizerBase, input_embeddings: torch.Tensor, output_embeddings: torch.Tensor | None = None
) -> ResizedVocabulary:
    """Add the image special tokens the tokenizer lacks, and give each of them a mean-initialised row.

    The tokens missing from `tokenizer` (of `<fake_token_around_image>`, `<image>`, `<end_of_utterance>`) are
    added as special tokens, in place, the way `VLMProcessor` adds them. The new vocabulary size is
    max(V, len(tokenizer)) for a V-row embedding matrix: an LM whose matrix is padded beyond its tokenizer (Qwen2
    pads to a multiple of 128) gives the new tokens unused padding rows instead of growing. The rows of the added
    tokens, and rows appended beyond V, become the mean of the original rows (`mean_resized_rows`), in the input
    embeddings and in the untied output embeddings alike; every other row is untouched.

    Args:
        tokenizer: the LM's tokenizer; modified in place.
        input_embeddings: (V, D) the LM's input embedding matrix.
        output_embeddings: (V, D) its untied `lm_head` weight, or None when the head is tied to the input.

    Raises:
        ValueError: the output matrix's shape differs from the input's.
    """
    if output_embeddings is not None and output_embeddings.shape[0] != input_embeddings.shape[0]:
        raise ValueError(
            f"The LM's input embeddings have {input_embeddings.shape[0]} rows but its lm_head has "
            f"{output_embeddings.shape[0]}; expected one row per token in both."
        )
    missing = [token for token in IMAGE_SPECIAL_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    old_size = input_embeddings.shape[0]
    vocab_size = max(old_size, len(tokenizer))
    added_ids = tokenizer.convert_tokens_to_ids(missing)
    new_rows = sorted(set(added_ids) | set(range(old_size, vocab_size)))
    resize = dict(vocab_size=vocab_size, new_token_ids=new_rows)
    return ResizedVocabulary(
        input_embeddings=mean_resized_rows(input_embeddings, **resize),
        output_embeddings=None if output_embeddings is None else mean_resized_rows(output_embeddings, **resize),
        vocab_size=vocab_size,
        new_rows=new_rows,
    )


# ---- the two backbones ----------------------------------------------------------------------------------------


def _read_model_type(folder: Path, role: str) -> str | None:
    if not (folder / "config.json").is_file():
        raise ValueError(f"The {role} folder {folder} is not a transformers checkpoint: it has no config.json.")
    return json.loads((folder / "config.json").read_text()).get("model_type")


def load_siglip_vision(
    vision_path: str | Path, *, image_size: int, allow_pickle: bool = False
) -> tuple[VisionEncoderConfig, dict[str, torch.Tensor]]:
    """Our vision encoder's config and weights from a SigLIP folder, its position table resized to `image_size`.

    Accepts a `SiglipVisionModel` folder, or a `SiglipModel` one whose text tower and logit scale/bias are
    dropped. The table side becomes `image_size // patch_size` (`interpolate_position_embeddings`).

    Raises:
        ValueError: not a SigLIP folder, pickled weights without `allow_pickle`, keys that are not SigLIP's, or
            `image_size` smaller than the patch size.
    """
    vision_path = Path(vision_path)
    model_type = _read_model_type(vision_path, "vision")
    if model_type not in SIGLIP_MODEL_TYPES:
        raise ValueError(
            f"{vision_path}/config.json has model_type={model_type!r}; expected a SigLIP checkpoint, one of "
            f"{SIGLIP_MODEL_TYPES}."
        )
    source_config = vision_config_from_siglip(AutoConfig.from_pretrained(vision_path))
    if image_size < source_config.patch_size:
        raise ValueError(f"image_size={image_size} is smaller than the patch size {source_config.patch_size}.")
    state_dict = load_weights(vision_path, allow_pickle=allow_pickle)
    if model_type == "siglip":
        dropped = [key for key in state_dict if key.startswith(_SIGLIP_NON_VISION_PREFIXES)]
        state_dict = {key: value for key, value in state_dict.items() if key not in dropped}
        logger.info(f"Dropped {len(dropped)} SigLIP text-tower and logit keys; kept the vision tower.")
    config = copy.deepcopy(source_config)
    config.image_size = image_size
    with torch.device("meta"):  # the key set only
        expected_keys = VisionEncoder(source_config).state_dict().keys()
    weights = convert_siglip_state_dict(state_dict, expected_keys=expected_keys)
    table = "embeddings.position_embedding.weight"
    old_side, new_side = source_config.num_patches_per_side, config.num_patches_per_side
    weights[table] = interpolate_position_embeddings(weights[table], new_side)
    logger.info(f"Position table interpolated bicubically: {old_side}×{old_side} → {new_side}×{new_side} patches.")
    return config, weights


def load_causal_lm(
    text_path: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and tokenizer of a transformers folder, loaded strictly.

    Raises:
        ValueError: no config or tokenizer, not a causal LM transformers knows, pickled weights without
            `allow_pickle`, or weights that do not match the config (missing, unexpected or mis-shaped keys).
    """
    text_path = Path(text_path)
    _read_model_type(text_path, "text")
    files = weight_files(text_path, allow_pickle=allow_pickle)  # refuses pickles before transformers reads them
    pickled = files[0].suffix == ".bin"
    try:
        tokenizer = AutoTokenizer.from_pretrained(text_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not load a tokenizer from {text_path}: {error}") from error
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            text_path, dtype=dtype, use_safetensors=not pickled, output_loading_info=True
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not load a causal LM from {text_path}: {error}") from error
    problems = {name: sorted(info[name])[:5] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ValueError(
            f"The weights in {text_path} do not match its config ({type(model).__name__}): {problems}. "
            "A backbone must load completely; fix the checkpoint or its config."
        )
    return model.eval(), tokenizer


def _key_of(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """`module`'s weight key inside `root`."""
    name = next(name for name, candidate in root.named_modules() if candidate is module)
    return f"{name}.weight"


def text_state_dict(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], ResizedVocabulary]:
    """The LM's weights with the image tokens added: (decoder weights, head weights, the resized vocabulary).

    The decoder weights are keyed as in `AutoModel.from_config(lm.config)` (the LM's base model); the head
    weights hold `lm_head.weight` unless the head is tied (then it is re-tied to the embeddings on loading).
    """
    decoder, head = lm.base_model, lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(lm).__name__} has an lm_head bias; vlmforge's lm_head has none.")
    tied = bool(lm.config.get_text_config().tie_word_embeddings)
    embedding_key = _key_of(decoder, lm.get_input_embeddings())
    decoder_weights = dict(decoder.state_dict())
    resized = add_image_tokens_and_resize(
        tokenizer, decoder_weights[embedding_key], None if tied else head.weight.detach()
    )
    decoder_weights[embedding_key] = resized.input_embeddings
    head_weights = {} if tied else {"lm_head.weight": resized.output_embeddings}
    return decoder_weights, head_weights, resized


# ---- assembly -------------------------------------------------------------------------------------------------


def fusion_classes(fusion: str) -> tuple[Fusion, type, type]:
    """The `Fusion` entry and its (config class, model class) for `fusion` ("autoregressive" | "cross_attention")."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion={fusion!r} is not one of {tuple(FUSIONS)}.")
    entry = FUSIONS[fusion]
    try:
        config_class, model_class = entry.classes()
    except (ModuleNotFoundError, AttributeError) as error:
        raise ValueError(f"The {fusion} fusion is not available in this vlmforge install ({error}).") from error
    return entry, config_class, model_class


class _DropLoadReport(std_logging.Filter):
    """transformers reports the connector's weights as MISSING: here that is the point, and we log our own line."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    report_logger = logging.get_logger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    report_logger.addFilter(report_filter)
    try:
        yield
    finally:
        report_logger.removeFilter(report_filter)


def assemble_vlm(
    fusion: str,
    vision_config: VisionEncoderConfig,
    vision_weights: dict[str, torch.Tensor],
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    pooling: str = "perceiver",
    connector_config: dict | None = None,
    cross_attention_every_n_layers: int = 4,
    dtype: torch.dtype = torch.float32,
    base_models: dict[str, str] | None = None,
) -> PreTrainedModel:
    """A VLM of `fusion` holding the SigLIP weights and the LM's weights (image tokens added to `tokenizer`).

    The model is built by `from_pretrained` from the merged state dict, so every parameter the backbones do not
    provide — the connector, and the cross-attention blocks — is initialised by the model's own `_init_weights`,
    as for any checkpoint that lacks it. A backbone key the model does not take, a shape mismatch, or a missing
    parameter outside the fusion's new parts raises `ValueError`. `base_models` (`{"vision": id, "text": id}`)
    is recorded in the config for the model card.
    """
    entry, config_class, model_class = fusion_classes(fusion)
    decoder_weights, head_weights, vocabulary = text_state_dict(lm, tokenizer)
    text_config = {**lm.config.get_text_config().to_dict(), "vocab_size": vocabulary.vocab_size}
    config_kwargs = dict(
        vision_config=vision_config,
        connector_config={**(connector_config or {}), "pooling": pooling},
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_SPECIAL_TOKENS[1]),
        tie_word_embeddings=not head_weights,
        dtype=dtype,
    )
    if fusion == "cross_attention":
        config_kwargs["cross_attention_every_n_layers"] = cross_attention_every_n_layers
    if base_models:
        config_kwargs["base_models"] = dict(base_models)
    config = config_class(**config_kwargs)
    state_dict = {
        **{f"model.vision_model.{key}": value for key, value in vision_weights.items()},
        **{f"model.text_model.{key}": value for key, value in decoder_weights.items()},
        **head_weights,
    }
    with _quiet_load_report():
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
        )
    new_parameters = re.compile("|".join(entry.new_parameters))
    unexplained = sorted(key for key in info["missing_keys"] if not new_parameters.search(key))
    problems = {"unexpected_keys": sorted(info["unexpected_keys"]), "mismatched_keys": sorted(info["mismatched_keys"])}
    if unexplained or any(problems.values()):
        raise ValueError(
            f"The backbones do not fit the {model_class.__name__}: {len(unexplained)} backbone parameter(s) not "
            f"provided {unexplained[:5]}, {problems}. Is the text model a decoder AutoModel builds from its config?"
        )
    logger.info(
        f"Built {model_class.__name__}: {len(state_dict)} backbone tensors loaded, {len(info['missing_keys'])} new "
        f"tensors initialised; token rows {vocabulary.new_rows} hold the mean of the LM's original rows."
    )
    return model.eval()


def hub_id_from_path(path: Path) -> str | None:
    """`org/name` for a folder inside the Hugging Face cache (`.../models--org--name/snapshots/<hash>`), else None."""
    for part in reversed(Path(path).resolve().parts):
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def _image_processor(vision_path: Path, image_size: int) -> VLMImageProcessor:
    """Idefics2's native-resolution resize capped at `image_size`, with the SigLIP folder's normalisation if any."""
    settings: dict = {"size": {"shortest_edge": min(_SHORTEST_EDGE, image_size), "longest_edge": image_size}}
    try:
        saved, _ = VLMImageProcessor.get_image_processor_dict(vision_path)
    except OSError:  # transformers' "no image processor config here"
        saved = {}
    settings.update({key: saved[key] for key in ("image_mean", "image_std") if key in saved})
    return VLMImageProcessor(**settings)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return "auto" if dtype is None else dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16').")
    return resolved


def build_vlm(
    vision_path: str | Path,
    text_path: str | Path,
    output_dir: str | Path,
    *,
    fusion: str = "autoregressive",
    pooling: str = "perceiver",
    image_size: int = 980,
    cross_attention_every_n_layers: int = 4,
    connector_config: dict | None = None,
    dtype: torch.dtype | str | None = None,
    base_models: dict[str, str] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Build a VLM checkpoint in `output_dir` from a SigLIP folder and a causal-LM folder (see the module docstring).

    Args:
        vision_path: a transformers `SiglipVisionModel` or `SiglipModel` folder.
        text_path: a transformers causal-LM folder (safetensors) with its tokenizer.
        output_dir: where the checkpoint is written; must be absent or empty unless `overwrite`.
        fusion: `"autoregressive"` (visual tokens in the LM's sequence) or `"cross_attention"` (gated blocks).
        pooling: `"perceiver"` (64 latents by default) or `"none"`.
        image_size: the side in pixels the position table is interpolated to (`image_size // patch_size` patches);
            also the image processor's longest edge.
        cross_attention_every_n_layers: cross-attention fusion only: a gated block before every n-th LM layer.
        connector_config: `ConnectorConfig` fields besides `pooling` (e.g. `n_latents`, `depth`); defaults are
            Idefics2's.
        dtype: dtype of the built model; None keeps the LM's (`config.json`'s dtype, float32 if it has none).
        base_models: the backbones' Hub ids, `{"vision": ..., "text": ...}`, recorded in the config as
            `base_models` for the model card; None infers them from Hugging Face cache paths where it can.
        overwrite: replace a non-empty `output_dir` (atomically, after everything else is written).
        allow_pickle: also read pickled `.bin` weights (unpickling runs code from the file: trusted sources only).

    Returns:
        `output_dir` as a `Path`: model weights and `config.json`, `generation_config.json` (stops at
        `<end_of_utterance>` and the LM's EOS), tokenizer, `processor_config.json`, `chat_template.jinja`.

    Raises:
        ValueError: a bad option, a non-empty `output_dir` without `overwrite`, pickled weights without
            `allow_pickle`, or a backbone folder that is not what is expected (see `load_siglip_vision`,
            `load_causal_lm`, `assemble_vlm`).
    """
    vision_path, text_path, output_dir = Path(vision_path), Path(text_path), Path(output_dir)
    fusion_classes(fusion)
    dtype = _resolve_dtype(dtype)
    if pooling not in POOLING_CHOICES:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLING_CHOICES}.")
    if output_dir.resolve() in (vision_path.resolve(), text_path.resolve()):
        raise ValueError(f"output_dir {output_dir} is one of the source folders; choose a new path.")
    check_destination(output_dir, overwrite=overwrite)
    if base_models is None:
        inferred = {"vision": hub_id_from_path(vision_path), "text": hub_id_from_path(text_path)}
        base_models = {part: hub_id for part, hub_id in inferred.items() if hub_id}

    with logging.tqdm(total=5, desc="vlmforge build", unit="step") as progress:
        progress.set_postfix_str("vision encoder")
        vision = load_siglip_vision(vision_path, image_size=image_size, allow_pickle=allow_pickle)
        progress.update()
        progress.set_postfix_str("language model")
        lm, tokenizer = load_causal_lm(text_path, allow_pickle=allow_pickle, dtype=dtype)
        progress.update()
        progress.set_postfix_str("assemble")
        model = assemble_vlm(
            fusion, *vision, lm, tokenizer,
            pooling=pooling, connector_config=connector_config,
            cross_attention_every_n_layers=cross_attention_every_n_layers, dtype=lm.dtype, base_models=base_models,
        )  # fmt: skip
        model.generation_config = chat_generation_config(tokenizer, lm.generation_config)
        del lm, vision  # the model holds the tensors it needs
        progress.update()
        progress.set_postfix_str("processor")
        tokenizer.chat_template = CHAT_TEMPLATE  # the LM's own template (if any) would disagree with the processor's
        if tokenizer.pad_token is None:
            logger.warning(
                f"The tokenizer of {text_path} has no pad token, so the processor cannot pad batches; set one "
                "(e.g. tokenizer.pad_token = tokenizer.unk_token, as Idefics2 does) before batching."
            )
        processor = VLMProcessor.from_model_config(model.config, _image_processor(vision_path, image_size), tokenizer)
        progress.update()
        progress.set_postfix_str("save")
        with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
            model.save_pretrained(staging)  # weights, config.json, generation_config.json
            processor.save_pretrained(staging)  # tokenizer, processor_config.json, chat_template.jinja
        progress.update()
    logger.info(f"Built a {fusion} VLM from {vision_path} and {text_path} → {output_dir}.")
    return output_dir


__all__ = [
    "FUSIONS",
    "ResizedVocabulary",
    "add_image_tokens_and_resize",
    "assemble_vlm",
    "build_vlm",
    "hub_id_from_path",
    "interpolate_position_embeddings",
    "load_causal_lm",
    "load_siglip_vision",
    "mean_resized_rows",
]
