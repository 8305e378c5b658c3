"""The self-improvement comparison of BENCHMARKS.md ("## Self-improvement runs").

    python benchmarks/self_improvement.py [--out runs/bench] [--only NAME ...] [-- EXTRA TRACK ARGS]

Runs each row's ``python -m ntkdyn.track`` command (with --no-track, one after the other; a row whose
summary.json exists is not run again) and prints the markdown table: the pre-trained model, then every
run's ``after`` metrics on the eval prompts. Every row has the same training budget: the defaults
(2048 prompts, 30 epochs capped at 1000 optimizer steps) make every run take exactly 1000 steps.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROWS = {  # the defaults give every run the same budget (1000 optimizer steps)
    "sft-unfiltered": ["--run", "sft", "--judge", "none"],
    "sft-self": ["--run", "sft"],
    "sft-oracle": ["--run", "sft", "--judge", "oracle"],
    "sft-self-3-rounds": ["--run", "sft", "--rounds", "3"],
    "curriculum": ["--run", "curriculum", "--rounds", "3"],
    "dpo": ["--run", "dpo"],
    "sft-self-no-replay": ["--run", "sft", "--replay-weight", "0"],
    "dpo-no-nll": ["--run", "dpo", "--nll-weight", "0"],
    "dpo-lr-5e-5": ["--run", "dpo", "--lr", "5e-5"],
}
COLUMNS = [
    ("gen_alignment", "gen_alignment"),
    ("und_accuracy", "und_accuracy"),
    ("non_unification", "non_unification"),
    ("self_precision", "self_precision"),
    ("co/fp_rejected", "former FPs rejected"),
    ("co/tp_kept", "TPs kept"),
]


def command(name: str, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "ntkdyn.track", *ROWS[name], "--no-track", "--out", str(out / name), *extra]


def cell(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else "-"


def table(out: Path, names: list[str], extra: list[str]) -> str:
    """Markdown rows: the pre-trained model (from the first run) and each run's after metrics."""
    summaries = {
        n: json.loads((out / n / "summary.json").read_text())
        for n in names
        if (out / n / "summary.json").exists()
    }
    head = "| run | " + " | ".join(c for _, c in COLUMNS) + " | steps | wall (s) | command |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    if summaries:
        before = next(iter(summaries.values()))["before"]
        lines.append(
            "| pre-trained | " + " | ".join(cell(before.get(k)) for k, _ in COLUMNS) + " | 0 | - | - |"
        )
    for n, s in summaries.items():
        shown = ["python", "-m", "ntkdyn.track", *ROWS[n], "--no-track", *extra]
        flag = " (co-degradation)" if s["co_degradation"] else ""
        lines.append(
            f"| {n}{flag} | "
            + " | ".join(cell(s["after"].get(k)) for k, _ in COLUMNS)
            + f" | {s['steps']} | {s['wall_s']:.0f} | `{shlex.join(shown)}` |"
        )
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS))
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    for name in args.only:
        if (out / name / "summary.json").exists():
            continue
        start = time.time()
        subprocess.run(command(name, out, extra), check=True, stdout=subprocess.DEVNULL)
        print(f"{name}: {time.time() - start:.0f} s", file=sys.stderr)
    print(table(out, args.only, extra))


if __name__ == "__main__":
    main()
