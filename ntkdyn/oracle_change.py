"""The change of the internal-gap metrics between two evaluations on the same eval prompts, with
bootstrap intervals (summary.json ``oracle_change``): gen_alignment and non_unification (category means of
per-prompt counts, paired by prompt), und_accuracy (the same understanding questions before and after).
Two runs on the same eval prompts compare through their saved prompt_counts (benchmarks/claims.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ntkdyn.analysis.statistics import weighted_bootstrap_ci, weighted_share
from ntkdyn.evaluate import CandidateRecord, UnderstandingRecord


def _finite(x) -> float | None:
    """float(x), None for NaN (JSON)."""
    return None if math.isnan(float(x)) else float(x)


def prompt_counts(records: Sequence[CandidateRecord]) -> dict:
    """Per prompt (in sorted text order): its category, its candidates (``total``), those the oracle
    accepts (``aligned``) and those the model's own judge rejects (``rejected``); plain lists (JSON)."""
    prompts = sorted({r.prompt.text for r in records})
    index = {t: i for i, t in enumerate(prompts)}
    out = {"prompts": prompts, "categories": [""] * len(prompts)}
    out |= {k: [0] * len(prompts) for k in ("total", "aligned", "rejected")}
    for r in records:
        i = index[r.prompt.text]
        out["categories"][i] = r.prompt.category
        out["total"][i] += 1
        out["aligned"][i] += int(r.oracle)
        out["rejected"][i] += int(not r.verdict)
    return out


def category_mean_change_with_ci(
    before: Mapping, after: Mapping, key: str, *, resamples: int = 1000, seed: int = 0
) -> dict:
    """The change of a category-mean rate between two prompt_counts on the same prompts: rate =
    mean over categories of sum(key) / sum(total) (gen_alignment with key "aligned", non_unification
    with "rejected"), with a percentile-bootstrap interval over ``resamples`` resamples of the prompts
    (a resample takes a prompt's candidates of both sides: the comparison is paired by prompt). Returns
    before, after, delta, delta_ci ([lo, hi], None where undefined), prompts."""
    if before["prompts"] != after["prompts"]:
        raise ValueError("the two evaluations are not on the same prompts")
    rows = [torch.tensor(c[k], dtype=torch.float64) for c in (before, after) for k in (key, "total")]
    masks = [
        torch.tensor([c == category for c in before["categories"]], dtype=torch.float64)
        for category in sorted(set(before["categories"]))
    ]

    def rate(w, hits, total):
        return torch.stack([weighted_share(w, hits * m, total * m) for m in masks]).mean(0)

    def change(w, hits0, total0, hits1, total1):
        return rate(w, hits1, total1) - rate(w, hits0, total0)

    interval = weighted_bootstrap_ci(change, *rows, resamples=resamples, seed=seed)
    ones = torch.ones(1, len(before["prompts"]), dtype=torch.float64)
    return {
        "before": _finite(rate(ones, *rows[:2])[0]),
        "after": _finite(rate(ones, *rows[2:])[0]),
        "delta": _finite(interval.estimate),
        "delta_ci": interval.bounds(),
        "prompts": len(before["prompts"]),
    }


def gap_change_with_ci(
    before: Sequence[CandidateRecord],
    after: Sequence[CandidateRecord],
    und_before: Sequence[UnderstandingRecord],
    und_after: Sequence[UnderstandingRecord],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """The change of gen_alignment, non_unification and und_accuracy (gap_metrics) between two evaluations
    on the same prompts, each with a percentile-bootstrap interval over ``resamples`` resamples of the
    prompts.

    gen_alignment and non_unification (category means; category_mean_change_with_ci): the before and
    after generations are independent samples, paired by prompt. und_accuracy (balanced: positives and
    hard negatives) needs the same questions before and after (the same ``understanding_records`` seed):
    und_before[i] and und_after[i] must be one scene and prompt. Returns {"gen_alignment",
    "non_unification", "und_accuracy": {before, after, delta, delta_ci, prompts}, "counts": {"before",
    "after": prompt_counts}} (the counts let two runs on the same prompts be compared afterwards)."""
    counts = {"before": prompt_counts(before), "after": prompt_counts(after)}
    if counts["before"]["prompts"] != counts["after"]["prompts"]:
        raise ValueError("gap_change_with_ci: the two evaluations are not on the same prompts")
    if [(r.prompt.text, r.kind) for r in und_before] != [(r.prompt.text, r.kind) for r in und_after]:
        raise ValueError("gap_change_with_ci: the understanding records are not the same questions")
    out = {
        name: category_mean_change_with_ci(
            counts["before"], counts["after"], key, resamples=resamples, seed=seed
        )
        for name, key in (("gen_alignment", "aligned"), ("non_unification", "rejected"))
    }
    positive = torch.tensor([r.kind == "positive" for r in und_before], dtype=torch.float64)
    right0, right1 = (
        torch.tensor([(r.p_yes > 0.5) == (r.kind == "positive") for r in rs], dtype=torch.float64)
        for rs in (und_before, und_after)
    )

    def balanced(w, right):
        return (
            weighted_share(w, right * positive, positive)
            + weighted_share(w, right * (1 - positive), 1 - positive)
        ) / 2

    def und_change(w, *_):
        return balanced(w, right1) - balanced(w, right0)

    clusters = [r.prompt.text for r in und_before]
    und = weighted_bootstrap_ci(und_change, right0, resamples=resamples, seed=seed, clusters=clusters)
    ones = torch.ones(1, len(right0), dtype=torch.float64)
    out["und_accuracy"] = {
        "before": _finite(balanced(ones, right0)[0]),
        "after": _finite(balanced(ones, right1)[0]),
        "delta": _finite(und.estimate),
        "delta_ci": und.bounds(),
        "prompts": len(set(clusters)),
    }
    return out | {"counts": counts}
