"""The paper's claims tested one by one on ShapesWorld (issue 15): runs every arm, writes the claims table.

    python benchmarks/claims.py [--out runs/claims] [--only ARM ...] [--read-only] [--readme README.md]
        [-- EXTRA TRACK ARGS]

Each arm is ``python -m ntkdyn.track ARGS --seed S --threads 1 --out OUT/<arm>-s<S>`` (plus the extra
options after ``--``), run one after the other; an arm whose summary.json exists is read, not run again,
so the script resumes where it stopped; ORDER runs the most needed first. The default arms (the default
run and the unfiltered arm it is compared with) run at seeds 0 and 1, the others at seed 0; every arm
has the default budget. Poor supervision (``--judge inverted``, ``--judge noisy:0.3``) corrupts
self-scored SFT, whose training set is exactly the judge's accepted candidates; once also without the
understanding anchor (``--anchor none``: only generation is trained, as in the paper). Every
interval is a 95% percentile-bootstrap interval from 1000 resamples (of the eval prompts, of the probes,
or of the tracked steps: ntkdyn.analysis.statistics). Co-degradation is recomputed from each run's
intervals with the current rule (ntkdyn.run_report.co_degradation, --co-degradation-tol's default).
It prints two Markdown tables, one row per claim and one row per run, and with ``--readme`` writes them
between the README's claims-table markers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ntkdyn.analysis.statistics import weighted_bootstrap_ci, weighted_mean
from ntkdyn.co_improvement import co_improvement_verdict
from ntkdyn.config import EvalConfig
from ntkdyn.oracle_change import category_mean_change_with_ci
from ntkdyn.run_report import co_degradation as degraded

ARMS: dict[str, list[str]] = {  # name -> track options
    "dpo": ["--run", "dpo"],  # the default run: the main command
    "sft-unfiltered": ["--run", "sft", "--judge", "none", "--no-track"],
    "sft-self": ["--run", "sft", "--no-track"],
    "sft-inverted": ["--run", "sft", "--judge", "inverted", "--no-track"],
    "sft-noisy": ["--run", "sft", "--judge", "noisy:0.3", "--no-track"],
    "sft-inverted-no-anchor": ["--run", "sft", "--judge", "inverted", "--anchor", "none", "--no-track"],
    "dpo-no-nll": ["--run", "dpo", "--nll-weight", "0"],
    "dpo-oracle-anchor": ["--run", "dpo", "--anchor", "oracle", "--no-track"],
    "curriculum": ["--run", "curriculum", "--rounds", "3", "--no-track"],
}
ORDER = [  # (arm, seed), most needed first: the script can be stopped and resumed
    ("dpo", 0),
    ("sft-unfiltered", 0),
    ("sft-self", 0),
    ("sft-inverted", 0),
    ("sft-inverted-no-anchor", 0),
    ("sft-noisy", 0),
    ("dpo", 1),
    ("sft-unfiltered", 1),
    ("dpo-no-nll", 0),
    ("dpo-oracle-anchor", 0),
    ("curriculum", 0),
]
MARKERS = ("<!-- claims-table -->", "<!-- /claims-table -->")
TOL = EvalConfig().co_degradation_tol  # the co-degradation rule, applied alike to every run's intervals
Summaries = dict[tuple[str, int], dict]


def command(arm: str, seed: int, extra: list[str]) -> list[str]:
    """The track command of an arm (without --out)."""
    return ["python", "-m", "ntkdyn.track", *ARMS[arm], "--seed", str(seed), "--threads", "1", *extra]


def run_arm(arm: str, seed: int, out: Path, extra: list[str]) -> dict:
    """The summary of an arm at ``seed`` (run now unless its summary.json exists)."""
    run_dir = out / f"{arm}-s{seed}"
    summary = run_dir / "summary.json"
    if not summary.exists():
        full = [sys.executable, *command(arm, seed, extra)[1:], "--out", str(run_dir)]
        print("+", shlex.join(full), file=sys.stderr, flush=True)
        start = time.time()
        subprocess.run(full, check=True, stdout=subprocess.DEVNULL)
        print(f"{arm} seed {seed}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(summary.read_text())


# ----------------------------------------------------------------------------- cells


def ci(value, bounds, sign: str = "+") -> str:
    if value is None:
        return "-"
    lo, hi = ("?" if b is None else f"{b:{sign}.3f}" for b in bounds)
    return f"{value:{sign}.3f} [{lo}, {hi}]"


def change(summary: dict, key: str) -> str:
    c = summary["oracle_change"][key]
    return ci(c["delta"], c["delta_ci"])


def above(bounds) -> bool:
    return bounds[0] is not None and bounds[0] > 0


def below(bounds) -> bool:
    return bounds[1] is not None and bounds[1] < 0


def fell(summary: dict) -> bool:
    """Co-degradation (ntkdyn.run_report.co_degradation) from the run's intervals, with today's rule."""
    return degraded(summary["oracle_change"], TOL)


def status(holds: list[bool], fails: list[bool]) -> str:
    """holds when it holds in every run; does not hold when it fails in every run; else inconclusive."""
    if holds and all(holds):
        return "holds"
    if fails and all(fails):
        return "does not hold"
    return "inconclusive"


def shown(arms: list[str], s: Summaries, extra: list[str]) -> str:
    """The arms' commands (at their first seed; the seeds run when more than one)."""
    cells = []
    for arm in arms:
        seeds = sorted(seed for (a, seed) in s if a == arm)
        more = f" (seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else ""
        cells.append(f"`{shlex.join(command(arm, seeds[0], extra))}`{more}")
    return "<br>".join(cells)


# ----------------------------------------------------------------------------- claims
# Each returns (claim, measurement, arms, status) or None when its arms have not run.

Claim = tuple[str, str, list[str], str]


def runs_of(s: Summaries, arm: str) -> list[tuple[int, dict]]:
    return sorted((seed, v) for (a, seed), v in s.items() if a == arm)


def self_improvement(s: Summaries) -> Claim | None:
    runs = runs_of(s, "dpo")
    if not runs:
        return None
    cells = [f"seed {seed}: {change(v, 'gen_alignment')}" for seed, v in runs]
    bounds = [v["oracle_change"]["gen_alignment"]["delta_ci"] for _, v in runs]
    verdict = status([above(b) for b in bounds], [below(b) for b in bounds])
    return (
        "Self-improvement raises generation (gen_alignment change, default DPO)",
        "; ".join(cells),
        ["dpo"],
        verdict,
    )


def unification(s: Summaries) -> Claim | None:
    runs = runs_of(s, "dpo")
    if not runs:
        return None
    cells = []
    for seed, v in runs:
        u = v["bayes_step"]["unification"]
        cells.append(
            f"seed {seed}: non_unification {change(v, 'non_unification')}; 1 - TV(p_G, p_U) "
            f"{u['before']:.3f} -> {u['after']:.3f}"
        )
    bounds = [v["oracle_change"]["non_unification"]["delta_ci"] for _, v in runs]
    verdict = status([below(b) for b in bounds], [above(b) for b in bounds])
    return "Unification gain (non-unification falls)", "; ".join(cells), ["dpo"], verdict


def co_improvement(s: Summaries) -> Claim | None:
    runs = [(seed, v, s.get(("sft-unfiltered", seed))) for seed, v in runs_of(s, "dpo")]
    runs = [r for r in runs if r[2] is not None]
    if not runs:
        return None
    cells, verdicts = [], []
    for seed, v, unfiltered in runs:
        co, null, other = (
            v["co_improvement"],
            v["co_improvement"]["null_random"],
            unfiltered["co_improvement"],
        )
        verdict = co_improvement_verdict(co, null, other)
        verdicts.append(verdict)
        cells.append(
            f"seed {seed}: ΔAUROC {ci(co['delta_auroc'], co['delta_auroc_ci'])}, random null "
            f"{ci(null['delta_auroc'], null['delta_auroc_ci'])}, unfiltered SFT "
            f"{ci(other['delta_auroc'], other['delta_auroc_ci'])}; "
            f"fp_rejected {ci(co['fp_rejected'], co['fp_rejected_ci'], '')} (null "
            f"{ci(null['fp_rejected'], null['fp_rejected_ci'], '')}): {verdict}"
        )
    verdict = status(
        [v.startswith("co-improvement:") for v in verdicts],
        [v.startswith(("no co-improvement", "judge degraded")) for v in verdicts],
    )
    return (
        "Co-improvement (the judge gets better on its former generations)",
        "; ".join(cells),
        [
            "dpo",
            "sft-unfiltered",
        ],
        verdict,
    )


def co_degradation(s: Summaries) -> Claim | None:
    """Poor supervision (inverted, noisy judge) beside the self-judged SFT it corrupts: the verdict holds
    where both branches fall beyond their intervals; the cells show whether non-unification alone tells
    the arms apart."""
    poor = [a for a in ("sft-inverted", "sft-inverted-no-anchor", "sft-noisy") if runs_of(s, a)]
    if not poor:
        return None
    arms = [*(["sft-self"] if runs_of(s, "sft-self") else []), *poor]
    cells, fired = [], []
    for arm in arms:
        for seed, v in runs_of(s, arm):
            if arm in poor:
                fired.append(fell(v))
            cells.append(
                f"{arm} (seed {seed}): gen {change(v, 'gen_alignment')}, und {change(v, 'und_accuracy')}, "
                f"non_unification {change(v, 'non_unification')}, ΔAUROC "
                f"{ci(v['co_improvement']['delta_auroc'], v['co_improvement']['delta_auroc_ci'])}: "
                f"{'co-degradation' if fell(v) else 'no co-degradation'}"
            )
    verdict = "holds" if any(fired) else "does not hold"
    claim = "Co-degradation under poor supervision (both branches fall; non-unification alone cannot tell)"
    return claim, "; ".join(cells), arms, verdict


def curriculum(s: Summaries) -> Claim | None:
    cur, base = s.get(("curriculum", 0)), s.get(("sft-self", 0))
    if cur is None or base is None:
        return None
    gain = category_mean_change_with_ci(
        base["oracle_change"]["counts"]["after"], cur["oracle_change"]["counts"]["after"], "aligned"
    )
    cell = (
        f"gen_alignment curriculum minus self-scored SFT: {ci(gain['delta'], gain['delta_ci'])} "
        f"({gain['before']:.3f} -> {gain['after']:.3f}, paired by eval prompt)"
    )
    verdict = status([above(gain["delta_ci"])], [below(gain["delta_ci"])])
    return "Curriculum gain over self-scored SFT", cell, ["sft-self", "curriculum"], verdict


def bayes(s: Summaries) -> Claim | None:
    runs = runs_of(s, "dpo")
    if not runs:
        return None
    cells, bounds = [], []
    for seed, v in runs:
        odds = v["bayes_step"]["agreement"]["yes_log_odds"]["all"]
        caption = v["bayes_step"]["agreement"]["caption"]["all"]
        bounds.append(odds["pearson_ci"])
        cells.append(
            f"seed {seed}: Δ yes-log-odds vs predicted ΔU = ΔG - Δlog pi(x): Pearson "
            f"{ci(odds['pearson'], odds['pearson_ci'])}, slope {ci(odds['slope'], odds['slope_ci'])}; "
            f"Δ log pi(y0|x): Pearson {ci(caption['pearson'], caption['pearson_ci'])} "
            f"({odds['n']} generations)"
        )
    verdict = status([above(b) for b in bounds], [below(b) for b in bounds])
    return (
        "Bayes-consistent dynamics (understanding moves as ΔG - Δlog pi(x))",
        "; ".join(cells),
        ["dpo"],
        verdict,
    )


def mean_step_change(rows: list[dict], kind: str) -> dict | None:
    """Mean per-step change of log pi of a squeezing kind over the logged steps (of the step's DPO pairs),
    with its interval over resampled steps; None with fewer than two logged steps."""
    values = torch.tensor([r[f"delta/{kind}"] for r in rows if r.get(f"delta/{kind}") is not None])
    if len(values) < 2:
        return None
    interval = weighted_bootstrap_ci(weighted_mean, values)
    return {"mean": interval.estimate, "ci": interval.bounds()}


def squeezing(s: Summaries, out: Path) -> Claim | None:
    """Ren & Sutherland's squeezing in plain DPO: the chosen and the rejected image both lose log pi per
    step while the greedy image gains (holds when the three intervals say so)."""
    if ("dpo-no-nll", 0) not in s or ("dpo", 0) not in s:
        return None
    cells, plain = [], {}
    for arm in ("dpo-no-nll", "dpo"):
        path = out / f"{arm}-s0" / "squeezing.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        rows = [r for r in rows if r["group"] == "pairs"]
        changes = {k: mean_step_change(rows, k) for k in ("chosen", "rejected", "greedy")}
        parts = ", ".join(f"{k} {ci(c['mean'], c['ci']) if c else '-'}" for k, c in changes.items())
        cells.append(f"{arm}: gen {change(s[(arm, 0)], 'gen_alignment')}; mean per-step Δlog pi: {parts}")
        if arm == "dpo-no-nll":
            plain = changes
    if not all(plain.values()):
        return (
            "DPO's squeezing effect explains plain DPO's collapse",
            "; ".join(cells),
            ["dpo-no-nll"],
            "inconclusive",
        )
    squeezed = [below(plain["chosen"]["ci"]), below(plain["rejected"]["ci"]), above(plain["greedy"]["ci"])]
    verdict = status([all(squeezed)], [above(plain["chosen"]["ci"]) or below(plain["greedy"]["ci"])])
    return (
        "DPO's squeezing effect explains plain DPO's collapse",
        "; ".join(cells),
        ["dpo-no-nll", "dpo"],
        verdict,
    )


CLAIMS: list[Callable] = [self_improvement, unification, co_improvement, co_degradation, curriculum, bayes]


def claims_table(s: Summaries, out: Path, extra: list[str]) -> str:
    lines = [
        "| claim (paper) | ShapesWorld measurement [95% interval] | command | verdict |",
        "|---|---|---|---|",
    ]
    rows = [f(s) for f in CLAIMS] + [squeezing(s, out)]
    for row in rows:
        if row is not None:
            claim, cell, arms, verdict = row
            lines.append(f"| {claim} | {cell} | {shown(arms, s, extra)} | **{verdict}** |")
    return "\n".join(lines)


def runs_table(s: Summaries) -> str:
    head = (
        "| arm | seed | external labels in training | gen_alignment Δ | und_accuracy Δ | non_unification Δ "
    )
    head += "| ΔAUROC (judge vs oracle) | random null ΔAUROC | co-degradation | steps | wall (s) |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (arm, seed), v in s.items():
        co = v["co_improvement"]
        lines.append(
            f"| {arm} | {seed} | {'yes' if v['external_labels_in_training'] else 'no'} | "
            f"{change(v, 'gen_alignment')} | {change(v, 'und_accuracy')} | {change(v, 'non_unification')} | "
            f"{ci(co['delta_auroc'], co['delta_auroc_ci'])} | "
            f"{ci(co['null_random']['delta_auroc'], co['null_random']['delta_auroc_ci'])} | "
            f"{'yes' if fell(v) else 'no'} | {v['steps']} | {v['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def write_between_markers(path: Path, text: str) -> None:
    content = path.read_text()
    if not all(m in content for m in MARKERS):
        raise SystemExit(f"{path}: lacks the markers {MARKERS[0]} ... {MARKERS[1]}")
    head, rest = content.split(MARKERS[0], 1)
    _, tail = rest.split(MARKERS[1], 1)
    path.write_text(f"{head}{MARKERS[0]}\n{text}\n{MARKERS[1]}{tail}")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/claims", help="where the runs go")
    parser.add_argument("--only", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run")
    parser.add_argument("--read-only", action="store_true", help="run nothing; tabulate the finished runs")
    parser.add_argument("--readme", help="write the tables between the claims-table markers of this file")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    summaries: Summaries = {}
    for arm, seed in ORDER:
        done = (out / f"{arm}-s{seed}" / "summary.json").exists()
        if arm in args.only and (done or not args.read_only):
            summaries[(arm, seed)] = run_arm(arm, seed, out, extra)
    text = claims_table(summaries, out, extra) + "\n\nThe runs:\n\n" + runs_table(summaries)
    print(text)
    if args.readme:
        write_between_markers(Path(args.readme), text)


if __name__ == "__main__":
    main()
