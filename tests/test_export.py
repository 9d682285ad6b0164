"""`vlmforge export`: a hub-ready folder that loads without vlmforge, written atomically, checked before writing,
and pushed through huggingface_hub (a recording stand-in here: no network)."""

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import tiny_connector_config, tiny_text_config, tiny_vision_config
from huggingface_hub import metadata_load
from PIL import Image
from safetensors.torch import load_file, save_file

import vlmforge
from vlmforge.cli import main
from vlmforge.conversion import export as export_module
from vlmforge.conversion.export import (
    check_remote_code,
    export_checkpoint,
    parse_size,
    plan_shards,
    push_folder_to_hub,
    read_tensor_records,
)
from vlmforge.conversion.generation_config import chat_generation_config
from vlmforge.toy_tokenizer import build_toy_tokenizer

PHOTO = Path(vlmforge.__file__).parent / "assets" / "grace_hopper.jpg"
QUESTION = "Describe the picture in one sentence."
NEW_TOKENS = 8
BASE_MODELS = ["google/siglip-so400m-patch14-384", "Qwen/Qwen2-0.5B"]
AUTO_CLASSES = {
    "AutoConfig",
    "AutoModel",
    "AutoModelForImageTextToText",
    "AutoModelForVision2Seq",
    "AutoProcessor",
    "AutoImageProcessor",
}


def fusion_classes(fusion: str):
    """(config class, model class) of a fusion; skips the test while the cross-attention model is not there."""
    if fusion == "autoregressive":
        return vlmforge.AutoregressiveVLMConfig, vlmforge.AutoregressiveVLMForConditionalGeneration
    try:
        from vlmforge.modeling.configuration_cross_attention_vlm import CrossAttentionVLMConfig
        from vlmforge.modeling.modeling_cross_attention_vlm import CrossAttentionVLMForConditionalGeneration
    except ImportError as error:
        pytest.skip(f"the cross-attention model is not available: {error}")
    return CrossAttentionVLMConfig, CrossAttentionVLMForConditionalGeneration


def save_tiny_checkpoint(path: Path, fusion: str = "autoregressive", *, seed: int = 0, vocab: int = 128, **overrides):
    """A tiny random vlmforge checkpoint as every writer leaves one: model, VLMProcessor (toy tokenizer), chat
    generation config. Returns the in-memory (package-native) model and processor."""
    config_class, model_class = fusion_classes(fusion)
    tokenizer = build_toy_tokenizer(vocab)
    text = tiny_text_config(
        "qwen2",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    kwargs = dict(
        vision_config=tiny_vision_config(),
        connector_config=tiny_connector_config(),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    if fusion == "cross_attention":
        # open gates, so the photograph changes the tokens (a zero gate would hide a broken image path)
        kwargs.update(cross_attention_every_n_layers=1, gate_init=1.0)
    kwargs.update(overrides)
    config = config_class(**kwargs)
    processor = vlmforge.VLMProcessor.from_model_config(config, vlmforge.VLMImageProcessor(), tokenizer)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config = chat_generation_config(tokenizer, model.generation_config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def photo_messages(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def greedy_tokens(model, processor) -> list[int]:
    with Image.open(PHOTO) as image:
        inputs = processor.apply_chat_template(
            photo_messages(image.convert("RGB")),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


# The loading side: an isolated interpreter (-I: no PYTHONPATH, no user site, no script dir; -S: no .pth files,
# so not the editable install's finder) that sees only the venv's site-packages, where vlmforge is not installed.
ISOLATED_LOADER = r"""
import importlib.util, json, sys
args = json.loads(sys.argv[1])
sys.path.extend(args["site_packages"])
result = {"vlmforge_found": importlib.util.find_spec("vlmforge") is not None}
try:
    import vlmforge  # noqa: F401
    result["import_vlmforge"] = "succeeded"
except ModuleNotFoundError:
    result["import_vlmforge"] = "failed"

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

n = args["new_tokens"]
for folder in args["folders"]:
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.open(args["photo"]).convert("RGB")
    content = [{"type": "image", "image": image}, {"type": "text", "text": args["question"]}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    content = [{"type": "image", "path": args["photo"]}, {"type": "text", "text": args["question"]}]
    reply = pipe(text=[{"role": "user", "content": content}], max_new_tokens=4)
    result[folder] = {
        "tokens": output[0, inputs["input_ids"].shape[1]:].tolist(),
        "model_module": type(model).__module__,
        "processor_module": type(processor).__module__,
        "image_processor_module": type(processor.image_processor).__module__,
        "pipeline_model_module": type(pipe.model).__module__,
        "pipeline_reply": reply[0]["generated_text"][-1]["content"],
    }
print("RESULT " + json.dumps(result))
"""


def load_in_isolated_process(folders: list[Path], tmp_path: Path) -> dict:
    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    args = dict(
        site_packages=site_packages,
        folders=[str(folder) for folder in folders],
        photo=str(PHOTO),
        question=QUESTION,
        new_tokens=NEW_TOKENS,
    )
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    completed = subprocess.run(  # noqa: PLW1510 (the return code is asserted with stderr shown)
        [sys.executable, "-I", "-S", "-c", ISOLATED_LOADER, json.dumps(args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


# ---- export, then load where vlmforge cannot be imported --------------------------------------------------------


FUSIONS = ["autoregressive", "cross_attention"]


@pytest.fixture(scope="module")
def isolated_loads(tmp_path_factory):
    """Both fusions exported, then loaded in ONE isolated process (its imports take most of the time):
    fusion → (native greedy tokens, what the isolated process saw)."""
    tmp_path = tmp_path_factory.mktemp("isolated")
    native, folders = {}, {}
    for fusion in FUSIONS:
        try:
            model, processor = save_tiny_checkpoint(tmp_path / f"{fusion}_checkpoint", fusion)
        except pytest.skip.Exception:
            continue
        native[fusion] = greedy_tokens(model, processor)
        folders[fusion] = export_checkpoint(
            tmp_path / f"{fusion}_checkpoint", tmp_path / f"{fusion}_exported", max_shard_size="300KB"
        )
    result = load_in_isolated_process(list(folders.values()), tmp_path)
    return {fusion: (native[fusion], result, result[str(folder)], folder) for fusion, folder in folders.items()}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_exported_folder_loads_without_vlmforge_and_generates_the_same_tokens(isolated_loads, fusion):
    fusion_classes(fusion)  # skips while the cross-attention model is not there
    expected, result, loaded, folder = isolated_loads[fusion]

    assert result["vlmforge_found"] is False and result["import_vlmforge"] == "failed"
    assert loaded["tokens"] == expected
    for key in ("model_module", "processor_module", "image_processor_module", "pipeline_model_module"):
        assert loaded[key].startswith("transformers_modules."), (key, loaded[key])
    assert isinstance(loaded["pipeline_reply"], str)
    card = (folder / "README.md").read_text()
    facts = {
        "autoregressive": ["**fully autoregressive**", "| language model |"],
        "cross_attention": ["**cross-attention**", "before decoder layers 0, 1 (of 2)", "| cross-attention blocks |"],
    }
    for fact in facts[fusion]:
        assert fact in card, fact


def test_folder_layout_auto_map_remote_code_and_model_card(tmp_path):
    model, _ = save_tiny_checkpoint(tmp_path / "checkpoint", base_models=BASE_MODELS)
    out = export_checkpoint(
        tmp_path / "checkpoint", tmp_path / "exported", max_shard_size="300KB", license="apache-2.0"
    )

    config = json.loads((out / "config.json").read_text())
    assert set(config["auto_map"]) == AUTO_CLASSES
    assert config["auto_map"]["AutoModelForVision2Seq"] == config["auto_map"]["AutoModelForImageTextToText"]
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_vlm.VLMProcessor"
    assert processor_config["image_processor"]["auto_map"] == {
        "AutoImageProcessor": "image_processing_vlm.VLMImageProcessor"
    }
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    generation = json.loads((out / "generation_config.json").read_text())
    assert model.config.text_config.eos_token_id in generation["eos_token_id"]

    code = sorted(path.name for path in out.glob("*.py"))
    assert {"configuration_autoregressive_vlm.py", "modeling_autoregressive_vlm.py", "processing_vlm.py"} <= set(code)
    assert "__init__.py" not in code
    for path in out.glob("*.py"):
        imports_vlmforge = re.compile(r"^\s*(?:from|import)\s+vlmforge\b", flags=re.MULTILINE)
        assert not imports_vlmforge.search(path.read_text()), path.name
    check_remote_code(out, config["auto_map"])  # every sibling import present, nothing but allowed packages

    # sharded, with an index, and every tensor bit-identical to the model's
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)
    saved = {}
    for shard in shards:
        saved.update(load_file(out / shard))
    assert saved.keys() == index["weight_map"].keys() == model.state_dict().keys()
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())

    metadata = metadata_load(out / "README.md")
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["license"] == "apache-2.0"
    assert metadata["base_model"] == BASE_MODELS
    assert "vlmforge" in metadata["tags"]
    card = (out / "README.md").read_text()
    for fact in ("fully autoregressive", "perceiver", "4 per image", "20 with image splitting", "remote_code=True"):
        assert fact in card, fact
    assert f"{model.num_parameters():,}" in card


def test_shards_respect_max_shard_size(tmp_path):
    save_tiny_checkpoint(tmp_path / "checkpoint")
    out = export_checkpoint(tmp_path / "checkpoint", tmp_path / "exported", max_shard_size="100KB")
    records, _ = read_tensor_records(out)
    by_file = {}
    for record in records:
        by_file.setdefault(record.file, []).append(record)
    for file, shard in by_file.items():
        size = sum(record.nbytes for record in shard)
        assert size <= 100_000 or len(shard) == 1, (file.name, size)  # a bigger tensor gets a shard of its own


def test_single_shard_has_no_index(tmp_path):
    save_tiny_checkpoint(tmp_path / "checkpoint")
    out = export_checkpoint(tmp_path / "checkpoint", tmp_path / "exported")
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()


# ---- safety ---------------------------------------------------------------------------------------------------


def test_exception_in_a_shard_write_leaves_no_output_and_no_temporary_folder(tmp_path, monkeypatch):
    save_tiny_checkpoint(tmp_path / "checkpoint")
    real_write_shard, calls = export_module._write_shard, []

    def failing_write_shard(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real_write_shard(path, *args, **kwargs)

    monkeypatch.setattr(export_module, "_write_shard", failing_write_shard)
    (tmp_path / "exports").mkdir()
    out = tmp_path / "exports" / "model"

    with pytest.raises(OSError, match="injected"):
        export_checkpoint(tmp_path / "checkpoint", out, max_shard_size="200KB")

    assert len(calls) == 2 and calls[0].parent.parent == out.parent  # it failed while writing beside OUT
    assert not out.exists()
    assert list((tmp_path / "exports").iterdir()) == []


def test_non_empty_output_is_refused_unless_overwrite(tmp_path):
    save_tiny_checkpoint(tmp_path / "checkpoint")
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    with pytest.raises(ValueError, match="not an empty folder"):
        export_checkpoint(tmp_path / "checkpoint", out)
    assert (out / "keep.txt").read_text() == "precious"

    export_checkpoint(tmp_path / "checkpoint", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "exported"]  # no staging or old folder


def test_exporting_onto_the_checkpoint_itself_is_refused(tmp_path):
    save_tiny_checkpoint(tmp_path / "checkpoint")
    with pytest.raises(ValueError, match="must not be the checkpoint"):
        export_checkpoint(tmp_path / "checkpoint", tmp_path / "checkpoint", overwrite=True)


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    model, _ = save_tiny_checkpoint(tmp_path / "checkpoint")
    (tmp_path / "checkpoint" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "checkpoint" / "pytorch_model.bin")

    with pytest.raises(ValueError, match="pickled"):
        export_checkpoint(tmp_path / "checkpoint", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    out = export_checkpoint(tmp_path / "checkpoint", tmp_path / "exported", allow_pickle=True)
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())
    assert not list(out.glob("*.bin"))


def test_processor_that_disagrees_with_the_model_is_refused(tmp_path):
    save_tiny_checkpoint(tmp_path / "checkpoint")
    processor_config = tmp_path / "checkpoint" / "processor_config.json"
    settings = json.loads(processor_config.read_text())
    settings["image_seq_len"] = 7  # the perceiver makes 4 visual tokens per sub-image
    processor_config.write_text(json.dumps(settings))

    with pytest.raises(ValueError, match="image_seq_len"):
        export_checkpoint(tmp_path / "checkpoint", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_tokenizer_longer_than_the_vocabulary_is_refused(tmp_path):
    _, processor = save_tiny_checkpoint(tmp_path / "checkpoint")
    processor.tokenizer.add_tokens(["<an_extra_token_the_model_has_no_row_for>"])
    processor.tokenizer.save_pretrained(tmp_path / "checkpoint")

    with pytest.raises(ValueError, match=r"the tokenizer has 129 tokens but the model's vocabulary has 128 rows"):
        export_checkpoint(tmp_path / "checkpoint", tmp_path / "exported")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    save_tiny_checkpoint(tmp_path / "checkpoint")
    weights = load_file(tmp_path / "checkpoint" / "model.safetensors")
    del weights["model.connector.perceiver_resampler.latents"]
    save_file(weights, tmp_path / "checkpoint" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing, e.g. \['model.connector.perceiver_resampler.latents'\]"):
        export_checkpoint(tmp_path / "checkpoint", tmp_path / "exported")


def test_remote_code_importing_vlmforge_or_parent_packages_is_refused(tmp_path):
    (tmp_path / "modeling_x.py").write_text("import torch\nfrom vlmforge.modeling import y\n")
    with pytest.raises(ValueError, match="imports vlmforge.modeling"):
        check_remote_code(tmp_path, {"AutoModel": "modeling_x.X"})
    (tmp_path / "modeling_x.py").write_text("from . import sibling\n")
    with pytest.raises(ValueError, match="relative import the Hub loader does not follow"):
        check_remote_code(tmp_path, {"AutoModel": "modeling_x.X"})
    (tmp_path / "modeling_x.py").write_text("from .absent_sibling import Y\n")
    with pytest.raises(ValueError, match="absent_sibling, which is not in the folder"):
        check_remote_code(tmp_path, {"AutoModel": "modeling_x.X"})


# ---- push to the Hub (recorded, no network) --------------------------------------------------------------------


class RecordingHubApi:
    """Stands in for `huggingface_hub.HfApi`: records each call and answers like the Hub would."""

    def __init__(self, token=None):
        self.token = token
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        kwargs["files"] = sorted(path.name for path in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs.pop("repo_id"), kwargs))
        return "commit-info"


def test_export_pushes_the_folder_with_the_recorded_hub_calls(tmp_path, monkeypatch):
    save_tiny_checkpoint(tmp_path / "checkpoint")
    apis = []
    monkeypatch.setattr(export_module, "HfApi", lambda token=None: apis.append(RecordingHubApi(token)) or apis[-1])

    out = export_checkpoint(
        tmp_path / "checkpoint",
        tmp_path / "exported",
        push_to_hub="someone/tiny-vlm",
        private=True,
        revision="v1",
        commit_message="First upload",
    )

    (api,) = apis
    assert api.token is None  # huggingface_hub then reads HF_TOKEN or the `hf auth login` cache
    assert [call[:2] for call in api.calls] == [
        ("create_repo", "someone/tiny-vlm"),
        ("create_branch", "someone/tiny-vlm"),
        ("upload_folder", "someone/tiny-vlm"),
    ]
    assert api.calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert api.calls[1][2] == {"branch": "v1", "repo_type": "model", "exist_ok": True}
    upload = api.calls[2][2]
    assert upload["folder_path"] == str(out) and upload["revision"] == "v1"
    assert upload["commit_message"] == "First upload" and upload["repo_type"] == "model"
    assert {"config.json", "README.md", "modeling_autoregressive_vlm.py", "model.safetensors"} <= set(upload["files"])
    assert "someone/tiny-vlm" in (out / "README.md").read_text()  # the card's snippets name the repo


def test_push_folder_to_hub_defaults(tmp_path):
    save_tiny_checkpoint(tmp_path / "checkpoint")
    api = RecordingHubApi()

    assert push_folder_to_hub(tmp_path / "checkpoint", "someone/tiny-vlm", api=api) == "commit-info"

    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]  # no branch without a revision
    assert api.calls[0][2]["private"] is None  # an existing repo's visibility is left alone
    assert api.calls[1][2]["revision"] is None and "vlmforge" in api.calls[1][2]["commit_message"]
    with pytest.raises(ValueError, match="no config.json"):
        push_folder_to_hub(tmp_path, "someone/tiny-vlm", api=api)


# ---- command line and small pieces -----------------------------------------------------------------------------


def test_cli_export_and_its_refusal(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "checkpoint")
    out = tmp_path / "exported"

    assert main(["export", str(tmp_path / "checkpoint"), str(out), "--max-shard-size", "300KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert "wrote" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "checkpoint"), str(out)])
    assert exit_info.value.code == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_parse_size_and_plan_shards():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size(1234) == 1234
    for bad in ("five", "5XB", 0, "-1MB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)

    records = [export_module.TensorRecord(f"t{i}", "F32", (n,), 4 * n, Path("x")) for i, n in enumerate([3, 3, 10, 1])]
    shards = plan_shards(records, 24)
    assert [[r.name for r in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3"]]
