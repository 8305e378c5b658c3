"""benchmarks/claims.py's verdicts on hand-made run summaries: a claim holds only when every run's
interval says so, fails when every run's interval says the opposite, and is inconclusive otherwise."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "claims", Path(__file__).resolve().parents[1] / "benchmarks" / "claims.py"
)
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)


def summary(gen=(0.05, 0.1), und=(-0.01, 0.01), auroc=(0.02, 0.04), null=(-0.01, 0.01)):
    def change(bounds):
        return {"delta": sum(bounds) / 2, "delta_ci": list(bounds)}

    report = {"delta_auroc": sum(auroc) / 2, "delta_auroc_ci": list(auroc), "fp_rejected": 0.3}
    report["fp_rejected_ci"] = [0.2, 0.4]
    report["null_random"] = {"delta_auroc": 0.0, "delta_auroc_ci": list(null), "fp_rejected": 0.05}
    report["null_random"]["fp_rejected_ci"] = [0.0, 0.1]
    return {
        "oracle_change": {
            "gen_alignment": change(gen),
            "und_accuracy": change(und),
            "non_unification": change(und),
        },
        "co_improvement": report,
    }


def test_self_improvement_needs_every_seed_above_zero():
    both = {("dpo", 0): summary(), ("dpo", 1): summary()}
    assert claims.self_improvement(both)[3] == "holds"
    mixed = {("dpo", 0): summary(), ("dpo", 1): summary(gen=(-0.01, 0.05))}
    assert claims.self_improvement(mixed)[3] == "inconclusive"
    falls = {("dpo", 0): summary(gen=(-0.1, -0.05))}
    assert claims.self_improvement(falls)[3] == "does not hold"
    assert claims.self_improvement({}) is None


@pytest.mark.parametrize(
    ("unfiltered_auroc", "want"),
    [((-0.01, 0.015), "holds"), ((0.01, 0.03), "inconclusive")],
)
def test_co_improvement_is_judged_against_the_random_null_and_the_unfiltered_arm(unfiltered_auroc, want):
    runs = {("dpo", s): summary() for s in (0, 1)}
    runs |= {("sft-unfiltered", s): summary(auroc=unfiltered_auroc) for s in (0, 1)}
    assert claims.co_improvement(runs)[3] == want
    overlapping = {("dpo", 0): summary(auroc=(0.0, 0.02)), ("sft-unfiltered", 0): summary(auroc=(-0.01, 0.0))}
    assert claims.co_improvement(overlapping)[3] == "does not hold"


def test_co_degradation_holds_where_a_poor_supervision_arm_fires():
    both_fell = summary(gen=(-0.05, -0.02), und=(-0.02, -0.001))
    fired = {("sft-self", 0): summary(), ("sft-inverted", 0): both_fell}
    assert claims.co_degradation(fired)[3] == "holds"
    held = {("sft-self", 0): both_fell, ("sft-inverted", 0): summary(gen=(-0.05, -0.02))}
    assert claims.co_degradation(held)[3] == "does not hold"  # the self-judged arm does not count
