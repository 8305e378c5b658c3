"""Configuration of the self-improvement trainer: dataclasses with help metadata, choices as
``Literal`` types, validated in ``__post_init__`` (errors name the field). They are two parts of a run's
config tree (ntkdyn.config.RunConfig), from which the command line is built (ntkdyn.cli), with
SelectionConfig (label-free checkpoint selection, ntkdyn.trainer.selection; off by default).

Budget: a run is ``rounds`` rounds; each round collects data (Algorithm 1; in a curriculum
run, round r > 0 revisits the discard pool, Algorithm 2) and then trains ``ceil(epochs * n /
batch_size)`` optimizer steps on its n items, capped by ``max_steps // rounds`` (the remainder goes to
the last round; max_steps 0: no cap). The defaults (2048 prompts, 30 epochs, 300 steps) make every run
take exactly 300 steps, so runs with different filters, objectives and data sizes have an equal budget.
The DPO defaults (lr 5e-5, 300 steps, about 5 epochs of its ~1800 pairs) come from the robustness grid of
benchmarks/robustness.py: at lr 2e-4 and 1000 steps generation peaked after 100-500 steps and then fell
below the pre-trained model on 3 of 4 independently pre-trained toy models (BENCHMARKS.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, get_args

RunKind = Literal["sft", "dpo", "curriculum"]
Objective = Literal["sft", "dpo"]
JUDGES = ("self", "oracle", "none", "inverted", "noisy:P")
Schedule = Literal["cosine", "linear", "constant"]
Trainable = Literal["shared", "all"]
Anchor = Literal["self", "oracle", "none"]


def _help(text: str, **kwargs) -> dict:
    return {"help": text, **kwargs}


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


def _check_choice(value: str, name: str, choices: object) -> None:
    """``value`` is one of the Literal type ``choices``."""
    _check(value in get_args(choices), name, f"expected one of {get_args(choices)}, got {value!r}")


@dataclass
class TrainConfig:
    """Optimisation of the generation branch (and the understanding anchor term)."""

    run: RunKind = field(default="dpo", metadata=_help("run kind"))
    curriculum_objective: Objective = field(default="sft", metadata=_help("objective of a curriculum run"))
    lr: float | None = field(
        default=None, metadata=_help("peak AdamW learning rate (default: 3e-4 for SFT, 5e-5 for DPO)")
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(default=5, metadata=_help("linear warm-up steps"))
    schedule: Schedule = field(default="cosine", metadata=_help("learning-rate schedule after warm-up"))
    batch_size: int = field(default=32, metadata=_help("global batch (items per optimizer step)"))
    micro_batch_size: int = field(
        default=32, metadata=_help("items per forward/backward on one process (gradient accumulation)")
    )
    grad_clip: float = field(default=1.0, metadata=_help("clip the global grad norm to this (0 = off)"))
    epochs: float = field(
        default=30.0, metadata=_help("epochs over each round's data, capped by --max-steps (paper: 20-30)")
    )
    max_steps: int = field(
        default=300,
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
    anchor: Anchor = field(
        default="self",
        metadata=_help(
            "the understanding term's targets on a fixed pool of world scenes and hard negatives: self = "
            "the pre-trained model's own P(yes) (no external labels in training), oracle = the world's "
            "exact answers (external labels), none = no understanding term"
        ),
    )
    anchor_pool: int = field(default=2048, metadata=_help("pairs in the anchor's pool of world scenes"))
    replay_weight: float = field(
        default=1.0,
        metadata=_help(
            "weight of the understanding term (soft cross-entropy of the judge's P(yes) to the anchor's "
            "targets, one pool pair per training item); 0 = off, as --anchor none"
        ),
    )
    trainable: Trainable = field(
        default="shared", metadata=_help("trained parameters: the shared language model or all")
    )
    checkpoint_every: int = field(default=50, metadata=_help("checkpoint every K optimizer steps"))
    eval_every: int = field(default=500, metadata=_help("evaluate every K steps during training (0 = off)"))
    seed: int = field(default=0, metadata=_help("seed of everything (data order, sampling, replay)"))

    def __post_init__(self) -> None:
        _check_choice(self.run, "run", RunKind)
        _check_choice(self.curriculum_objective, "curriculum_objective", Objective)
        if self.lr is None:
            self.lr = 5e-5 if self.objective == "dpo" else 3e-4
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check_choice(self.schedule, "schedule", Schedule)
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
        _check_choice(self.anchor, "anchor", Anchor)
        _check(self.anchor_pool >= 2, "anchor_pool", f"must be >= 2, got {self.anchor_pool}")
        _check_choice(self.trainable, "trainable", Trainable)
        _check(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")

    @property
    def understanding_weight(self) -> float:
        """Weight of the understanding (anchor) term in the loss: 0 when it is off."""
        return 0.0 if self.anchor == "none" else self.replay_weight

    @property
    def objective(self) -> Objective:
        """The loss trained: "sft" or "dpo"."""
        return self.curriculum_objective if self.run == "curriculum" else self.run


def parse_judge(judge: str) -> tuple[str, float]:
    """The data filter's judge: ("self" | "oracle" | "none" | "inverted", 0.0), or ("noisy", P) for
    "noisy:P" with P in (0, 1] (the self-judge with a fraction P of its verdicts flipped); anything else
    raises ValueError naming the accepted forms."""
    kind, colon, rest = judge.partition(":")
    if not colon and kind in JUDGES:
        return kind, 0.0
    if kind == "noisy" and colon:
        try:
            p = float(rest)
        except ValueError:
            p = float("nan")
        if 0 < p <= 1:
            return kind, p
        raise ValueError(f"judge: noisy:P needs a flip fraction P in (0, 1], got {rest!r}")
    raise ValueError(f"judge: expected one of {', '.join(JUDGES)}, got {judge!r}")


@dataclass
class DataConfig:
    """Self-improvement data (Algorithm 1): candidates, the judge and the filters."""

    judge: str = field(
        default="self",
        metadata=_help(
            "filter: self (the model's own verdicts), oracle (the exact oracle: external labels), none "
            "(accept all), inverted (the model's verdicts reversed) or noisy:P (its verdicts, a seeded "
            "fraction P flipped)"
        ),
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
        parse_judge(self.judge)
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
class SelectionConfig:
    """Label-free checkpoint selection (ntkdyn.trainer.selection): the run scores itself on held-out
    training-split prompts, keeps the best point's weights and may stop early. Off by default. Costs
    a frozen copy of the model in memory, one generation + judging pass over select_prompts x
    select_candidates per point, and one weights file per point that can still be selected."""

    select_every: int = field(
        default=0,
        metadata=_help(
            "label-free selection point every K optimizer steps (and at step 0 and the last step); the run's "
            "result is the selected point's model (0 = off: the last step's model)"
        ),
    )
    select_prompts: int = field(
        default=128,
        metadata=_help(
            "held-out prompts of the world's train split scored at each point (never trained on, never "
            "eval prompts)"
        ),
    )
    select_candidates: int = field(
        default=4, metadata=_help("generations per held-out prompt at each selection point")
    )
    patience: int = field(
        default=0,
        metadata=_help(
            "stop training once the last K points all score below the best point's one-standard-error "
            "threshold (0 = never stop early)"
        ),
    )

    def __post_init__(self) -> None:
        _check(self.select_every >= 0, "select_every", f"must be >= 0, got {self.select_every}")
        _check(
            self.select_prompts >= 2,
            "select_prompts",
            f"must be >= 2 (the standard error needs two prompts), got {self.select_prompts}",
        )
        _check(
            self.select_candidates >= 1, "select_candidates", f"must be >= 1, got {self.select_candidates}"
        )
        _check(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")
        _check(
            self.patience == 0 or self.select_every > 0,
            "patience",
            f"early stopping (patience {self.patience}) needs selection points: set select_every > 0",
        )
