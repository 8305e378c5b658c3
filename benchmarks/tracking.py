"""Tracking cost and prediction quality: plain, stored and tracked steps of the same run.

The default toy unified model (ToyConfig size, randomly initialised from seed 0, or a saved one
with --model-dir) trains with the default DPO objective of ``python -m ntkdyn.track --run dpo``
(AdamW at its default lr, beta, understanding anchor; batch of --batch pairs), each step as the trainer
runs it (trainer/loop.py: one forward and backward per loss source inside the split's context and the
hooks' ``recording``, clip, AdamW). Steps come in triples on one batch each (a step's cost depends on
its batch's lengths): a tracked step on a fresh batch, as in a run, then a plain and a stored step on the
same batch, timed on the same model in the same process:
  plain    no hook (the step is split by loss source on every step: SourceAttribution's cost included)
  stored   the gradient store (analysis/gradient_store.py, --store-k): every training sample's projected
           gradient captured from the step's own forward and backward and written to the run directory
  tracked  the tracker (before_step, the step, after_step): the probes' features and exact first order
           along every part of the split update (one recording per probe group), the training features
           and preconditioned features from the step's own backward, the Gram matrix, rows and kernels
The first triple is not timed (it calibrates the sample layouts with a full recording).
Times are CPU time of this process (time.process_time, summed over its threads), which other processes
sharing the machine do not inflate the way they inflate wall-clock time. For every projection size
and probe count of the grid, it prints the median step times, the store's overhead and the tracked /
plain ratio (medians over the batches of each step's ratio to its batch's plain step), the Pearson
correlation of predicted with observed change (exact first order, features) and of the kernel forms
(Adam-aware kernel, SGD form) with the exact current-step part, per branch over the run's tracked steps,
as a Markdown table.

    python benchmarks/tracking.py --ks 64 128 --probes 2 8  # the grid of BENCHMARKS.md
    python benchmarks/tracking.py --ks 128 --probes 8 --model-dir ntkdyn/models/pretrained/toy  # default
    python benchmarks/tracking.py --factored-from RUN_DIR   # error of the factored Adam preconditioner
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

from ntkdyn.analysis.gradient_store import GradientStore
from ntkdyn.analysis.projector import ProjectionConfig
from ntkdyn.analysis.summary import summarize_dynamics
from ntkdyn.config import TrackingConfig
from ntkdyn.models.scenes import oracle_of_images, world_images
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.rundir import RunDir, read_jsonl
from ntkdyn.shapes_probes import build_tracker
from ntkdyn.trainer.config import TrainConfig
from ntkdyn.trainer.data import anchor_pool
from ntkdyn.trainer.losses import source_loss_fns, source_terms
from ntkdyn.world import ShapesWorld


def build_adapter(model_dir: str | None) -> ToyAdapter:
    return (
        ToyAdapter.from_pretrained(model_dir) if model_dir else ToyAdapter.build(ShapesWorld(seed=0), seed=0)
    )


def pretrained_records(adapter: ToyAdapter, n_prompts: int) -> list[dict]:
    """The model's own judged generations on eval prompts (the tracker's probe pool)."""
    world = adapter.world
    prompts = world.prompts("eval")[:: max(1, len(world.prompts("eval")) // n_prompts)][:n_prompts]
    texts = [p.text for p in prompts]
    images = adapter.generate(texts, 2, generator=torch.Generator().manual_seed(0))
    flat, flat_texts = images.flatten(0, 1), [t for t in texts for _ in range(2)]
    with torch.no_grad():
        verdict = adapter.judge(flat, flat_texts).p_yes > 0.5
    oracle, _ = oracle_of_images(adapter, world, [p for p in prompts for _ in range(2)], flat)
    return [
        {"prompt": t, "image": x.tolist(), "verdict": bool(v), "oracle": o}
        for t, x, v, o in zip(flat_texts, flat, verdict, oracle, strict=True)
    ]


def dpo_batch(
    adapter: ToyAdapter, reference: ToyAdapter, size: int, step: int, cfg: TrainConfig, anchor
) -> dict:
    """size DPO pairs (chosen: a true scene of the prompt; rejected: a world negative of it) with the
    reference model's log-probs, plus the anchor pairs of the default run (``anchor``: AnchorPool)."""
    world = adapter.world
    rng = np.random.default_rng(step)
    train = world.prompts("train")
    prompts = [train[i] for i in rng.choice(len(train), size, replace=False)]
    chosen = [world.sample_image(p, rng) for p in prompts]
    rejected = [world.negatives(p, x, rng)[0][1] for p, x in zip(prompts, chosen, strict=True)]
    batch = {
        "prompts": [p.text for p in prompts],
        "images": world_images(adapter, world, chosen),
        "rejected": world_images(adapter, world, rejected),
    }
    with torch.no_grad():
        batch["ref_chosen"] = reference.gen_logprob(batch["prompts"], batch["images"])
        batch["ref_rejected"] = reference.gen_logprob(batch["prompts"], batch["rejected"])
    if anchor is not None:
        batch.update(anchor.batch(size, cfg.seed, step))
    return batch


def run(
    model_dir: str | None,
    kind: str,
    k: int | None,
    per_category: int,
    steps: int,
    batch_size: int,
    store_k: int,
) -> dict:
    cfg = TrainConfig(run="dpo")
    adapter, reference = build_adapter(model_dir), build_adapter(model_dir)
    model = adapter.model
    terms = source_terms(adapter, "dpo", cfg.beta, cfg.nll_weight, cfg.understanding_weight)
    loss_fns = source_loss_fns(terms)
    anchor = None
    if cfg.understanding_weight:
        train = adapter.world.prompts("train")
        anchor = anchor_pool(adapter, adapter.world, train, cfg.anchor_pool, cfg.anchor, cfg.seed)
    records = pretrained_records(adapter, 4 * per_category)
    projection = ProjectionConfig(kind=kind, k=k)
    settings = TrackingConfig(track_every=3, projection=projection, probes_per_category=per_category)
    times: dict[str, dict[int, float]] = {"plain": {}, "stored": {}, "tracked": {}}  # kind -> batch -> s
    with tempfile.TemporaryDirectory(prefix="ntkdyn-bench-") as out:
        tracker = build_tracker(adapter, adapter.world, out, settings, records)
        store = GradientStore(model, out, ProjectionConfig(kind="kronecker", k=store_k))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        split = tracker.attribute(opt, model.named_parameters(), tuple(loss_fns))
        model.train()
        for step in tqdm(range(1, steps + 1), desc=f"{kind} k={k} probes/cat={per_category}", leave=False):
            kind_of_step = ("tracked", "plain", "stored")[step % 3]
            hooks = {"tracked": [tracker], "stored": [store], "plain": []}[kind_of_step]
            if kind_of_step == "tracked" or step == 1:  # a fresh batch for the tracked step, as in a run;
                batch_id = step  # the plain and stored steps after it run on the same batch
                batch = dpo_batch(adapter, reference, batch_size, step, cfg, anchor)
            start = time.process_time()
            for hook in hooks:
                hook.before_step(step, model, loss_fns, batch)
            opt.zero_grad(set_to_none=True)
            for source, fn in loss_fns.items():  # the trainer's step (trainer/loop.py Trainer.backward)
                with contextlib.ExitStack() as stack:
                    stack.enter_context(split.source(source))
                    watchers = [stack.enter_context(h.recording(step, source, fn, batch)) for h in hooks]
                    losses = fn(model, batch)
                    for watch in filter(None, watchers):
                        watch(losses)
                    losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            for hook in hooks:
                hook.after_step(step, model, cfg.lr)
            if step > 3:  # steps 1-3 warm up (first AdamW step, projection factors, the calibrations)
                times[kind_of_step][batch_id] = time.process_time() - start
        summary = summarize_dynamics(read_jsonl(RunDir(out).dynamics))
        stored_rows = sum(1 for _ in RunDir(out).gradient_files())
    return {
        "kind": kind,
        "k": k,
        "probes": sum(len(g.batch["prompts"]) for g in tracker.probes),
        "D": tracker.projector.feature_dim,
        "store_D": store.projector.feature_dim,
        "store_files": stored_rows,
        **{f"{name}_s": statistics.median(values.values()) for name, values in times.items()},
        **{  # median over the batches of the ratio to the same batch's plain step
            f"{name}_ratio": statistics.median(
                t / times["plain"][b] for b, t in times[name].items() if b in times["plain"]
            )
            for name in ("stored", "tracked")
        },
        **{
            f"{b}_{name}": (summary[b] if name == "exact" else summary[b].get(name, {})).get(
                "pearson", float("nan")
            )
            for b in ("gen", "und")
            for name in ("exact", "features", "kernel_vs_current", "sgd_vs_current")
        },
    }


def factored_errors(run_dir: str) -> None:
    """Per weight matrix with a projected axis at the default k (the toy's 256-wide MLP matrices):
    ||D - r c^T|| / ||D|| of AdamW's preconditioner D = 1/(sqrt(v_hat) + eps) in a run's checkpoint (the
    toy model of ``python -m ntkdyn.track``) for the tracker's fit (sketches.factored), the best rank-one
    fit (SVD) and Adafactor's row/column means."""
    from ntkdyn.analysis.projector.sketches import factored
    from ntkdyn.config import TRACKING_K
    from ntkdyn.models import load_adapter
    from ntkdyn.state_file import load_state

    state = load_state(f"{run_dir}/checkpoint.safetensors")
    model = load_adapter("toy").model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    group = state["optimizer"]["param_groups"][0]
    print("| parameter | log least squares (used) | SVD rank one | Adafactor means |\n|---|---|---|---|")
    for index, name in zip(group["params"], names, strict=True):
        moments = state["optimizer"]["state"][index]
        v_hat = moments["exp_avg_sq"] / (1 - group["betas"][1] ** float(moments["step"]))
        d = (1 / (v_hat.sqrt() + group["eps"])).double()
        if d.dim() != 2 or max(d.shape) <= TRACKING_K:
            continue
        row, col = factored(d)
        u, sv, v = torch.linalg.svd(d)
        fits = (
            row[:, None] * col[None],
            sv[0] * u[:, :1] @ v[:1],
            d.mean(1, keepdim=True) * d.mean(0) / d.mean(),
        )
        errors = [float((d - fit).norm() / d.norm()) for fit in fits]
        print(f"| {name} | " + " | ".join(f"{e:.3f}" for e in errors) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", default=None, help="a saved ToyAdapter (default: random default-size toy)"
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128], help="kronecker factor sizes")
    parser.add_argument("--exact", action="store_true", help="also run kind='exact' (no projection)")
    parser.add_argument("--probes", type=int, nargs="+", default=[2, 8], help="probe pairs per category")
    parser.add_argument(
        "--steps",
        type=int,
        default=15,
        help="steps per configuration (cycling stored, plain, tracked; the first three untimed)",
    )
    parser.add_argument("--store-k", type=int, default=16, help="k of the gradient store's projection")
    parser.add_argument("--batch", type=int, default=32, help="DPO pairs per step")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time = compute)")
    parser.add_argument(
        "--factored-from",
        default=None,
        help="a run directory: only print the factored preconditioner's error",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.factored_from:
        factored_errors(args.factored_from)
        return
    configs = [("kronecker", k, p) for p in args.probes for k in args.ks]
    if args.exact:
        configs += [("exact", None, p) for p in args.probes]
    header = (
        "| kind | k | probes | D | plain step (CPU s) | store k | store D | stored step (CPU s) "
        "| store overhead | tracked step (CPU s) | tracked / plain "
        "| gen r exact | gen r features | gen r kernel~current | gen r sgd~current "
        "| und r exact | und r features | und r kernel~current | und r sgd~current |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kind, k, p in configs:
        r = run(args.model_dir, kind, k, p, args.steps, args.batch, args.store_k)
        print(
            f"| {r['kind']} | {r['k'] or '-'} | {r['probes']} | {r['D']} | {r['plain_s']:.3f} | "
            f"{args.store_k} | {r['store_D']} | {r['stored_s']:.3f} | "
            f"{100 * (r['stored_ratio'] - 1):+.0f}% | "
            f"{r['tracked_s']:.2f} | {r['tracked_ratio']:.1f}x | "
            + " | ".join(
                f"{r[f'{b}_{name}']:.3f}"
                for b in ("gen", "und")
                for name in ("exact", "features", "kernel_vs_current", "sgd_vs_current")
            )
            + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
