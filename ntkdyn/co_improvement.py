"""Co-improvement: how a model judges the pre-trained model's own generations, against the exact oracle.

The set is fixed: the pre-trained evaluation's generations (``pretrained/records.jsonl``), judged once by
the pre-trained model (P(yes) then, verdict v0 = 1[P(yes) > 1/2]) and once by the oracle (o). Two uses:

    co_improvement(p_yes, records)     point estimates ``co/...`` at every evaluation of a run, from the
                                       model's P(yes) of the set (judge_records; before training the
                                       records' own, as the pre-trained evaluation judged them)
    frozen_set_report(p0, p1, records) the end of a run (summary.json ``co_improvement``): AUROC of P(yes)
                                       against the oracle before/after and its paired change, and the
                                       verdict rates, each with a percentile-bootstrap interval
                                       (>= 1000 resamples of the prompts: a prompt's candidates are one
                                       cluster, ntkdyn.analysis.statistics)
    random_update_null(...)            the same report for the random-direction null: the pre-trained
                                       weights moved by a random update with the per-tensor norms of the
                                       run's real total update theta_final - theta_pretrained
    co_improvement_verdict(...)        "co-improvement" only when the run's ΔAUROC interval lies above the
                                       null's (and above the unfiltered arm's where that is given);
                                       otherwise what was seen
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm import tqdm

from ntkdyn.analysis.measuring import parameters_at
from ntkdyn.analysis.statistics import delta_auroc_with_ci, random_like_update, verdict_rates_with_ci
from ntkdyn.models.base import UnifiedAdapter

RESAMPLES = 1000
RATES = ("fp_rejected", "tp_kept", "fn_accepted", "und_win", "judge_accuracy")


@torch.no_grad()
def judge_records(adapter: UnifiedAdapter, records: Sequence, chunk: int = 256) -> torch.Tensor:
    """The adapter's current P(yes) of every record (``.image`` LongTensor[L], ``.prompt.text``): float32
    Tensor[n] on the CPU."""
    images = torch.stack([r.image for r in records])
    texts = [r.prompt.text for r in records]
    return torch.cat(
        [
            adapter.judge(images[s : s + chunk], texts[s : s + chunk]).p_yes.float().cpu()
            for s in tqdm(range(0, len(texts), chunk), desc="judge the frozen generations", leave=False)
        ]
    )


def co_improvement(p_yes: torch.Tensor, records: Sequence) -> dict:
    """A model's judgement of the pre-trained model's generations against the oracle, from its P(yes) of
    them (``p_yes`` [n], judge_records).

    records: the pre-trained evaluation's candidate records (``.verdict`` then, ``.oracle``). With v0 the
    pre-trained verdict, v the current one (p_yes > 1/2) and o the oracle:
        co/fp_rejected = P(v = 0 | v0 = 1, o = 0)    former false positives now rejected
        co/tp_kept     = P(v = 1 | v0 = 1, o = 1)    true positives kept
        co/fn_accepted = P(v = 1 | v0 = 0, o = 1)    former false negatives now accepted
        co/und_win     = P(v = o | v != v0)          exact-oracle win rate over the pre-trained judge
                                                     (paper's Und-win)
        co/judge_accuracy = P(v = o)
    A rate whose condition is empty is None (und_win too: no changed verdict is no evidence).
    """
    if p_yes.shape != (len(records),):
        raise ValueError(f"co_improvement: p_yes has shape {tuple(p_yes.shape)}, expected ({len(records)},)")
    now = p_yes > 0.5
    then = torch.tensor([bool(r.verdict) for r in records])
    oracle = torch.tensor([bool(r.oracle) for r in records])

    def rate(hit: torch.Tensor, given: torch.Tensor) -> float | None:
        return (hit & given).sum().item() / given.sum().item() if given.any() else None

    return {
        "co/fp_rejected": rate(~now, then & ~oracle),
        "co/tp_kept": rate(now, then & oracle),
        "co/fn_accepted": rate(now, ~then & oracle),
        "co/und_win": rate(now == oracle, now != then),
        "co/judge_accuracy": (now == oracle).float().mean().item(),
    }


def frozen_set_report(
    p_before: torch.Tensor,
    p_after: torch.Tensor,
    records: Sequence,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """The judge on the frozen set before (P(yes) p_before [n], verdict v0 = p_before > 1/2) and after
    (p_after [n]) against the oracle (``records[i].oracle``), intervals from ``resamples`` bootstrap
    resamples of the prompts (``records[i].prompt.text``).

    Keys: auroc_before, auroc_after, delta_auroc (paired: one resample serves both), each with
    ``<name>_ci``; fp_rejected, tp_kept, fn_accepted, und_win, judge_accuracy (the ``co/...`` rates, with
    v the verdict after) each with ``<name>_ci`` and ``<name>_n`` (items in its condition); n, prompts,
    resamples. An undefined statistic (one oracle class, an empty condition) is None with [None, None].
    """
    if resamples < 1000:
        raise ValueError(f"resamples: the reported intervals use >= 1000 resamples, got {resamples}")
    oracle = torch.tensor([bool(r.oracle) for r in records])
    clusters = [r.prompt.text for r in records]
    auc = delta_auroc_with_ci(p_before, p_after, oracle, clusters=clusters, resamples=resamples, seed=seed)
    rates = verdict_rates_with_ci(
        p_before > 0.5, p_after > 0.5, oracle, clusters=clusters, resamples=resamples, seed=seed
    )
    out = {k: auc[k] for k in ("auroc_before", "auroc_after", "delta_auroc")}
    out |= {f"{k}_ci": auc[f"{k}_ci"] for k in ("auroc_before", "auroc_after", "delta_auroc")}
    for k in RATES:
        out |= {k: rates[k], f"{k}_ci": rates[f"{k}_ci"], f"{k}_n": rates[f"{k}_n"]}
    return out | {"n": len(records), "prompts": len(set(clusters)), "resamples": resamples}


def random_update_null(
    adapter: UnifiedAdapter,
    pretrained: Mapping[str, torch.Tensor],
    records: Sequence,
    p_before: torch.Tensor,
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> dict:
    """The random-direction null of the run's update, measured like the run.

    adapter.model holds the trained parameters theta_1; ``pretrained``: the pre-trained values theta_0 of
    (at least) every parameter training changed. The null model is theta_0 + r, r = random_like_update(
    theta_1 - theta_0, seed): per tensor a Gaussian direction with the real update's Frobenius norm (a
    tensor training left unchanged stays unchanged). Returns frozen_set_report(p_before, P(yes) of the
    null model) with ``update_norm`` (|theta_1 - theta_0| over all those tensors) and ``seed``; the
    adapter's model holds theta_1 again afterwards."""
    params = dict(adapter.model.named_parameters())
    delta = {n: params[n].detach() - v.to(params[n].device, params[n].dtype) for n, v in pretrained.items()}
    random = random_like_update(delta, seed=seed)
    moved = {n: pretrained[n].to(params[n].device, params[n].dtype) + random[n] for n in pretrained}
    was_training = adapter.model.training
    adapter.model.eval()
    with parameters_at(adapter.model, moved):
        p_null = judge_records(adapter, records)
    adapter.model.train(was_training)
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())).item() if delta else 0.0
    report = frozen_set_report(p_before, p_null, records, resamples=resamples, seed=seed)
    return report | {"update_norm": norm, "seed": seed}


def _ci(interval: Sequence) -> str:
    lo, hi = interval
    return "[undefined]" if lo is None or hi is None else f"[{lo:+.3f}, {hi:+.3f}]"


def co_improvement_verdict(report: Mapping, null: Mapping, unfiltered: Mapping | None = None) -> str:
    """A short verdict on the run's ΔAUROC (``report``) against the random null's (``null``) and, where
    given, the unfiltered arm's (``unfiltered``: a report of the ``--judge none`` run at the same budget):
    "co-improvement" only when the run's 95% interval lies wholly above the other intervals; otherwise
    what was seen (below the null, overlapping it, above the null but not above the unfiltered arm)."""
    lo, hi = report["delta_auroc_ci"]
    null_lo, null_hi = null["delta_auroc_ci"]
    if None in (lo, hi, null_lo, null_hi):
        return "undefined: the frozen set lacks one oracle class in its resamples"
    seen = f"ΔAUROC {report['delta_auroc']:+.3f} {_ci(report['delta_auroc_ci'])}"
    versus = f"random null {_ci(null['delta_auroc_ci'])}"
    if unfiltered is not None:
        versus += f", unfiltered arm {_ci(unfiltered['delta_auroc_ci'])}"
    if hi < null_lo:
        return f"judge degraded: {seen} below the {versus}"
    if lo <= null_hi:
        return f"no co-improvement: {seen} overlaps the {versus}"
    if unfiltered is None:
        return f"co-improvement over the random null (unfiltered arm not compared): {seen}, {versus}"
    unfiltered_hi = unfiltered["delta_auroc_ci"][1]
    if unfiltered_hi is None or lo <= unfiltered_hi:
        return f"above the random null but not above the unfiltered arm: {seen}, {versus}"
    return f"co-improvement: {seen} above the {versus}"
