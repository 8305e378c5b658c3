"""Configuration of a self-improvement run: dataclasses with help metadata, validated in
``__post_init__`` (errors name the field). The command line of ``python -m ntkdyn.track``
is built from these fields by :func:`add_dataclass_arguments`.

Budget: a run is ``rounds`` rounds; each round collects data (Algorithm 1; in a curriculum
run, round r > 0 revisits the discard pool, Algorithm 2) and then trains ``ceil(epochs * n /
batch_size)`` optimizer steps on its n items, capped by ``max_steps // rounds`` (the remainder goes to
the last round; max_steps 0: no cap). The defaults (2048 prompts, 30 epochs, 1000 steps) make every run
take exactly 1000 steps, so runs with different filters, objectives and data sizes have an equal budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

RUN_KINDS = ("sft", "dpo", "curriculum")
JUDGES = ("self", "oracle", "none")
SCHEDULES = ("cosine", "linear", "constant")
TRAINABLE = ("shared", "all")


def _help(text: str, **kwargs) -> dict:
    return {"help": text, **kwargs}


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


@dataclass
class TrainConfig:
    """Optimisation of the generation branch (and the optional understanding replay)."""

    run: str = field(default="dpo", metadata=_help("run kind", choices=RUN_KINDS))
    curriculum_objective: str = field(
        default="sft", metadata=_help("objective of a curriculum run", choices=("sft", "dpo"))
    )
    lr: float | None = field(
        default=None, metadata=_help("peak AdamW learning rate (default: 3e-4 for SFT, 2e-4 for DPO)")
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(default=5, metadata=_help("linear warm-up steps"))
    schedule: str = field(
        default="cosine", metadata=_help("learning-rate schedule after warm-up", choices=SCHEDULES)
    )
    batch_size: int = field(default=32, metadata=_help("global batch (items per optimizer step)"))
    micro_batch_size: int = field(
        default=32, metadata=_help("items per forward/backward on one process (gradient accumulation)")
    )
    grad_clip: float = field(default=1.0, metadata=_help("clip the global grad norm to this (0 = off)"))
    epochs: float = field(
        default=30.0, metadata=_help("epochs over each round's data, capped by --max-steps (paper: 20-30)")
    )
    max_steps: int = field(
        default=1000,
        metadata=_help(
            "cap on the optimizer steps over all rounds: every default run trains this many steps (equal "
            "budget across filters and objectives); 0 = no cap"
        ),
    )
    rounds: int = field(
        default=1,
        metadata=_help(
            "data rounds: sft/dpo regenerate all data with the current model each round (iterated "
            "self-improvement); curriculum revisits the discard pool each round (Algorithm 2)"
        ),
    )
    beta: float = field(default=0.1, metadata=_help("DPO beta"))
    nll_weight: float = field(
        default=1.0,
        metadata=_help(
            "weight of the per-token NLL of the chosen image added to DPO (0 = plain DPO; measured: without "
            "it DPO lowered generation alignment on the toy model)"
        ),
    )
    replay_weight: float = field(
        default=1.0,
        metadata=_help(
            "weight of the understanding replay term (yes/no cross-entropy on world scenes and hard "
            "negatives, one replay pair per training item); 0 = off"
        ),
    )
    trainable: str = field(
        default="shared",
        metadata=_help("trained parameters: the shared language model or all", choices=TRAINABLE),
    )
    checkpoint_every: int = field(default=50, metadata=_help("checkpoint every K optimizer steps"))
    eval_every: int = field(default=500, metadata=_help("evaluate every K steps during training (0 = off)"))
    seed: int = field(default=0, metadata=_help("seed of everything (data order, sampling, replay)"))

    def __post_init__(self) -> None:
        _check(self.run in RUN_KINDS, "run", f"unknown run kind {self.run!r}; expected one of {RUN_KINDS}")
        _check(
            self.curriculum_objective in ("sft", "dpo"),
            "curriculum_objective",
            f"expected 'sft' or 'dpo', got {self.curriculum_objective!r}",
        )
        if self.lr is None:
            self.lr = 2e-4 if self.objective == "dpo" else 3e-4
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.schedule in SCHEDULES, "schedule", f"expected one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        _check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        _check(
            self.max_steps == 0 or self.max_steps >= self.rounds,
            "max_steps",
            f"must be 0 (no cap) or >= rounds ({self.rounds}), got {self.max_steps}",
        )
        _check(self.beta > 0, "beta", f"DPO beta must be > 0, got {self.beta}")
        _check(self.nll_weight >= 0, "nll_weight", f"must be >= 0, got {self.nll_weight}")
        _check(self.replay_weight >= 0, "replay_weight", f"must be >= 0, got {self.replay_weight}")
        _check(
            self.trainable in TRAINABLE, "trainable", f"expected one of {TRAINABLE}, got {self.trainable!r}"
        )
        _check(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")

    @property
    def objective(self) -> str:
        """The loss trained: "sft" or "dpo"."""
        return self.curriculum_objective if self.run == "curriculum" else self.run


@dataclass
class DataConfig:
    """Self-improvement data (Algorithm 1): candidates, the judge and the filters."""

    judge: str = field(
        default="self",
        metadata=_help("filter: the model's own understanding, the exact oracle, or none", choices=JUDGES),
    )
    candidates: int = field(default=8, metadata=_help("N candidates sampled per training prompt"))
    temperature: float = field(default=1.0, metadata=_help("sampling temperature of the candidates"))
    accept_threshold: float = field(
        default=0.5,
        metadata=_help("--judge self accepts a candidate when P(yes) > this (0.5: the yes/no verdict)"),
    )
    sft_threshold: float = field(
        default=0.0,
        metadata=_help("SFT keeps accepted candidates with P(yes) >= this (0 = every accepted one)"),
    )
    dpo_margin: float = field(
        default=0.0, metadata=_help("DPO keeps a pair when P(yes) chosen - P(yes) rejected >= this")
    )
    prompts: str = field(
        default="2048",
        metadata=_help(
            "training prompts: a count P (P prompts of the world's train split, every category alike) or a "
            'text/JSONL file of prompts (one per line / objects with a "text" field)'
        ),
    )
    gen_batch: int = field(default=32, metadata=_help("prompts per generation/judging chunk"))

    def __post_init__(self) -> None:
        _check(self.judge in JUDGES, "judge", f"expected one of {JUDGES}, got {self.judge!r}")
        _check(self.candidates >= 1, "candidates", f"must be >= 1, got {self.candidates}")
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _check(
            0 <= self.accept_threshold < 1,
            "accept_threshold",
            f"must be in [0, 1), got {self.accept_threshold}",
        )
        _check(0 <= self.sft_threshold <= 1, "sft_threshold", f"must be in [0, 1], got {self.sft_threshold}")
        _check(0 <= self.dpo_margin <= 1, "dpo_margin", f"must be in [0, 1], got {self.dpo_margin}")
        _check(
            int(self.prompts) >= 1 if self.prompts.isdigit() else os.path.isfile(self.prompts),
            "prompts",
            f"expected a count >= 1 or a prompts file, got {self.prompts!r} (no such file)",
        )
        _check(self.gen_batch >= 1, "gen_batch", f"must be >= 1, got {self.gen_batch}")


@dataclass
class EvalConfig:
    """Evaluation on held-out eval prompts before, during and after training."""

    eval_prompts: int = field(
        default=192, metadata=_help("eval prompts (world eval split, never trained on)")
    )
    eval_candidates: int = field(
        default=32, metadata=_help("candidates per eval prompt (8 gave +-2.5 points of sampling noise)")
    )
    co_degradation_tol: float = field(
        default=0.01,
        metadata=_help("flag co-degradation when gen_alignment and und_accuracy both fall by more than this"),
    )

    def __post_init__(self) -> None:
        _check(self.eval_prompts >= 1, "eval_prompts", f"must be >= 1, got {self.eval_prompts}")
        _check(self.eval_candidates >= 1, "eval_candidates", f"must be >= 1, got {self.eval_candidates}")
        _check(
            self.co_degradation_tol >= 0, "co_degradation_tol", f"must be >= 0, got {self.co_degradation_tol}"
        )


@dataclass
class RunConfig:
    """One run of ``python -m ntkdyn.track``: the model, the output directory, and the parts."""

    model: list[str] = field(
        default_factory=lambda: ["toy"],
        metadata=_help("adapter name and optional local path, e.g. --model toy or --model janus PATH"),
    )
    out: str = field(default="runs/track", metadata=_help("run directory"))
    resume: bool = field(default=False, metadata=_help("continue the run in --out from its last checkpoint"))
    track: bool = field(default=True, metadata=_help("learning-dynamics tracking (--no-track turns it off)"))
    threads: int = field(
        default=1,
        metadata=_help(
            "torch CPU threads per process (1: small models gain nothing from more, and a busy "
            "machine slows down badly with more)"
        ),
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(1 <= len(self.model) <= 2, "model", f"expected NAME [PATH], got {self.model!r}")
        _check(bool(self.out), "out", "must be a directory path")
        _check(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        parts = {"train": TrainConfig, "data": DataConfig, "eval": EvalConfig}
        kwargs = {k: (parts[k](**v) if k in parts else v) for k, v in d.items()}
        return cls(**kwargs)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--field-name`` option per field of dataclass ``cls`` (help and choices from metadata).

    A bool field that defaults to True becomes ``--no-<name>``, one that defaults to False ``--<name>``.
    All defaults are ``argparse.SUPPRESS`` so that the dataclass keeps its own defaults.
    """
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(
            f.default_factory if f.default_factory is not dataclasses.MISSING else None
        ):
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        helptext = meta.pop("help", "")
        if f.type in ("bool", bool):
            default = f.default
            if default:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"),
                    dest=f.name,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    help=helptext,
                )
            else:
                parser.add_argument(
                    flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=helptext
                )
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}.get(f.type)
        if f.type == "list[str]":
            parser.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS, help=helptext)
            continue
        if kind is None:
            raise TypeError(f"add_dataclass_arguments: field {f.name!r} has unsupported type {f.type!r}")
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=argparse.SUPPRESS,
            help=helptext if default is None else f"{helptext} (default: {default})",
            **meta,
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m ntkdyn.track`` parser: every field of RunConfig and its parts."""
    parser = argparse.ArgumentParser(
        prog="python -m ntkdyn.track",
        description="Self-improvement of a unified model (self-scored SFT/DPO, curriculum) with evaluation "
        "before/after and learning-dynamics tracking.",
    )
    add_dataclass_arguments(parser, RunConfig)
    for part in (TrainConfig, DataConfig, EvalConfig):
        add_dataclass_arguments(parser.add_argument_group(part.__name__), part)
    return parser


def config_from_args(namespace: argparse.Namespace) -> RunConfig:
    """RunConfig from parsed arguments (unset options keep the dataclass defaults); validates."""
    given = vars(namespace)
    parts = {}
    for name, cls in (("train", TrainConfig), ("data", DataConfig), ("eval", EvalConfig)):
        parts[name] = cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})
    top = {f.name: given[f.name] for f in dataclasses.fields(RunConfig) if f.name in given}
    return RunConfig(**top, **parts)
