"""`run_recipe` end to end, a few steps each, on every model and data source a recipe can name besides the CI
recipe's own (`from_scratch` + `synthetic_vqa`, in test_recipe.py): a model built from a SigLIP folder and an LM
folder (`model: {build: ...}`), a `datasets.save_to_disk` folder (`data: {dataset: DIR, split: ...}`) and a JSONL
file with an image folder (`data: {jsonl: FILE, image_folder: DIR}`)."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_connector_config, tiny_text_config, tiny_vision_config
from test_build import plain_tokenizer
from transformers import (
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlmforge.auto import AutoModelForVision2Seq
from vlmforge.training.recipe import TrainRecipe, load_data_source, run_recipe
from vlmforge.training.synthetic_vqa import SyntheticVQADataset

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
IMAGE_SIZE = 56
SCENES = dict(image_size=IMAGE_SIZE, single_object_fraction=1.0, categories=["colour", "shape"])


def recipe(
    tmp_path: Path, *, train: dict, eval: dict | None = None, model: dict | None = None, **options
) -> TrainRecipe:
    """Two steps of 2 samples, on the CI recipe's tiny from-scratch model unless `model` is given."""
    training_args = dict(
        max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    return TrainRecipe(
        output_dir=str(tmp_path / "run"),
        model=model or TrainRecipe.from_yaml(RECIPES / "demo_ci.yaml").model,
        data={"train": train, "eval": eval},
        training_args=training_args,
        num_threads=1,
        **options,
    )


def trained_epoch(recipe: TrainRecipe) -> float:
    """The epoch reached, after checking that both steps logged a finite loss."""
    state = json.loads((Path(recipe.output_dir) / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), state["log_history"]
    return state["epoch"]


def eval_loss(recipe: TrainRecipe) -> float:
    return json.loads((Path(recipe.output_dir) / "eval_results.json").read_text())["eval_loss"]


def scenes(n: int, seed: int) -> list[dict]:
    dataset = SyntheticVQADataset(n, seed=seed, **SCENES)
    return [dataset[i] for i in range(n)]


# ---- data: {dataset: DIR, split: ...} ---------------------------------------------------------------------------


def test_run_recipe_on_a_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    splits = {"train": scenes(8, seed=0), "validation": scenes(4, seed=1)}
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(folder)

    run = recipe(
        tmp_path,
        train={"dataset": str(folder), "split": "train"},
        eval={"dataset": str(folder), "split": "validation"},
    )
    final_dir = run_recipe(run)
    assert trained_epoch(run) == pytest.approx(0.5)  # 2 steps × 2 samples of the 8 in "train", not of the 4 others
    assert math.isfinite(eval_loss(run))
    assert AutoModelForVision2Seq.from_pretrained(final_dir).config.model_type == "vlmforge_autoregressive"
    with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train', 'validation'\]"):
        load_data_source({"dataset": str(folder), "split": "test"})


# ---- data: {jsonl: FILE, image_folder: DIR} ---------------------------------------------------------------------


def write_jsonl(folder: Path, rows: list[dict]) -> Path:
    """`rows` as JSONL whose images are PNG files in `folder / "images"`, named relative to that folder."""
    (folder / "images").mkdir(parents=True)
    with (folder / "train.jsonl").open("w") as lines:
        for index, row in enumerate(rows):
            row["images"][0].save(folder / "images" / f"{index}.png")
            lines.write(json.dumps({"images": [f"{index}.png"], "texts": row["texts"]}) + "\n")
    return folder / "train.jsonl"


def test_run_recipe_on_jsonl_with_an_image_folder(tmp_path):
    path = write_jsonl(tmp_path / "data", scenes(8, seed=0))
    source = {"jsonl": str(path), "image_folder": str(tmp_path / "data" / "images")}
    run = recipe(tmp_path, train=source, eval=source)
    run_recipe(run)
    assert trained_epoch(run) == pytest.approx(0.5)
    assert math.isfinite(eval_loss(run))


def test_data_source_keys_are_checked():
    with pytest.raises(ValueError, match=r"data.train: unknown keys \['images'\] beside 'jsonl'"):
        TrainRecipe(output_dir="out", model={"checkpoint": "c"}, data={"train": {"jsonl": "f", "images": "d"}})
    with pytest.raises(ValueError, match=r"data.eval: unknown keys \['splits'\] beside 'dataset'; it takes"):
        TrainRecipe(
            output_dir="out", model={"checkpoint": "c"},
            data={"train": {"dataset": "d"}, "eval": {"dataset": "d", "splits": "x"}},
        )  # fmt: skip


# ---- model: {build: {vision: SIGLIP_DIR, text: LM_DIR, ...}} ----------------------------------------------------


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, str]:
    """A tiny random SigLIP vision folder and a tiny random Llama folder with a text-only tokenizer."""
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**tiny_vision_config(image_size=IMAGE_SIZE))).save_pretrained(root / "siglip")
    SiglipImageProcessorPil().save_pretrained(root / "siglip")
    tokenizer = plain_tokenizer()
    llama = tiny_text_config("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(LlamaConfig(**llama)).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return {"vision": str(root / "siglip"), "text": str(root / "llama")}


BUILDS = {
    # Finding 2's two set-ups: autoregressive with everything training; cross-attention with frozen vision, LoRA LM
    "autoregressive": ({}, {"vision": "full", "text": "full"}),
    "cross_attention": ({"cross_attention_every_n_layers": 1}, {"vision": "frozen", "text": "lora", "lora_r": 2}),
}


@pytest.mark.parametrize("fusion", list(BUILDS))
def test_run_recipe_builds_the_model_from_backbones(tmp_path, backbones, fusion):
    options, policies = BUILDS[fusion]
    build = dict(backbones, fusion=fusion, image_size=IMAGE_SIZE, connector_config=tiny_connector_config(), **options)
    train = {"synthetic_vqa": dict(n=8, seed=0, **SCENES)}
    run = recipe(tmp_path, model={"build": build}, train=train, policies=policies)
    final_dir = run_recipe(run)
    assert trained_epoch(run) == pytest.approx(0.5)
    assert (Path(run.output_dir) / "built_model" / "config.json").is_file()  # built once, where a resume finds it
    model = AutoModelForVision2Seq.from_pretrained(final_dir)
    assert model.config.model_type == f"vlmforge_{fusion}"
    assert model.config.text_config.hidden_size == tiny_text_config()["hidden_size"]
    assert AutoProcessor.from_pretrained(final_dir).image_processor.size["longest_edge"] == IMAGE_SIZE
    assert (final_dir / "adapter").is_dir() == (policies["text"] == "lora")  # LoRA: adapters + merged model
