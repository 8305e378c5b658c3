"""ShapesWorld: scenes on a small grid of cells with an exact oracle.

A scene (an *image*) is a LongTensor[L] of cell codes in raster order, L = grid * grid:
code 0 is an empty cell, code ``1 + shape * n_colors + color`` an object. It is also the
toy model's image-token sequence, so a toy image *is* a world image.

A prompt describes the scene *exactly*: the scene holds precisely the prompt's objects
(no more, no fewer), each with the prompt's shape and, when the prompt names one, its
color; relations compare grid cells strictly (``A left of B``: col(A) < col(B);
``above``: row(A) < row(B); ``right of`` and ``below`` mirror them).

Categories, by rising difficulty (after GenEval and T2I-CompBench; difficulty = how many
constraints a generated scene must meet at once):
    single_object       "a circle"                                         1 object, its shape
    two_objects         "a circle and a square"                            2 objects, shapes
    counting            "three triangles"                                  n in {2, 3} of one shape
    color_attribution   "a red circle and a blue square"                   2 shape-color bindings
    spatial_relation    "a red circle left of a blue square"               2 bindings + a relation
    compositional       "a red circle above a blue cross and a green square"  3 bindings + a relation
(objects without a color may have any color).

One module on purpose (a little over 400 lines): prompts, the oracle, sampling, hard negatives,
rendering and parsing all read the same vocabulary, codes and grid of one ShapesWorld.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "diamond": "diamonds",
}
COLORS = ("red", "green", "blue", "yellow", "purple")
PALETTE = np.array([[220, 40, 40], [40, 170, 60], [40, 80, 220], [235, 200, 30], [150, 60, 190]], np.uint8)
BACKGROUND = np.array([255, 255, 255], np.uint8)
RELATIONS = ("left of", "right of", "above", "below")
MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = {2: "two", 3: "three"}
CATEGORIES = (
    "single_object",
    "two_objects",
    "counting",
    "color_attribution",
    "spatial_relation",
    "compositional",
)
NEGATIVE_KINDS = ("color", "shape", "count", "added", "removed", "relation")
LOCATION_WORDS = {  # grid size -> (row words top to bottom, column words left to right)
    2: (("top", "bottom"), ("left", "right")),
    3: (("top", "middle", "bottom"), ("left", "center", "right")),
}


@dataclass(frozen=True)
class Prompt:
    """A text prompt and the scene it describes.

    objects: one (shape, color or None) per required object instance ("three circles" ->
    three ("circle", None)); relation: None or one of RELATIONS, read as
    objects[0] <relation> objects[1] (a third object, if any, may be anywhere).
    """

    text: str
    category: str
    objects: tuple[tuple[str, str | None], ...]
    relation: str | None = None

    def key(self) -> tuple:
        """Meaning of the prompt, equal for texts that describe the same scenes."""
        if self.relation in ("right of", "below"):
            return (
                self.category,
                (self.objects[1], self.objects[0], *self.objects[2:]),
                MIRROR[self.relation],
            )
        if self.relation is not None:
            return (self.category, self.objects, self.relation)
        return (self.category, tuple(sorted(self.objects, key=str)), None)


def _object_phrase(shape: str, color: str | None) -> str:
    return f"a {color} {shape}" if color else f"a {shape}"


def _shape_masks(cell: int) -> np.ndarray:
    """Boolean masks [n_shapes, cell, cell] of each shape drawn in a cell."""
    c = (cell - 1) / 2.0
    yy, xx = np.mgrid[0:cell, 0:cell].astype(np.float64)
    dy, dx = yy - c, xx - c
    r = 0.38 * cell
    bar = max(1.0, 0.13 * cell)
    circle = dy**2 + dx**2 <= r**2
    square = (np.abs(dy) <= 0.3 * cell) & (np.abs(dx) <= 0.3 * cell)
    top, bottom = c - r, c + r
    height = (yy - top) / (bottom - top)  # 0 at apex, 1 at base
    triangle = (yy >= top) & (yy <= bottom) & (np.abs(dx) <= height * r)
    cross = ((np.abs(dy) <= bar) & (np.abs(dx) <= r)) | ((np.abs(dx) <= bar) & (np.abs(dy) <= r))
    diamond = np.abs(dy) + np.abs(dx) <= r
    return np.stack([circle, square, triangle, cross, diamond])


class ShapesWorld:
    """The world: prompts, scene sampler, exact oracle, renderer and pixel parser.

    seed fixes the train/eval split of prompts (a 25% eval share per category, split by
    meaning so that two texts of one scene description are on the same side).
    """

    def __init__(self, seed: int = 0, grid_size: int = 3, cell_pixels: int = 16):
        if grid_size < 2 or grid_size * grid_size < 4:
            raise ValueError(f"grid_size must be >= 2 (got {grid_size})")
        if cell_pixels < 8:
            raise ValueError(f"cell_pixels must be >= 8 (got {cell_pixels})")
        self.seed = seed
        self.grid_size = grid_size
        self.cell_pixels = cell_pixels
        self.image_tokens = grid_size * grid_size
        self.codebook_size = 1 + len(SHAPES) * len(COLORS)
        self.categories = CATEGORIES
        self.negative_kinds = NEGATIVE_KINDS
        self._masks = _shape_masks(cell_pixels)
        self._splits: dict[str, dict[str, list[Prompt]]] | None = None
        self._by_text: dict[str, Prompt] | None = None

    # ---------------------------------------------------------------- vocabulary
    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of rendered images."""
        side = self.grid_size * self.cell_pixels
        return side, side

    @property
    def words(self) -> list[str]:
        """Every word of the world's texts (prompts and grounded captions), sorted."""
        rows, columns = LOCATION_WORDS.get(self.grid_size, ((), ()))
        words = {
            *rows,
            *columns,
            "a",
            "and",
            "of",
            "left",
            "right",
            "above",
            "below",
            *SHAPES,
            *PLURALS.values(),
            *COLORS,
            *NUMBERS.values(),
        }
        return sorted(words)

    def code(self, shape: str, color: str) -> int:
        """Cell code of an object: 1 + shape * n_colors + color."""
        return 1 + SHAPES.index(shape) * len(COLORS) + COLORS.index(color)

    def describe_code(self, code: int) -> tuple[str, str] | None:
        """(shape, color) of a cell code, None for an empty cell."""
        if code == 0:
            return None
        return SHAPES[(code - 1) // len(COLORS)], COLORS[(code - 1) % len(COLORS)]

    # ------------------------------------------------------------------ prompts
    def _all_prompts(self) -> dict[str, list[Prompt]]:
        colored = [(s, c) for s in SHAPES for c in COLORS]
        out: dict[str, list[Prompt]] = {k: [] for k in CATEGORIES}
        for s in SHAPES:
            out["single_object"].append(Prompt(_object_phrase(s, None), "single_object", ((s, None),)))
        for a in SHAPES:
            for b in SHAPES:
                if a != b:
                    text = f"{_object_phrase(a, None)} and {_object_phrase(b, None)}"
                    out["two_objects"].append(Prompt(text, "two_objects", ((a, None), (b, None))))
        for s in SHAPES:
            for n, word in NUMBERS.items():
                out["counting"].append(Prompt(f"{word} {PLURALS[s]}", "counting", ((s, None),) * n))
        for a in colored:
            for b in colored:
                if a != b:
                    text = f"{_object_phrase(*a)} and {_object_phrase(*b)}"
                    out["color_attribution"].append(Prompt(text, "color_attribution", (a, b)))
        for a in colored:
            for b in colored:
                if a == b:
                    continue
                for rel in RELATIONS:
                    text = f"{_object_phrase(*a)} {rel} {_object_phrase(*b)}"
                    out["spatial_relation"].append(Prompt(text, "spatial_relation", (a, b), rel))
                    for c in colored:
                        if c[0] not in (a[0], b[0]):
                            text_c = f"{text} and {_object_phrase(*c)}"
                            out["compositional"].append(Prompt(text_c, "compositional", (a, b, c), rel))
        return out

    def _build_splits(self) -> None:
        splits: dict[str, dict[str, list[Prompt]]] = {"train": {}, "eval": {}}
        by_text: dict[str, Prompt] = {}
        for index, (category, prompts) in enumerate(self._all_prompts().items()):
            groups: dict[tuple, list[Prompt]] = {}
            for p in prompts:
                groups.setdefault(p.key(), []).append(p)
                by_text[p.text] = p
            keys = list(groups)
            order = np.random.default_rng([self.seed, index]).permutation(len(keys))
            n_eval = max(2, round(0.25 * len(keys)))
            splits["eval"][category] = [p for i in order[:n_eval] for p in groups[keys[i]]]
            splits["train"][category] = [p for i in order[n_eval:] for p in groups[keys[i]]]
        self._splits, self._by_text = splits, by_text

    def prompts(self, split: str, category: str | None = None) -> list[Prompt]:
        """Prompts of a split ("train" or "eval"), all categories in order or one category."""
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}: expected 'train' or 'eval'")
        if category is not None and category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}: expected one of {CATEGORIES}")
        if self._splits is None:
            self._build_splits()
        cats = CATEGORIES if category is None else (category,)
        return [p for c in cats for p in self._splits[split][c]]

    def parse_prompt(self, text: str) -> Prompt:
        """The Prompt of a text (case and spacing are normalised); unknown text -> ValueError."""
        if self._by_text is None:
            self._build_splits()
        norm = " ".join(str(text).lower().replace(".", " ").split())
        if norm not in self._by_text:
            raise ValueError(
                f"ShapesWorld cannot read the prompt {text!r}: expected a text like 'a red circle', "
                f"'a circle and a square', 'three triangles', 'a red circle and a blue square', "
                f"'a circle left of a square' or 'a red circle above a blue cross' "
                f"(shapes {SHAPES}, colors {COLORS}, relations {RELATIONS}, counts 2-4)"
            )
        return self._by_text[norm]

    # ------------------------------------------------------------------- scenes
    def _as_cells(self, image) -> np.ndarray:
        cells = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image).astype(
            np.int64
        )
        if cells.shape != (self.image_tokens,):
            raise ValueError(
                f"a ShapesWorld image is {self.image_tokens} cell codes, got shape {cells.shape}"
            )
        if cells.min() < 0 or cells.max() >= self.codebook_size:
            raise ValueError(
                f"cell codes must lie in [0, {self.codebook_size}), got {cells.min()}..{cells.max()}"
            )
        return cells

    def objects_of(self, image) -> list[tuple[str, str, int, int]]:
        """Objects of a scene: (shape, color, row, col) in raster order."""
        cells = self._as_cells(image)
        out = []
        for i in np.flatnonzero(cells):
            shape, color = self.describe_code(int(cells[i]))
            out.append((shape, color, int(i) // self.grid_size, int(i) % self.grid_size))
        return out

    def grounded_caption(self, image, rng: np.random.Generator) -> str:
        """Every object of a scene with its cell, in random order (grids of 2 or 3 only):
        "a red circle top left and a blue square middle right"."""
        if self.grid_size not in LOCATION_WORDS:
            raise ValueError(
                f"grounded captions name the cells of 2x2 and 3x3 grids only (grid_size {self.grid_size})"
            )
        rows, columns = LOCATION_WORDS[self.grid_size]
        objects = self.objects_of(image)
        return " and ".join(
            f"{_object_phrase(shape, color)} {rows[row]} {columns[col]}"
            for shape, color, row, col in (objects[i] for i in rng.permutation(len(objects)))
        )

    @staticmethod
    def _matches(want: tuple[str, str | None], have: tuple[str, str, int, int]) -> bool:
        return want[0] == have[0] and (want[1] is None or want[1] == have[1])

    @staticmethod
    def _holds(relation: str, a: tuple[str, str, int, int], b: tuple[str, str, int, int]) -> bool:
        if relation == "left of":
            return a[3] < b[3]
        if relation == "right of":
            return a[3] > b[3]
        if relation == "above":
            return a[2] < b[2]
        return a[2] > b[2]

    def assignment(self, prompt: Prompt, image) -> tuple[tuple[str, str, int, int], ...] | None:
        """Scene objects matching prompt.objects one to one (in the prompt's order, the relation
        holding between the first two), or None when the scene does not satisfy the prompt."""
        have = self.objects_of(image)
        if len(have) != len(prompt.objects):
            return None
        for order in itertools.permutations(have):
            if all(self._matches(w, h) for w, h in zip(prompt.objects, order, strict=True)) and (
                prompt.relation is None or self._holds(prompt.relation, order[0], order[1])
            ):
                return order
        return None

    def oracle(self, prompt: Prompt, image) -> bool:
        """Exact judge: does the scene hold exactly the prompt's objects (and relation)?"""
        return self.assignment(prompt, image) is not None

    def sample_image(self, prompt: Prompt, rng: np.random.Generator) -> torch.Tensor:
        """A uniformly placed random scene satisfying the prompt: LongTensor[L]."""
        n = len(prompt.objects)
        while True:
            cells = rng.choice(self.image_tokens, size=n, replace=False)
            if prompt.relation is None:
                break
            a = (None, None, cells[0] // self.grid_size, cells[0] % self.grid_size)
            b = (None, None, cells[1] // self.grid_size, cells[1] % self.grid_size)
            if self._holds(prompt.relation, a, b):
                break
        image = np.zeros(self.image_tokens, np.int64)
        for (shape, color), cell in zip(prompt.objects, cells, strict=True):
            image[cell] = self.code(shape, color if color is not None else COLORS[rng.integers(len(COLORS))])
        return torch.from_numpy(image)

    def negatives(self, prompt: Prompt, image, rng: np.random.Generator) -> list[tuple[str, torch.Tensor]]:
        """Hard negatives of a true scene: one (kind, image) per kind that applies to the prompt.

        color: one object recolored (prompts that name colors); shape: one object reshaped;
        count: one more or one fewer copy of a named object (a copy added for non-counting
        prompts); added: a new object unlike any in the scene; removed: one object removed;
        relation: the two objects swapped or one moved so the relation breaks (relation
        prompts). Each negative differs from ``image`` by a minimal edit and fails the oracle.
        """
        cells = self._as_cells(image)
        if not self.oracle(prompt, cells):
            raise ValueError(f"negatives need a scene that satisfies {prompt.text!r}")
        kinds = ["shape", "count", "added", "removed"]
        if prompt.objects[0][1] is not None:
            kinds.insert(0, "color")
        if prompt.relation is not None:
            kinds.append("relation")
        out = []
        for kind in kinds:
            for _ in range(50):
                neg = self._edit(kind, prompt, cells, rng)
                if neg is not None and not self.oracle(prompt, neg):
                    out.append((kind, torch.from_numpy(neg)))
                    break
        return out

    def _edit(
        self, kind: str, prompt: Prompt, cells: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray | None:
        full = np.flatnonzero(cells)
        empty = np.flatnonzero(cells == 0)
        neg = cells.copy()
        nc = len(COLORS)
        if kind in ("color", "shape"):
            i = rng.choice(full)
            shape, color = self.describe_code(int(cells[i]))
            if kind == "color":
                color = rng.choice([c for c in COLORS if c != color])
            else:
                shape = rng.choice([s for s in SHAPES if s != shape])
            neg[i] = self.code(shape, color)
        elif kind == "count":
            if prompt.category == "counting" and len(full) > 1 and rng.random() < 0.5:
                neg[rng.choice(full)] = 0
            elif len(empty):
                neg[rng.choice(empty)] = cells[rng.choice(full)]
            else:
                return None
        elif kind == "added":
            present = {(int(c) - 1) // nc for c in cells[full]}
            shapes = [s for s in range(len(SHAPES)) if s not in present] or list(range(len(SHAPES)))
            if not len(empty):
                return None
            neg[rng.choice(empty)] = 1 + rng.choice(shapes) * nc + rng.integers(nc)
        elif kind == "removed":
            neg[rng.choice(full)] = 0
        elif kind == "relation":
            first, second = self.assignment(prompt, cells)[:2]
            a, b = (obj[2] * self.grid_size + obj[3] for obj in (first, second))
            if rng.random() < 0.5:
                neg[a], neg[b] = cells[b], cells[a]
            else:
                src = rng.choice([a, b])
                neg[src] = 0
                neg[rng.choice(np.flatnonzero(neg == 0))] = cells[src]
        return neg

    # ------------------------------------------------------------------- pixels
    def render(self, image) -> np.ndarray:
        """Pixels of a scene: uint8 [H, W, 3], white background, each object a colored shape."""
        cells = self._as_cells(image)
        g, p = self.grid_size, self.cell_pixels
        pixels = np.empty((g * p, g * p, 3), np.uint8)
        pixels[:] = BACKGROUND
        for i in np.flatnonzero(cells):
            s, c = divmod(int(cells[i]) - 1, len(COLORS))
            block = pixels[(i // g) * p : (i // g + 1) * p, (i % g) * p : (i % g + 1) * p]
            block[self._masks[s]] = PALETTE[c]
        return pixels

    def parse(self, pixels) -> torch.Tensor:
        """Scene of an image of exactly render's size: LongTensor[L]; the exact inverse of render.

        Tolerant of pixel noise: a cell is empty when under a quarter of the smallest shape's
        area differs from the background; otherwise its color is the palette color nearest to the
        mean of its foreground pixels and its shape the mask with the highest overlap (IoU).
        """
        arr = np.asarray(pixels.detach().cpu() if isinstance(pixels, torch.Tensor) else pixels)
        h, w = self.image_size
        if arr.shape != (h, w, 3):
            raise ValueError(f"a ShapesWorld image has pixels of shape ({h}, {w}, 3), got {tuple(arr.shape)}")
        arr = arr.astype(np.float64)
        g, p = self.grid_size, self.cell_pixels
        min_area = self._masks.reshape(len(SHAPES), -1).sum(1).min()
        out = np.zeros(self.image_tokens, np.int64)
        for i in range(self.image_tokens):
            block = arr[(i // g) * p : (i // g + 1) * p, (i % g) * p : (i % g + 1) * p]
            fg = np.abs(block - BACKGROUND).sum(-1) > 120
            if fg.sum() < 0.25 * min_area:
                continue
            color = np.argmin(((PALETTE[None].astype(np.float64) - block[fg].mean(0)) ** 2).sum(-1))
            inter = (self._masks & fg).reshape(len(SHAPES), -1).sum(1)
            union = (self._masks | fg).reshape(len(SHAPES), -1).sum(1)
            out[i] = 1 + int(np.argmax(inter / union)) * len(COLORS) + int(color)
        return torch.from_numpy(out)
