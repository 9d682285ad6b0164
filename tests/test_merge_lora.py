"""`vlmforge merge-lora`: the merged checkpoint reproduces base + adapter (and not the base alone), carries the
processor, chat template and generation config, and nothing is written when the check or an input fails."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file
from test_export import save_tiny_checkpoint
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmforge.cli import main
from vlmforge.conversion.merge_lora import check_logits, merge_lora, probe_inputs

# float32 tolerance of the parity checks (merging reorders the arithmetic: x(W + s·BA) vs xW + s·(xA)B)
ATOL = RTOL = 1e-4


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def base_and_adapter(tmp_path):
    """A tiny base checkpoint and a LoRA adapter on the attention projections of all three parts, with random
    (non-zero) B matrices so that the adapter changes the outputs. Returns (base dir, adapter dir, reference logits
    of base + adapter, base logits, probe inputs)."""
    base = tmp_path / "base"
    model, processor = save_tiny_checkpoint(base)
    inputs = probe_inputs(processor)
    base_logits = logits(model, inputs)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora).eval()
    adapted_logits = logits(peft_model, inputs)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)  # the adapter matters
    peft_model.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter", adapted_logits, base_logits, inputs


def test_merged_checkpoint_reproduces_base_plus_adapter(tmp_path, base_and_adapter):
    base, adapter, adapted_logits, base_logits, inputs = base_and_adapter

    out = merge_lora(base, adapter, tmp_path / "merged", max_shard_size="300KB")

    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    merged_logits = logits(merged, inputs)
    torch.testing.assert_close(merged_logits, adapted_logits, atol=ATOL, rtol=RTOL)
    assert (merged_logits - base_logits).abs().max() > 1e-3
    # a plain checkpoint: no LoRA tensors, no adapter files; sharded as asked
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not [name for name in index["weight_map"] if "lora" in name]
    assert not (out / "adapter_config.json").exists()
    for shard in set(index["weight_map"].values()):
        assert not [name for name in load_file(out / shard) if "lora" in name]
    # processor, chat template, generation config that stops at <end_of_utterance>
    processor = AutoProcessor.from_pretrained(out)
    assert (out / "chat_template.jinja").is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert processor.end_of_utterance_token_id in generation["eos_token_id"]


def test_a_merge_whose_outputs_differ_writes_nothing(tmp_path, base_and_adapter, monkeypatch):
    base, adapter, *_ = base_and_adapter
    # a broken merge: drop the adapter instead of folding it in
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *args, **kwargs: self.unload())

    with pytest.raises(ValueError, match="differ from base \\+ adapter"):
        merge_lora(base, adapter, tmp_path / "merged")

    assert not (tmp_path / "merged").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".merged")]


def test_refusals(tmp_path, base_and_adapter):
    base, adapter, *_ = base_and_adapter
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "file").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        merge_lora(base, adapter, tmp_path / "occupied")

    weights = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(weights, adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickled adapter weights"):
        merge_lora(base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    with pytest.raises(ValueError, match="no adapter_config.json"):
        merge_lora(base, tmp_path / "occupied", tmp_path / "merged")


def test_check_logits_tolerance():
    reference = torch.tensor([[10.0, -3.0, 0.5]])
    check_logits(reference + 5e-4, reference, torch.float32)  # within 1e-4 · max(1, 10) + 1e-4 · |logit|
    with pytest.raises(ValueError, match="differ"):
        check_logits(reference + torch.tensor([[0.0, 0.0, 2e-3]]), reference, torch.float32)
    check_logits(reference + 0.1, reference, torch.bfloat16)


def test_cli_merge_lora(tmp_path, base_and_adapter, capsys):
    base, adapter, *_ = base_and_adapter
    assert main(["merge-lora", str(base), str(adapter), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert "wrote" in capsys.readouterr().out
