"""`vlmforge build`: a VLM from a tiny random SigLIP folder and a tiny random Llama or Qwen2 folder.

The built model holds the backbones' weights exactly (text-only logits equal the LM's over its original
vocabulary; the position table is torch's bicubic interpolation of SigLIP's), the new tokens get mean rows, the
processor and generation config come along, and the refusals and failures leave nothing half-written.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import vlmforge
from conftest import tiny_connector_config, tiny_text_config, tiny_vision_config
from vlmforge import cli
from vlmforge.conversion import build as build_module
from vlmforge.conversion.build import (
    add_image_tokens_and_resize,
    build_vlm,
    hub_id_from_path,
    interpolate_position_embeddings,
    mean_resized_rows,
)
from vlmforge.processing.processing_vlm import CHAT_TEMPLATE
from vlmforge.processing.prompt_expansion import IMAGE_SPECIAL_TOKENS

PHOTO = Path(vlmforge.__file__).parent / "assets" / "grace_hopper.jpg"
SIGLIP_IMAGE_SIZE, BUILT_IMAGE_SIZE = 56, 98  # a 4 × 4 position table becomes 7 × 7
PADDED_ROWS = 8  # the Qwen2 LM's embedding has rows beyond its tokenizer, as Qwen2 checkpoints do
SIGLIP_MEAN, SIGLIP_STD = [0.1, 0.2, 0.3], [0.25, 0.5, 0.75]
CONNECTOR = tiny_connector_config()
FUSIONS = ["autoregressive", "cross_attention"]
BUILD_OPTIONS = {
    "autoregressive": {},
    "cross_attention": {"cross_attention_every_n_layers": 1},  # a block before each of the 2 layers
}


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer WITHOUT the image tokens: what a text-only LM ships with."""
    characters = list("▁abcdefghijklmnopqrstuvwxyz.,:?!'")
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *characters])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# ---- source folders, saved as transformers saves them ------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    vision = dict(tiny_vision_config(image_size=SIGLIP_IMAGE_SIZE))
    SiglipVisionModel(SiglipVisionConfig(**vision)).save_pretrained(root / "siglip_vision")
    SiglipImageProcessorPil(image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD).save_pretrained(root / "siglip_vision")
    text_tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=50)
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text_tower)).save_pretrained(root / "siglip_full")

    tokenizer = plain_tokenizer()
    llama = tiny_text_config("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(LlamaConfig(**llama)).eval().save_pretrained(root / "llama")  # untied head, grows by 3 rows
    qwen2 = tiny_text_config(
        "qwen2", vocab_size=len(tokenizer) + PADDED_ROWS, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2
    )
    Qwen2ForCausalLM(Qwen2Config(**qwen2)).eval().save_pretrained(root / "qwen2")  # tied head, padded rows
    for name in ("llama", "qwen2"):
        tokenizer.save_pretrained(root / name)
    return {"siglip_vision": root / "siglip_vision", "siglip_full": root / "siglip_full", "llama": root / "llama",
            "qwen2": root / "qwen2", "root": root}  # fmt: skip


def build(
    sources, output: Path, *, fusion="autoregressive", text="llama", vision="siglip_vision", text_path=None, **kwargs
) -> Path:
    options = dict(image_size=BUILT_IMAGE_SIZE, connector_config=CONNECTOR, **BUILD_OPTIONS[fusion], **kwargs)
    return build_vlm(sources[vision], text_path or sources[text], output, fusion=fusion, **options)


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    """Built checkpoints, one per (fusion, LM), made on first use."""
    cache: dict[tuple[str, str], Path] = {}

    def get(fusion: str, text: str) -> Path:
        if (fusion, text) not in cache:
            cache[fusion, text] = build(sources, tmp_path_factory.mktemp("built") / "out", fusion=fusion, text=text)
        return cache[fusion, text]

    return get


def load_built(folder: Path):
    return vlmforge.AutoModelForVision2Seq.from_pretrained(folder).eval()


def text_only_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, len(plain_tokenizer()), (2, 9), generator=generator)  # (B, S), no image tokens


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- pure helpers --------------------------------------------------------------------------------------------


def test_interpolate_position_embeddings_is_torch_bicubic():
    table = torch.randn(27 * 27, 8, generator=torch.Generator().manual_seed(0))
    resized = interpolate_position_embeddings(table, 70)  # SigLIP-so400m: 384 px → 980 px
    grid = table.reshape(27, 27, 8).permute(2, 0, 1)[None]  # (1, D, 27, 27)
    expected = F.interpolate(grid, size=(70, 70), mode="bicubic", align_corners=False, antialias=False)
    assert resized.shape == (70 * 70, 8)
    assert torch.equal(resized, expected[0].permute(1, 2, 0).reshape(70 * 70, 8))


def test_interpolate_position_embeddings_is_row_major():
    """Row i * side + j is grid cell (i, j): a table that varies only down the rows still does after resizing."""
    rows = torch.arange(4.0).repeat_interleave(4)[:, None].expand(16, 3)  # cell (i, j) holds i
    resized = interpolate_position_embeddings(rows, 7).reshape(7, 7, 3)
    assert torch.allclose(resized, resized[:, :1].expand(7, 7, 3), atol=1e-6)  # constant along each row
    assert (resized[1:, 0] > resized[:-1, 0]).all()  # increasing down the rows


def test_interpolate_position_embeddings_keeps_dtype_and_same_size():
    table = torch.randn(16, 4).to(torch.bfloat16)
    assert torch.equal(interpolate_position_embeddings(table, 4), table)
    assert interpolate_position_embeddings(table, 6).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_position_embeddings(torch.randn(15, 4), 6)


def test_mean_resized_rows():
    weight = torch.randn(5, 3)
    resized = mean_resized_rows(weight, vocab_size=7, new_token_ids=[1, 5, 6])
    assert resized.shape == (7, 3)
    for row in (1, 5, 6):
        assert torch.equal(resized[row], weight.mean(dim=0))
    for row in (0, 2, 3, 4):
        assert torch.equal(resized[row], weight[row])


def test_add_image_tokens_and_resize_adds_only_missing_tokens():
    tokenizer = plain_tokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})  # already there: keeps its row
    size = len(tokenizer)
    embeddings, head = torch.randn(size, 4), torch.randn(size, 4)
    resized = add_image_tokens_and_resize(tokenizer, embeddings, head)
    assert all(token in tokenizer.get_vocab() for token in IMAGE_SPECIAL_TOKENS)
    assert resized.vocab_size == size + 2 == len(tokenizer)
    assert resized.new_rows == [size, size + 1]
    assert torch.equal(resized.input_embeddings[:size], embeddings)
    assert torch.equal(resized.output_embeddings[size:], head.mean(dim=0).expand(2, -1))


# ---- the built checkpoint ------------------------------------------------------------------------------------


def image_token_ids(folder: Path) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer.convert_tokens_to_ids(token) for token in IMAGE_SPECIAL_TOKENS]


@pytest.mark.parametrize("text", ["llama", "qwen2"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_text_only_logits_equal_the_language_model(sources, built, fusion, text):
    """torch.equal on float32 CPU, over the LM's vocabulary minus the rows the image tokens took (Qwen2's padding)."""
    folder = built(fusion, text)
    model = load_built(folder)
    lm = AutoModelForCausalLM.from_pretrained(sources[text]).eval()
    kept = [i for i in range(lm.config.vocab_size) if i not in image_token_ids(folder)]
    ids = text_only_ids()
    with torch.no_grad():
        logits, expected = model(input_ids=ids).logits, lm(input_ids=ids).logits
    assert logits.shape[-1] == model.config.get_text_config().vocab_size
    assert torch.equal(logits[..., kept], expected[..., kept])


@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_image_tokens_added_with_mean_rows(sources, built, text):
    folder = built("autoregressive", text)
    model = load_built(folder)
    lm = AutoModelForCausalLM.from_pretrained(sources[text]).eval()
    new_ids = image_token_ids(folder)
    original = len(plain_tokenizer())
    assert new_ids == [original, original + 1, original + 2]  # appended in IMAGE_SPECIAL_TOKENS order
    assert model.config.image_token_id == new_ids[1]
    vocab = model.config.get_text_config().vocab_size
    if text == "llama":  # 3 rows appended
        assert vocab == lm.config.vocab_size + 3
    else:  # the tokens took 3 of the 8 padding rows: no growth
        assert vocab == lm.config.vocab_size == original + PADDED_ROWS
    pairs = [(model.get_input_embeddings().weight, lm.get_input_embeddings().weight)]
    if text == "llama":
        pairs.append((model.lm_head.weight, lm.lm_head.weight))
    else:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    for built_rows, source_rows in pairs:
        for token_id in new_ids:
            assert torch.equal(built_rows[token_id], source_rows.mean(dim=0))
        kept = [i for i in range(lm.config.vocab_size) if i not in new_ids]
        assert torch.equal(built_rows[kept], source_rows[kept])


def test_position_table_is_torch_bicubic_of_siglip(sources, built):
    model = load_built(built("autoregressive", "llama"))
    siglip = SiglipVisionModel.from_pretrained(sources["siglip_vision"])
    # SigLIP's keys, without the pooling head and the `vision_model.` prefix (present or not, by version)
    source = {k.removeprefix("vision_model."): v for k, v in siglip.state_dict().items()}
    source = {k: v for k, v in source.items() if not k.startswith("head.")}
    table = source["embeddings.position_embedding.weight"]  # (16, D): 4 × 4
    grid = table.reshape(4, 4, -1).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(49, -1)
    vision = model.model.vision_model
    assert model.config.vision_config.image_size == BUILT_IMAGE_SIZE
    assert model.config.vision_config.num_patches_per_side == 7
    assert torch.equal(vision.embeddings.position_embedding.weight, expected)
    # every other vision weight is SigLIP's, unchanged
    assert vision.state_dict().keys() == source.keys()
    for key, value in vision.state_dict().items():
        if key != "embeddings.position_embedding.weight":
            assert torch.equal(value, source[key]), key


def test_full_siglip_model_gives_its_vision_tower(sources, tmp_path):
    model = load_built(build(sources, tmp_path / "out", vision="siglip_full"))
    siglip = SiglipModel.from_pretrained(sources["siglip_full"]).vision_model
    vision = model.model.vision_model
    assert torch.equal(vision.encoder.layers[1].mlp.fc2.weight, siglip.encoder.layers[1].mlp.fc2.weight)
    assert torch.equal(vision.post_layernorm.bias, siglip.post_layernorm.bias)


def test_connector_is_freshly_initialised(built):
    model = load_built(built("autoregressive", "llama"))
    latents = model.model.connector.perceiver_resampler.latents  # (n_latents, D)
    # N(0, 1) latents: distinct queries (identical ones would get identical gradients forever)
    assert latents.shape == (CONNECTOR["n_latents"], 32)
    assert torch.cdist(latents, latents).add(torch.eye(len(latents))).min() > 0.1
    assert 0.5 < latents.std() < 1.5
    projection = model.model.connector.modality_projection.gate_proj.weight
    fan_in_std = projection.shape[1] ** -0.5  # fan-in scaled (issue 6), not initializer_range 0.02
    assert torch.isfinite(projection).all() and 0.8 * fan_in_std < projection.std() < 1.2 * fan_in_std


def test_cross_attention_blocks_start_closed(built):
    """The blocks are new: initialised by the model (gates exactly 0, so text-only logits are the LM's)."""
    model = load_built(built("cross_attention", "llama"))
    assert model.config.cross_attention_layers == [0, 1]
    assert len(model.model.cross_attention_blocks) == 2
    for block in model.model.cross_attention_blocks:
        assert block.attn_gate.item() == 0 and block.mlp_gate.item() == 0
        assert torch.isfinite(block.cross_attn.q_proj.weight).all() and block.cross_attn.q_proj.weight.std() > 0


@pytest.mark.parametrize("fusion", FUSIONS)
def test_built_model_runs_on_a_processed_photograph(built, fusion):
    folder = built(fusion, "llama")
    model, processor = load_built(folder), AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[Image.open(PHOTO)], text=prompt, return_tensors="pt")
    # the image processor's longest edge is the built image size
    assert max(inputs["pixel_values"].shape[-2:]) == BUILT_IMAGE_SIZE
    # autoregressive: image_seq_len placeholders; cross-attention: one marker per image
    markers = model.config.image_seq_len if fusion == "autoregressive" else 1
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == markers
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_processor_loads_and_round_trips(built, tmp_path, fusion):
    folder = built(fusion, "llama")
    config = vlmforge.AutoModelForVision2Seq.from_pretrained(folder).config
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, vlmforge.VLMProcessor)
    assert processor.image_seq_len == config.image_seq_len == CONNECTOR["n_latents"]
    assert processor.fusion == config.model_type
    assert processor.image_token_id == config.image_token_id
    assert processor.chat_template == CHAT_TEMPLATE
    # the SigLIP folder's normalisation, the built image size as the longest edge
    assert list(processor.image_processor.image_mean) == SIGLIP_MEAN
    assert list(processor.image_processor.image_std) == SIGLIP_STD
    assert processor.image_processor.size["longest_edge"] == BUILT_IMAGE_SIZE
    processor.save_pretrained(tmp_path / "again")
    again = AutoProcessor.from_pretrained(tmp_path / "again")
    assert again.to_dict() == processor.to_dict()
    text = "<image>what is this?"
    image = Image.open(PHOTO)
    first, second = processor(images=[image], text=text), again(images=[image], text=text)
    assert first["input_ids"] == second["input_ids"]
    assert torch.equal(torch.as_tensor(first["pixel_values"]), torch.as_tensor(second["pixel_values"]))


def test_generation_config_stops_at_end_of_utterance_and_eos(built):
    folder = built("autoregressive", "llama")
    generation_config = GenerationConfig.from_pretrained(folder)
    end_of_utterance = image_token_ids(folder)[2]
    assert generation_config.eos_token_id == [2, end_of_utterance]  # the LM's </s>, then <end_of_utterance>
    assert generation_config.pad_token_id == 0


def test_base_models_recorded_for_the_model_card(sources, tmp_path):
    cache = tmp_path / "hub" / "models--acme--tiny-lm" / "snapshots" / "0123abc"
    assert hub_id_from_path(cache) == "acme/tiny-lm" and hub_id_from_path(sources["llama"]) is None
    shutil.copytree(sources["llama"], cache)
    folder = build(sources, tmp_path / "out", text=None, text_path=cache, base_models=None)
    assert load_built(folder).config.base_models == {"text": "acme/tiny-lm"}
    folder = build(sources, tmp_path / "out2", base_models={"vision": "google/siglip", "text": "acme/lm"})
    assert load_built(folder).config.base_models == {"vision": "google/siglip", "text": "acme/lm"}


def test_dtype_casts_every_part(sources, tmp_path):
    model = load_built(build(sources, tmp_path / "out", dtype="bfloat16"))
    lm = AutoModelForCausalLM.from_pretrained(sources["llama"])
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    up_proj = lm.model.layers[0].mlp.up_proj.weight
    assert torch.equal(model.model.text_model.layers[0].mlp.up_proj.weight, up_proj.bfloat16())
    with pytest.raises(ValueError, match="not a torch dtype"):
        build(sources, tmp_path / "bad", dtype="float99")


def test_pooling_none(sources, tmp_path):
    folder = build(sources, tmp_path / "out", pooling="none")
    model, processor = load_built(folder), AutoProcessor.from_pretrained(folder)
    assert model.config.connector_config.pooling == "none" and processor.image_seq_len is None
    assert not hasattr(model.model.connector, "perceiver_resampler")


def test_cli_build(sources, tmp_path, capsys):
    output = tmp_path / "out"
    argv = ["build", "--vision", str(sources["siglip_vision"]), "--text", str(sources["llama"]),
            "--output", str(output), "--image-size", str(BUILT_IMAGE_SIZE), "--pooling", "none"]  # fmt: skip
    assert cli.main(argv) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    assert json.loads((output / "config.json").read_text())["model_type"] == "vlmforge_autoregressive"
    with pytest.raises(SystemExit) as exit_info:  # non-empty output: a clean error, no traceback
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err


# ---- refusals and failures -----------------------------------------------------------------------------------


def test_non_empty_output_refused_unless_overwrite(sources, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        build(sources, output)
    assert (output / "keep.txt").read_text() == "mine"
    build(sources, output, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_pickled_weights_refused_unless_allowed(sources, tmp_path):
    text = tmp_path / "pickled_llama"
    shutil.copytree(sources["llama"], text)
    lm = AutoModelForCausalLM.from_pretrained(text)
    torch.save(lm.state_dict(), text / "pytorch_model.bin")
    (text / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="pickled"):
        build_vlm(sources["siglip_vision"], text, tmp_path / "out", image_size=BUILT_IMAGE_SIZE)
    assert not (tmp_path / "out").exists()
    folder = build_vlm(
        sources["siglip_vision"], text, tmp_path / "out", image_size=BUILT_IMAGE_SIZE, connector_config=CONNECTOR,
        allow_pickle=True,
    )  # fmt: skip
    assert torch.equal(load_built(folder).model.text_model.norm.weight, lm.model.norm.weight)


def test_wrong_folders_and_options_refused(sources, tmp_path):
    with pytest.raises(ValueError, match="expected a SigLIP checkpoint"):
        build_vlm(sources["llama"], sources["llama"], tmp_path / "a")
    with pytest.raises(ValueError, match="no config.json"):
        build_vlm(sources["siglip_vision"], tmp_path, tmp_path / "b")
    with pytest.raises(ValueError, match="fusion="):
        build_vlm(sources["siglip_vision"], sources["llama"], tmp_path / "c", fusion="early")
    with pytest.raises(ValueError, match="pooling="):
        build_vlm(sources["siglip_vision"], sources["llama"], tmp_path / "d", pooling="mean")
    with pytest.raises(ValueError, match="smaller than the patch size"):
        build_vlm(sources["siglip_vision"], sources["llama"], tmp_path / "e", image_size=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_midway_leaves_no_output(sources, tmp_path, monkeypatch, overwrite):
    """The model is already in the staging folder when saving the processor fails."""
    output = tmp_path / "out"
    if overwrite:
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    written = []

    def failing_save(processor, folder, **kwargs):
        written.extend(p.name for p in Path(folder).iterdir())
        raise OSError("disk full")

    monkeypatch.setattr(build_module.VLMProcessor, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="disk full"):
        build(sources, output, overwrite=overwrite)
    assert "model.safetensors" in written
    if overwrite:  # the old output is untouched
        assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]
    else:
        assert not output.exists()
    assert leftovers(tmp_path) == []
