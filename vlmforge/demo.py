"""`make demo`: a small fully autoregressive VLM, end to end, in seconds on a CPU.

With the embedded trained checkpoint (`vlmforge/assets/demo_checkpoint`, trained from scratch on the CPU by
`vlmforge train recipes/demo.yaml` on synthetic visual question answering), `demo` loads it through
`vlmforge.AutoModelForVision2Seq`, draws a few fresh images (a stream the training never saw), asks each question
the image supports (colour, shape, position, count, the printed word) and prints every answer beside the truth,
then the accuracy per category: `run_trained_demo`. Without that checkpoint, or with `random_weights=True`, it
runs the random-weight demo on a real photograph below: `run_demo`.

What runs is the whole pipeline of the Idefics2 paper's final architecture: a SigLIP-style encoder reading
the photograph at its native resolution and aspect ratio (Finding 5), a perceiver resampler pooling its
patches into 64 visual tokens (Finding 4), the visual tokens spliced into a Llama decoder's input
(Finding 2). The checkpoint is what every vlmforge writer produces: the model, its `VLMProcessor` (built from the
model config, so image_seq_len and the image token ids cannot disagree) and a generation config that stops at
`<end_of_utterance>`. The demo reloads it with `AutoProcessor` / `AutoModelForVision2Seq.from_pretrained`, writes
the prompt with the processor's chat template, and generates greedily from image features computed once.

The weights are RANDOM (nothing can be downloaded here), so the generated text is meaningless; the demo
shows that the pieces fit together and how fast they run, not what a trained model says.
"""

import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.utils import logging

from vlmforge.auto import AutoModelForVision2Seq
from vlmforge.conversion.generation_config import chat_generation_config
from vlmforge.modeling.configuration_autoregressive_vlm import AutoregressiveVLMConfig
from vlmforge.modeling.modeling_autoregressive_vlm import AutoregressiveVLMForConditionalGeneration
from vlmforge.processing.image_processing_vlm import VLMImageProcessor
from vlmforge.processing.processing_vlm import VLMProcessor
from vlmforge.toy_tokenizer import build_toy_tokenizer

logger = logging.get_logger(__name__)

DEMO_IMAGE = Path(__file__).parent / "assets" / "grace_hopper.jpg"
DEMO_QUESTION = "Describe the picture in one sentence."
DEMO_VOCAB_SIZE = 300
RANDOM_WEIGHTS_NOTICE = (
    "vlmforge demo: the model has RANDOM weights (nothing is downloaded), so the generated text is meaningless; "
    "the demo shows the pipeline and its speed, not a trained model's answer."
)


def demo_config(tokenizer) -> AutoregressiveVLMConfig:
    """A small model with the paper's shapes where they matter: 14 px patches on a 27 × 27 position table
    (378 px, 729 patches for a square image) pooled by a perceiver into 64 visual tokens per image."""
    return AutoregressiveVLMConfig(
        vision_config=dict(
            hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            image_size=378, patch_size=14,
        ),
        connector_config=dict(
            pooling="perceiver", n_latents=64, depth=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32
        ),
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def _save_random_checkpoint(output_dir: Path, seed: int) -> None:
    """Write a random-weight model, its processor (tokenizer included) and its generation config to `output_dir`."""
    tokenizer = build_toy_tokenizer(DEMO_VOCAB_SIZE)
    config = demo_config(tokenizer)
    # the model config dictates the prompt layout (64 placeholders per image, the image token ids); the image
    # processor keeps the paper's defaults: native resolution, 378 ≤ edges ≤ 980 px, no splitting unless asked
    processor = VLMProcessor.from_model_config(config, VLMImageProcessor(), tokenizer)
    torch.manual_seed(seed)
    model = AutoregressiveVLMForConditionalGeneration(config)
    model.generation_config = chat_generation_config(tokenizer, model.generation_config)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def _report(result: dict) -> str:
    t = result["timings"]
    return "\n".join(
        [
            f"checkpoint:        {result['output_dir']}",
            f"image:             {result['image_size'][0]} x {result['image_size'][1]} px (w x h), "
            f"pixel_values {result['pixel_values_shape']}",
            f"patches per image: {result['patches_per_image']} at native resolution "
            f"-> perceiver -> {result['visual_tokens_per_image']} visual tokens per image "
            f"(processor.num_image_tokens: {result['num_image_tokens']})",
            f"prompt:            {result['prompt']!r}",
            f"prompt tokens:     {result['prompt_tokens']}",
            f"timings:           build+save {t['build_and_save_s']:.2f} s, load {t['load_s']:.2f} s, "
            f"preprocess {t['preprocess_s']:.3f} s, encode image {t['encode_image_s']:.3f} s, "
            f"generate {t['generate_s']:.3f} s ({t['tokens_per_s']:.1f} tokens/s)",
            f"generated ids:     {result['generated_ids']}  (stops at eos ids {result['eos_token_ids']}: "
            f"</s> and <end_of_utterance>; {'stopped' if result['stopped_at_eos'] else 'ran to max_new_tokens'})",
            f"generated text:    {result['generated_text']!r}  (random weights: meaningless)",
        ]
    )


def run_demo(output_dir: str | Path | None = None, *, max_new_tokens: int = 20, seed: int = 0) -> dict:
    """Build, save, reload and run a small random-weight VLM on `vlmforge/assets/grace_hopper.jpg`.

    Args:
        output_dir: where the checkpoint (model, tokenizer, processor) is written; a temporary folder,
            removed afterwards, when None.
        max_new_tokens: generation budget (greedy; it stops earlier at `</s>` or `<end_of_utterance>`).
        seed: seed of the random weights.

    Returns:
        dict with `output_dir`, `image_size` (w, h), `pixel_values_shape`, `patches_per_image`,
        `visual_tokens_per_image` (what the model made of the image), `num_image_tokens` (what the processor
        said it would cost, before processing), `prompt` (the chat template's rendering), `prompt_tokens`,
        `generated_ids` (list of ints, the new tokens only), `generated_text`, `eos_token_ids` (the checkpoint's
        generation config), `stopped_at_eos`, `random_weights` (True) and `timings` (seconds: `build_and_save_s`,
        `load_s`, `preprocess_s`, `encode_image_s`, `generate_s`; and `tokens_per_s`). The same facts are printed.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    logger.warning("The demo model has random weights: its generated text is meaningless.")
    print(RANDOM_WEIGHTS_NOTICE, flush=True)
    # the report below is the demo's output; per-file progress bars for a 7 MB checkpoint only clutter it
    bars_were_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        if output_dir is None:
            with tempfile.TemporaryDirectory(prefix="vlmforge-demo-") as tmp:
                return _run(Path(tmp), max_new_tokens=max_new_tokens, seed=seed)
        return _run(Path(output_dir), max_new_tokens=max_new_tokens, seed=seed)
    finally:
        if bars_were_enabled:
            logging.enable_progress_bar()


def _run(output_dir: Path, *, max_new_tokens: int, seed: int) -> dict:
    timings = {}
    start = time.perf_counter()
    _save_random_checkpoint(output_dir, seed)
    timings["build_and_save_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model = AutoModelForVision2Seq.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)  # our VLMProcessor, checked against config.json
    timings["load_s"] = time.perf_counter() - start
    logger.info(f"Loaded {type(model).__name__} ({model.num_parameters():,} parameters) from {output_dir}")

    with Image.open(DEMO_IMAGE) as image:
        image.load()
    image_size = image.size
    content = [{"type": "image", "image": image}, {"type": "text", "text": DEMO_QUESTION}]
    messages = [{"role": "user", "content": content}]
    start = time.perf_counter()
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    timings["preprocess_s"] = time.perf_counter() - start

    with torch.inference_mode():
        # encode once: the visual tokens are what the perceiver made of the photograph's patches
        start = time.perf_counter()
        features = model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"])
        timings["encode_image_s"] = time.perf_counter() - start

        start = time.perf_counter()
        # no eos_token_id here: the checkpoint's generation config stops at </s> and <end_of_utterance>
        output_ids = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            **features,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        timings["generate_s"] = time.perf_counter() - start

    num_images = inputs["pixel_values"].shape[1]
    patch_size = model.config.vision_config.patch_size
    mask = inputs["pixel_attention_mask"][0, 0]  # (H, W), one image
    patch_rows, patch_cols = int(mask[:, 0].sum()) // patch_size, int(mask[0, :].sum()) // patch_size
    new_ids = output_ids[0, inputs["input_ids"].shape[1] :].tolist()
    eos_token_ids = list(model.generation_config.eos_token_id)
    timings["tokens_per_s"] = len(new_ids) / timings["generate_s"]
    result = {
        "output_dir": str(output_dir),
        "random_weights": True,
        "image_size": tuple(image_size),
        "pixel_values_shape": tuple(inputs["pixel_values"].shape),
        "patches_per_image": patch_rows * patch_cols,
        "visual_tokens_per_image": int(features.image_features_mask.sum()) // num_images,
        "num_image_tokens": processor.num_image_tokens(image_size[1], image_size[0]),
        "prompt": processor.apply_chat_template(messages, add_generation_prompt=True),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "generated_ids": new_ids,
        "generated_text": processor.decode(new_ids, skip_special_tokens=True),
        "eos_token_ids": eos_token_ids,
        "stopped_at_eos": bool(new_ids) and new_ids[-1] in eos_token_ids,
        "timings": timings,
    }
    print(_report(result), flush=True)
    return result


DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo_checkpoint"
# the demo's images come from a stream of their own: training used seed 0, validation seeds 1 and 2
DEMO_STREAM_OFFSET = 1_000_000


def trained_checkpoint_available(checkpoint: str | Path = DEMO_CHECKPOINT) -> bool:
    return (Path(checkpoint) / "config.json").is_file() and (Path(checkpoint) / "model.safetensors").is_file()


def run_trained_demo(
    checkpoint: str | Path = DEMO_CHECKPOINT,
    output_dir: str | Path | None = None,
    *,
    num_images: int = 6,
    seed: int = 0,
) -> dict:
    """Ask a trained synthetic-VQA checkpoint every question about `num_images` fresh images; print the answers.

    Args:
        checkpoint: a checkpoint trained by a synthetic-VQA recipe (default: the embedded demo checkpoint).
        output_dir: receives a copy of the checkpoint and the images as `images/image_<i>.png`; nothing when None.
        num_images: images to draw (single- and multi-object scenes, as in training).
        seed: picks the stream of images (`DEMO_STREAM_OFFSET + seed`, never a training or validation stream).

    Returns:
        dict with `checkpoint`, `random_weights` (False), `items` (one dict per question: `image`, `category`,
        `question`, `answer`, `truth`, `correct`), `accuracy` ({category: fraction}, over the categories asked) and
        `timings` (seconds: `load_s`, `answer_s`).
    """
    from vlmforge.training.synthetic_vqa import CATEGORIES, answer_questions, make_sample

    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}.")
    if not trained_checkpoint_available(checkpoint):
        raise FileNotFoundError(f"No trained checkpoint (config.json + model.safetensors) in {checkpoint}.")
    start = time.perf_counter()
    model = AutoModelForVision2Seq.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    load_s = time.perf_counter() - start
    image_size = processor.image_processor.size["longest_edge"]
    samples = [make_sample(i, seed=DEMO_STREAM_OFFSET + seed, image_size=image_size) for i in range(num_images)]
    if output_dir is not None:
        # a copy of the checkpoint, so that `output_dir` loads like the random demo's, and the images to look at
        shutil.copytree(checkpoint, output_dir, dirs_exist_ok=True)
        (Path(output_dir) / "images").mkdir(exist_ok=True)
        for i, sample in enumerate(samples):
            sample["images"][0].save(Path(output_dir) / "images" / f"image_{i}.png")
    turns = [(i, sample["images"][0], turn) for i, sample in enumerate(samples) for turn in sample["texts"]]
    turns.sort(key=lambda t: (t[0], CATEGORIES.index(t[2]["source"].split("/")[-1])))  # per image, fixed order
    start = time.perf_counter()
    answers = answer_questions(model, processor, [t[1] for t in turns], [t[2]["user"] for t in turns])
    answer_s = time.perf_counter() - start
    items = [
        {
            "image": i,
            "category": turn["source"].split("/")[-1],
            "question": turn["user"],
            "answer": answer,
            "truth": turn["assistant"],
            "correct": answer == turn["assistant"].lower(),
        }
        for (i, _, turn), answer in zip(turns, answers)
    ]
    accuracy = {}
    for item in items:
        accuracy.setdefault(item["category"], []).append(item["correct"])
    accuracy = {category: sum(marks) / len(marks) for category, marks in accuracy.items()}
    result = {
        "checkpoint": str(checkpoint),
        "random_weights": False,
        "items": items,
        "accuracy": accuracy,
        "timings": {"load_s": load_s, "answer_s": answer_s},
    }
    print(_trained_report(result, model.num_parameters(), output_dir), flush=True)
    return result


def _trained_report(result: dict, num_parameters: int, output_dir) -> str:
    lines = [
        f"checkpoint: {result['checkpoint']} ({num_parameters:,} parameters, trained from scratch on synthetic VQA)",
        f"images:     fresh, never seen in training{'; saved in ' + str(output_dir) + '/images' if output_dir else ''}",
    ]
    for item in result["items"]:
        mark = "ok " if item["correct"] else "NO "
        lines.append(
            f"  image {item['image']}  {item['question']:<40} "
            f"answer: {item['answer']:<9} truth: {item['truth']:<9} {mark}"
        )
    scores = ", ".join(f"{category} {value:.0%}" for category, value in sorted(result["accuracy"].items()))
    total = sum(item["correct"] for item in result["items"]) / len(result["items"])
    lines.append(f"accuracy:   {total:.0%} of {len(result['items'])} questions ({scores})")
    t = result["timings"]
    lines.append(f"timings:    load {t['load_s']:.2f} s, answer all questions {t['answer_s']:.2f} s")
    return "\n".join(lines)


def demo(
    output_dir: str | Path | None = None, *, max_new_tokens: int = 20, seed: int = 0, random_weights: bool = False
):
    """`make demo`: the trained demo when the embedded checkpoint is there (and `random_weights` is False), else the
    random-weight demo; `output_dir` receives the images (trained) or the random checkpoint (random)."""
    if not random_weights and trained_checkpoint_available():
        return run_trained_demo(DEMO_CHECKPOINT, output_dir, seed=seed)
    return run_demo(output_dir, max_new_tokens=max_new_tokens, seed=seed)


__all__ = ["DEMO_CHECKPOINT", "demo", "demo_config", "run_demo", "run_trained_demo", "trained_checkpoint_available"]
