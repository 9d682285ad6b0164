"""Batches without images in data-parallel training: in training, the vision path (and, for cross-attention, every
block) still runs on one dummy image and adds exactly 0, so every process's graph holds every parameter and neither
DDP with `find_unused_parameters=False` nor FSDP can hang; outputs and the other gradients are bit-identical to the
plain path, and evaluation and generation run nothing extra.

Run as a script under `accelerate launch` (see `two_process_run`), this file is the two processes' worker."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import (
    CallCounter,
    image_attention_mask_for,
    image_prompt,
    marker_prompt,
    random_images,
    tiny_autoregressive_model,
    tiny_cross_attention_model,
)

from vlmforge.training import apply_training_policy, enable_activation_checkpointing
from vlmforge.training.policies import unwrap

BUILDERS = {"autoregressive": tiny_autoregressive_model, "cross_attention": tiny_cross_attention_model}


def batch(fusion: str, *, n_images: int) -> dict:
    """One sample with `n_images` images (0: text only), labels on every token."""
    prompt = image_prompt(n_images, image_seq_len=4) if fusion == "autoregressive" else marker_prompt(n_images)
    ids = torch.tensor([prompt])
    inputs = {"input_ids": ids, "labels": ids}
    if n_images:
        inputs["pixel_values"] = random_images(n_images)[None]  # (1, N_img, 3, 56, 56)
    if n_images and fusion == "cross_attention":
        inputs["image_attention_mask"] = image_attention_mask_for(ids)  # (1, S, N_img)
    return inputs


def build(fusion: str):
    # cross-attention gates open, so that the blocks change the text when images are there
    return BUILDERS[fusion](**({"gate_init": 0.5} if fusion == "cross_attention" else {})).train()


def image_path_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters a text-only batch would leave out: vision encoder, connector, cross-attention blocks."""
    parts = ("vision_model.", "connector.", "cross_attention_blocks.")
    return {name: p for name, p in model.named_parameters() if any(part in name for part in parts)}


def text_path_gradients(model) -> dict[str, torch.Tensor]:
    image_path = image_path_parameters(model)
    return {name: p.grad.clone() for name, p in model.named_parameters() if name not in image_path}


# ---- one process ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", list(BUILDERS))
def test_text_only_training_step_gives_the_image_path_exactly_zero_gradients(fusion, monkeypatch):
    model = build(fusion)
    inputs = batch(fusion, n_images=0)
    with torch.no_grad():  # no gradient wanted: the plain text path
        plain = model(**inputs)
    output = model(**inputs)
    output.loss.backward()
    assert torch.equal(output.logits, plain.logits) and torch.equal(output.loss, plain.loss)
    for name, parameter in image_path_parameters(model).items():
        assert parameter.grad is not None, name
        assert torch.count_nonzero(parameter.grad) == 0, name
    with_dummy = text_path_gradients(model)

    # the same step without the dummy image gives the text path bit-identical gradients
    if fusion == "autoregressive":
        monkeypatch.setattr(type(model.model), "_zero_through_vision_path", lambda self: torch.zeros(()))
    else:
        monkeypatch.setattr(type(model.model), "_dummy_cross_attention_inputs", lambda self, embeds: None)
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    assert all(p.grad is None for p in image_path_parameters(model).values())
    without = text_path_gradients(model)
    assert with_dummy.keys() == without.keys()
    assert all(torch.equal(with_dummy[name], without[name]) for name in without)


@pytest.mark.parametrize("fusion", list(BUILDERS))
def test_all_padding_images_train_like_no_images(fusion):
    """A collated batch whose samples have no image carries all-zero pixel_values: still no real image."""
    model = build(fusion)
    inputs = batch(fusion, n_images=0)
    inputs["pixel_values"] = torch.zeros(1, 1, 3, 56, 56)  # (B, N_img, C, H, W): one padding slot
    if fusion == "cross_attention":
        inputs["image_attention_mask"] = torch.zeros(1, inputs["input_ids"].shape[1], 1, dtype=torch.long)
    with torch.no_grad():
        plain = model(**inputs)
    output = model(**inputs)
    output.loss.backward()
    assert torch.equal(output.logits, plain.logits)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in image_path_parameters(model).values())


@pytest.mark.parametrize("fusion", list(BUILDERS))
def test_text_only_step_with_lora_and_activation_checkpointing_reaches_every_trainable_parameter(fusion):
    model = apply_training_policy(build(fusion), vision="lora", text="lora", lora_r=2, verbose=False)
    enable_activation_checkpointing(model)
    model.train()
    model(**batch(fusion, n_images=0)).loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    image_path = {name for name in trainable if any(part in name for part in ("vision_model", "connector"))}
    assert any("lora_" in name for name in image_path)  # the vision encoder's adapters are among them
    assert [name for name, p in trainable.items() if p.grad is None] == []
    assert all(torch.count_nonzero(trainable[name].grad) == 0 for name in image_path)


@pytest.mark.parametrize("fusion", list(BUILDERS))
def test_no_dummy_image_in_evaluation_generation_or_with_images(fusion):
    model = build(fusion)
    vision_model = unwrap(model).model.vision_model
    text_only = batch(fusion, n_images=0)
    with CallCounter(vision_model) as counter:
        with torch.no_grad():
            model(**text_only)  # training mode, but no gradient
        model.eval()
        model(**text_only)
        model.generate(input_ids=text_only["input_ids"], max_new_tokens=2, do_sample=False)
        model.train()
        model(**batch(fusion, n_images=1))  # real images: encoded once, no dummy
    assert counter.batch_sizes == [1]


# ---- two processes ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(arguments: list[str], *, cwd: Path, timeout: float, env: dict | None = None) -> str:
    """Run `accelerate launch --multi_gpu --num_processes 2 … arguments` on the CPU; return its stdout.

    `--multi_gpu` on a machine without GPUs starts 2 torchrun processes that use gloo (accelerate 1.x's `--cpu
    --num_processes 2` starts only one); the script must ask for the CPU (`Accelerator(cpu=True)`, or
    `use_cpu: true` in TrainingArguments), or each process trains alone. A run still going after `timeout` seconds
    is killed with all its processes and fails the test: a hang never blocks the suite.
    """
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), *arguments,
    ]  # fmt: skip
    quiet = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    env = {**os.environ, **quiet, **(env or {})}
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers
            stdout, stderr = process.communicate()
            pytest.fail(f"accelerate launch still running after {timeout} s (a hang?):\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return stdout


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> str:
    """This file's worker under `accelerate launch`: every (mode, fusion) case, one line per rank and case."""
    # a case that hangs fails after 30 s (the worker's gloo timeout); the whole launch after 200 s
    tests = str(Path(__file__).parent)
    return accelerate_launch([__file__], cwd=tmp_path_factory.mktemp("ddp"), timeout=200, env={"PYTHONPATH": tests})


def outcome(stdout: str, mode: str, fusion: str) -> list[str]:
    """Each rank's result of one case, in rank order: "ok" or the error."""
    results = dict(re.findall(rf"^{mode} {fusion} rank (\d): (.*)$", stdout, flags=re.MULTILINE))
    return [results.get(rank, "no result") for rank in ("0", "1")]


@pytest.mark.parametrize("fusion", list(BUILDERS))
def test_ddp_with_a_text_only_rank_finishes(two_process_run, fusion):
    """Rank 0 trains on images, rank 1 on text only, under DDP's default find_unused_parameters=False (without the
    dummy image, rank 1 fails with "Expected to have finished reduction in the prior iteration" and rank 0 waits)."""
    assert outcome(two_process_run, "ddp", fusion) == ["ok", "ok"], two_process_run


@pytest.mark.parametrize("fusion", list(BUILDERS))
def test_fsdp2_with_a_text_only_rank_finishes(two_process_run, fusion):
    """FSDP2 on the CPU (gloo), each `_no_split_modules` layer sharded on its own as accelerate's default wrap policy
    does it; rank 1 trains on text only. (accelerate itself enables FSDP only on GPUs: see `run_recipe`.)"""
    assert outcome(two_process_run, "fsdp2", fusion) == ["ok", "ok"], two_process_run


def shard_as_accelerate_does(model, mesh) -> None:
    """FSDP2: `fully_shard` every module whose class is in `_no_split_modules`, then the root (accelerate's
    TRANSFORMER_BASED_WRAP falls back to `_no_split_modules`)."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def train_two_steps(accelerator, mode: str, fusion: str) -> None:
    """Two SGD steps, rank 1's batches without images; then the ranks must agree on the loss of one batch."""
    from torch.distributed.device_mesh import init_device_mesh

    model = build(fusion)
    if mode == "ddp":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel) and not model.find_unused_parameters
    else:
        shard_as_accelerate_does(model, init_device_mesh("cpu", (accelerator.num_processes,)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        loss = model(**batch(fusion, n_images=1 if accelerator.process_index == 0 else 0)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        loss = model(**batch(fusion, n_images=1)).loss
    losses = accelerator.gather(loss[None])  # (2,)
    assert losses[0] == losses[1], f"the ranks' models differ after synchronised steps: losses {losses.tolist()}"


def worker() -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=30))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[timeout])  # without cpu=True: one process each, no DDP
    for mode in ("ddp", "fsdp2"):
        for fusion in BUILDERS:
            try:
                train_two_steps(accelerator, mode, fusion)
                result = "ok"
            except Exception as error:  # reported per case, so that one failure leaves the others' results
                result = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            # one write of a short line: the two processes' lines do not interleave
            sys.stdout.write(f"{mode} {fusion} rank {accelerator.process_index}: {result}\n")
            sys.stdout.flush()
    accelerator.end_training()


if __name__ == "__main__":
    worker()
