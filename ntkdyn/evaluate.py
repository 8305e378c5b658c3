"""The internal gap of a unified model, measured against ShapesWorld's exact oracle.

    python -m ntkdyn.evaluate --model NAME [PATH] [--num-prompts P] [--candidates N] [--json FILE]
                              [--prompts FILE] [--out DIR]     (every option: --help)

For every prompt y the model samples N candidates x ~ pi^gen(.|y); its own understanding
answers q(y) = "does this image describe y ?" with verdict v = 1[P(yes) > 1/2]; the oracle
o = J(x, y) is applied to world.parse(adapter.decode(x)) (a candidate whose pixels cannot be
parsed counts as o = 0). Understanding is also scored on true scenes and their hard negatives.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ntkdyn.cli import config_parser, model_option, parse_config
from ntkdyn.models import check_model_spec, load_adapter
from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.models.scenes import oracle_of_images, world_images
from ntkdyn.rundir import write_json
from ntkdyn.world import Prompt, ShapesWorld

METRIC_KEYS = (
    "non_unification",
    "weak_generation",
    "und_accuracy",
    "und_accuracy_per_negative",
    "gen_alignment",
    "self_precision",
    "false_positive_rate",
    "false_negative_rate",
)


@dataclass
class CandidateRecord:
    """One generated candidate: its prompt, image tokens [L], the model's P(yes) and verdict, the oracle."""

    prompt: Prompt
    image: torch.Tensor
    p_yes: float
    verdict: bool
    oracle: bool
    parsed: bool  # False when world.parse rejected the decoded pixels (then oracle is False)

    def to_row(self) -> dict:
        """The record as plain data: a row of a run's pretrained/records.jsonl, and the form the probes
        are chosen from (ntkdyn.shapes_probes.select_probes)."""
        return {
            "prompt": self.prompt.text,
            "category": self.prompt.category,
            "image": self.image.tolist(),
            "p_yes": self.p_yes,
            "verdict": self.verdict,
            "oracle": self.oracle,
            "parsed": self.parsed,
        }

    @classmethod
    def from_row(cls, row: Mapping, world: ShapesWorld) -> CandidateRecord:
        """The inverse of :meth:`to_row` (the prompt is parsed by ``world``)."""
        return cls(
            prompt=world.parse_prompt(row["prompt"]),
            image=torch.tensor(row["image"]),
            p_yes=row["p_yes"],
            verdict=row["verdict"],
            oracle=row["oracle"],
            parsed=row["parsed"],
        )


@dataclass
class UnderstandingRecord:
    """One understanding probe: a true scene ("positive") or a hard negative of a kind."""

    prompt: Prompt
    kind: str
    p_yes: float

    def to_row(self) -> dict:
        """The record as plain data: a row of a run's pretrained/und_records.jsonl."""
        return {"prompt": self.prompt.text, "kind": self.kind, "p_yes": self.p_yes}

    @classmethod
    def from_row(cls, row: Mapping, world: ShapesWorld) -> UnderstandingRecord:
        """The inverse of :meth:`to_row` (the prompt is parsed by ``world``)."""
        return cls(prompt=world.parse_prompt(row["prompt"]), kind=row["kind"], p_yes=row["p_yes"])


@dataclass
class EvalResult:
    """metrics: METRIC_KEYS plus per_category {category: METRIC_KEYS}; records: one per candidate."""

    metrics: dict
    records: list[CandidateRecord]
    und_records: list[UnderstandingRecord] = field(default_factory=list)


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def gap_metrics(records: Sequence[CandidateRecord], und_records: Sequence[UnderstandingRecord]) -> dict:
    """Metrics (METRIC_KEYS) pooled over the given records; a rate with an empty condition is None.

    With verdict v and oracle o of every candidate:
        non_unification     = P(v = 0)                  the model rejects its own generation
        weak_generation     = P(o = 0 | v = 0)          its rejections are right (paper: WeakGen)
        gen_alignment       = P(o = 1)                  oracle pass rate of its generations
        self_precision      = P(o = 1 | v = 1)          pass rate of what it accepts (self-training data)
        false_positive_rate = P(v = 1 | o = 0)          misaligned generations it accepts
        false_negative_rate = P(v = 0 | o = 1)          aligned generations it rejects
    On true scenes (kind "positive") and hard negatives (one of each applicable kind per scene):
        und_accuracy_per_negative[kind] = P(answer right | kind)  (P(yes) > 1/2 for "positive",
                                          <= 1/2 for a negative kind)
        und_accuracy = (accuracy on positives + accuracy on all negatives) / 2   (balanced)
    """
    v = np.array([r.verdict for r in records], bool)
    o = np.array([r.oracle for r in records], bool)
    per_kind: dict[str, list[bool]] = {}
    for r in und_records:
        per_kind.setdefault(r.kind, []).append((r.p_yes > 0.5) == (r.kind == "positive"))
    negatives = [c for k, hits in per_kind.items() if k != "positive" for c in hits]
    positives = per_kind.get("positive", [])
    und_accuracy = (np.mean(positives) + np.mean(negatives)) / 2 if positives and negatives else None
    return {
        "non_unification": _rate(int((~v).sum()), len(v)),
        "weak_generation": _rate(int((~v & ~o).sum()), int((~v).sum())),
        "und_accuracy": None if und_accuracy is None else float(und_accuracy),
        "und_accuracy_per_negative": {k: float(np.mean(h)) for k, h in per_kind.items()},
        "gen_alignment": _rate(int(o.sum()), len(o)),
        "self_precision": _rate(int((v & o).sum()), int(v.sum())),
        "false_positive_rate": _rate(int((v & ~o).sum()), int((~o).sum())),
        "false_negative_rate": _rate(int((~v & o).sum()), int(o.sum())),
    }


@torch.no_grad()
def evaluate(
    adapter: UnifiedAdapter,
    world: ShapesWorld,
    prompts: Sequence[Prompt],
    candidates: int = 8,
    seed: int = 0,
    temperature: float = 1.0,
    und_pairs: int = 2,
    batch_size: int = 64,
) -> EvalResult:
    """Sample ``candidates`` images per prompt, judge them with the model's own understanding and
    with the oracle, and score understanding on ``und_pairs`` true scenes per prompt, each with one
    hard negative of every applicable kind. True scenes are rendered by the world and, when the
    adapter declares another ``image_size`` (H, W) or side, resized to it (nearest neighbour) before
    ``adapter.encode``; generations are decoded, resized back to the world's size and parsed.

    metrics: see :func:`gap_metrics`; per_category holds the same keys per category. Overall
    ``non_unification`` and ``gen_alignment`` are the unweighted means over categories (as in the
    paper); the conditional rates and understanding accuracies are pooled over all records.
    Deterministic from ``seed``.
    """
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    if candidates < 1 or und_pairs < 0:
        raise ValueError(f"candidates must be >= 1 and und_pairs >= 0 (got {candidates}, {und_pairs})")
    generator = torch.Generator().manual_seed(seed)
    per_chunk = max(1, batch_size // candidates)
    records: list[CandidateRecord] = []
    for start in tqdm(range(0, len(prompts), per_chunk), desc="evaluate: generate and judge", leave=False):
        chunk = list(prompts[start : start + per_chunk])
        texts = [p.text for p in chunk]
        images = adapter.generate(texts, candidates, temperature=temperature, generator=generator)
        flat = images.reshape(-1, images.shape[-1])
        flat_texts = [t for t in texts for _ in range(candidates)]
        p_yes = adapter.judge(flat, flat_texts).p_yes.float().cpu()
        flat_prompts = [p for p in chunk for _ in range(candidates)]
        oracle, parsed = oracle_of_images(adapter, world, flat_prompts, flat)
        for i, prompt in enumerate(flat_prompts):
            records.append(
                CandidateRecord(
                    prompt=prompt,
                    image=flat[i].cpu(),
                    p_yes=float(p_yes[i]),
                    verdict=bool(p_yes[i] > 0.5),
                    oracle=oracle[i],
                    parsed=parsed[i],
                )
            )
    und_records = understanding_records(adapter, world, prompts, und_pairs, seed, batch_size)
    metrics = gap_metrics(records, und_records)
    categories = [c for c in world.categories if any(p.category == c for p in prompts)]
    metrics["per_category"] = {
        c: gap_metrics(
            [r for r in records if r.prompt.category == c], [r for r in und_records if r.prompt.category == c]
        )
        for c in categories
    }
    for key in ("non_unification", "gen_alignment"):
        metrics[key] = float(np.mean([metrics["per_category"][c][key] for c in categories]))
    return EvalResult(metrics, records, und_records)


@torch.no_grad()
def understanding_records(
    adapter: UnifiedAdapter,
    world: ShapesWorld,
    prompts: Sequence[Prompt],
    und_pairs: int,
    seed: int,
    batch_size: int = 64,
) -> list[UnderstandingRecord]:
    """The model's P(yes) on ``und_pairs`` true scenes per prompt, each followed by one hard negative of
    every applicable kind; the scenes depend on ``seed`` and the prompts only, so two models measured
    with the same seed answer the same questions (paired)."""
    rng = np.random.default_rng(seed)
    probes: list[tuple[Prompt, str, torch.Tensor]] = []
    for prompt in prompts:
        for _ in range(und_pairs):
            scene = world.sample_image(prompt, rng)
            probes.append((prompt, "positive", scene))
            probes.extend((prompt, kind, neg) for kind, neg in world.negatives(prompt, scene, rng))
    und_records: list[UnderstandingRecord] = []
    for start in range(0, len(probes), batch_size):
        chunk = probes[start : start + batch_size]
        images = world_images(adapter, world, [scene for _, _, scene in chunk])
        judged = adapter.judge(images, [p.text for p, _, _ in chunk]).p_yes.float().cpu()
        und_records.extend(
            UnderstandingRecord(p, kind, float(q)) for (p, kind, _), q in zip(chunk, judged, strict=True)
        )
    return und_records


# --------------------------------------------------------------------------- CLI helpers
def read_prompts(path: str | Path, world: ShapesWorld) -> list[Prompt]:
    """Prompts of a text file (one per line) or JSONL file (objects with a "text" field).

    Blank lines are skipped; an empty file, a malformed JSON line or a text the world cannot read
    raises ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"prompts file {path} holds no prompts")
    jsonl = path.suffix == ".jsonl" or lines[0][1].startswith("{")
    prompts = []
    for n, line in lines:
        text = line
        if jsonl:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON object ({err.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise ValueError(f'{path}:{n}: expected a JSON object with a string field "text"')
            text = item["text"]
        try:
            prompts.append(world.parse_prompt(text))
        except ValueError as err:
            raise ValueError(f"{path}:{n}: {err}") from None
    return prompts


def format_table(metrics: dict) -> str:
    """The metrics as a fixed-width table: one row per category and an overall row."""
    columns = [k for k in METRIC_KEYS if k != "und_accuracy_per_negative"]
    short = ["non_unif", "weak_gen", "und_acc", "gen_align", "self_prec", "FPR", "FNR"]

    def cell(x):
        return "     -" if x is None else f"{x:6.3f}"

    lines = [f"{'category':<18}" + "".join(f"{s:>11}" for s in short)]
    for name, m in [*metrics["per_category"].items(), ("overall", metrics)]:
        lines.append(f"{name:<18}" + "".join(f"{cell(m[k]):>11}" for k in columns))
    per_negative = metrics["und_accuracy_per_negative"]
    lines.append(
        "understanding accuracy per probe kind: " + ", ".join(f"{k} {v:.3f}" for k, v in per_negative.items())
    )
    return "\n".join(lines)


def generations_figure(adapter: UnifiedAdapter, records: Sequence[CandidateRecord], per_prompt: int = 6):
    """Grid of sample generations, one row per category (its first prompt), titled with the
    model's verdict P(yes) and the oracle's; returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, list[CandidateRecord]] = {}
    for r in records:
        first = rows.setdefault(r.prompt.category, [r])
        if r is not first[0] and r.prompt == first[0].prompt and len(first) < per_prompt:
            first.append(r)
    fig, axes = plt.subplots(
        len(rows), per_prompt, figsize=(1.9 * per_prompt, 2.2 * len(rows)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, row in enumerate(rows.values()):
        pixels = adapter.decode(torch.stack([r.image for r in row]))
        axes[i, 0].text(
            -0.1, 0.5, row[0].prompt.text, transform=axes[i, 0].transAxes, ha="right", va="center"
        )
        for j, r in enumerate(row):
            ax = axes[i, j]
            ax.imshow(pixels[j].numpy())
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            verdict, oracle = ("yes" if x else "no" for x in (r.verdict, r.oracle))
            ok = "ok" if r.verdict == r.oracle else "WRONG"
            ax.set_title(
                f"model {verdict} ({r.p_yes:.2f})\noracle {oracle} {ok}",
                fontsize=7,
                color="green" if r.verdict == r.oracle else "red",
            )
    fig.suptitle("sample generations: the model's own verdict vs the exact oracle")
    fig.tight_layout()
    return fig


@dataclass
class EvaluateConfig:
    """Options of ``python -m ntkdyn.evaluate``."""

    model: list[str] = model_option()
    num_prompts: int = field(default=8, metadata={"help": "eval prompts per category (without --prompts)"})
    candidates: int = field(default=8, metadata={"help": "generations per prompt (N)"})
    und_pairs: int = field(default=4, metadata={"help": "true scenes per prompt for understanding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the generations"})
    seed: int = field(default=0, metadata={"help": "seed of the generations and the understanding scenes"})
    prompts: str | None = field(
        default=None, metadata={"help": "text (one prompt a line) or JSONL file of prompts"}
    )
    json: str | None = field(default=None, metadata={"help": "write the metrics here"})
    out: str = field(default="ntkdyn-eval", metadata={"help": "directory for the figure of generations"})

    def __post_init__(self) -> None:
        check_model_spec(self.model)
        for name in ("num_prompts", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.und_pairs < 0:
            raise ValueError(f"und_pairs: must be >= 0, got {self.und_pairs}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.prompts is not None and not os.path.isfile(self.prompts):
            raise ValueError(f"prompts: no such file {self.prompts!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ntkdyn.evaluate``: exit code 0, or 2 for bad input (options, prompts file, model)."""
    parser = config_parser(EvaluateConfig, "python -m ntkdyn.evaluate", __doc__.split("\n\n")[0])
    cfg = parse_config(parser, EvaluateConfig, argv)
    try:
        adapter = load_adapter(*cfg.model)
        world = getattr(adapter, "world", None) or ShapesWorld(seed=0)
        if cfg.prompts:
            prompts = read_prompts(cfg.prompts, world)
        else:
            prompts = [p for c in world.categories for p in world.prompts("eval", c)[: cfg.num_prompts]]
        result = evaluate(
            adapter,
            world,
            prompts,
            candidates=cfg.candidates,
            seed=cfg.seed,
            temperature=cfg.temperature,
            und_pairs=cfg.und_pairs,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    unparsed = sum(not r.parsed for r in result.records)
    print(
        f"{cfg.model[0]}: {len(prompts)} prompts x {cfg.candidates} candidates, {len(result.und_records)} "
        f"understanding probes, {unparsed} unparseable generations"
    )
    print(format_table(result.metrics))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = generations_figure(adapter, result.records)
    fig.savefig(out / "generations.png", dpi=110)
    print(f"figure: {out / 'generations.png'}")
    if cfg.json:
        write_json(cfg.json, result.metrics)
        print(f"metrics: {cfg.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
