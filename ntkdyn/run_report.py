"""What a ``python -m ntkdyn.track`` run measures at its end, beside before/after (summary.json keys
``co_improvement``, ``oracle_change``, ``bayes_step``), and the printed lines of it.

    end_of_run_report   the final model against the pre-trained one: the frozen-set co-improvement report
                        with its random-direction null and verdict (ntkdyn.co_improvement), the oracle
                        change of gen_alignment and und_accuracy with intervals (ntkdyn.evaluate), the
                        Bayes step (ntkdyn.bayes_step)
    format_run_report   those, the anchor and the squeezing log's pairs as printed lines
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ntkdyn.bayes_step import bayes_step
from ntkdyn.co_improvement import (
    co_improvement_verdict,
    frozen_set_report,
    judge_records,
    random_update_null,
)
from ntkdyn.config import RunConfig
from ntkdyn.evaluate import EvalResult
from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.oracle_change import gap_change_with_ci
from ntkdyn.shapes_probes import select_probes
from ntkdyn.world import ShapesWorld

BAYES_PROBES_PER_CATEGORY = 32


def end_of_run_report(
    adapter: UnifiedAdapter,
    world: ShapesWorld,
    cfg: RunConfig,
    before: EvalResult,
    pretrained: dict[str, torch.Tensor],
    final: EvalResult | None,
    p_after: torch.Tensor | None = None,
) -> dict:
    """Measured on the final model (adapter.model) against the pre-trained one (``pretrained``: the
    pre-trained values of the trained parameters; ``before``: its evaluation, whose judged generations
    are the frozen set): ``co_improvement``, the frozen-set report
    (ntkdyn.co_improvement: AUROC before/after, the verdict rates, intervals) with its random-direction
    null ``null_random``, a ``verdict`` and ``external_labels_in_training``; ``oracle_change``, the
    change of gen_alignment and und_accuracy with intervals (``final``: the last evaluation, None when
    nothing was trained; ``p_after``: its P(yes) of the frozen set where that evaluation judged it, else
    it is judged here); ``bayes_step`` (ntkdyn.bayes_step) on up to BAYES_PROBES_PER_CATEGORY of the
    pre-trained generations per probe category."""
    seed = cfg.train.seed
    records = before.records
    p_before = torch.tensor([r.p_yes for r in records])
    p_after = judge_records(adapter, records) if p_after is None else p_after
    report = frozen_set_report(p_before, p_after, records, seed=seed)
    report["null_random"] = random_update_null(adapter, pretrained, records, p_before, seed=seed)
    report["verdict"] = co_improvement_verdict(report, report["null_random"])
    report["external_labels_in_training"] = cfg.external_labels_in_training
    final = final or before
    change = gap_change_with_ci(records, final.records, before.und_records, final.und_records, seed=seed)
    probes = select_probes([r.to_row() for r in records], BAYES_PROBES_PER_CATEGORY, seed)
    bayes = bayes_step(adapter, world, probes, pretrained, seed=seed)
    return {"co_improvement": report, "oracle_change": change, "bayes_step": bayes}


def co_degradation(oracle_change: Mapping, tol: float) -> bool:
    """Both branches fell beyond their intervals: the 95% intervals of the gen_alignment and und_accuracy
    changes (oracle_change, end_of_run_report) both lie wholly below -tol."""
    his = [oracle_change[k]["delta_ci"][1] for k in ("gen_alignment", "und_accuracy")]
    return all(hi is not None and hi < -tol for hi in his)


def format_run_report(summary: dict) -> list[str]:
    """The printed lines of the anchor, the frozen-set co-improvement report and the oracle change."""
    labels = "yes" if summary["external_labels_in_training"] else "no"
    lines = [f"judge {summary['judge']}, anchor {summary['anchor']}, external labels in training: {labels}"]
    co = summary.get("co_improvement")
    if co is None:
        return lines

    def ci(value, bounds) -> str:
        lo, hi = ("nan" if b is None else f"{b:.3f}" for b in bounds)
        return "-" if value is None else f"{value:.3f} [{lo}, {hi}]"

    null = co["null_random"]
    lines.append(
        f"co-improvement on the pre-trained model's {co['n']} generations (frozen, oracle-judged once; "
        f"95% intervals, {co['resamples']} resamples of its {co['prompts']} prompts)"
    )
    lines.append(
        f"  AUROC of P(yes) vs oracle: before {ci(co['auroc_before'], co['auroc_before_ci'])}, after "
        f"{ci(co['auroc_after'], co['auroc_after_ci'])}"
    )
    lines.append(
        f"  delta AUROC {ci(co['delta_auroc'], co['delta_auroc_ci'])}; random-direction null "
        f"{ci(null['delta_auroc'], null['delta_auroc_ci'])}"
    )
    for k in ("fp_rejected", "tp_kept", "und_win"):
        lines.append(f"  {k:<12}{ci(co[k], co[k + '_ci']):>28}   null {ci(null[k], null[k + '_ci'])}")
    lines.append(f"  verdict: {co['verdict']}")
    for k, change in summary.get("oracle_change", {}).items():
        if k != "counts":
            lines.append(f"oracle change of {k}: {ci(change['delta'], change['delta_ci'])}")
    bayes = summary.get("bayes_step")
    if bayes:
        lines.append(
            f"Bayes step on {bayes['probes']} generations x {bayes['set_size_mean']:.0f} competing prompts: "
            "the model's own change of understanding vs predicted ΔU = ΔG - Δlog pi(x)"
        )
        for name, per in bayes["agreement"].items():
            stats = per.get("all", {})
            if stats:
                lines.append(
                    f"  {name:<13} Pearson {ci(stats['pearson'], stats['pearson_ci'])}, "
                    f"slope {ci(stats['slope'], stats['slope_ci'])}"
                )
        u = bayes["unification"]
        lines.append(
            f"  unification 1 - TV(p_G, p_U): {u['before']:.3f} -> {u['after']:.3f}; same argmax "
            f"{u['same_argmax_before']:.3f} -> {u['same_argmax_after']:.3f}"
        )
    pairs = summary.get("squeezing", {}).get("pairs")
    if pairs:
        deltas = ", ".join(
            f"{k} {pairs[f'total_delta/{k}']:+.2f}"
            for k in ("chosen", "rejected", "greedy")
            if pairs.get(f"total_delta/{k}") is not None
        )
        lines.append(
            f"squeezing: log pi of the DPO pairs, summed per-step change over tracked steps: {deltas}"
        )
    return lines
