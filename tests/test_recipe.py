"""Training recipes: YAML round trip, the CI recipe really learns, resume reproduces the loss, `vlmforge train` runs
end to end (also data-parallel under `accelerate launch`)."""

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoProcessor, TrainerCallback

from vlmforge import cli
from vlmforge.auto import AutoModelForVision2Seq
from vlmforge.training.collator import IGNORE_INDEX, VLMDataCollator
from vlmforge.training.recipe import (
    TrainRecipe,
    _check_distributed,
    build_from_scratch,
    build_trainer,
    load_data_source,
    run_recipe,
    training_arguments,
)
from vlmforge.training.synthetic_vqa import answer_vocabulary, evaluate_vqa

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def ci_recipe(tmp_path: Path, **training_args) -> TrainRecipe:
    recipe = TrainRecipe.from_yaml(RECIPES / "demo_ci.yaml")
    recipe.output_dir = str(tmp_path / "run")
    recipe.training_args.update(training_args)
    return recipe


# ---- the recipe file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo.yaml", "demo_ci.yaml"])
def test_recipe_yaml_round_trip(tmp_path, name):
    recipe = TrainRecipe.from_yaml(RECIPES / name)
    again = TrainRecipe.from_yaml(recipe.to_yaml(tmp_path / name))
    assert again == recipe
    assert yaml.safe_load((tmp_path / name).read_text()) == dataclasses.asdict(recipe)


def test_recipe_errors_say_what_was_expected(tmp_path):
    base = TrainRecipe.from_yaml(RECIPES / "demo_ci.yaml").to_dict()
    with pytest.raises(ValueError, match="Unknown recipe keys"):
        TrainRecipe.from_dict({**base, "epochs": 3})
    with pytest.raises(ValueError, match="exactly one of"):
        TrainRecipe.from_dict({**base, "model": {"checkpoint": "a", "from_scratch": {}}})
    with pytest.raises(ValueError, match="'train' source"):
        TrainRecipe.from_dict({**base, "data": {"eval": base["data"]["eval"]}})
    with pytest.raises(ValueError, match="policies.text"):
        TrainRecipe.from_dict({**base, "policies": {"vision": "full", "text": "half"}})
    with pytest.raises(FileNotFoundError, match="No recipe file"):
        TrainRecipe.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_recipe(ci_recipe(tmp_path), resume=True)


def test_from_scratch_tokenizer_has_every_answer_as_one_token():
    _, processor = build_from_scratch(TrainRecipe.from_yaml(RECIPES / "demo.yaml").model["from_scratch"])
    tokenizer = processor.tokenizer
    assert all(len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1 for word in answer_vocabulary())


def test_jsonl_source_opens_images_from_its_folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 30), (255, 0, 0)).save(tmp_path / "red.png")
    sample = {"images": ["red.png"], "texts": [{"user": "What colour?", "assistant": "red"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(sample) + "\n")
    dataset = load_data_source({"jsonl": str(tmp_path / "train.jsonl"), "image_folder": str(tmp_path)})
    assert len(dataset) == 1 and dataset[0]["images"][0].size == (20, 30)
    assert dataset[0]["texts"] == sample["texts"]


# ---- training really learns -------------------------------------------------------------------------------------


def conditional_answer_entropy(dataset, n: int) -> float:
    """H(answer | question) in nats per answer over the first `n` samples: the loss of the best model that reads
    the question but not the image."""
    by_question: dict[str, Counter] = {}
    for index in range(n):
        for turn in dataset[index]["texts"]:
            by_question.setdefault(turn["user"], Counter())[turn["assistant"]] += 1
    total = sum(sum(counts.values()) for counts in by_question.values())
    entropy = 0.0
    for counts in by_question.values():
        m = sum(counts.values())
        entropy -= sum(c / total * math.log(c / m) for c in counts.values())
    return entropy


@torch.no_grad()
def answer_token_loss(model, processor, dataset) -> float:
    """Mean cross-entropy on the answer tokens (assistant text, without the `<end_of_utterance>` that closes it)."""
    batch = VLMDataCollator(processor)([dataset[i] for i in range(len(dataset))])
    labels = batch.pop("labels")
    logits = model.eval()(**batch).logits[:, :-1]
    targets = labels[:, 1:].masked_fill(labels[:, 1:] == processor.end_of_utterance_token_id, IGNORE_INDEX)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX).item()


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    recipe = ci_recipe(tmp_path_factory.mktemp("ci"))
    return recipe, run_recipe(recipe)


def test_ci_recipe_learns_well_below_the_answer_prior(ci_run):
    recipe, final_dir = ci_run
    model = AutoModelForVision2Seq.from_pretrained(final_dir)
    processor = AutoProcessor.from_pretrained(final_dir)
    prior = conditional_answer_entropy(load_data_source(recipe.data["train"]), 2000)
    loss = answer_token_loss(model, processor, load_data_source(recipe.data["eval"]))
    # colour and shape are equally likely: the image-blind optimum is (log 6 + log 4) / 2 ≈ 1.59 nats per answer
    assert prior == pytest.approx((math.log(6) + math.log(4)) / 2, abs=0.02)
    assert loss < 0.6 * prior, f"answer loss {loss:.3f} is not well below the answer prior {prior:.3f}"
    eval_kwargs = {k: v for k, v in recipe.data["eval"]["synthetic_vqa"].items() if k not in ("n", "seed")}
    scores = evaluate_vqa(model, processor, n=64, seed=2, **eval_kwargs)
    assert scores["colour"]["accuracy"] >= 0.8, scores


def test_run_recipe_saves_model_processor_and_generation_config(ci_run):
    _, final_dir = ci_run
    names = set(os.listdir(final_dir))
    expected = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "processor_config.json"}
    assert expected <= names
    processor = AutoProcessor.from_pretrained(final_dir)
    assert processor.image_processor.size["longest_edge"] == 56


# ---- resume -----------------------------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Stop training after `step` (as a kill right after a checkpoint would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _losses(output_dir: Path, step: int) -> dict[int, float]:
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def test_resume_reaches_the_same_loss_at_the_same_step(tmp_path):
    settings = dict(max_steps=12, save_strategy="steps", save_steps=6, logging_steps=1, eval_strategy="no")
    whole = ci_recipe(tmp_path / "whole", **settings)
    run_recipe(whole)

    interrupted = ci_recipe(tmp_path / "interrupted", **settings)
    trainer, _ = build_trainer(interrupted)
    trainer.add_callback(StopAt(6))
    trainer.train()
    assert sorted(p.name for p in Path(interrupted.output_dir).glob("checkpoint-*")) == ["checkpoint-6"]
    run_recipe(interrupted, resume=True)

    expected, resumed = _losses(Path(whole.output_dir), 12), _losses(Path(interrupted.output_dir), 12)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4), (step, resumed[step], expected[step])


# ---- the command line -------------------------------------------------------------------------------------------


def test_train_command_calls_run_recipe(monkeypatch, capsys):
    calls = []

    def fake_run_recipe(recipe, resume):
        calls.append((recipe, resume))
        return "out"

    monkeypatch.setattr("vlmforge.training.recipe.run_recipe", fake_run_recipe)
    assert cli.main(["train", "r.yaml", "--resume"]) == 0
    assert cli.main(["train", "r.yaml"]) == 0
    assert calls == [("r.yaml", True), ("r.yaml", False)]
    assert "vlmforge train: wrote out" in capsys.readouterr().out


def test_train_command_reports_a_missing_recipe(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2
    assert "vlmforge train: error: No recipe file" in capsys.readouterr().err


def test_accelerate_launch_two_cpu_processes_runs_vlmforge_train(tmp_path):
    recipe = ci_recipe(tmp_path, max_steps=4, per_device_train_batch_size=4, logging_steps=1)
    recipe.data["train"]["synthetic_vqa"]["n"] = 80
    recipe.data["eval"]["synthetic_vqa"]["n"] = 8
    path = recipe.to_yaml(tmp_path / "recipe.yaml")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is installed with the package"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    # `--cpu --num_processes 2` starts ONE process in accelerate 1.x (multi-CPU there means mpirun); `--multi_gpu`
    # starts 2 torchrun processes, which find no GPU and train data-parallel over gloo on the CPU
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "vlmforge.cli", "train", str(path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vlmforge train: wrote" in done.stdout
    # 4 steps of 2 processes x 4 samples = 32 of the 80 samples: epoch 0.4 (one process would reach 0.2)
    state = json.loads((Path(recipe.output_dir) / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(0.4)
    assert AutoModelForVision2Seq.from_pretrained(recipe.final_dir).num_parameters() > 0


# ---- distributed settings ---------------------------------------------------------------------------------------


def test_fsdp_and_ddp_settings_reach_training_arguments(tmp_path):
    fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": ["VisionEncoderLayer", "LlamaDecoderLayer"]}
    recipe = ci_recipe(tmp_path, fsdp=True, fsdp_config=fsdp_config, ddp_find_unused_parameters=False)
    arguments = training_arguments(recipe)
    assert arguments.fsdp_plugin_args["fsdp_version"] == 2
    assert arguments.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "VisionEncoderLayer,LlamaDecoderLayer"
    assert arguments.ddp_find_unused_parameters is False
    assert arguments.output_dir == recipe.output_dir and arguments.remove_unused_columns is False


def test_deepspeed_setting_reaches_training_arguments(tmp_path):
    recipe = ci_recipe(tmp_path, deepspeed={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 16})
    if importlib.util.find_spec("deepspeed") is None:  # TrainingArguments asks for the package: the key got there
        with pytest.raises(importlib.metadata.PackageNotFoundError, match="deepspeed"):
            training_arguments(recipe)
    else:
        assert training_arguments(recipe).deepspeed_plugin is not None


def test_fsdp_that_accelerate_would_drop_is_refused():
    """`vlmforge train` with fsdp under `accelerate launch --multi_gpu` on CPUs: accelerate runs DDP (MULTI_CPU)
    and says nothing; the recipe would train unsharded. (In one process, Trainer itself refuses fsdp.)"""
    trainer = SimpleNamespace(
        args=SimpleNamespace(fsdp=True),
        is_fsdp_enabled=False,
        accelerator=SimpleNamespace(num_processes=1, distributed_type="MULTI_CPU"),
    )
    with pytest.raises(ValueError, match=r"training_args.fsdp is set, but accelerate did not enable FSDP \(acc"):
        _check_distributed(trainer)
    trainer.is_fsdp_enabled = True
    _check_distributed(trainer)


def test_build_trainer_refuses_processes_that_would_each_train_alone(tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu` without GPUs and without use_cpu: every process would train on its own."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes were launched, but accelerate trains each one alone"):
        build_trainer(ci_recipe(tmp_path, use_cpu=False))
