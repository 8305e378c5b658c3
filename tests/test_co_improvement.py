"""Co-improvement metrics that can fail: the frozen-set report against explicit counts and a pairwise
AUROC, the random-direction null against an explicitly built null model, the verdict's branches, the
oracle change with its intervals and the co-degradation verdict, and the summary's contract keys."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from ntkdyn.analysis.measuring import parameters_at
from ntkdyn.analysis.statistics import random_like_update
from ntkdyn.co_improvement import (
    co_improvement,
    co_improvement_verdict,
    frozen_set_report,
    judge_records,
    random_update_null,
)
from ntkdyn.config import RunConfig
from ntkdyn.evaluate import CandidateRecord, UnderstandingRecord, evaluate
from ntkdyn.models import load_adapter
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.oracle_change import gap_change_with_ci
from ntkdyn.track import parse_args, run, summarize
from ntkdyn.trainer.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def pairwise_auroc(scores, labels) -> float:
    """P(s+ > s-) + P(s+ = s-)/2 by an explicit loop over (positive, negative) pairs."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def records_of(oracle, prompts) -> list:
    return [
        SimpleNamespace(prompt=SimpleNamespace(text=t), oracle=o, image=torch.zeros(1, dtype=torch.long))
        for o, t in zip(oracle, prompts, strict=True)
    ]


def test_frozen_set_report_matches_explicit_counts():
    g = torch.Generator().manual_seed(0)
    n = 60
    oracle = (torch.rand(n, generator=g) < 0.4).tolist()
    p_before = torch.rand(n, generator=g)
    p_after = (
        p_before + 0.3 * (torch.tensor(oracle).float() - 0.5) + 0.4 * torch.randn(n, generator=g)
    ).clamp(0, 1)
    prompts = [f"prompt {i // 3}" for i in range(n)]  # 3 candidates per prompt
    report = frozen_set_report(p_before, p_after, records_of(oracle, prompts), seed=1)
    assert report["auroc_before"] == pytest.approx(pairwise_auroc(p_before.tolist(), oracle))
    assert report["auroc_after"] == pytest.approx(pairwise_auroc(p_after.tolist(), oracle))
    assert report["delta_auroc"] == pytest.approx(report["auroc_after"] - report["auroc_before"])
    v0, v = (p_before > 0.5).tolist(), (p_after > 0.5).tolist()
    fp = [i for i in range(n) if v0[i] and not oracle[i]]
    tp = [i for i in range(n) if v0[i] and oracle[i]]
    changed = [i for i in range(n) if v[i] != v0[i]]
    assert report["fp_rejected"] == pytest.approx(sum(not v[i] for i in fp) / len(fp))
    assert report["tp_kept"] == pytest.approx(sum(v[i] for i in tp) / len(tp))
    assert report["und_win"] == pytest.approx(sum(v[i] == oracle[i] for i in changed) / len(changed))
    assert (report["fp_rejected_n"], report["und_win_n"]) == (len(fp), len(changed))
    assert (report["n"], report["prompts"], report["resamples"]) == (n, 20, 1000)
    for k in ("delta_auroc", "fp_rejected", "tp_kept", "und_win"):
        lo, hi = report[f"{k}_ci"]
        assert lo <= report[k] <= hi and lo < hi, k
    with pytest.raises(ValueError, match="1000"):
        frozen_set_report(p_before, p_after, records_of(oracle, prompts), resamples=200)


def test_und_win_is_none_when_no_verdict_changed():
    adapter = ToyAdapter.tiny(seed=0)
    prompt = adapter.world.prompts("eval")[0]
    images = torch.randint(1, adapter.codebook_size, (4, adapter.image_tokens))
    p_yes = judge_records(adapter, [SimpleNamespace(image=x, prompt=prompt) for x in images])
    records = [
        SimpleNamespace(image=x, prompt=prompt, verdict=bool(p > 0.5), oracle=i % 2 == 0)
        for i, (x, p) in enumerate(zip(images, p_yes, strict=True))
    ]
    assert co_improvement(p_yes, records)["co/und_win"] is None  # the same judge: nothing changed
    report = frozen_set_report(p_yes, p_yes, records)
    assert report["und_win"] is None and report["und_win_ci"] == [None, None]
    assert report["delta_auroc"] == 0.0


def test_random_update_null_is_the_pretrained_model_moved_by_a_random_update_of_the_same_norms():
    adapter = ToyAdapter.tiny(seed=0)
    world = adapter.world
    prompts = [p for c in world.categories for p in world.prompts("eval", c)[:2]]
    records = evaluate(adapter, world, prompts, candidates=4, seed=0, und_pairs=0).records
    for r in records[::3]:  # both oracle classes on this random model
        r.oracle = not r.oracle
    p_before = torch.tensor([r.p_yes for r in records])
    trained_names = [n for n, _ in adapter.model.named_parameters()][:4]
    pretrained = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if n in trained_names}
    with torch.no_grad():  # "training": move the chosen tensors
        for n, p in adapter.model.named_parameters():
            if n in trained_names:
                p.add_(0.05 * torch.randn_like(p))
    trained = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}

    null = random_update_null(adapter, pretrained, records, p_before, seed=5)

    for n, p in adapter.model.named_parameters():  # the trained model is back
        assert torch.equal(p, trained[n]), n
    reference = copy.deepcopy(adapter)
    direction = random_like_update({n: trained[n] - pretrained[n] for n in pretrained}, seed=5)
    with torch.no_grad():
        for n, p in reference.model.named_parameters():
            if n in pretrained:
                p.copy_(pretrained[n] + direction[n])
                assert (p - pretrained[n]).norm().item() == pytest.approx(
                    (trained[n] - pretrained[n]).norm().item()
                )
    p_null = judge_records(reference, records)
    oracle = [r.oracle for r in records]
    assert null["auroc_after"] == pytest.approx(pairwise_auroc(p_null.tolist(), oracle))
    assert null["auroc_before"] == pytest.approx(pairwise_auroc(p_before.tolist(), oracle))
    norm = math.sqrt(sum(((trained[n] - pretrained[n]).double() ** 2).sum().item() for n in pretrained))
    assert null["update_norm"] == pytest.approx(norm)
    assert {"delta_auroc_ci", "fp_rejected", "tp_kept"} <= set(null)


def test_parameters_at_restores_after_an_error():
    model = torch.nn.Linear(2, 2)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError), parameters_at(model, {"weight": torch.zeros(2, 2)}):
        assert model.weight.abs().sum() == 0
        raise RuntimeError
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="no parameters"):
        with parameters_at(model, {"nope": torch.zeros(1)}):
            pass


@pytest.mark.parametrize(
    ("run_ci", "null_ci", "unfiltered_ci", "start"),
    [
        ((0.02, 0.05), (-0.01, 0.01), (0.0, 0.015), "co-improvement:"),
        ((0.02, 0.05), (-0.01, 0.01), None, "co-improvement over the random null"),
        ((0.02, 0.05), (-0.01, 0.01), (0.01, 0.03), "above the random null but not above the unfiltered"),
        ((-0.005, 0.02), (-0.01, 0.01), None, "no co-improvement"),
        ((-0.05, -0.02), (-0.01, 0.01), None, "judge degraded"),
        ((None, None), (-0.01, 0.01), None, "undefined"),
    ],
)
def test_verdict_says_co_improvement_only_above_every_null(run_ci, null_ci, unfiltered_ci, start):
    report = {"delta_auroc": 0.03, "delta_auroc_ci": list(run_ci)}
    unfiltered = None if unfiltered_ci is None else {"delta_auroc_ci": list(unfiltered_ci)}
    verdict = co_improvement_verdict(report, {"delta_auroc_ci": list(null_ci)}, unfiltered)
    assert verdict.startswith(start), verdict


def _records(world, prompts, hits_per_prompt, n=4):
    return [
        CandidateRecord(p, torch.zeros(1, dtype=torch.long), 0.5, i < hits, i < hits, True)
        for p, hits in zip(prompts, hits_per_prompt, strict=True)
        for i in range(n)
    ]


def test_gap_change_against_direct_means_and_the_co_degradation_verdict():
    world = ToyAdapter.tiny(seed=0).world
    prompts = [p for c in world.categories[:3] for p in world.prompts("eval", c)[:6]]
    g = torch.Generator().manual_seed(0)
    hits0 = torch.randint(2, 5, (len(prompts),), generator=g).tolist()
    hits1 = [max(0, h - 2) for h in hits0]  # generation falls
    before, after = _records(world, prompts, hits0), _records(world, prompts, hits1)
    kinds = ["positive", "color", "shape"] * len(prompts)
    und_prompts = [p for p in prompts for _ in range(3)]
    right0 = [True] * len(kinds)
    right1 = [i % 3 != 1 for i in range(len(kinds))]  # every colour negative now answered wrong

    def und(right):
        return [
            UnderstandingRecord(p, k, 0.9 if (k == "positive") == r else 0.1)
            for p, k, r in zip(und_prompts, kinds, right, strict=True)
        ]

    change = gap_change_with_ci(before, after, und(right0), und(right1), seed=0)
    per_category = {c: [i for i, p in enumerate(prompts) if p.category == c] for c in world.categories[:3]}
    want_gen = sum(
        (sum(hits1[i] for i in idx) - sum(hits0[i] for i in idx)) / (4 * len(idx))
        for idx in per_category.values()
    ) / len(per_category)
    assert change["gen_alignment"]["delta"] == pytest.approx(want_gen)
    assert change["non_unification"]["delta"] == pytest.approx(-want_gen)  # here the judge is the oracle
    assert change["counts"]["after"]["aligned"] == [
        hits1[prompts.index(p)] for p in sorted(prompts, key=lambda p: p.text)
    ]
    assert change["und_accuracy"]["delta"] == pytest.approx(-0.25)  # negatives 1 -> 1/2, balanced: -1/4
    for k in ("gen_alignment", "und_accuracy"):
        lo, hi = change[k]["delta_ci"]
        assert lo <= change[k]["delta"] <= hi < 0
    cfg = RunConfig()
    assert summarize({}, {}, cfg, change)["co_degradation"] is True
    held = gap_change_with_ci(before, after, und(right0), und(right0), seed=0)
    assert held["und_accuracy"]["delta"] == 0.0
    assert summarize({}, {}, cfg, held)["co_degradation"] is False
    assert summarize({}, {}, cfg)["co_degradation"] is None
    with pytest.raises(ValueError, match="same prompts"):
        gap_change_with_ci(before, after[4:], und(right0), und(right1))
    with pytest.raises(ValueError, match="same questions"):
        gap_change_with_ci(before, after, und(right0), und(right1)[1:])


def test_summary_carries_the_contract(tmp_path):
    args = "--model toy-tiny --run sft --no-track --prompts 8 --candidates 2 --gen-batch 4 --max-steps 2 "
    args += "--batch-size 4 --eval-prompts 6 --eval-candidates 3 --eval-und-pairs 1 --anchor-pool 8 --lr 0.01"
    summary = run(parse_args([*args.split(), "--no-figures", "--out", str(tmp_path)]))
    assert not (tmp_path / "figures").exists()  # --no-figures: python -m ntkdyn.plot draws them later
    co = summary["co_improvement"]
    keys = {"auroc_before", "auroc_after", "delta_auroc", "delta_auroc_ci", "null_random", "fp_rejected_ci"}
    keys |= {"tp_kept_ci", "und_win_ci", "verdict", "external_labels_in_training"}
    assert keys <= set(co)
    assert {"delta_auroc_ci", "fp_rejected", "tp_kept"} <= set(co["null_random"])
    assert co["external_labels_in_training"] is False and isinstance(co["verdict"], str)
    assert summary["anchor"] == "self" and summary["external_labels_in_training"] is False
    assert isinstance(summary["co_degradation"], bool)
    # the oracle change's "before" is the pre-trained evaluation's own und_accuracy (same questions)
    assert summary["oracle_change"]["und_accuracy"]["before"] == pytest.approx(
        summary["before"]["und_accuracy"]
    )
    assert summary["oracle_change"]["gen_alignment"]["before"] == pytest.approx(
        summary["before"]["gen_alignment"]
    )
    assert json.loads((tmp_path / "summary.json").read_text())["co_improvement"]["verdict"] == co["verdict"]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["anchor"] == "self"
    # before training the judge is the pre-trained one: no verdict of the frozen set has changed
    before = summary["before"]
    assert before["co/fp_rejected"] in (0.0, None) and before["co/tp_kept"] in (1.0, None)
    assert before["co/fn_accepted"] in (0.0, None) and before["co/und_win"] is None
    # the report's "after" is the final model's P(yes) of the frozen set, judged here from its checkpoint
    adapter = load_adapter("toy-tiny")
    adapter.model.load_state_dict(load_checkpoint(tmp_path).model)
    adapter.model.eval()
    rows = [json.loads(x) for x in (tmp_path / "pretrained" / "records.jsonl").read_text().splitlines()]
    records = [CandidateRecord.from_row(row, adapter.world) for row in rows]
    p_before = torch.tensor([r.p_yes for r in records])
    want = frozen_set_report(p_before, judge_records(adapter, records), records)
    for key in ("auroc_after", "fp_rejected", "tp_kept", "judge_accuracy"):
        assert co[key] == pytest.approx(want[key], abs=1e-12), key
    assert summary["after"]["co/judge_accuracy"] == pytest.approx(want["judge_accuracy"], abs=1e-6)  # float32


def test_the_co_improvement_figure_shows_the_run_beside_its_random_null():
    from ntkdyn.plot import co_improvement as figure

    rows = [{"step": 0, "gen_alignment": 0.5}, {"step": 10, "gen_alignment": 0.6}]
    run_report = {"delta_auroc": 0.03, "delta_auroc_ci": [0.01, 0.05], "fp_rejected": 0.3}
    run_report |= {"fp_rejected_ci": [0.2, 0.4], "tp_kept": 0.9, "tp_kept_ci": [0.85, 0.95], "und_win": None}
    null = {"delta_auroc": -0.001, "delta_auroc_ci": [-0.004, 0.002], "fp_rejected": 0.05}
    null |= {"fp_rejected_ci": [0.02, 0.08], "tp_kept": 0.99, "tp_kept_ci": [0.98, 1.0], "und_win": None}
    summary = {"co_improvement": {**run_report, "null_random": null, "verdict": "co-improvement over ..."}}
    fig = figure(rows, summary)
    assert len(fig.axes) == 3
    auroc_points = [c.lines[0].get_ydata()[0] for c in fig.axes[1].containers]
    assert auroc_points == [0.03, -0.001]
    (run_bar, null_bar) = [c.lines[2][0].get_segments()[0][:, 1].tolist() for c in fig.axes[1].containers]
    assert run_bar == pytest.approx([0.01, 0.05]) and null_bar == pytest.approx([-0.004, 0.002])
    rates = sorted(c.lines[0].get_ydata()[0] for c in fig.axes[2].containers)
    assert rates == [0.05, 0.3, 0.9, 0.99]  # und_win undefined: not drawn
    assert len(figure(rows).axes) == 1
