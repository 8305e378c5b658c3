"""Summaries of a tracked run: agreement of each predictor with the observed change, pooled over the
run (per branch, category and measurement), each statistic with a 95% bootstrap interval that resamples
probes (a probe's rows over the tracked steps are one cluster), and the mean kernel scalars over tracked
steps. They read rows (ntkdyn.rundir.ProbeRow, KernelRow), so they summarise a finished run as well as a
live tracker."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ntkdyn.analysis.statistics import agreement_with_ci, weighted_bootstrap_ci, weighted_share
from ntkdyn.rundir import KernelRow, ProbeRow, parse_ntk_key

PREDICTORS = {
    "exact": "predicted",
    "features": "predicted_features",
    "current": "predicted_current",
    "kernel": "predicted_kernel",
    "sgd": "predicted_sgd",
}
# the kernel forms against the exact current-step part they predict (the Adam-aware kernel and the SGD form)
OF_CURRENT = {"kernel_vs_current": "predicted_kernel", "sgd_vs_current": "predicted_sgd"}


def _column(rows: Sequence[ProbeRow], key: str) -> torch.Tensor | None:
    if any(r.get(key) is None for r in rows):
        return None
    return torch.tensor([r[key] for r in rows], dtype=torch.float64)


def _stats(rows: Sequence[ProbeRow]) -> dict:
    """agreement_with_ci() of the exact predictor at the top level, the other predictors nested by name,
    the kernel forms against predicted_current (OF_CURRENT) and the source shares; clusters: one per
    probe (group and label)."""
    observed = _column(rows, "observed")
    probes = [(r["group"], r["probe"]) for r in rows]
    out: dict[str, Any] = {}
    for name, key in PREDICTORS.items():
        predicted = _column(rows, key)
        if predicted is None:
            continue
        stats = agreement_with_ci(predicted, observed, clusters=probes)
        if name == "exact":
            out.update(stats)
        else:
            out[name] = stats
    current = _column(rows, "predicted_current")
    for name, key in OF_CURRENT.items():
        predicted = _column(rows, key)
        if current is not None and predicted is not None:
            out[name] = agreement_with_ci(predicted, current, clusters=probes)
    if all(r.get("predicted_by_source") for r in rows):
        out["shares"] = source_shares(rows)
    return out


def source_shares(rows: Sequence[ProbeRow]) -> dict:
    """The share of the predicted change carried by each part of the split update (predicted_by_source)
    and by each source (its current + momentum parts):
        share_p = Σ_rows part_p · predicted / Σ_rows predicted²
    (the parts' projections on the change; they sum to 1 over the parts, since Σ_p part_p = predicted),
    each with a 95% bootstrap interval resampling probes. Also ``parts_sum_error``: the largest
    |Σ_p part_p - predicted| / Σ_p |part_p| over the rows (the split's exactness, first order)."""
    predicted = _column(rows, "predicted")
    parts = {
        k: torch.tensor([r["predicted_by_source"][k] for r in rows], dtype=torch.float64)
        for k in rows[0]["predicted_by_source"]
    }
    sources: dict[str, torch.Tensor] = {}
    for key, value in parts.items():
        source = key.split("/")[0]
        sources[source] = sources.get(source, 0.0) + value
    probes = [(r["group"], r["probe"]) for r in rows]
    out: dict[str, Any] = {}
    for name, value in {**parts, **{s: v for s, v in sources.items() if s not in parts}}.items():
        interval = weighted_bootstrap_ci(
            weighted_share, value * predicted, predicted * predicted, clusters=probes
        )
        out[name] = {"share": interval.estimate, "share_ci": interval.bounds()}
    total = sum(parts.values())
    magnitude = sum(v.abs() for v in parts.values())
    error = (total - predicted).abs() / magnitude.clamp_min(torch.finfo(torch.float64).tiny)
    out["parts_sum_error"] = float(error.max())
    return out


def summarize_dynamics(rows: Iterable[ProbeRow]) -> dict:
    """Agreement of predicted with observed change, pooled over the run.

    Returns ``{branch: {pearson, pearson_ci, spearman, slope, slope_through_origin, sign_agreement (each
    with its ``_ci``), n, clusters, features: {...}, current: {...}, kernel: {...}, sgd: {...},
    kernel_vs_current: {...}, sgd_vs_current: {...}, shares: {...}, categories: {category: {...}},
    measurements: {measurement: {...}}}}`` where the top-level numbers use the exact first-order
    predictor over every probe of the branch over all steps; ``features`` (<φ, PΔθ>), ``current`` (the
    current step's exact part), ``kernel`` (the Adam-aware kernel) and ``sgd`` (the SGD form) nest the
    same statistics of the other predictors against the observed change; ``kernel_vs_current`` and
    ``sgd_vs_current`` the kernel forms against the current-step part they predict; ``shares``
    (source_shares) when the steps were split by source. Predictors a row lacks (None) are left out.
    """
    rows = list(rows)
    out: dict[str, Any] = {}
    horizons = cumulative_horizons(rows)
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
        if horizons.get(branch):
            entry["horizons"] = horizons[branch]
        flips = verdict_flips(in_branch)
        if flips:
            entry["verdict_flips"] = flips
        out[branch] = entry
    return out


def cumulative_horizons(rows: Sequence[ProbeRow], horizons: Sequence[int] = (1, 10)) -> dict:
    """Tracking windows (rows with ``window_start``, several steps per window): for H in ``horizons``
    and the full window W, each probe's change over the first H steps of each window, observed
    (Σ observed = f(θ_{start+H}) - f(θ_start)) against Σ predicted (the exact first order step by step)
    and against Σ predicted_frozen (the window's first features along the real updates): {branch: {H:
    {"exact": agreement, "frozen": agreement}}} with intervals resampling probes; windows shorter than H
    are left out. {} without windows."""
    windows: dict[tuple, list[ProbeRow]] = {}
    for r in rows:
        if r.get("window_start") is not None:
            windows.setdefault((r["window_start"], r["group"], r["probe"]), []).append(r)
    longest = max((len(w) for w in windows.values()), default=0)
    if longest < 2:
        return {}
    out: dict[str, Any] = {}
    for h in sorted({*(h for h in horizons if h <= longest), longest}):
        chosen = [sorted(w, key=lambda r: r["step"])[:h] for w in windows.values() if len(w) >= h]
        for branch in dict.fromkeys(w[0]["branch"] for w in chosen):
            own = [w for w in chosen if w[0]["branch"] == branch]
            probes = [(w[0]["group"], w[0]["probe"]) for w in own]
            observed = torch.tensor([sum(r["observed"] for r in w) for w in own], dtype=torch.float64)
            entry = {"windows": len({w[0]["window_start"] for w in own})}
            for name, key in (("exact", "predicted"), ("frozen", "predicted_frozen")):
                if all(r.get(key) is not None for w in own for r in w):
                    predicted = torch.tensor([sum(r[key] for r in w) for w in own], dtype=torch.float64)
                    entry[name] = agreement_with_ci(predicted, observed, clusters=probes)
            out.setdefault(branch, {})[h] = entry
    return out


def mean_kernel_scalars(rows: Sequence[KernelRow]) -> dict[str, float]:
    """Mean over tracked steps of the shared-kernel scalars over all probes: the ``cross_cos``,
    ``alignment`` and ``alignment_centred`` keys without a category (key order of the first row)."""
    keys = []
    for key in rows[0] if rows else {}:
        if key.startswith("ntk/"):
            parsed = parse_ntk_key(key)
            if parsed.stat in ("cross_cos", "alignment", "alignment_centred") and parsed.category is None:
                keys.append(key)
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def _pearson_cell(stats: dict | None) -> str:
    if not stats or stats.get("pearson") is None:
        return f"{'-':>22}"
    lo, hi = (f"{x:.3f}" if x is not None else "nan" for x in stats["pearson_ci"])
    return f"{stats['pearson']:6.3f} [{lo}, {hi}]"


def _share_cell(stats: dict | None) -> str:
    if not stats or stats.get("share") is None:
        return f"{'-':>21}"
    lo, hi = (f"{x:.2f}" if x is not None else "nan" for x in stats["share_ci"])
    return f"{stats['share']:6.3f} [{lo}, {hi}]"


def format_dynamics(dynamics: dict) -> list[str]:
    """The printed table of summarize_dynamics: each predictor's Pearson with the observed change, the
    kernel forms' Pearson with the current-step part they predict, and the source shares per branch
    and category."""
    lines = [
        "predicted vs observed change of the probes: Pearson [95% interval, probes resampled]",
        "  exact    = grad f(o) . (real update)       a first-order Taylor step, not a kernel test",
        "  features = <phi(o), P (real update)>       the same through the projection",
        "  current  = grad f(o) . (this batch's part of the AdamW update)   exact; what a kernel can predict",
        "  kernel   = sum_u c(o, u)                   Adam-aware kernel <phi(o), phi(D_t grad l(u))>, scaled",
        "  sgd      = -lr sum_u K(o, u) / B           baseline: the kernel alone, as if the step were SGD",
    ]
    for branch, stats in dynamics.items():
        lines.append(
            f"  {branch:<4} exact {_pearson_cell(stats)}  features {_pearson_cell(stats.get('features'))}  "
            f"n={stats.get('n')} ({stats.get('clusters')} probes)"
        )
        lines.append(
            f"       current {_pearson_cell(stats.get('current'))}  "
            f"kernel {_pearson_cell(stats.get('kernel'))}  sgd {_pearson_cell(stats.get('sgd'))}"
        )
    if any("kernel_vs_current" in s or "sgd_vs_current" in s for s in dynamics.values()):
        lines.append("the kernel forms against the current-step part they predict: Pearson [95% interval]")
        for branch, stats in dynamics.items():
            lines.append(
                f"  {branch:<4} kernel {_pearson_cell(stats.get('kernel_vs_current'))}  "
                f"sgd {_pearson_cell(stats.get('sgd_vs_current'))}"
            )
    if any("horizons" in s for s in dynamics.values()):
        lines.append(
            "cumulative change over the first H steps of each tracking window: Pearson [95% interval]"
        )
        for branch, stats in dynamics.items():
            for h, entry in stats.get("horizons", {}).items():
                lines.append(
                    f"  {branch:<4} H={h:<3} exact {_pearson_cell(entry.get('exact'))}  "
                    f"frozen kernel {_pearson_cell(entry.get('frozen'))}  ({entry['windows']} windows)"
                )
    flips = [f for stats in dynamics.values() for f in stats.get("verdict_flips", [])]
    if flips:
        lines.append(
            "verdicts flipped yes -> no over the tracked steps (before -> after; gen share; top samples):"
        )
        for f in flips:
            gen = (f.get("shares") or {}).get("gen")
            share = "-" if gen is None else f"{gen:.2f}"
            samples = ", ".join(f"{s}#{u} {c:+.2g}" for s, u, c in f["top_train"][:3])
            lines.append(
                f"  {f['group']}/{f['probe']} ({f['category']}): {f['before']:.2f} -> {f['after']:.2f}; "
                f"gen {share}; {samples}"
            )
    if any("shares" in s for s in dynamics.values()):
        parts = [
            k for k in next(s["shares"] for s in dynamics.values() if "shares" in s) if k != "parts_sum_error"
        ]
        lines.append("share of the probes' first-order change per part: sum part*predicted / sum predicted^2")
        lines.append(f"  {'branch/category':<24}" + "".join(f"{p:>23}" for p in parts))
        for branch, stats in dynamics.items():
            groups = {branch: stats, **{f"  {c}": s for c, s in stats.get("categories", {}).items()}}
            for name, entry in groups.items():
                if "shares" in entry:
                    cells = "".join(f"{_share_cell(entry['shares'].get(p)):>23}" for p in parts)
                    lines.append(f"  {name:<24}{cells}")
    return lines


def dynamics_scalars(rows: Sequence[ProbeRow]) -> dict[str, float]:
    """Scalars of one tracked step for a host trainer's log: per branch, the mean over its probes of
    observed and of each predictor present ("dynamics/<branch>/<key>", key: observed, predicted,
    predicted_current, predicted_kernel, predicted_sgd, and each part of predicted_by_source)."""
    out: dict[str, float] = {}
    for branch in dict.fromkeys(r["branch"] for r in rows):
        in_branch = [r for r in rows if r["branch"] == branch]
        columns: dict[str, list[float]] = {}
        for r in in_branch:
            for key in ("observed", "predicted", "predicted_current", "predicted_kernel", "predicted_sgd"):
                if r.get(key) is not None:
                    columns.setdefault(key, []).append(r[key])
            for part, value in (r.get("predicted_by_source") or {}).items():
                columns.setdefault(part, []).append(value)
        for key, values in columns.items():
            if len(values) == len(in_branch):
                out[f"dynamics/{branch}/{key}"] = sum(values) / len(values)
    return out


def verdict_flips(rows: Sequence[ProbeRow], top: int = 5) -> list[dict]:
    """Probes whose value went from > 0 (before their first tracked step) to < 0 (after their last):
    for a yes log-odds, a yes verdict that became no (e.g. a pre-trained false positive now rejected).
    Each: group, probe, category, before, after, ``shares`` {source: Σ_rows its parts / Σ_rows predicted}
    (over the tracked steps) and ``top_train``: the samples with the largest |Σ c| of their top_train
    entries over the tracked steps, [[source, id, Σ c], ...] (ids: the trainer's training-set items)."""
    probes: dict[tuple, list[ProbeRow]] = {}
    for r in rows:
        probes.setdefault((r["group"], r["probe"]), []).append(r)
    out = []
    for (group, probe), own in probes.items():
        own = sorted(own, key=lambda r: r["step"])
        after = own[-1]["before"] + own[-1]["observed"]
        if not (own[0]["before"] > 0 > after):
            continue
        entry: dict[str, Any] = {
            "group": group,
            "probe": probe,
            "category": own[0]["category"],
            "before": own[0]["before"],
            "after": after,
        }
        if all(r.get("predicted_by_source") for r in own):
            total = sum(r["predicted"] for r in own)
            shares: dict[str, float] = {}
            for r in own:
                for key, value in r["predicted_by_source"].items():
                    shares[key.split("/")[0]] = shares.get(key.split("/")[0], 0.0) + value
            entry["shares"] = {k: v / total if total else None for k, v in shares.items()}
        pushed: dict[tuple, float] = {}
        for r in own:
            for source, sample, c in r["top_train"]:
                pushed[(source, sample)] = pushed.get((source, sample), 0.0) + c
        ranked = sorted(pushed.items(), key=lambda kv: -abs(kv[1]))[:top]
        entry["top_train"] = [[source, sample, c] for (source, sample), c in ranked]
        out.append(entry)
    return out
