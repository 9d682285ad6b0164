"""A LoRA training step (forward + backward): ours beside Idefics2, same weights, same adapters, same batch.

Run: `.venv/bin/python benchmarks/bench_lora_step.py` (about a minute on 2 CPU cores; options: --device cuda,
--dtype bf16, --attn, --lora-r, --split, --batch-size, --repeats, the model-size flags, --preset idefics2;
--help lists them).

A random `Idefics2ForConditionalGeneration` and our `AutoregressiveVLMForConditionalGeneration` converted from it
(identical weights) are each wrapped by PEFT with the same `LoraConfig` — rank 16, alpha 32, no dropout, on the
language model's attention and MLP projections (q/k/v/o, gate/up/down of every `text_model.layers.N`) — with the
same seed, so their adapters are identical too; everything else is frozen (PEFT's default). Both get the same
`VLMProcessor` batch: one chat sample per photograph (portrait and landscape by default; native resolution, no
splitting), question and answer, labels = the tokens with padding and image placeholders masked (-100).
A step is `model(**batch, labels=labels).loss.backward()` in train mode, gradients cleared (set to None) before
it; no optimizer step. Medians over `--repeats` steps, the models taking turns, after a warm-up step each.
Parity columns: |Δ loss| and max |Δ| of the LoRA gradients. Peak memory: growth over one step (CPU: peak RSS of a
fresh process per model; CUDA: max_memory_allocated).
"""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under `python -P`

import _common as common  # noqa: E402

# PEFT still calls transformers' deprecated `is_gradient_checkpointing`: not ours to fix, and noise in the output
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# the language model's own layers, in both models (the connector has q_proj/… too, and must not match)
LORA_TARGETS = (
    r"(.*\.)?text_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)
SAMPLES = [
    ("400x600 portrait", "What is the person wearing?", "A navy uniform with medals and a white collar."),
    ("512x300 landscape", "Describe the picture.", "A woman in uniform in front of a flag, looking at the camera."),
    ("256x300 small", "Is it day or night?", "It is an indoor portrait, so it cannot be told."),
    ("512x600 original", "How many people are there?", "There is one person in the photograph."),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=5, warmup=1)
    parser.add_argument("--batch-size", type=int, default=2, help=f"samples per step (at most {len(SAMPLES)})")
    parser.add_argument("--split", action="store_true", help="image splitting on (5 sub-images per photograph)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2 × rank)")
    return parser.parse_args(argv)


def chat(question: str, answer: str) -> str:
    return f"User:<image>{question}<end_of_utterance>\nAssistant: {answer}<end_of_utterance>\n"


def setup(args):
    import torch
    from peft import LoraConfig, get_peft_model

    dtype = common.setup_torch(args)
    torch.manual_seed(args.seed)
    pair = common.build_pair(args, dtype)
    photos = common.photographs()
    samples = SAMPLES[: args.batch_size]
    batch = pair.processor(
        text=[chat(question, answer) for _, question, answer in samples],
        images=[[photos[name]] for name, _, _ in samples],
        do_image_splitting=args.split,
        padding=True,
        return_tensors="pt",
    )
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for token in ("<image>", "<fake_token_around_image>"):
        labels[labels == pair.tokenizer.convert_tokens_to_ids(token)] = -100
    batch = common.to_device({**batch, "labels": labels}, args.device, dtype)

    lora = dict(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS)
    models = {}
    for name, model in (("ours", pair.ours), ("Idefics2", pair.theirs)):
        torch.manual_seed(args.seed)  # the same adapter initialisation for both
        peft_model = get_peft_model(model, LoraConfig(**lora))
        with torch.no_grad():  # LoRA's B starts at zero, which would zero A's gradients: give B values too
            generator = torch.Generator(device=args.device).manual_seed(args.seed)
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(0.01 * torch.randn(param.shape, generator=generator, device=args.device))
        models[name] = peft_model.train()
    losses = {}

    def runner(name):
        model = models[name]

        def step():
            model.zero_grad(set_to_none=True)
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            losses[name] = loss.detach()
            return loss

        return step

    runners = {name: runner(name) for name in models}
    return pair, batch, models, runners, losses, lora


def lora_gradients(model) -> dict:
    return {
        name.split("text_model.", 1)[1]: param.grad
        for name, param in model.named_parameters()
        if param.requires_grad and param.grad is not None
    }


def main() -> None:
    args = parse_args()
    pair, batch, models, runners, losses, lora = setup(args)
    if args.memory_worker:
        common.memory_worker(args, runners)
        return

    for run in runners.values():  # the parity step
        run()
    ours_grads, theirs_grads = lora_gradients(models["ours"]), lora_gradients(models["Idefics2"])
    if ours_grads.keys() != theirs_grads.keys() or not ours_grads:
        raise SystemExit(f"different LoRA parameters: {len(ours_grads)} vs {len(theirs_grads)}")
    grad_diff = max((ours_grads[k].float() - theirs_grads[k].float()).abs().max().item() for k in ours_grads)
    grad_scale = max(g.abs().max().item() for g in theirs_grads.values())
    loss_diff = abs(losses["ours"].item() - losses["Idefics2"].item())
    trainable = sum(p.numel() for p in models["ours"].parameters() if p.requires_grad)
    total = sum(p.numel() for p in models["ours"].parameters())

    times = common.time_interleaved(runners, repeats=args.repeats, warmup=args.warmup, device=args.device)
    seconds = {name: common.median(values) for name, values in times.items()}
    tokens = int(batch["attention_mask"].sum())
    label = common.bench_label("lora step", args)
    config = (
        f"bench_lora_step: batch {batch['input_ids'].shape[0]} (one photograph each, splitting "
        f"{'on' if args.split else 'off'}), {batch['input_ids'].shape[1]} tokens per row, {tokens} real, "
        f"{int((batch['labels'] != -100).sum())} labelled; pixel_values {tuple(batch['pixel_values'].shape)}; "
        f"PEFT LoRA r={lora['r']} alpha={lora['lora_alpha']} on the LM's q/k/v/o/gate/up/down: {trainable:,} trainable "
        f"of {total:,} parameters; forward + backward, no optimizer step"
    )
    print(config)
    print(common.size_line(args))
    print(common.run_line(args, pair.attn))
    print(
        f"parity: loss {losses['Idefics2'].item():.4f}, |Δ loss| = {loss_diff:.2e}; max |Δ LoRA grad| = "
        f"{grad_diff:.2e} (largest grad {grad_scale:.2e}) over {len(ours_grads)} tensors\n"
    )
    rows = [
        common.comparison_row(label, "forward + backward", seconds["ours"], seconds["Idefics2"], unit="s",
                              higher_is_better=False, target=1.0, config=config,
                              ratio=common.paired_ratio(times["Idefics2"], times["ours"])),
    ]  # fmt: skip
    rows += common.memory_row(args, runners, label, config)
    common.report(args, rows, times)


if __name__ == "__main__":
    main()
