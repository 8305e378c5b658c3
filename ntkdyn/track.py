"""Self-improvement of a unified model with its learning dynamics tracked.

    python -m ntkdyn.track --run {sft,dpo,curriculum} [--model NAME [PATH]] [--prompts P] [--out DIR]
        [--seed S] [--max-steps T] [--epochs E] [--rounds R] [--judge {self,oracle,none,inverted,noisy:P}]
        [--anchor {self,oracle,none}] [--resume] [--no-track] [--track-every K] [--proj-k K] ...
        (every option: --help)
    torchrun --nproc-per-node 2 -m ntkdyn.track -- --run dpo ...   (DDP: gloo on CPU, nccl on GPU; the
        "--" keeps torchrun from reading --run as its own --run-path)

0. parse and check the whole config tree (ntkdyn.config.RunConfig) and the run directory: every bad
   option fails here, before any model is loaded; 1. evaluate the pre-trained model on eval prompts
   (the ``before`` metrics, its judged generations and its understanding answers, kept in the run
   directory); 2. build the tracker (unless --no-track) and, for DPO, the squeezing log
   (ntkdyn.squeezing); 3. train
   (ntkdyn.trainer.loop.Trainer); 4. write ``summary.json``: ``before`` and ``after`` (the keys of
   ntkdyn.evaluate plus the co-improvement keys ``co/...``), ``delta``, ``judge``, ``anchor`` and
   ``external_labels_in_training``, the end-of-run report (ntkdyn.run_report: ``co_improvement`` with
   intervals, its random-direction null and verdict; ``oracle_change``; ``bayes_step``),
   ``co_degradation`` (both branches fell beyond their intervals), ``squeezing``, ``dynamics`` and
   ``ntk`` (tracking), ``selection`` (label-free checkpoint selection, --select-every K: ``after`` is
   then the selected step's model), and print a before/after table; 5. draw the figures (ntkdyn.plot;
   unless --no-figures). The run directory's files:
   ntkdyn.rundir and ARCHITECTURE.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch

from ntkdyn.analysis.gradient_store import GradientStore
from ntkdyn.analysis.projector import ProjectionConfig
from ntkdyn.analysis.summary import format_dynamics, mean_kernel_scalars
from ntkdyn.cli import config_parser, parse_config
from ntkdyn.co_improvement import co_improvement, judge_records
from ntkdyn.config import RunConfig, changed_options
from ntkdyn.evaluate import CandidateRecord, EvalResult, UnderstandingRecord, evaluate, read_prompts
from ntkdyn.models import load_adapter
from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.plot import plot_run
from ntkdyn.run_report import co_degradation, end_of_run_report, format_run_report
from ntkdyn.rundir import RunDir, read_json, read_jsonl, write_json, write_jsonl
from ntkdyn.shapes_probes import build_tracker, load_probes
from ntkdyn.squeezing import SqueezingLog, squeezing_summary
from ntkdyn.trainer.checkpoint import check_checkpoint
from ntkdyn.trainer.data import stratified_prompts
from ntkdyn.trainer.distributed import Dist, init_distributed, leave_process_group
from ntkdyn.trainer.loop import Trainer
from ntkdyn.world import Prompt, ShapesWorld

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


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    """The run's config from the command line, with its run directory checked (check_run_dir); a bad
    option or directory exits with the usage error (code 2) before any model is loaded."""
    parser = config_parser(
        RunConfig,
        "python -m ntkdyn.track",
        "Self-improvement of a unified model (self-scored SFT/DPO, curriculum) with evaluation "
        "before/after and learning-dynamics tracking.",
    )
    cfg = parse_config(parser, RunConfig, argv)
    try:
        check_run_dir(cfg)
    except ValueError as err:
        parser.error(str(err))
    return cfg


def check_run_dir(cfg: RunConfig) -> None:
    """An --out holding a run needs --resume with the same whole configuration and a checkpoint that
    loads without unpickling; otherwise --out must be empty."""
    run = RunDir(cfg.out)
    if run.config.exists():
        if not cfg.resume:
            raise ValueError(
                f"out: {run.root} holds a run (config.json); pass --resume to continue it "
                "or choose another --out"
            )
        changed = changed_options(read_json(run.config), cfg)
        if changed:
            raise ValueError(
                f"resume: options differ from the run in {run.root} (its config.json): " + "; ".join(changed)
            )
        check_checkpoint(run.root)
    elif run.root.exists() and any(run.root.iterdir()) and not cfg.resume:
        raise ValueError(f"out: {run.root} is not empty and holds no run; choose another --out")


def pretrained_evaluation(
    adapter: UnifiedAdapter, world: ShapesWorld, eval_prompts: Sequence[Prompt], cfg: RunConfig, dist: Dist
) -> EvalResult:
    """The pre-trained model's evaluation (its metrics, judged generations and understanding answers):
    computed on rank 0 once, kept in the run directory (pretrained/before.json, records.jsonl,
    und_records.jsonl) for resuming."""
    run = RunDir(cfg.out)
    files = (run.pretrained_before, run.pretrained_records, run.pretrained_und_records)
    if dist.is_main and not (cfg.resume and all(f.exists() for f in files)):
        run.pretrained_before.parent.mkdir(parents=True, exist_ok=True)
        result = evaluate_model(adapter, world, eval_prompts, cfg)
        write_jsonl(run.pretrained_records, (r.to_row() for r in result.records))
        write_jsonl(run.pretrained_und_records, (r.to_row() for r in result.und_records))
        p_yes = torch.tensor([r.p_yes for r in result.records])  # as the evaluation judged them
        write_json(run.pretrained_before, {**result.metrics, **co_improvement(p_yes, result.records)})
    dist.barrier()
    return EvalResult(
        read_json(run.pretrained_before),
        [CandidateRecord.from_row(row, world) for row in read_jsonl(run.pretrained_records)],
        [UnderstandingRecord.from_row(row, world) for row in read_jsonl(run.pretrained_und_records)],
    )


def evaluate_model(
    adapter: UnifiedAdapter, world: ShapesWorld, eval_prompts: Sequence[Prompt], cfg: RunConfig
) -> EvalResult:
    """The run's evaluation (cfg.eval) of the adapter's current model on the eval prompts."""
    return evaluate(
        adapter,
        world,
        eval_prompts,
        candidates=cfg.eval.eval_candidates,
        seed=cfg.train.seed,
        und_pairs=cfg.eval.eval_und_pairs,
    )


def summarize(before: dict, after: dict, cfg: RunConfig, oracle_change: dict | None = None) -> dict:
    """before/after/delta of the scalar metrics, what trained the run (anchor, judge, whether external
    labels entered training) and, given ``oracle_change`` (end_of_run_report), the co-degradation
    verdict: gen_alignment and und_accuracy both fell, each 95% interval of the change lying wholly
    below -cfg.eval.co_degradation_tol (None without ``oracle_change``)."""
    delta = {
        k: after[k] - before[k]
        for k in before
        if isinstance(before[k], float) and isinstance(after.get(k), float)
    }
    tol = cfg.eval.co_degradation_tol
    degraded = None if oracle_change is None else co_degradation(oracle_change, tol)
    return {
        "run": cfg.train.run,
        "judge": cfg.data.judge,
        "anchor": cfg.train.anchor,
        "external_labels_in_training": cfg.external_labels_in_training,
        "before": before,
        "after": after,
        "delta": delta,
        "co_degradation": degraded,
    }


def format_summary(summary: dict) -> str:
    """Before/after table of TABLE_KEYS."""

    def cell(x):
        return f"{x:9.3f}" if isinstance(x, float) else f"{'-':>9}"

    lines = []
    if "selection" in summary:
        sel = summary["selection"]
        stop = ", training stopped there: it had passed its best" if sel["stopped_early"] else ""
        lines.append(
            f"after = the model of step {sel['selected_step']} (label-free selection among "
            f"{len(sel['points'])} points; last step {sel['last_step']}{stop})"
        )
        if sel.get("after_last"):
            last = sel["after_last"]
            lines.append(
                f"the last step's model: gen_alignment {cell(last.get('gen_alignment')).strip()}, "
                f"und_accuracy {cell(last.get('und_accuracy')).strip()}"
            )
    lines.append(f"{'metric':<22}{'before':>9}{'after':>9}{'delta':>9}")
    for k in TABLE_KEYS:
        lines.append(
            f"{k:<22}{cell(summary['before'].get(k))}{cell(summary['after'].get(k))}"
            f"{cell(summary['delta'].get(k))}"
        )
    lines.extend(format_run_report(summary))
    if summary["co_degradation"]:
        lines.append(
            "CO-DEGRADATION: generation alignment and understanding accuracy both fell beyond their intervals"
        )
    if "dynamics" in summary:
        lines.append("")
        lines += format_dynamics(summary["dynamics"])
        lines.append("shared eNTK, mean over tracked steps")
        for key, value in summary["ntk"].items():
            lines.append(f"  {key:<34}{cell(value)}")
    return "\n".join(lines)


def run(cfg: RunConfig) -> dict:
    """Run (or resume) the run of ``cfg`` (checked by parse_args); returns its summary."""
    start = time.time()
    if cfg.inference_threads:
        torch.set_num_threads(cfg.inference_threads)
    dist = init_distributed()
    if cfg.train.batch_size % dist.world_size:
        raise ValueError(
            f"batch_size: {cfg.train.batch_size} is not divisible by the {dist.world_size} processes"
        )
    run_dir = RunDir(cfg.out)
    if dist.is_main:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        write_json(run_dir.config, cfg.to_dict())
    adapter = load_adapter(*cfg.model)
    adapter.model.to(dist.device)
    world = getattr(adapter, "world", None) or ShapesWorld(seed=0)
    if cfg.data.prompts.isdigit():
        prompts = stratified_prompts(world, "train", int(cfg.data.prompts), cfg.train.seed)
    else:
        prompts = read_prompts(cfg.data.prompts, world)
    eval_prompts = stratified_prompts(world, "eval", cfg.eval.eval_prompts, cfg.train.seed)
    pretrained_eval = pretrained_evaluation(adapter, world, eval_prompts, cfg, dist)
    before, pretrained_records = pretrained_eval.metrics, pretrained_eval.records

    hooks, tracker = [], None
    if cfg.track:
        records = [r.to_row() for r in pretrained_records]
        tracker = build_tracker(adapter, world, run_dir.root, cfg.tracking, records, dist.is_main)
        hooks.append(tracker)
    if cfg.tracking.store_k:
        store = ProjectionConfig(kind="kronecker", k=cfg.tracking.store_k, seed=cfg.tracking.projection.seed)
        hooks.append(GradientStore(adapter.model, run_dir.root, store, cfg.tracking.store_every))
    if cfg.track and cfg.train.objective == "dpo" and dist.is_main:  # rank 0 logs its share of the pairs
        probes = load_probes(run_dir.probes)
        hooks.append(SqueezingLog(adapter, run_dir.root, probes, cfg.tracking.track_every))

    # the last evaluation (rank 0) and its P(yes) of the frozen set, kept for the end-of-run report
    latest: dict[str, EvalResult | torch.Tensor] = {}

    def evaluate_fn(model_adapter: UnifiedAdapter) -> dict:
        latest["result"] = evaluate_model(model_adapter, world, eval_prompts, cfg)
        latest["p_yes"] = judge_records(model_adapter, pretrained_records)
        return {**latest["result"].metrics, **co_improvement(latest["p_yes"], pretrained_records)}

    trainer = Trainer(
        adapter,
        world,
        prompts,
        cfg.train,
        cfg.data,
        run_dir.root,
        evaluate_fn,
        dist=dist,
        hooks=hooks,
        selection=cfg.selection,
        step_threads=cfg.threads,
    )
    pretrained = {
        n: p.detach().to("cpu", copy=True) for n, p in adapter.model.named_parameters() if p.requires_grad
    }
    final = trainer.train(before, resume=cfg.resume)
    del trainer  # its DDP wrapper must be gone before the process group is (leave_process_group)
    after = {k: v for k, v in final.items() if k not in ("step", "selection")}
    end = {}
    if dist.is_main:
        end = end_of_run_report(
            adapter, world, cfg, pretrained_eval, pretrained, latest.get("result"), latest.get("p_yes")
        )
    summary = summarize(before, after, cfg, end.get("oracle_change"))
    summary.update(end)
    summary.update(steps=final["step"], wall_s=time.time() - start)
    if "selection" in final:
        summary["selection"] = final["selection"]
    if run_dir.squeezing.exists():
        summary["squeezing"] = squeezing_summary(read_jsonl(run_dir.squeezing))
    if tracker is not None:
        summary["dynamics"] = tracker.summary()
        summary["ntk"] = mean_kernel_scalars(read_jsonl(run_dir.ntk))
    if dist.is_main:
        write_json(run_dir.summary, summary)
        print(format_summary(summary))
        if cfg.figures:
            plot_run(run_dir.root)
            print(f"run directory: {run_dir.root} (figures in {run_dir.figures})")
        else:
            print(f"run directory: {run_dir.root} (figures: python -m ntkdyn.plot {run_dir.root})")
    if dist.enabled:
        leave_process_group()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ntkdyn.track``: exit code 0 (bad options exit with 2 before any model is loaded)."""
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
