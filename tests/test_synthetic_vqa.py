"""The synthetic VQA generator: deterministic by seed, answers that match the pixels, the_cauldron schema."""

import random

import numpy as np
import pytest

from vlmforge.training.synthetic_vqa import (
    BACKGROUND,
    CATEGORIES,
    COLOURS,
    Scene,
    SceneObject,
    SyntheticVQADataset,
    answer_vocabulary,
    make_sample,
    render_scene,
    sample_scene,
    scene_questions,
)


def _answers(scene: Scene) -> dict:
    return {(q["category"], q["question"]): q["answer"] for q in scene_questions(scene)}


def test_same_seed_same_samples_other_seed_other_samples():
    first, again = make_sample(7, seed=3), make_sample(7, seed=3)
    assert first["texts"] == again["texts"]
    assert np.array_equal(np.asarray(first["images"][0]), np.asarray(again["images"][0]))
    pairs = [(make_sample(i, seed=3), make_sample(i, seed=4)) for i in range(5)]
    assert all(not np.array_equal(np.asarray(a["images"][0]), np.asarray(b["images"][0])) for a, b in pairs)


def test_samples_follow_the_cauldron_schema():
    sample = make_sample(0, seed=0)
    assert set(sample) == {"images", "texts"} and len(sample["images"]) == 1
    assert sample["images"][0].mode == "RGB" and sample["images"][0].size == (112, 112)
    for turn in sample["texts"]:
        assert set(turn) == {"user", "assistant", "source"}
        assert turn["source"].split("/")[1] in CATEGORIES
        assert len(turn["assistant"].split()) == 1 and turn["assistant"] in answer_vocabulary()


def test_hand_checked_single_red_circle_top_right():
    circle = SceneObject("circle", "red", quadrant=(0, 1), center=(84, 21), radius=12)
    scene = Scene((circle,), word="cat", image_size=112)
    answers = _answers(scene)
    assert answers[("colour", "What colour is the shape?")] == "red"
    assert answers[("shape", "What shape is it?")] == "circle"
    assert answers[("position", "Is the shape on the left or the right?")] == "right"
    assert answers[("position", "Is the shape at the top or the bottom?")] == "top"
    assert answers[("count", "How many shapes are there?")] == "one"
    assert answers[("reading", "What word is written?")] == "cat"
    pixels = np.asarray(render_scene(scene))  # (H, W, 3), indexed [y, x]
    assert tuple(pixels[21, 84]) == COLOURS["red"]
    assert tuple(pixels[21 - 11, 84 - 11]) == BACKGROUND  # the circle's bounding-box corner is outside it
    assert tuple(pixels[50, 20]) == BACKGROUND  # the other quadrants are empty
    band = pixels[84:]
    assert (band == 0).all(axis=-1).any() and (band == 255).all(axis=-1).mean() > 0.8  # black text on white


@pytest.mark.parametrize(
    "shape, inside, outside",
    [
        ("square", (-9, -9), (-12, -12)),  # square corners are filled, just beyond them is background
        ("triangle", (0, 10), (-10, -10)),  # wide base, empty top corners
        ("cross", (-11, 0), (-10, -10)),  # arms along the axes, empty diagonals
    ],
)
def test_hand_checked_shapes(shape, inside, outside):
    obj = SceneObject(shape, "blue", quadrant=(1, 0), center=(28, 63), radius=12)
    pixels = np.asarray(render_scene(Scene((obj,), word="7", image_size=112)))
    assert tuple(pixels[63 + inside[1], 28 + inside[0]]) == COLOURS["blue"]
    assert tuple(pixels[63 + outside[1], 28 + outside[0]]) == BACKGROUND
    answers = _answers(Scene((obj,), word="7", image_size=112))
    assert answers[("shape", "What shape is it?")] == shape
    assert answers[("position", "Is the shape on the left or the right?")] == "left"
    assert answers[("position", "Is the shape at the top or the bottom?")] == "bottom"


def test_multi_object_scenes_ask_count_and_reading_only():
    objects = tuple(
        SceneObject("square", colour, quadrant=q, center=c, radius=10)
        for colour, q, c in [("red", (0, 0), (28, 21)), ("green", (0, 1), (84, 21)), ("blue", (1, 1), (84, 63))]
    )
    scene = Scene(objects, word="42", image_size=112)
    assert sorted(q["category"] for q in scene_questions(scene)) == ["count", "reading"]
    assert _answers(scene)[("count", "How many shapes are there?")] == "three"
    pixels = np.asarray(render_scene(scene))
    assert [tuple(pixels[y, x]) for x, y in [(28, 21), (84, 21), (84, 63), (28, 63)]] == [
        COLOURS["red"], COLOURS["green"], COLOURS["blue"], BACKGROUND,
    ]


def test_sampled_scenes_keep_shapes_inside_their_quadrant_and_counts_in_range():
    rng = random.Random(0)
    counts = set()
    for _ in range(200):
        scene = sample_scene(rng)
        counts.add(len(scene.objects))
        assert len({obj.quadrant for obj in scene.objects}) == len(scene.objects)  # one shape per quadrant
        for obj in scene.objects:
            row, col = obj.quadrant
            assert col * 56 <= obj.center[0] - obj.radius and obj.center[0] + obj.radius <= (col + 1) * 56
            assert row * 42 <= obj.center[1] - obj.radius and obj.center[1] + obj.radius <= (row + 1) * 42
    assert counts == {1, 2, 3, 4}


def test_categories_restrict_the_questions_and_are_checked():
    sample = make_sample(0, seed=0, single_object_fraction=1.0, categories=("colour",))
    assert [turn["source"] for turn in sample["texts"]] == ["synthetic_vqa/colour"]
    with pytest.raises(ValueError, match="single_object_fraction"):
        make_sample(0, seed=0, categories=("colour", "shape"))
    with pytest.raises(ValueError, match="categories"):
        SyntheticVQADataset(4, seed=0, categories=("smell",))


def test_dataset_is_make_sample_by_index():
    dataset = SyntheticVQADataset(5, seed=9, image_size=56)
    assert len(dataset) == 5
    assert dataset[4]["texts"] == make_sample(4, seed=9, image_size=56)["texts"]
    assert dataset[4]["images"][0].size == (56, 56)
    with pytest.raises(IndexError):
        dataset[5]
    with pytest.raises(ValueError, match="n must be"):
        SyntheticVQADataset(0, seed=0)
