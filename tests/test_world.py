"""ShapesWorld: the oracle against hand-built scenes, render/parse, splits, sampler, negatives."""

import numpy as np
import pytest
import torch

from ntkdyn.world import CATEGORIES, ShapesWorld


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(seed=0)


def scene(world, objects: dict) -> torch.Tensor:
    """Hand-built 3x3 scene from {(row, col): "color shape"}."""
    cells = torch.zeros(9, dtype=torch.long)
    for (r, c), name in objects.items():
        color, shape = name.split()
        cells[r * 3 + c] = world.code(shape, color)
    return cells


# (prompt text, scene, expected oracle verdict): true and false cases for every category.
CASES = [
    ("a circle", {(1, 1): "red circle"}, True),
    ("a circle", {(0, 2): "blue circle"}, True),
    ("a circle", {(1, 1): "red square"}, False),
    ("a circle", {(1, 1): "red circle", (0, 0): "red circle"}, False),
    ("a circle", {}, False),
    ("a circle and a square", {(0, 0): "blue square", (2, 2): "red circle"}, True),
    ("a circle and a square", {(0, 0): "blue square", (2, 2): "red square"}, False),
    ("a circle and a square", {(0, 0): "blue square", (2, 2): "red circle", (1, 1): "red cross"}, False),
    ("a circle and a square", {(2, 2): "red circle"}, False),
    ("three triangles", {(0, 0): "red triangle", (0, 1): "blue triangle", (2, 2): "green triangle"}, True),
    ("three triangles", {(0, 0): "red triangle", (0, 1): "blue triangle"}, False),
    ("three triangles", {(0, 0): "red triangle", (0, 1): "blue triangle", (2, 2): "green circle"}, False),
    ("two crosses", {(0, 0): "red cross", (0, 1): "red cross", (1, 0): "red cross"}, False),
    ("a red circle and a blue square", {(0, 0): "blue square", (1, 2): "red circle"}, True),
    ("a red circle and a blue square", {(0, 0): "red square", (1, 2): "blue circle"}, False),
    ("a red circle and a blue square", {(0, 0): "blue square", (1, 2): "green circle"}, False),
    ("a red circle and a green circle", {(0, 0): "green circle", (2, 0): "red circle"}, True),
    ("a red circle and a green circle", {(0, 0): "green circle", (2, 0): "green circle"}, False),
    ("a red circle left of a blue square", {(2, 0): "red circle", (0, 1): "blue square"}, True),
    ("a red circle left of a blue square", {(0, 1): "red circle", (2, 1): "blue square"}, False),
    ("a red circle left of a blue square", {(0, 2): "red circle", (0, 0): "blue square"}, False),
    ("a red circle left of a blue square", {(2, 0): "blue circle", (0, 1): "red square"}, False),
    ("a red circle right of a blue square", {(0, 2): "red circle", (0, 0): "blue square"}, True),
    ("a green triangle above a red diamond", {(0, 2): "green triangle", (1, 0): "red diamond"}, True),
    ("a green triangle above a red diamond", {(1, 2): "green triangle", (1, 0): "red diamond"}, False),
    ("a green triangle below a red diamond", {(2, 2): "green triangle", (1, 0): "red diamond"}, True),
    (
        "a red circle above a blue cross and a green square",
        {(0, 1): "red circle", (2, 1): "blue cross", (0, 0): "green square"},
        True,
    ),
    (
        "a red circle above a blue cross and a green square",
        {(2, 1): "red circle", (0, 1): "blue cross", (1, 1): "green square"},
        False,
    ),
    (
        "a red circle above a blue cross and a green square",
        {(0, 1): "red circle", (2, 1): "blue cross", (0, 0): "red square"},
        False,
    ),
    (
        "a red circle above a blue cross and a green square",
        {(0, 1): "red circle", (2, 1): "blue cross"},
        False,
    ),
]


@pytest.mark.parametrize("text,objects,expected", CASES)
def test_oracle_on_hand_built_scenes(world, text, objects, expected):
    assert world.oracle(world.parse_prompt(text), scene(world, objects)) is expected


def test_cases_cover_every_category_true_and_false(world):
    seen = {(world.parse_prompt(t).category, e) for t, _, e in CASES}
    assert seen == {(c, e) for c in CATEGORIES for e in (True, False)}


def test_splits_are_seeded_disjoint_and_cover_all_categories(world):
    train, evals = world.prompts("train"), world.prompts("eval")
    assert {p.category for p in evals} == set(CATEGORIES) == {p.category for p in train}
    assert not {p.text for p in train} & {p.text for p in evals}
    assert not {p.key() for p in train} & {p.key() for p in evals}  # split by meaning, not only text
    assert [p.text for p in ShapesWorld(seed=0).prompts("eval")] == [p.text for p in evals]
    assert [p.text for p in ShapesWorld(seed=1).prompts("eval")] != [p.text for p in evals]
    assert all(p.category == "counting" for p in world.prompts("eval", "counting"))
    with pytest.raises(ValueError, match="split"):
        world.prompts("test")


def test_sample_image_satisfies_prompt_and_render_parse_roundtrip(world):
    rng = np.random.default_rng(0)
    for prompt in world.prompts("eval")[::7]:
        image = world.sample_image(prompt, rng)
        assert world.oracle(prompt, image)
        pixels = world.render(image)
        assert pixels.dtype == np.uint8 and pixels.shape == (*world.image_size, 3)
        assert torch.equal(world.parse(pixels), image)
        assert world.parse_prompt(prompt.text.upper()) == prompt


def test_parse_tolerates_noise_and_rejects_wrong_size(world):
    rng = np.random.default_rng(1)
    for prompt in world.prompts("eval", "compositional")[:20]:
        image = world.sample_image(prompt, rng)
        noisy = world.render(image).astype(np.int64) + rng.integers(-40, 41, size=(*world.image_size, 3))
        assert torch.equal(world.parse(np.clip(noisy, 0, 255).astype(np.uint8)), image)
    with pytest.raises(ValueError, match="shape"):
        world.parse(np.zeros((47, 48, 3), np.uint8))


def test_negatives_are_minimal_edits_that_fail_the_oracle(world):
    rng = np.random.default_rng(2)
    for category in CATEGORIES:
        for prompt in world.prompts("train", category)[:10]:
            image = world.sample_image(prompt, rng)
            negatives = world.negatives(prompt, image, rng)
            expected = {"shape", "count", "added", "removed"}
            expected |= {"color"} if prompt.objects[0][1] else set()
            expected |= {"relation"} if prompt.relation else set()
            assert {k for k, _ in negatives} == expected
            for kind, neg in negatives:
                assert not world.oracle(prompt, neg)
                changed = int((neg != image).sum())
                n_before, n_after = int((image > 0).sum()), int((neg > 0).sum())
                if kind in ("color", "shape"):
                    assert changed == 1 and n_after == n_before
                elif kind in ("added", "removed", "count"):
                    assert changed == 1 and abs(n_after - n_before) == 1
                else:  # relation: same objects, other cells
                    assert sorted(neg[neg > 0].tolist()) == sorted(image[image > 0].tolist())


def test_grounded_caption_names_every_object_at_its_cell(world):
    """Rebuilding a scene from its caption's words (hand-written cell names) gives the scene back."""
    rows = {"top": 0, "middle": 1, "bottom": 2}
    columns = {"left": 0, "center": 1, "right": 2}
    rng = np.random.default_rng(3)
    for category in CATEGORIES:
        for prompt in world.prompts("train", category)[:5]:
            image = world.sample_image(prompt, rng)
            caption = world.grounded_caption(image, rng)
            rebuilt = {}
            for phrase in caption.split(" and "):
                article, color, shape, row, column = phrase.split()
                assert article == "a" and (rows[row], columns[column]) not in rebuilt
                rebuilt[(rows[row], columns[column])] = f"{color} {shape}"
            assert torch.equal(scene(world, rebuilt), image), caption
            assert set(caption.split()) <= set(world.words)
    with pytest.raises(ValueError, match="2x2 and 3x3 grids only"):
        ShapesWorld(grid_size=4).grounded_caption(torch.zeros(16, dtype=torch.long), rng)


def test_unknown_prompt_and_bad_image_errors(world):
    with pytest.raises(ValueError, match="cannot read the prompt"):
        world.parse_prompt("a pink elephant")
    with pytest.raises(ValueError, match="cell codes"):
        world.oracle(world.parse_prompt("a circle"), torch.zeros(16, dtype=torch.long))
