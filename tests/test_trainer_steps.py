"""transformers.Trainer, unchanged, on tiny models: a few steps lower the loss on a fixed batch for both fusions with
activation checkpointing on (non-reentrant), per-part gradient norms are logged, and a non-finite loss stops
training with a message naming the step, before the optimizer writes NaNs into the weights."""

import pytest
import torch
from conftest import tiny_autoregressive_model, tiny_cross_attention_model
from PIL import Image
from test_collator import processor_for
from transformers import Trainer, TrainerCallback, TrainingArguments

from vlmforge.training import (
    GradNormPerPartCallback,
    NonFiniteLossCallback,
    NonFiniteLossError,
    VLMDataCollator,
    apply_training_policy,
    enable_activation_checkpointing,
    parameter_groups,
    special_token_ids,
    uses_reentrant_checkpointing,
)
from vlmforge.training.policies import unwrap

COLOURS = {"red": (200, 20, 20), "green": (20, 180, 40), "blue": (30, 40, 210), "white": (240, 240, 240)}


def samples() -> list[dict]:
    """Four colour questions (the_cauldron schema) and one text-only chat: one fixed batch."""
    rows = [
        {"images": [Image.new("RGB", (40, 30), rgb)], "texts": [{"user": "What colour?", "assistant": name}]}
        for name, rgb in COLOURS.items()
    ]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    return rows


def arguments(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=5,
        max_steps=8,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        activation_checkpointing=True,
        remove_unused_columns=False,  # the collator needs the raw "images"/"texts"/"messages" columns
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def fixed_batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train()
    return loss


CASES = {
    # Finding 3: the autoregressive fusion with LoRA on the LM; Finding 2: cross-attention with frozen backbones
    "autoregressive": (tiny_autoregressive_model, dict(vision="lora", text="lora")),
    "cross_attention": (tiny_cross_attention_model, dict(vision="frozen", text="frozen")),
}


@pytest.mark.parametrize("fusion", list(CASES))
def test_trainer_steps_lower_the_loss(fusion, tmp_path):
    build, policy = CASES[fusion]
    processor = processor_for(fusion)
    lora = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = apply_training_policy(
        build(), **policy, **lora, new_token_ids=special_token_ids(processor), verbose=False
    )
    collator = VLMDataCollator(processor)
    dataset = samples()
    batch = collator(dataset)
    before = fixed_batch_loss(model, batch)

    optimizer = torch.optim.AdamW(parameter_groups(model, connector_lr=2e-2, backbone_lr=2e-2))
    grad_norms = GradNormPerPartCallback()
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=dataset,
        data_collator=collator,
        optimizers=(optimizer, None),
        callbacks=[grad_norms, NonFiniteLossCallback()],
    )
    trainer.train()
    after = fixed_batch_loss(model, batch)

    assert uses_reentrant_checkpointing(model) is False  # checkpointing was on, and non-reentrant
    assert after < before - 0.25, (before, after)  # random tiny backbones: a clear drop, not convergence
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 8
    parts = {"vision_encoder", "connector", "language_model"} if fusion == "autoregressive" else set()
    parts = parts or {"connector", "cross_attention", "language_model"}
    for entry in logged:
        norms = {key.split("/", 1)[1]: value for key, value in entry.items() if key.startswith("grad_norm/")}
        assert set(norms) == parts  # a frozen vision encoder is not reported
        assert all(0 <= value < float("inf") for value in norms.values())
    # every trained part gets gradient (the connector only once the zero-initialised gates have moved: step 2)
    assert all(value > 0 for key, value in logged[-1].items() if key.startswith("grad_norm/"))


class PoisonAt(TrainerCallback):
    """After step `step`, write NaN into the connector: the next step's loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(unwrap(model).model.connector.parameters()).fill_(float("nan"))


def test_non_finite_loss_stops_training_naming_the_step(tmp_path):
    processor = processor_for("autoregressive")
    model = apply_training_policy(tiny_autoregressive_model(), vision="frozen", text="full", verbose=False)
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, max_steps=6, activation_checkpointing=False),
        train_dataset=samples(),
        data_collator=VLMDataCollator(processor),
        callbacks=[PoisonAt(2), NonFiniteLossCallback()],
    )
    with pytest.raises(NonFiniteLossError, match=r"Non-finite training loss \(nan\) at step 3 \(epoch"):
        trainer.train()
    assert trainer.state.global_step == 2
    # stopped before the optimizer step: the LM (which trains) holds no NaN
    assert all(torch.isfinite(p).all() for p in model.model.text_model.parameters())
    assert torch.isfinite(model.lm_head.weight).all()


def test_activation_checkpointing_is_non_reentrant_by_default():
    model = apply_training_policy(tiny_cross_attention_model(), vision="frozen", text="lora", verbose=False)
    assert uses_reentrant_checkpointing(model) is None  # off until asked for
    enable_activation_checkpointing(model)  # through the PEFT wrapper
    assert uses_reentrant_checkpointing(model) is False
    with pytest.raises(ValueError, match="only non-reentrant"):  # images reach its layers as keywords
        enable_activation_checkpointing(model, use_reentrant=True)
    model = apply_training_policy(tiny_autoregressive_model(), vision="frozen", text="lora", verbose=False)
    enable_activation_checkpointing(model, use_reentrant=True)  # reentrant only when asked for explicitly
    assert uses_reentrant_checkpointing(model) is True


def test_trl_sft_trainer_trains_with_the_documented_flags(tmp_path):
    """TRL's SFTTrainer, unchanged, with the collator and the flags `VLMDataCollator`'s docstring names
    (`remove_unused_columns=False`, `dataset_kwargs={"skip_prepare_dataset": True}`): it lowers the loss."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    processor = processor_for("autoregressive")
    model = tiny_autoregressive_model()
    rows = [row for row in samples() if "images" in row]  # one schema per `datasets` table
    batch = VLMDataCollator(processor)(rows)
    before = fixed_batch_loss(model, batch)
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(rows),
        max_steps=6,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=VLMDataCollator(processor),
        processing_class=processor,
    )
    trainer.train()
    after = fixed_batch_loss(model, batch)
    assert after < 0.8 * before, (before, after)
