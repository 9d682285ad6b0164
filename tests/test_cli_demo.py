"""The `vlmforge` command and `make demo`'s library function, `vlmforge.demo.run_demo`."""

import importlib.metadata
import os

import pytest
from transformers import AutoProcessor, GenerationConfig

import vlmforge
from vlmforge import cli
from vlmforge.demo import run_demo


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    return output_dir, run_demo(output_dir, max_new_tokens=5, seed=0)


def test_run_demo_reports_visual_tokens_timings_and_generation(demo_result):
    _, result = demo_result
    expected = {
        "output_dir", "random_weights", "image_size", "pixel_values_shape", "patches_per_image",
        "visual_tokens_per_image", "num_image_tokens", "prompt", "prompt_tokens", "generated_ids", "generated_text",
        "eos_token_ids", "stopped_at_eos", "timings",
    }
    assert expected <= result.keys()
    assert result["random_weights"] is True
    # the perceiver pools every image, whatever its patch count, into 64 visual tokens; the processor said so first
    assert result["visual_tokens_per_image"] == result["num_image_tokens"] == 64
    # native resolution: the 512 x 600 photograph is neither resized nor squared (36 x 42 patches of 14 px)
    assert result["image_size"] == (512, 600) and result["pixel_values_shape"] == (1, 1, 3, 600, 512)
    assert result["patches_per_image"] == 36 * 42
    # the chat template's rendering, with the generation prompt
    assert result["prompt"] == "User:<image>Describe the picture in one sentence.<end_of_utterance>\nAssistant:"
    assert 1 <= len(result["generated_ids"]) <= 5
    assert all(isinstance(token, int) for token in result["generated_ids"])
    assert isinstance(result["generated_text"], str)
    for key in ("build_and_save_s", "load_s", "preprocess_s", "encode_image_s", "generate_s", "tokens_per_s"):
        assert result["timings"][key] > 0


def test_run_demo_writes_a_reloadable_checkpoint(demo_result):
    output_dir, _ = demo_result
    names = set(os.listdir(output_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    processor = AutoProcessor.from_pretrained(output_dir)
    assert type(processor) is vlmforge.VLMProcessor
    assert type(processor.image_processor) is vlmforge.VLMImageProcessor
    assert processor.image_seq_len == 64


def test_run_demo_checkpoint_stops_at_end_of_utterance(demo_result):
    output_dir, result = demo_result
    tokenizer = AutoProcessor.from_pretrained(output_dir).tokenizer
    expected = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    assert GenerationConfig.from_pretrained(output_dir).eos_token_id == expected == result["eos_token_ids"]
    # with random weights it may or may not stop early; either way the report says which
    assert result["stopped_at_eos"] == (result["generated_ids"][-1] in expected)


def test_run_demo_says_the_weights_are_random(tmp_path, capsys):
    run_demo(tmp_path, max_new_tokens=1)
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed
    assert "64 visual tokens per image" in printed


def test_run_demo_rejects_an_empty_generation_budget():
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_demo(max_new_tokens=0)


def test_help_lists_the_sub_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "demo" in help_text and "convert" in help_text


def test_convert_help_lists_idefics2_and_allow_pickle(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "idefics2", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "SRC" in help_text and "DST" in help_text and "--allow-pickle" in help_text


def test_arguments_become_the_dataclass_handed_to_the_library(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.ConvertIdefics2Args, "run", lambda self: calls.append(self))
    monkeypatch.setattr(cli.DemoArgs, "run", lambda self: calls.append(self))
    assert cli.main(["convert", "idefics2", "in", "out", "--allow-pickle"]) == 0
    assert cli.main(["demo", "--output-dir", "d", "--max-new-tokens", "3"]) == 0
    assert calls == [
        cli.ConvertIdefics2Args(src="in", dst="out", allow_pickle=True),
        cli.DemoArgs(output_dir="d", max_new_tokens=3, seed=0),
    ]


def test_bad_input_is_an_error_message_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "idefics2", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "vlmforge convert: error:" in capsys.readouterr().err


def test_console_script_entry_point_is_importable():
    (entry_point,) = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "vlmforge"]
    assert entry_point.value == "vlmforge.cli:main"
    assert entry_point.load() is cli.main


# ---- the trained demo (vlmforge/assets/demo_checkpoint, `vlmforge train recipes/demo.yaml`) -----------------------


def _tiny_trained_layout_checkpoint(folder):
    """A checkpoint laid out as the demo recipe writes it (tiny, untrained): model, processor, generation config."""
    from pathlib import Path

    from vlmforge.training.recipe import TrainRecipe, build_from_scratch

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    model, processor = build_from_scratch(TrainRecipe.from_yaml(recipes / "demo_ci.yaml").model["from_scratch"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder


def test_trained_demo_prints_each_answer_beside_the_truth(tmp_path, capsys):
    from vlmforge.demo import run_trained_demo

    checkpoint = _tiny_trained_layout_checkpoint(tmp_path / "ckpt")
    result = run_trained_demo(checkpoint, tmp_path / "out", num_images=3, seed=0)
    assert result["random_weights"] is False
    assert {"count", "reading"} <= set(result["accuracy"]) <= {"colour", "shape", "position", "count", "reading"}
    for item in result["items"]:
        assert item["correct"] == (item["answer"] == item["truth"])
    printed = capsys.readouterr().out
    assert "truth:" in printed and "accuracy:" in printed
    # the output folder loads like the random demo's, and holds the images asked about
    assert (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [f"image_{i}.png" for i in range(3)]


def test_demo_falls_back_to_random_weights_without_the_trained_checkpoint(tmp_path, monkeypatch, capsys):
    import vlmforge.demo as demo_module

    monkeypatch.setattr(demo_module, "DEMO_CHECKPOINT", tmp_path / "absent")
    monkeypatch.setattr(demo_module, "trained_checkpoint_available", lambda checkpoint=tmp_path / "absent": False)
    result = demo_module.demo(tmp_path / "random", max_new_tokens=1)
    assert result["random_weights"] is True
    assert "RANDOM weights" in capsys.readouterr().out


def test_shipped_demo_checkpoint_answers_fresh_images():
    """The embedded checkpoint exists, loads through AutoModelForVision2Seq, and knows colours and counts."""
    from vlmforge.demo import DEMO_CHECKPOINT, DEMO_STREAM_OFFSET, trained_checkpoint_available
    from vlmforge.auto import AutoModelForVision2Seq
    from vlmforge.training.synthetic_vqa import evaluate_vqa

    assert trained_checkpoint_available(), f"the trained demo checkpoint is missing from {DEMO_CHECKPOINT}"
    model = AutoModelForVision2Seq.from_pretrained(DEMO_CHECKPOINT)
    processor = AutoProcessor.from_pretrained(DEMO_CHECKPOINT)
    scores = evaluate_vqa(model, processor, n=48, seed=DEMO_STREAM_OFFSET + 7)
    assert scores["colour"]["accuracy"] >= 0.85, scores
    assert scores["count"]["accuracy"] >= 0.5, scores
