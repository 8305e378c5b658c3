"""The self-improvement result over training seeds and independently pre-trained models (issue 13).

Runs ``python -m ntkdyn.track --run dpo --no-track`` (plus any extra options after ``--``) for every
pre-trained model x training seed, each into OUT/<model>-s<seed> (a run that has its summary.json is read
instead of re-run), and prints Markdown tables: per run, generation alignment and understanding accuracy
before and at the last step (the default run's result), the label-free selected step and its model's
generation alignment (with ``--select-every``), and the oracle's best evaluated step (with
``--eval-every``); per model, the mean change over seeds with a 95% t-interval (none with one seed); the
mean over models (a t-interval over the per-model means), the pooled runs, and how often the selection
landed within 1 point of the oracle's best evaluated step (the last step's rate beside it).

    python benchmarks/robustness.py --seeds 0 1 2 3 4 -- --eval-every 100 --select-every 100  # the table
    python benchmarks/robustness.py --seeds 0 1 2 3 4 --report-only    # tabulate the finished runs
    python benchmarks/robustness.py --models shipped seed1 --seeds 0 -- --eval-every 100 --select-every 100
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "shipped": ["toy"],
    **{f"seed{s}": ["toy", str(ROOT / "benchmarks" / "pretrained" / f"toy-seed{s}")] for s in (1, 2, 3)},
}
T_975 = {  # Student's t, 97.5% quantile, by degrees of freedom
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    21: 2.080,
    22: 2.074,
    23: 2.069,
    24: 2.064,
    25: 2.060,
    26: 2.056,
    27: 2.052,
    28: 2.048,
    29: 2.045,
    30: 2.042,
}


def run(model: str, seed: int, out: Path, extra: list[str], launch: bool = True) -> dict | None:
    """The summary of the run of ``model`` at training ``seed`` (run now unless already finished; None
    for an unfinished run when not ``launch``)."""
    run_dir = out / f"{model}-s{seed}"
    summary = run_dir / "summary.json"
    if not summary.exists() and not launch:
        return None
    if not summary.exists():
        command = [sys.executable, "-m", "ntkdyn.track", "--run", "dpo", "--no-track", "--seed", str(seed)]
        command += ["--model", *MODELS[model], "--out", str(run_dir), *extra]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return json.loads(summary.read_text())


def interval(values: list[float]) -> str:
    """mean [lo, hi] with a 95% t-interval over the values (mean only for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:+.3f}"
    half = T_975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def trajectory(run_dir: Path) -> dict[int, float]:
    """Oracle generation alignment at the steps evaluated during training (eval.jsonl rows without
    ``selected_step``: the last step's model is evaluated after the loop): step -> gen_alignment."""
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["gen_alignment"] for r in rows if "selected_step" not in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--out", default="runs/robustness", help="where the runs go")
    parser.add_argument(
        "--report-only", action="store_true", help="tabulate the finished runs; launch nothing"
    )
    parser.add_argument("extra", nargs="*", help="options passed on to ntkdyn.track (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    rows = [
        "| model | seed | gen before | gen, last step | und before | und, last step | selected step | "
        "gen, selected | oracle-best step (gen) |"
    ]
    rows.append("|---|---|---|---|---|---|---|---|---|")
    per_model, model_means, all_gains = [], [], []
    hits = {"selected (one-SE rule)": 0, "highest label-free score": 0, "last step": 0}
    runs = 0
    for model in args.models:
        last_gains, selected_gains, und_changes = [], [], []
        for seed in args.seeds:
            s = run(model, seed, out, args.extra, launch=not args.report_only)
            if s is None:
                continue
            before, after = s["before"], s["after"]
            selection = s.get("selection") or {}
            last = selection.get("after_last") or after
            curve = {**trajectory(out / f"{model}-s{seed}"), s["steps"]: last["gen_alignment"]}
            best_step = max(curve, key=curve.get)
            selected_step = selection.get("selected_step", s["steps"])
            rows.append(
                f"| {model} | {seed} | {before['gen_alignment']:.3f} | {last['gen_alignment']:.3f} | "
                f"{before['und_accuracy']:.3f} | {last['und_accuracy']:.3f} | {selected_step} | "
                f"{after['gen_alignment']:.3f} | {best_step} ({curve[best_step]:.3f}) |"
            )
            last_gains.append(last["gen_alignment"] - before["gen_alignment"])
            selected_gains.append(after["gen_alignment"] - before["gen_alignment"])
            und_changes.append(last["und_accuracy"] - before["und_accuracy"])
            runs += 1
            top_score = max(selection["points"], key=lambda p: p[1])[0] if selection else s["steps"]
            for rule, step in zip(hits, (selected_step, top_score, s["steps"]), strict=True):
                hits[rule] += curve[best_step] - curve[step] <= 0.01 + 1e-9
        if not last_gains:
            continue
        changes = " | ".join(interval(v) for v in (last_gains, und_changes, selected_gains))
        per_model.append(f"| {model} | {len(last_gains)} | {changes} |")
        model_means.append(statistics.fmean(last_gains))
        all_gains += last_gains
    print("\n".join(rows))
    print()
    print(
        "| model | seeds | gen_alignment change, last step (the default run's result): mean [95% "
        "t-interval over seeds] | und_accuracy change, last step | gen_alignment change, selected model "
        "(--select-every) |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(per_model))
    print()
    print(f"mean over the {len(model_means)} pre-trained models of their mean gain: {interval(model_means)}")
    print(f"pooled over all {len(all_gains)} runs: {interval(all_gains)}; min {min(all_gains):+.3f}")
    print(f"within 1 point of the oracle's best evaluated step, of {runs} runs:")
    for rule, count in hits.items():
        print(f"  {rule}: {count}")


if __name__ == "__main__":
    main()
