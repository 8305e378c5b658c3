"""The recipe of the pre-trained toy model and its shipped weights.

The recipe (:class:`PretrainConfig`: the model's size and world, a ToyConfig, plus the budget, task
mix and optimiser) is what ``python -m ntkdyn.pretrain`` trains. The default recipe's weights ship with
the package (``ntkdyn/models/pretrained/toy/``, :data:`SHIPPED_TOY_DIR`), beside a ``manifest.json``
that records the recipe, its hash, the SHA-256 of ``model.safetensors`` and the machine that made
them. ``load_adapter("toy")`` loads them after checking that digest (:func:`pretrained_toy_dir`):
the same weights on every machine, and loading never trains. Pre-training lands elsewhere on
another CPU (float reductions differ in the last bits and the recipe is sensitive), which is why the
weights ship rather than being rebuilt on first use.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ntkdyn.models.toy import META_FILE, ToyConfig

UNIT_FIELDS = ("hard_start", "hard_end", "hard_ramp", "weight_decay")


@dataclass
class PretrainConfig:
    """The recipe: model size and world (``model``), budget, task mix and optimiser."""

    model: ToyConfig = field(
        default_factory=lambda: ToyConfig(initializer_range=0.09),
        metadata={"help": "the toy model's size and world", "cli_prefix": ""},
    )
    seed: int = field(default=0, metadata={"help": "seed of the initial weights and of the examples"})
    steps: int = field(default=2400, metadata={"help": "optimizer steps"})
    relation_warmup: int = field(
        default=500,
        metadata={"help": "first steps: relation minimal pairs and grounding only (0 = off)"},
    )
    gen_batch: int = field(default=16, metadata={"help": "generation examples per step"})
    und_batch: int = field(default=48, metadata={"help": "understanding examples per step (minimal pairs)"})
    caption_batch: int = field(default=16, metadata={"help": "caption examples per step (0 = off)"})
    ground_batch: int = field(default=16, metadata={"help": "grounded captions per step (0 = off)"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the matrices"})
    hard_start: float = field(default=0.3, metadata={"help": "P(hard negative) at the start"})
    hard_end: float = field(default=0.9, metadata={"help": "P(hard negative) after the ramp"})
    hard_ramp: float = field(default=0.3, metadata={"help": "fraction of the steps over which it rises"})
    und_category_weights: tuple[float, ...] = field(
        default=(1.0, 1.0, 1.0, 1.5, 2.5, 4.0),
        metadata={"help": "weights of the 6 prompt categories in understanding examples"},
    )
    negative_kind_weights: tuple[float, ...] = field(
        default=(3.0, 1.0, 1.0, 1.0, 1.0, 8.0),
        metadata={"help": "weights of the 6 hard-negative kinds (order: ShapesWorld.negative_kinds)"},
    )
    threads: int = field(
        default=2,
        metadata={"help": "torch threads while training (float reductions, hence the weights, depend on it)"},
    )

    def __post_init__(self) -> None:
        for name in ("seed", "warmup", "caption_batch", "ground_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("steps", "gen_batch", "und_batch", "threads", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PretrainConfig.{name} must be > 0 (got {getattr(self, name)})")
        if not 0 <= self.relation_warmup < self.steps:
            raise ValueError(
                f"PretrainConfig needs 0 <= relation_warmup ({self.relation_warmup}) < steps ({self.steps})"
            )
        if self.und_batch % 2:
            raise ValueError(f"PretrainConfig.und_batch must be even (minimal pairs), got {self.und_batch}")
        for name in ("und_category_weights", "negative_kind_weights"):
            weights = tuple(getattr(self, name))
            setattr(self, name, weights)
            if len(weights) != 6 or min(weights) < 0 or max(weights) <= 0:
                raise ValueError(f"PretrainConfig.{name} needs 6 weights >= 0 (not all 0), got {weights}")
        for name in UNIT_FIELDS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PretrainConfig.{name} must lie in [0, 1] (got {getattr(self, name)})")

    def recipe(self) -> dict:
        """Every field as one flat dict (the model's fields inline). The world's geometry (grid_size,
        cell_pixels) appears only where it differs from ToyConfig's default: recipes from before it
        was part of the recipe keep their hash, hence their cached weights."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        geometry = {"grid_size": ToyConfig.grid_size, "cell_pixels": ToyConfig.cell_pixels}
        for name, value in asdict(self.model).items():
            if geometry.get(name, object()) != value:
                flat[name] = value
        return flat

    def recipe_hash(self) -> str:
        """12 hex digits identifying the recipe (every field)."""
        return hashlib.sha256(json.dumps(self.recipe(), sort_keys=True).encode()).hexdigest()[:12]


SHIPPED_TOY_DIR = Path(__file__).resolve().parent / "pretrained" / "toy"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"


def weights_digest(directory: str | Path) -> str:
    """SHA-256 (hex) of a saved toy model's ``model.safetensors``."""
    return hashlib.sha256((Path(directory) / WEIGHTS_FILE).read_bytes()).hexdigest()


def _machine() -> str:
    """The CPU model name (from /proc/cpuinfo where there is one) and the platform."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
        if line.startswith("model name")
    ]
    return f"{names[0] if names else platform.processor() or 'unknown CPU'} ({platform.platform()})"


def write_manifest(directory: str | Path, config: PretrainConfig) -> dict:
    """Record beside saved weights what made them: recipe, recipe hash, weights digest, torch, machine."""
    import torch

    manifest = {
        "recipe": config.recipe(),
        "recipe_hash": config.recipe_hash(),
        "sha256": weights_digest(directory),
        "torch": torch.__version__,
        "machine": _machine(),
    }
    (Path(directory) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def verified_toy_dir(directory: str | Path) -> Path:
    """``directory`` if it holds a saved toy model whose weights match its manifest's digest (a
    directory without a manifest is taken as it is); raises naming what is missing or differs."""
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no toy model ({META_FILE} missing)")
    manifest_path = directory / MANIFEST_FILE
    if manifest_path.is_file():
        recorded = json.loads(manifest_path.read_text())["sha256"]
        actual = weights_digest(directory)
        if actual != recorded:
            raise ValueError(
                f"{directory / WEIGHTS_FILE} has SHA-256 {actual}, its {MANIFEST_FILE} records {recorded}: "
                "the weights were changed or damaged"
            )
    return directory


def pretrained_toy_dir() -> Path:
    """The weights ``load_adapter("toy")`` loads: the shipped default recipe, digest checked."""
    return verified_toy_dir(SHIPPED_TOY_DIR)
