"""The self-improvement result over training seeds and independently pre-trained models (issue 13).

Runs ``python -m ntkdyn.track --run dpo --no-track`` (plus any extra options after ``--``) for every
pre-trained model x training seed, each into OUT/<model>-s<seed> (a run that has its summary.json is read
instead of re-run), and prints a Markdown table: per run, generation alignment and understanding
accuracy before and after (with ``--select-every``, "after" is the label-free selected model and the last
step's model is shown beside it); per model, the mean change over seeds with a 95% t-interval (none with
one seed), of the last step's model (the default run's result) and of "after".

    python benchmarks/robustness.py --seeds 0 1 2                  # 4 pre-trained models x 3 seeds
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
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run(model: str, seed: int, out: Path, extra: list[str]) -> dict:
    """The summary of the run of ``model`` at training ``seed`` (run now unless already finished)."""
    run_dir = out / f"{model}-s{seed}"
    summary = run_dir / "summary.json"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--out", default="runs/robustness", help="where the runs go")
    parser.add_argument("extra", nargs="*", help="options passed on to ntkdyn.track (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    rows = ["| model | seed | gen before | gen after | und before | und after | selected | gen, last step |"]
    rows.append("|---|---|---|---|---|---|---|---|")
    per_model = []
    for model in args.models:
        gains, last_gains, und_changes = [], [], []
        for seed in args.seeds:
            s = run(model, seed, out, args.extra)
            before, after = s["before"], s["after"]
            selection = s.get("selection") or {}
            last = selection.get("after_last") or after
            rows.append(
                f"| {model} | {seed} | {before['gen_alignment']:.3f} | {after['gen_alignment']:.3f} | "
                f"{before['und_accuracy']:.3f} | {after['und_accuracy']:.3f} | "
                f"{selection.get('selected_step', s['steps'])} | {last['gen_alignment']:.3f} |"
            )
            gains.append(after["gen_alignment"] - before["gen_alignment"])
            last_gains.append(last["gen_alignment"] - before["gen_alignment"])
            und_changes.append(after["und_accuracy"] - before["und_accuracy"])
        changes = " | ".join(interval(v) for v in (last_gains, gains, und_changes))
        per_model.append(f"| {model} | {len(gains)} | {changes} |")
    print("\n".join(rows))
    print()
    print(
        "| model | seeds | gen_alignment change, last step: mean [95% t-interval] | the same, after "
        "(selected model with --select-every) | und_accuracy change, after |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(per_model))


if __name__ == "__main__":
    main()
