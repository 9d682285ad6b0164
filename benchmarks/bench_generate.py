"""Decode tokens per second: the cross-attention VLM beside its bare language model, same weights, same prompt.

Run: `.venv/bin/python benchmarks/bench_generate.py` (about 25 s on 2 cores; options: --layers, --hidden-size,
--vocab-size, --every, --batch-size, --new-tokens, --repeats, --threads).

The VLM (random weights; open gates; a gated cross-attention block before every `--every`-th of `--layers` Llama
decoder layers) and `AutoModelForCausalLM` built from the same `text_config` with the VLM's LM weights get the
same left-padded batch of prompts; the VLM's prompts carry one image each (64 perceiver tokens). Greedy decoding,
no eos. A streamer timestamps every step of `generate`, so prefill (images encoded, image keys/values computed)
and decode steps are timed apart: the decode figure is the steady per-token cost the blocks add, the median step
over `--repeats` runs, the models taking turns, both generating exactly `--new-tokens` tokens per prompt.

Size: 8 layers × 1024 wide, so that the weights a decode step reads (~380 MB in float32) exceed the CPU's last-level
cache for both models, as any real LM's do. With a narrower LM the bare backbone can stay cache-resident while the
VLM (20 % more weights) cannot, and the figure then measures the cache, not the blocks. A decode step reads every
weight once, so the script also prints the ratio a purely memory-bound step would reach: the architecture's own
bound (each block is a decoder layer's worth of weights without the key/value projections, which ran at prefill).
"""

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

import vlmforge

IMAGE_TOKEN_ID = 3


def build_models(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    heads = args.hidden_size // 64
    config = vlmforge.CrossAttentionVLMConfig(
        vision_config=dict(
            hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=3, image_size=224
        ),
        connector_config=dict(n_latents=64, depth=1, num_attention_heads=heads, num_key_value_heads=1, head_dim=64),
        text_config=dict(
            model_type="llama",
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=args.hidden_size * 8 // 3 // 64 * 64,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(heads // 4, 1),
            max_position_embeddings=1024,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        cross_attention_every_n_layers=args.every,
        gate_init=0.5,  # open gates, as after training (the blocks never skip work on gate values anyway)
    )
    torch.manual_seed(0)
    vlm = vlmforge.CrossAttentionVLMForConditionalGeneration(config).eval()
    backbone = AutoModelForCausalLM.from_config(copy.deepcopy(config.text_config)).eval()
    backbone.model.load_state_dict(vlm.model.text_model.state_dict())
    backbone.lm_head.load_state_dict(vlm.lm_head.state_dict())
    for model in (vlm, backbone):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return vlm, backbone


def prompts(batch: int, generator: torch.Generator) -> dict:
    """`batch` left-padded prompts of 24..40 tokens, each with one image marker after its first 8 tokens."""
    lengths = torch.randint(24, 41, (batch,), generator=generator).tolist()
    width = max(lengths)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    image_attention_mask = torch.zeros(batch, width, 1, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids = torch.randint(100, 4000, (length,), generator=generator)
        ids[8] = IMAGE_TOKEN_ID
        input_ids[row, width - length :] = ids
        attention_mask[row, width - length :] = 1
        image_attention_mask[row, width - length + 8 :, 0] = 1  # every token from the marker on sees the image
    pixel_values = torch.randn(batch, 1, 3, 224, 224, generator=generator)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        image_attention_mask=image_attention_mask,
        pixel_values=pixel_values,
    )


class StepClock(BaseStreamer):
    """Timestamps every `put`: generate puts the prompt, then each new token right after the step that made it."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(model, inputs: dict, new_tokens: int) -> tuple[float, list[float], torch.Tensor]:
    """(prefill seconds — images included —, seconds of each later decode step, the generated ids)."""
    clock = StepClock()
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    times = clock.times
    return times[1] - times[0], [b - a for a, b in zip(times[1:], times[2:])], out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the language model")
    parser.add_argument("--hidden-size", type=int, default=1024, help="width of the language model")
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="a small vocabulary keeps lm_head from hiding the layers"
    )
    parser.add_argument("--every", type=int, default=4, help="a cross-attention block before every N-th layer")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per generate call")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=8, help="timed runs per model, the models taking turns")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vlm, backbone = build_models(args)
    inputs = prompts(args.batch_size, torch.Generator().manual_seed(0))
    runs = {
        "cross-attention VLM": (vlm, inputs),
        "bare backbone": (backbone, {k: inputs[k] for k in ("input_ids", "attention_mask")}),
    }
    prefills = {name: [] for name in runs}
    steps = {name: [] for name in runs}
    outputs = {}
    with torch.inference_mode():
        for attempt in range(args.repeats + 1):  # the first pass warms up
            for name, (model, model_inputs) in runs.items():
                prefill, decode_steps, outputs[name] = timed_generate(model, model_inputs, args.new_tokens)
                if attempt:
                    prefills[name].append(prefill)
                    steps[name] += decode_steps

    if len({out.shape for out in outputs.values()}) != 1:
        raise SystemExit(f"the models generated different lengths: {[tuple(o.shape) for o in outputs.values()]}")
    # medians: a step slowed down by another process on the machine does not move them
    step = {name: statistics.median(times) for name, times in steps.items()}
    breakdown = vlm.parameter_breakdown()
    print(
        f"Llama {args.layers} layers × {args.hidden_size} wide, vocabulary {args.vocab_size}; cross-attention before "
        f"layers {vlm.config.cross_attention_layers}; batch {args.batch_size}, {args.new_tokens} new tokens, "
        f"{args.threads} threads, {args.repeats} runs each"
    )
    print(f"parameters: backbone {backbone.num_parameters():,}\n{breakdown}\n")
    print(f"{'model':<22}{'prefill ms':>12}{'decode step ms':>16}{'decode tok/s':>14}")
    for name in runs:
        prefill_ms = statistics.median(prefills[name]) * 1e3
        print(f"{name:<22}{prefill_ms:>12.1f}{step[name] * 1e3:>16.2f}{args.batch_size / step[name]:>14.1f}")
    ratio = step["bare backbone"] / step["cross-attention VLM"]
    print(f"\ndecode speed, VLM / backbone: {ratio:.2f}×  (target ≥ 0.80×)")
    backbone_weights, block_weights = decode_weights(vlm)
    print(
        f"weights a decode step reads: backbone {backbone_weights:,}, + blocks {block_weights:,} → a memory-bound "
        f"step would run at {backbone_weights / (backbone_weights + block_weights):.2f}×"
    )


def decode_weights(vlm) -> tuple[int, int]:
    """Parameters one decode step multiplies with: the LM's (not its embedding table, of which it reads one row
    per token) and lm_head; and the blocks' (not their image key/value projections, which ran at prefill)."""
    text_model = vlm.model.text_model
    backbone = count(text_model) - count(text_model.get_input_embeddings()) + count(vlm.lm_head)
    blocks = vlm.model.cross_attention_blocks
    image_projections = sum(count(b.cross_attn.k_proj) + count(b.cross_attn.v_proj) for b in blocks)
    return backbone, count(blocks) - image_projections


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    main()
