"""Summaries of a tracked run: agreement of each predictor with the observed change, pooled over the
run (per branch, category and measurement), each statistic with a 95% bootstrap interval that resamples
probes (a probe's rows over the tracked steps are one cluster), and the mean kernel scalars over tracked
steps. They read rows (ntkdyn.rundir.ProbeRow, KernelRow), so they summarise a finished run as well as a
live tracker."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ntkdyn.analysis.statistics import agreement_with_ci
from ntkdyn.rundir import KernelRow, ProbeRow, parse_ntk_key

PREDICTORS = {"exact": "predicted", "features": "predicted_features", "sgd": "predicted_sgd"}


def _stats(rows: Sequence[ProbeRow]) -> dict:
    """agreement_with_ci() of the exact predictor at the top level, the other predictors nested by name;
    clusters: one per probe (group and label)."""
    observed = torch.tensor([r["observed"] for r in rows], dtype=torch.float64)
    probes = [(r["group"], r["probe"]) for r in rows]
    out: dict[str, Any] = {}
    for name, key in PREDICTORS.items():
        if any(r.get(key) is None for r in rows):
            continue
        predicted = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        stats = agreement_with_ci(predicted, observed, clusters=probes)
        if name == "exact":
            out.update(stats)
        else:
            out[name] = stats
    return out


def summarize_dynamics(rows: Iterable[ProbeRow]) -> dict:
    """Agreement of predicted with observed change, pooled over the run.

    Returns ``{branch: {pearson, pearson_ci, spearman, slope, slope_through_origin, sign_agreement (each
    with its ``_ci``), n, clusters, features: {...}, sgd: {...}, categories: {category: {...}},
    measurements: {measurement: {...}}}}`` where the top-level numbers use the exact first-order
    predictor over every probe of the branch over all steps;
    ``features`` (<φ, PΔθ>) and ``sgd`` (kernel form) nest the same statistics of the other predictors.
    """
    rows = list(rows)
    out: dict[str, Any] = {}
    for branch in dict.fromkeys(r["branch"] for r in rows):
        in_branch = [r for r in rows if r["branch"] == branch]
        entry = _stats(in_branch)
        entry["categories"] = {
            c: _stats([r for r in in_branch if r["category"] == c])
            for c in dict.fromkeys(r["category"] for r in in_branch)
        }
        entry["measurements"] = {
            m: _stats([r for r in in_branch if r["measurement"] == m])
            for m in dict.fromkeys(r["measurement"] for r in in_branch)
        }
        out[branch] = entry
    return out


def mean_kernel_scalars(rows: Sequence[KernelRow]) -> dict[str, float]:
    """Mean over tracked steps of the shared-kernel scalars over all probes: the ``cross_cos`` and
    ``alignment`` keys without a category (key order of the first row)."""
    keys = []
    for key in rows[0] if rows else {}:
        if key.startswith("ntk/"):
            parsed = parse_ntk_key(key)
            if parsed.stat in ("cross_cos", "alignment") and parsed.category is None:
                keys.append(key)
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}
