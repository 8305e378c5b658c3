"""The configuration tree of a ``python -m ntkdyn.track`` run, saved whole in its config.json:

    RunConfig           model, run directory, resume, tracking on/off, threads (steps, the rest)
      train  TrainConfig      optimisation (ntkdyn.trainer.config)
      data   DataConfig       self-improvement data: candidates, judge, filters (ntkdyn.trainer.config)
      selection SelectionConfig  label-free checkpoint selection, off by default (ntkdyn.trainer.config)
      tracking TrackingConfig learning-dynamics tracking and its probes
        projection ProjectionConfig   the projection of the features (ntkdyn.analysis.projector)
      eval   EvalConfig       evaluation on held-out eval prompts

The command line is built from this tree (ntkdyn.cli): every field is an option (``--lr``,
``--judge``, ``--track-every``, ``--proj-k``, ``--eval-prompts``, ...). ``--resume`` compares the
whole tree with the run's config.json and refuses a changed option by name.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any

from ntkdyn.analysis.projector import ProjectionConfig
from ntkdyn.cli import model_option, option_flags
from ntkdyn.models import check_model_spec
from ntkdyn.trainer.config import DataConfig, SelectionConfig, TrainConfig

TRACKING_K = (
    128  # keeps the feature predictor within 0.05 Pearson of the exact one on the toy (BENCHMARKS.md)
)


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


@dataclass
class EvalConfig:
    """Evaluation on held-out eval prompts before, during and after training."""

    eval_prompts: int = field(
        default=192, metadata={"help": "eval prompts (world eval split, never trained on)"}
    )
    eval_candidates: int = field(
        default=32, metadata={"help": "candidates per eval prompt (8 gave +-2.5 points of sampling noise)"}
    )
    eval_und_pairs: int = field(
        default=2,
        metadata={
            "help": "true scenes per eval prompt for understanding, each with every applicable hard negative"
        },
    )
    co_degradation_tol: float = field(
        default=0.0,
        metadata={
            "help": "flag co-degradation when the 95% intervals of the gen_alignment and und_accuracy "
            "changes both lie wholly below -this (0: both falls are significant)"
        },
    )

    def __post_init__(self) -> None:
        _check(self.eval_prompts >= 1, "eval_prompts", f"must be >= 1, got {self.eval_prompts}")
        _check(self.eval_candidates >= 1, "eval_candidates", f"must be >= 1, got {self.eval_candidates}")
        _check(self.eval_und_pairs >= 0, "eval_und_pairs", f"must be >= 0, got {self.eval_und_pairs}")
        _check(
            self.co_degradation_tol >= 0, "co_degradation_tol", f"must be >= 0, got {self.co_degradation_tol}"
        )


@dataclass
class TrackingConfig:
    """Learning-dynamics tracking: how often, the projection of the features, the probes."""

    track_every: int = field(default=40, metadata={"help": "track every K optimizer steps"})
    track_window: int = field(
        default=1,
        metadata={
            "help": "track W consecutive steps from every K-th step (horizons over them, the frozen-kernel "
            "prediction, kernel drift); 1 = single steps"
        },
    )
    projection: ProjectionConfig = field(
        default_factory=lambda: ProjectionConfig(kind="kronecker", k=TRACKING_K),
        metadata={"cli_prefix": "proj", "cli_fields": ("kind", "k", "seed")},
    )
    probes_per_category: int = field(default=8, metadata={"help": "probe pairs per category"})
    probe_seed: int = field(default=0, metadata={"help": "seed of the probe choice"})
    top_contributors: int = field(default=3, metadata={"help": "training samples listed per probe and step"})
    train_kernel: bool = field(
        default=False,
        metadata={
            "help": "also log the eNTK between the training samples (kernels/ K/train_*,train_*: B^2 more "
            "feature products per tracked step)"
        },
    )
    store_k: int = field(
        default=0,
        metadata={
            "help": "gradient store: every training sample's projected gradient (kronecker, k x k per "
            "weight matrix) from the training step's own backward, every --store-every steps, into "
            "gradients/ (0: off)"
        },
    )
    store_every: int = field(default=1, metadata={"help": "steps between gradient store files"})

    def __post_init__(self) -> None:
        _check(self.store_k >= 0, "store_k", f"must be >= 0 (0: off), got {self.store_k}")
        for name in ("track_every", "probes_per_category", "store_every"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.top_contributors >= 0, "top_contributors", f"must be >= 0, got {self.top_contributors}")
        _check(
            1 <= self.track_window <= self.track_every,
            "track_window",
            f"must be in [1, track_every={self.track_every}], got {self.track_window}",
        )


@dataclass
class RunConfig:
    """One run of ``python -m ntkdyn.track``: the model, the output directory, and the parts."""

    model: list[str] = model_option()
    out: str = field(default="runs/track", metadata={"help": "run directory"})
    resume: bool = field(
        default=False, metadata={"help": "continue the run in --out from its last checkpoint"}
    )
    track: bool = field(
        default=True, metadata={"help": "learning-dynamics tracking (--no-track turns it off)"}
    )
    figures: bool = field(
        default=True,
        metadata={
            "help": "write the figures into RUN_DIR/figures at the end (--no-figures: draw them later with "
            "python -m ntkdyn.plot RUN_DIR)"
        },
    )
    threads: int = field(
        default=1,
        metadata={
            "help": "torch CPU threads of each training step (its float sums, hence the trained weights, "
            "depend on it; the documented runs use 1)"
        },
    )
    inference_threads: int = field(
        default=0,
        metadata={
            "help": "torch CPU threads for everything else: generating, judging, evaluating, the "
            "end-of-run report (0: the process's setting, in a fresh process torch's default of one per "
            "core or OMP_NUM_THREADS; 1 on a busy machine)"
        },
    )
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"cli_prefix": ""})
    data: DataConfig = field(default_factory=DataConfig, metadata={"cli_prefix": ""})
    selection: SelectionConfig = field(default_factory=SelectionConfig, metadata={"cli_prefix": ""})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"cli_prefix": ""})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"cli_prefix": ""})

    def __post_init__(self) -> None:
        check_model_spec(self.model)
        _check(bool(self.out), "out", "must be a directory path")
        _check(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        _check(
            self.inference_threads >= 0,
            "inference_threads",
            f"must be >= 0 (0: torch's default), got {self.inference_threads}",
        )
        if self.train.objective == "dpo":
            _check(
                self.data.candidates >= 2,
                "candidates",
                f"DPO needs N >= 2 candidates per prompt to form pairs, got {self.data.candidates}",
            )
            _check(
                self.data.judge != "none",
                "judge",
                "DPO needs a judge to tell chosen from rejected; --judge none is the SFT baseline only",
            )
        _check(
            self.train.run != "curriculum" or self.data.judge != "none",
            "judge",
            "a curriculum revisits prompts with no accepted candidate; --judge none accepts everything",
        )

    @property
    def external_labels_in_training(self) -> bool:
        """Whether the world's oracle shapes training: the oracle filter (--judge oracle) or the oracle
        anchor of the understanding term (--anchor oracle with a weight > 0)."""
        return self.data.judge == "oracle" or (
            self.train.anchor == "oracle" and self.train.understanding_weight > 0
        )

    def to_dict(self) -> dict:
        """The whole tree as JSON data (what config.json holds)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=_plain))


def _plain(value: Any) -> Any:
    """JSON form of the few non-JSON values a config may hold: enums, classes."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    raise TypeError(f"config value {value!r} has no JSON form")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_options(saved: dict, cfg: RunConfig) -> list[str]:
    """The options of ``cfg`` whose values differ from a saved config.json (``resume`` and ``figures``
    aside: neither changes what the run computes), each as "--flag (field path): <saved> in the run, <now>
    now"."""
    old, new = flatten(saved), flatten(cfg.to_dict())
    flags = option_flags(RunConfig)
    missing = "absent"
    return [
        f"{flags.get(k, k)} ({k}): {old.get(k, missing)!r} in the run, {new.get(k, missing)!r} now"
        for k in sorted(old.keys() | new.keys())
        if k not in ("resume", "figures") and old.get(k, missing) != new.get(k, missing)
    ]
