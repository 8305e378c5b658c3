"""Self-improvement of a unified model with its learning dynamics tracked.

    python -m ntkdyn.track --run {sft,dpo,curriculum} [--model NAME [PATH]] [--prompts P] [--out DIR]
        [--seed S] [--max-steps T] [--epochs E] [--rounds R] [--judge {self,oracle,none}] [--resume]
        [--no-track] ...   (every option: --help)
    torchrun --nproc-per-node 2 -m ntkdyn.track -- --run dpo ...   (DDP: gloo on CPU, nccl on GPU; the
        "--" keeps torchrun from reading --run as its own --run-path)

1. evaluate the pre-trained model on eval prompts (the ``before`` metrics and its judged generations,
   kept in the run directory); 2. build the tracker (unless --no-track); 3. train (ntkdyn.trainer.loop);
4. write ``summary.json``: ``before`` and ``after`` (the keys of ntkdyn.evaluate plus the co-improvement
   keys ``co/...``), ``delta``, ``co_degradation`` (both branches fell), and print a before/after table.
Run directory: config.json, pretrained/{before.json,records.jsonl}, data/round_R.{safetensors,jsonl},
the logs metrics.jsonl, eval.jsonl, data.jsonl (every top-level *.jsonl is a log, cut back to the
checkpoint on resume), checkpoint.pt, summary.json (+ the tracker's files, dynamics.jsonl among them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ntkdyn.analysis.dynamics import TrackingConfig, read_jsonl
from ntkdyn.evaluate import CandidateRecord, evaluate, read_prompts
from ntkdyn.models import load_adapter
from ntkdyn.plot import plot_run
from ntkdyn.trainer.config import RunConfig, add_dataclass_arguments, build_parser, config_from_args
from ntkdyn.trainer.data import stratified_prompts
from ntkdyn.trainer.distributed import Dist, init_distributed
from ntkdyn.trainer.loop import co_improvement, train
from ntkdyn.world import ShapesWorld

TABLE_KEYS = (
    "gen_alignment",
    "und_accuracy",
    "non_unification",
    "weak_generation",
    "self_precision",
    "false_positive_rate",
    "false_negative_rate",
    "co/fp_rejected",
    "co/tp_kept",
    "co/und_win",
)


def parser() -> argparse.ArgumentParser:
    """The CLI: RunConfig and its parts (ntkdyn.trainer.config) plus the tracker's TrackingConfig."""
    p = build_parser()
    add_dataclass_arguments(p.add_argument_group("TrackingConfig"), TrackingConfig)
    return p


def check_run_dir(cfg: RunConfig) -> None:
    """An --out holding a run needs --resume with the same configuration; otherwise it must be empty."""
    run_dir = Path(cfg.out)
    saved = run_dir / "config.json"
    if saved.exists():
        if not cfg.resume:
            raise ValueError(
                f"out: {run_dir} holds a run (config.json); pass --resume to continue it "
                f"or choose another --out"
            )
        old, new = flatten(json.loads(saved.read_text())), flatten(cfg.to_dict())
        diff = sorted(k for k in old.keys() | new.keys() if k != "resume" and old.get(k) != new.get(k))
        if diff:
            raise ValueError(
                f"resume: the options {diff} differ from the run in {run_dir} (see its config.json)"
            )
    elif run_dir.exists() and any(run_dir.iterdir()) and not cfg.resume:
        raise ValueError(f"out: {run_dir} is not empty and holds no run; choose another --out")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def record_dict(r: CandidateRecord) -> dict:
    """A judged generation as plain data (the form of the tracker's probes and pretrained/records.jsonl)."""
    return {
        "prompt": r.prompt.text,
        "category": r.prompt.category,
        "image": r.image.tolist(),
        "p_yes": r.p_yes,
        "verdict": r.verdict,
        "oracle": r.oracle,
        "parsed": r.parsed,
    }


def pretrained_evaluation(adapter, world: ShapesWorld, eval_prompts, cfg: RunConfig, dist: Dist):
    """(before metrics, the pre-trained model's judged generations as CandidateRecords): computed on
    rank 0 once, kept in the run directory (pretrained/before.json, pretrained/records.jsonl) for resuming."""
    folder = Path(cfg.out) / "pretrained"  # not a top-level *.jsonl: those are logs, cut back on resume
    before_path, records_path = folder / "before.json", folder / "records.jsonl"
    if dist.is_main and not (cfg.resume and before_path.exists() and records_path.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        result = evaluate(
            adapter, world, eval_prompts, candidates=cfg.eval.eval_candidates, seed=cfg.train.seed
        )
        before = {**result.metrics, **co_improvement(adapter, result.records)}
        with open(records_path.with_suffix(".tmp"), "w") as f:
            f.writelines(json.dumps(record_dict(r)) + "\n" for r in result.records)
        os.replace(records_path.with_suffix(".tmp"), records_path)
        before_path.with_suffix(".tmp").write_text(json.dumps(before, indent=1))
        os.replace(before_path.with_suffix(".tmp"), before_path)
    dist.barrier()
    before = json.loads(before_path.read_text())
    rows = [json.loads(line) for line in records_path.read_text().splitlines()]
    records = [
        CandidateRecord(
            prompt=world.parse_prompt(r["prompt"]),
            image=torch.tensor(r["image"]),
            p_yes=r["p_yes"],
            verdict=r["verdict"],
            oracle=r["oracle"],
            parsed=r["parsed"],
        )
        for r in rows
    ]
    return before, records


def summarize(before: dict, after: dict, cfg: RunConfig) -> dict:
    """before/after/delta of the scalar metrics and the co-degradation flag (gen_alignment and
    und_accuracy both fell by more than cfg.eval.co_degradation_tol)."""
    delta = {
        k: after[k] - before[k]
        for k in before
        if isinstance(before[k], float) and isinstance(after.get(k), float)
    }
    tol = cfg.eval.co_degradation_tol
    co_degradation = delta.get("gen_alignment", 0.0) < -tol and delta.get("und_accuracy", 0.0) < -tol
    return {
        "run": cfg.train.run,
        "before": before,
        "after": after,
        "delta": delta,
        "co_degradation": co_degradation,
    }


def format_summary(summary: dict) -> str:
    """Before/after table of TABLE_KEYS."""

    def cell(x):
        return f"{x:9.3f}" if isinstance(x, float) else f"{'-':>9}"

    lines = [f"{'metric':<22}{'before':>9}{'after':>9}{'delta':>9}"]
    for k in TABLE_KEYS:
        lines.append(
            f"{k:<22}{cell(summary['before'].get(k))}{cell(summary['after'].get(k))}"
            f"{cell(summary['delta'].get(k))}"
        )
    if summary["co_degradation"]:
        lines.append("CO-DEGRADATION: generation alignment and understanding accuracy both fell")
    if "dynamics" in summary:
        lines.append("")
        lines.append("predicted vs observed change of the probes (pearson; exact first order, features)")
        for branch, stats in summary["dynamics"].items():
            features = stats.get("features", {}).get("pearson")
            lines.append(
                f"  {branch:<8} exact {cell(stats.get('pearson'))}  features {cell(features)}  "
                f"sign agreement {cell(stats.get('sign_agreement'))}  n={stats.get('n')}"
            )
        lines.append("shared eNTK, mean over tracked steps")
        for key, value in summary["ntk"].items():
            lines.append(f"  {key:<34}{cell(value)}")
    return "\n".join(lines)


def mean_ntk_scalars(run_dir: Path) -> dict:
    """Mean over tracked steps of the shared-kernel scalars of dynamics.jsonl's ntk rows
    (ntk/cross_cos/* and ntk/alignment/* without a per-category suffix)."""
    rows = [r for r in read_jsonl(run_dir / "dynamics.jsonl") if r.get("kind") == "ntk"]
    keys = [k for k in (rows[0] if rows else {}) if k.startswith(("ntk/cross_cos/", "ntk/alignment/"))]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys if k.count("/") == 2}


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_run_dir(cfg)
    except ValueError as err:
        p.error(str(err))
    start = time.time()
    torch.set_num_threads(cfg.threads)
    dist = init_distributed()
    run_dir = Path(cfg.out)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    adapter = load_adapter(*cfg.model)
    adapter.model.to(dist.device)
    world = getattr(adapter, "world", None) or ShapesWorld(seed=0)
    if cfg.data.prompts.isdigit():
        prompts = stratified_prompts(world, "train", int(cfg.data.prompts), cfg.train.seed)
    else:
        prompts = read_prompts(cfg.data.prompts, world)
    eval_prompts = stratified_prompts(world, "eval", cfg.eval.eval_prompts, cfg.train.seed)
    before, pretrained_records = pretrained_evaluation(adapter, world, eval_prompts, cfg, dist)

    hooks = []
    if cfg.track:
        # ---- the learning-dynamics tracker (issue 5) is built here -------------------------------
        from ntkdyn.analysis.dynamics import build_tracker

        hooks.append(
            build_tracker(adapter, world, run_dir, args, [record_dict(r) for r in pretrained_records])
        )
        # ----------------------------------------------------------------------------------------------

    def evaluate_fn(model_adapter) -> dict:
        result = evaluate(
            model_adapter, world, eval_prompts, candidates=cfg.eval.eval_candidates, seed=cfg.train.seed
        )
        return {**result.metrics, **co_improvement(model_adapter, pretrained_records)}

    final = train(adapter, world, prompts, cfg, dist, evaluate_fn, before, hooks)
    summary = summarize(before, {k: v for k, v in final.items() if k != "step"}, cfg)
    summary.update(steps=final["step"], wall_s=time.time() - start)
    if hooks:
        summary["dynamics"] = hooks[0].summary()
        summary["ntk"] = mean_ntk_scalars(run_dir)
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary))
        plot_run(run_dir)
        print(f"run directory: {run_dir} (figures in {run_dir / 'figures'})")
    if dist.enabled:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
