"""A synthetic visual question-answering task for training and checking small VLMs on a CPU, offline.

Each image is a light-grey canvas holding 1-4 coloured shapes, one per quadrant of the upper area, and a short
word or number printed in black on a white band along the bottom. Every question has a one-word answer, so a
model's accuracy per category is exact-match of its first words:

    colour    "What colour is the shape?"                  single-object images   red | green | blue | ...
    shape     "What shape is it?"                          single-object images   circle | square | ...
    position  "Is the shape on the left or the right?"     single-object images   left | right
              "Is the shape at the top or the bottom?"                            top | bottom
    count     "How many shapes are there?"                 every image            one | two | three | four
    reading   "What word is written?"                      every image            the printed word or number

Samples follow the_cauldron schema, `{"images": [PIL image], "texts": [{"user", "assistant", "source"}, ...]}`,
one turn per question the image supports, in random order; `source` is `synthetic_vqa/<category>`.
Everything is a pure function of `(seed, index)`: the same seed gives the same images and questions on every
machine with the same Pillow (the text is drawn with Pillow's bundled default font).
"""

import dataclasses
import random

import torch
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 120, 10),
}
SHAPES = ("circle", "square", "triangle", "cross")
COUNT_WORDS = ("one", "two", "three", "four")
WORDS = (
    "cat", "dog", "sun", "map", "box", "cup", "hat", "key", "pen", "car", "bus", "fox",
    "7", "12", "25", "38", "41", "56", "63", "80", "99", "2024",
)
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "horizontal": "Is the shape on the left or the right?",
    "vertical": "Is the shape at the top or the bottom?",
    "count": "How many shapes are there?",
    "reading": "What word is written?",
}
CATEGORIES = ("colour", "shape", "position", "count", "reading")
BACKGROUND = (215, 215, 215)
TEXT_BAND_FRACTION = 0.25  # the bottom quarter of the image is the white text band


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    quadrant: tuple[int, int]  # (row, column): row 0 = top, column 0 = left
    center: tuple[int, int]  # (x, y) px
    radius: int  # px, half the side of the shape's bounding box


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    word: str
    image_size: int


def sample_scene(rng: random.Random, *, image_size: int = 112, single_object_fraction: float = 0.4) -> Scene:
    """Draw a scene: 1 object with probability `single_object_fraction`, else 2-4, each in its own quadrant."""
    if image_size < 56:
        raise ValueError(f"image_size must be at least 56 px to hold four shapes and a word, got {image_size}.")
    count = 1 if rng.random() < single_object_fraction else rng.randint(2, 4)
    quadrants = rng.sample([(row, col) for row in range(2) for col in range(2)], count)
    cell_w, cell_h = image_size / 2, image_size * (1 - TEXT_BAND_FRACTION) / 2
    objects = []
    for row, col in sorted(quadrants):
        radius = rng.randint(round(cell_h * 0.22), round(cell_h * 0.34))
        # jitter the centre inside the quadrant, keeping the whole shape in it
        x = rng.uniform(col * cell_w + radius + 1, (col + 1) * cell_w - radius - 1)
        y = rng.uniform(row * cell_h + radius + 1, (row + 1) * cell_h - radius - 1)
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        objects.append(SceneObject(shape, colour, (row, col), (round(x), round(y)), radius))
    return Scene(tuple(objects), rng.choice(WORDS), image_size)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x, y, r = obj.center[0], obj.center[1], obj.radius
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        s = round(r * 0.85)  # a square of the circle's area looks the same size
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    elif obj.shape == "cross":
        t = max(2, round(r * 0.35))  # half the bar thickness
        draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}.")


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `image_size` × `image_size` px."""
    size = scene.image_size
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj)
    band_top = round(size * (1 - TEXT_BAND_FRACTION))
    draw.rectangle((0, band_top, size, size), fill=(255, 255, 255))
    font = ImageFont.load_default(size=max(8, round(size * TEXT_BAND_FRACTION * 0.6)))
    left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=font)
    origin = ((size - (right - left)) / 2 - left, band_top + (size - band_top - (bottom - top)) / 2 - top)
    draw.text(origin, scene.word, fill=(0, 0, 0), font=font)
    return image


def scene_questions(scene: Scene) -> list[dict]:
    """Every question the scene supports: dicts with `category`, `question` and `answer` (one word)."""
    questions = [
        {"category": "count", "question": QUESTIONS["count"], "answer": COUNT_WORDS[len(scene.objects) - 1]},
        {"category": "reading", "question": QUESTIONS["reading"], "answer": scene.word},
    ]
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        row, col = obj.quadrant
        questions += [
            {"category": "colour", "question": QUESTIONS["colour"], "answer": obj.colour},
            {"category": "shape", "question": QUESTIONS["shape"], "answer": obj.shape},
            {"category": "position", "question": QUESTIONS["horizontal"], "answer": ("left", "right")[col]},
            {"category": "position", "question": QUESTIONS["vertical"], "answer": ("top", "bottom")[row]},
        ]
    return questions


SINGLE_OBJECT_CATEGORIES = ("colour", "shape", "position")


def _check_categories(categories, single_object_fraction: float) -> None:
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown or not categories:
        raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {list(categories)}.")
    if set(categories) <= set(SINGLE_OBJECT_CATEGORIES) and single_object_fraction < 1.0:
        raise ValueError(
            f"categories {list(categories)} are asked about single-object images only, so multi-object images would "
            f"have no question: set single_object_fraction=1.0 (got {single_object_fraction}) or add count/reading."
        )


def make_sample(
    index: int,
    *,
    seed: int,
    image_size: int = 112,
    single_object_fraction: float = 0.4,
    categories: tuple[str, ...] = CATEGORIES,
) -> dict:
    """Sample `index` of the stream `seed`, in the_cauldron schema: one turn per question of the given
    `categories` that the image supports, in random order."""
    _check_categories(categories, single_object_fraction)
    rng = random.Random(f"synthetic_vqa-{seed}-{index}")  # str seeds hash with sha512: stable across runs
    scene = sample_scene(rng, image_size=image_size, single_object_fraction=single_object_fraction)
    questions = [q for q in scene_questions(scene) if q["category"] in categories]
    rng.shuffle(questions)
    texts = [
        {"user": q["question"], "assistant": q["answer"], "source": f"synthetic_vqa/{q['category']}"}
        for q in questions
    ]
    return {"images": [render_scene(scene)], "texts": texts}


def answer_vocabulary() -> list[str]:
    """Every answer the generator can give, once each."""
    return list(COLOURS) + list(SHAPES) + ["left", "right", "top", "bottom"] + list(COUNT_WORDS) + list(WORDS)


def vocabulary_text() -> str:
    """All questions and answers as one text, to train a toy tokenizer that covers them."""
    return " ".join(list(QUESTIONS.values()) + answer_vocabulary())


class SyntheticVQADataset(torch.utils.data.Dataset):
    """`n` samples of the stream `seed`, generated on access (nothing is stored): `dataset[i]` is
    `make_sample(i, seed=seed, ...)`. Two datasets with different seeds share no (seed, index) pair."""

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        image_size: int = 112,
        single_object_fraction: float = 0.4,
        categories: tuple[str, ...] | list[str] = CATEGORIES,
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}.")
        if not 0.0 <= single_object_fraction <= 1.0:
            raise ValueError(f"single_object_fraction must lie in [0, 1], got {single_object_fraction}.")
        _check_categories(categories, single_object_fraction)
        self.n, self.seed = n, seed
        self.image_size, self.single_object_fraction = image_size, single_object_fraction
        self.categories = tuple(categories)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples.")
        return make_sample(
            index,
            seed=self.seed,
            image_size=self.image_size,
            single_object_fraction=self.single_object_fraction,
            categories=self.categories,
        )


__all__ = [
    "CATEGORIES",
    "Scene",
    "SceneObject",
    "SyntheticVQADataset",
    "answer_questions",
    "answer_vocabulary",
    "evaluate_vqa",
    "make_sample",
    "render_scene",
    "sample_scene",
    "scene_questions",
    "vocabulary_text",
]


@torch.no_grad()
def answer_questions(model, processor, images: list, questions: list[str], *, max_new_tokens: int = 4) -> list[str]:
    """Greedy one-turn answers: image i with question i, batched; each answer is the reply's first word."""
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
        )
        for question in questions
    ]
    inputs = processor(
        images=[[image] for image in images], text=prompts, padding=True, padding_side="left", return_tensors="pt"
    )
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    replies = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [(reply.split() or [""])[0].strip(" .").lower() for reply in replies]


def evaluate_vqa(model, processor, *, n: int, seed: int, batch_size: int = 32, **sample_kwargs) -> dict:
    """Exact-match accuracy per category on every question of `n` fresh samples of the stream `seed`.

    Returns {category: {"correct": int, "total": int, "accuracy": float}}; count covers 1-4 objects, colour,
    shape and position the single-object images (the only ones they are asked about).
    """
    items = []
    for index in range(n):
        sample = make_sample(index, seed=seed, **sample_kwargs)
        for turn in sample["texts"]:
            items.append((sample["images"][0], turn["user"], turn["assistant"], turn["source"].split("/")[-1]))
    was_training = model.training
    model.eval()
    scores = {category: {"correct": 0, "total": 0} for category in sample_kwargs.get("categories", CATEGORIES)}
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        answers = answer_questions(model, processor, [i[0] for i in batch], [i[1] for i in batch])
        for (_, _, truth, category), answer in zip(batch, answers):
            scores[category]["total"] += 1
            scores[category]["correct"] += int(answer == truth.lower())
    model.train(was_training)
    for score in scores.values():
        score["accuracy"] = score["correct"] / score["total"] if score["total"] else float("nan")
    return scores
