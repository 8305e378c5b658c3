"""Tracking cost and prediction quality: plain, stored and tracked steps of the default run's training.

The default toy unified model (ToyConfig size, randomly initialised from seed 0, or a saved one
with --model-dir) trains with the default DPO objective of ``python -m ntkdyn.track --run dpo``
(AdamW at its default lr, beta, understanding anchor; batch of --batch pairs), each step as the trainer
runs it (trainer/loop.py: one forward and backward per loss source, inside the hooks' ``recording``
and, in a tracked run, the split's context, clip, AdamW). A step's cost depends on its batch's lengths,
so every ratio is of steps on the same batch, and the medians over the batches carry a 95%
percentile-bootstrap interval.
  store    the gradient store alone (analysis/gradient_store.py, --store-k; no tracker in the process,
           so no split, as in a run with the store alone): every training sample's projected gradient
           captured from the step's own forward and backward and written to the run directory; pairs of a
           plain and a stored step, in alternating order
  split    what a tracked run pays on every step: the step split by loss source (SourceAttribution)
           over the same step unsplit; pairs on the same batch, in alternating order
  tracked  per projection size and probe count: rounds of a tracked step on a fresh batch (as in a run:
           the probes' features and exact first order along every part of the split update, one recording
           per probe group; the training features and preconditioned features from the step's own
           backward; every feature product, rows and kernels), then two plain steps on that batch: the
           first pays what the tracked step leaves behind (its freed memory faulted back: up to +25% here
           with a small tracker), the second is steady; "plain" steps here are split, as every step of a
           tracked run is. tracked / plain = (tracked + after - plain) / plain; the run's overhead at the
           default --track-every N: split x (1 + (tracked / plain - 1) / N) - 1 (of the two medians)
Two floors go beside them, work that no implementation of each can skip:
  store floor    every nn.Linear output's Kronecker block (the store's k) formed in bare hooks, as any
                 capture from Python hooks must (a forward hook keeps the input, a hook on the output forms
                 (G P_out)^T (A P_in) per sample): no rules, checks or file, and nothing for the other
                 parameters (RMSNorm gains, embeddings), so the store itself costs more; pairs of a plain
                 and a hooked step on the store's batches, in alternating order
  tracked floor  the probes' forward and one summed backward (no per-sample work at all), their
                 re-evaluation, and one float32 product of the probes' feature rows with all the rows a
                 tracked step multiplies them with (probes, plain and preconditioned training rows, P Δθ)
                 over D random columns; timed once per timed round after the rounds (it does not depend
                 on the training batch), floor / plain = 1 + that time / the round's plain step
Times are CPU time of this process (time.process_time, summed over its threads), which other processes
sharing the machine do not inflate the way they inflate wall-clock time. Work is counted too, on one more
step of each kind after the timed ones (torch.utils.flop_counter: the FLOPs of matrix products, attention
and convolutions; elementwise work is not counted): the FLOP ratio is the step's cost over a plain step's
if its extra products ran at the plain step's FLOP rate; "at peak" is its cost if they ran at this CPU's
rate for a large square float32 product and nothing else cost (a floor: small products run slower).
Per configuration it also prints the Pearson correlation of predicted with observed change (exact first
order, features) and of the kernel forms (Adam-aware kernel, SGD form) with the exact current-step part,
per branch over the tracked steps, as a Markdown table.

    python benchmarks/tracking.py --ks 64 128 --probes 2 8  # the grid of BENCHMARKS.md
    python benchmarks/tracking.py --ks 128 --probes 8 --model-dir ntkdyn/models/pretrained/toy  # default
    python benchmarks/tracking.py --store-only --width 512  # the store on a wider random toy
    python benchmarks/tracking.py --factored-from RUN_DIR   # error of the factored Adam preconditioner
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ntkdyn.analysis.attribution import SourceAttribution
from ntkdyn.analysis.gradient_store import GradientStore
from ntkdyn.analysis.projector import ProjectionConfig
from ntkdyn.analysis.statistics import Interval, bootstrap_ci
from ntkdyn.analysis.summary import summarize_dynamics
from ntkdyn.analysis.tracker import DynamicsTracker
from ntkdyn.config import TrackingConfig
from ntkdyn.models.scenes import oracle_of_images, world_images
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.rundir import RunDir, read_jsonl
from ntkdyn.shapes_probes import build_tracker
from ntkdyn.trainer.config import TrainConfig
from ntkdyn.trainer.data import anchor_pool
from ntkdyn.trainer.losses import source_loss_fns, source_terms
from ntkdyn.world import ShapesWorld


def build_adapter(model_dir: str | None, width: int | None = None) -> ToyAdapter:
    """The saved toy in model_dir, else a randomly initialised one (seed 0): ToyConfig's size, or hidden
    size ``width`` with an MLP of 2 x width."""
    if model_dir:
        return ToyAdapter.from_pretrained(model_dir)
    size = {} if width is None else {"hidden_size": width, "intermediate_size": 2 * width}
    return ToyAdapter.build(ShapesWorld(seed=0), seed=0, **size)


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


class ToyStep:
    """The default DPO run's model, data and optimizer on the toy, and its training step as the trainer runs
    it (trainer/loop.py Trainer.backward: one forward and backward per loss source inside the split's
    context, when ``split`` is set, and every hook's ``recording``, clip, AdamW), timed in CPU seconds."""

    def __init__(self, model_dir: str | None, width: int | None, batch_size: int):
        self.cfg = cfg = TrainConfig(run="dpo")
        self.adapter, self.reference = build_adapter(model_dir, width), build_adapter(model_dir, width)
        self.model = self.adapter.model
        terms = source_terms(self.adapter, "dpo", cfg.beta, cfg.nll_weight, cfg.understanding_weight)
        self.loss_fns = source_loss_fns(terms)
        self.anchor = None
        if cfg.understanding_weight:
            train = self.adapter.world.prompts("train")
            self.anchor = anchor_pool(
                self.adapter, self.adapter.world, train, cfg.anchor_pool, cfg.anchor, cfg.seed
            )
        self.batch_size = batch_size
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.split: SourceAttribution | None = None
        self.model.train()

    def batch(self, seed: int) -> dict:
        return dpo_batch(self.adapter, self.reference, self.batch_size, seed, self.cfg, self.anchor)

    def __call__(self, step: int, batch: dict, hooks: list) -> float:
        start = time.process_time()
        for hook in hooks:
            hook.before_step(step, self.model, self.loss_fns, batch)
        self.opt.zero_grad(set_to_none=True)
        for source, fn in self.loss_fns.items():
            with contextlib.ExitStack() as stack:
                if self.split is not None:
                    stack.enter_context(self.split.source(source))
                watchers = [stack.enter_context(h.recording(step, source, fn, batch)) for h in hooks]
                losses = fn(self.model, batch)
                for watch in filter(None, watchers):
                    watch(losses)
                losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        for hook in hooks:
            hook.after_step(step, self.model, self.cfg.lr)
        return time.process_time() - start

    def flops(self, step: int, batch: dict, hooks: list) -> int:
        """The FLOPs of matrix products, attention and convolutions of one step (FlopCounterMode)."""
        counter = FlopCounterMode(display=False)
        with counter:
            self(step, batch, hooks)
        return counter.get_total_flops()


def run(
    model_dir: str | None,
    width: int | None,
    kind: str,
    k: int | None,
    per_category: int,
    rounds: int,
    batch_size: int,
    peak: float,
) -> dict:
    """Tracked steps of one projection size and probe count: after two plain steps, per round a tracked step
    on a fresh batch (as in a run), then two plain steps on the same batch, "after" (it pays what the
    tracked step left behind: the tracker's freed memory faulted back) and "plain" (steady). The first
    round is not timed. The model's trajectory is that of the earlier plain / stored / tracked triples. One
    more round, after the timed ones and the summary, counts the FLOPs of a tracked and a plain step; then
    the tracked floor is timed once per timed round, each over that round's plain step."""
    toy = ToyStep(model_dir, width, batch_size)
    records = pretrained_records(toy.adapter, 4 * per_category)
    projection = ProjectionConfig(kind=kind, k=k)
    settings = TrackingConfig(track_every=3, projection=projection, probes_per_category=per_category)
    times: dict[str, list[float]] = {"tracked": [], "after": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="ntkdyn-bench-") as out:
        tracker = build_tracker(toy.adapter, toy.adapter.world, out, settings, records)
        toy.split = tracker.attribute(toy.opt, toy.model.named_parameters(), tuple(toy.loss_fns))
        warm = toy.batch(1)
        for step in (1, 2):  # as in the grid's earlier tables: the first tracked step is AdamW's third
            toy(step, warm, [])
        for r in tqdm(range(1, rounds + 1), desc=f"{kind} k={k} probes/cat={per_category}", leave=False):
            batch = toy.batch(3 * r)
            for offset, name in enumerate(times):  # steps 3r, 3r+1, 3r+2: step 3r is tracked (every 3)
                seconds = toy(3 * r + offset, batch, [tracker] if name == "tracked" else [])
                if r > 1:  # round 1 calibrates the sample layouts with a full recording
                    times[name].append(seconds)
        summary = summarize_dynamics(read_jsonl(RunDir(out).dynamics))
        last, batch = 3 * (rounds + 1), toy.batch(3 * (rounds + 1))
        flops = {"tracked": toy.flops(last, batch, [tracker]), "plain": toy.flops(last + 1, batch, [])}
        with torch.no_grad():
            train_rows = sum(len(fn(toy.model, batch)) for fn in toy.loss_fns.values())
        probes = sum(len(g.batch["prompts"]) for g in tracker.probes)
        # the probes' rows times every row of F and the preconditioned training rows
        features = torch.randn(probes + 2 * train_rows + 1, tracker.projector.feature_dim)
        floors = [tracked_floor(toy, tracker, features) for _ in times["plain"]]
        del features
    # the tracked step's cost with the slowdown it leaves to the next step, over a steady plain step
    ratios = [
        (t + a - p) / p for t, a, p in zip(times["tracked"], times["after"], times["plain"], strict=True)
    ]
    return {
        "kind": kind,
        "k": k,
        "probes": probes,
        "D": tracker.projector.feature_dim,
        **{f"{name}_s": statistics.median(values) for name, values in times.items()},
        "tracked_ratio": median_interval(ratios),
        "floor_ratio": median_interval([1 + f / p for f, p in zip(floors, times["plain"], strict=True)]),
        **work(flops["tracked"], flops["plain"], statistics.median(times["plain"]), peak),
        **{
            f"{b}_{name}": (summary[b] if name == "exact" else summary[b].get(name, {})).get(
                "pearson", float("nan")
            )
            for b in ("gen", "und")
            for name in ("exact", "features", "kernel_vs_current", "sgd_vs_current")
        },
    }


def paired_steps(
    pairs: int, batch: Callable[[int], dict], steps: dict[str, Callable[[int, dict], float]], desc: str
) -> tuple[dict[str, list[float]], int]:
    """pairs + 2 pairs of the two kinds of step in ``steps`` (name -> step(step number, batch) -> CPU s),
    both on batch(i) for pair i, in alternating order, numbered 1, 2, ... across both; the first two pairs
    are not timed. Returns the times of each kind and the last step number."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names, step = list(steps), 0
    for i in tqdm(range(pairs + 2), desc=desc, leave=False):
        pair_batch = batch(i)
        for name in names[::-1] if i % 2 else names:
            step += 1
            seconds = steps[name](step, pair_batch)
            if i >= 2:
                times[name].append(seconds)
    return times, step


def store_overhead(
    model_dir: str | None, width: int | None, pairs: int, batch_size: int, store_k: int, peak: float
) -> dict:
    """The gradient store alone (no tracker in the process): pairs of a plain and a stored step on the same
    batch, in alternating order; the overhead is the median over the pairs of stored / plain - 1. The
    first two pairs are not timed (the store's calibration); one more pair after them counts the FLOPs."""
    toy = ToyStep(model_dir, width, batch_size)  # no split: a run with the store alone does not split
    with tempfile.TemporaryDirectory(prefix="ntkdyn-bench-") as out:
        store = GradientStore(toy.model, out, ProjectionConfig(kind="kronecker", k=store_k))
        steps = {"plain": lambda n, b: toy(n, b, []), "stored": lambda n, b: toy(n, b, [store])}
        times, step = paired_steps(pairs, lambda i: toy.batch(1000 + i), steps, f"store k={store_k}")
        batch = toy.batch(1000 + pairs + 2)
        flops = {"plain": toy.flops(step + 1, batch, []), "stored": toy.flops(step + 2, batch, [store])}
        files = sum(1 for _ in RunDir(out).gradient_files())
        if files != pairs + 3:  # what is timed must be a store that stored every step
            raise RuntimeError(f"the store wrote {files} step files for {pairs + 3} stored steps")
    return {
        "D": store.projector.feature_dim,
        "parameters": sum(p.numel() for p in toy.model.parameters()),
        **{f"{name}_s": statistics.median(values) for name, values in times.items()},
        "ratio": median_interval([s / p for s, p in zip(times["stored"], times["plain"], strict=True)]),
        **work(flops["stored"], flops["plain"], statistics.median(times["plain"]), peak),
    }


@contextlib.contextmanager
def bare_linear_capture(
    model: torch.nn.Module, k: int
) -> Iterator[tuple[list[tuple[torch.nn.Linear, torch.Tensor]], dict]]:
    """The store's floor: on every nn.Linear call a forward hook keeps the input A [B, T, d_in] and a hook
    on the output's gradient G [B, T, d_out] forms the per-sample block (G P_out)^T (A P_in) [B, k, k]
    (a [d, k] Gaussian factor; an axis of size <= k kept exact: None). Yields (blocks, factors): the
    (module, block) pairs in the order the backward formed them, and module -> (P_out, P_in)."""
    blocks: list[tuple[torch.nn.Linear, torch.Tensor]] = []
    factors: dict[torch.nn.Linear, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def keep(module: torch.nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        a, (p_out, p_in) = inputs[0].detach(), factors[module]

        def form(g: torch.Tensor) -> None:
            left = g if p_out is None else g @ p_out
            right = a if p_in is None else a @ p_in
            blocks.append((module, torch.bmm(left.transpose(1, 2), right)))

        output.register_hook(form)

    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            dims = (module.out_features, module.in_features)
            factors[module] = tuple(torch.randn(d, k) / k**0.5 if d > k else None for d in dims)
            handles.append(module.register_forward_hook(keep))
    try:
        yield blocks, factors
    finally:
        for handle in handles:
            handle.remove()


def store_floor(model_dir: str | None, width: int | None, pairs: int, batch_size: int, store_k: int) -> dict:
    """bare_linear_capture over a plain (unsplit) step, as store_overhead times the store: pairs on the
    same batch, alternating order, the first two not timed; ``outputs``: the blocks formed per step."""
    toy = ToyStep(model_dir, width, batch_size)
    outputs = []

    def bare(step: int, batch: dict) -> float:
        with bare_linear_capture(toy.model, store_k) as (blocks, _):
            seconds = toy(step, batch, [])
        outputs.append(len(blocks))
        return seconds

    steps = {"plain": lambda n, b: toy(n, b, []), "bare": bare}
    times, _ = paired_steps(pairs, lambda i: toy.batch(1000 + i), steps, f"store floor k={store_k}")
    return {
        "outputs": outputs[-1],
        **{f"{name}_s": statistics.median(values) for name, values in times.items()},
        "ratio": median_interval([b / p for b, p in zip(times["bare"], times["plain"], strict=True)]),
    }


def tracked_floor(toy: ToyStep, tracker: DynamicsTracker, features: torch.Tensor) -> float:
    """CPU seconds of what no tracked step can skip (module docstring, "tracked floor") on ``tracker``'s
    probe groups at the current weights; ``features`` [rows, D]: the first rows stand for the probes'."""
    probes = sum(len(g.batch["prompts"]) for g in tracker.probes)
    start = time.process_time()
    for g in tracker.probes:
        g.fn(toy.model, g.batch).sum().backward()
    toy.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for g in tracker.probes:
            g.fn(toy.model, g.batch)
    features[:probes] @ features.T
    return time.process_time() - start


def split_overhead(model_dir: str | None, width: int | None, pairs: int, batch_size: int) -> dict:
    """What a tracked run pays on every step, tracked or not: the step split by loss source
    (SourceAttribution, its ``last_parts`` unread as on an untracked step) over the same step unsplit.
    Two copies of the toy train side by side (the split does not change the update), a step of each on
    the same batch, in alternating order; the first two pairs are not timed."""
    unsplit, split = ToyStep(model_dir, width, batch_size), ToyStep(model_dir, width, batch_size)
    split.split = SourceAttribution(split.opt, split.model.named_parameters(), tuple(split.loss_fns))
    steps = {"unsplit": lambda n, b: unsplit(n, b, []), "split": lambda n, b: split(n, b, [])}
    times, _ = paired_steps(pairs, lambda i: unsplit.batch(2000 + i), steps, "split")
    return {
        **{f"{name}_s": statistics.median(values) for name, values in times.items()},
        "ratio": median_interval([s / p for s, p in zip(times["split"], times["unsplit"], strict=True)]),
    }


def peak_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOPs per CPU second of the fastest of ``repeats`` float32 [n, n] @ [n, n] products: this CPU's rate
    for a large square product at the benchmark's thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        seconds.append(time.process_time() - start)
    return 2 * n**3 / min(seconds)


def work(flops: int, plain_flops: int, plain_s: float, peak: float) -> dict:
    """GFLOP of the step and of a plain step on its batch; flop_ratio = flops / plain_flops (the step's cost
    if its extra products ran at the plain step's rate); at_peak = 1 + (flops - plain_flops) / (peak x
    plain_s) (its cost if they ran at ``peak`` FLOP/s and nothing else cost)."""
    return {
        "gflop": flops / 1e9,
        "plain_gflop": plain_flops / 1e9,
        "flop_ratio": flops / plain_flops,
        "at_peak": 1 + (flops - plain_flops) / (peak * plain_s),
    }


def median_interval(values: list[float]) -> Interval:
    """The median with its 95% percentile-bootstrap interval (1000 resamples of the batches)."""
    return bootstrap_ci(lambda x: float(np.median(x)), np.asarray(values))


def overhead(ratio: Interval) -> str:
    """A ratio to the plain step as an overhead in percent, with its interval: "+25% [+18, +31]"."""
    return f"{100 * (ratio.estimate - 1):+.0f}% [{100 * (ratio.lo - 1):+.0f}, {100 * (ratio.hi - 1):+.0f}]"


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
    parser.add_argument(
        "--width", type=int, default=None, help="hidden size of the random toy (MLP 2x; default ToyConfig's)"
    )
    parser.add_argument("--store-only", action="store_true", help="only the gradient store's overhead")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128], help="kronecker factor sizes")
    parser.add_argument("--exact", action="store_true", help="also run kind='exact' (no projection)")
    parser.add_argument("--probes", type=int, nargs="+", default=[2, 8], help="probe pairs per category")
    parser.add_argument(
        "--rounds", type=int, default=15, help="tracked steps per configuration (the first untimed)"
    )
    parser.add_argument("--store-pairs", type=int, default=30, help="timed pairs (store, split)")
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
    peak = peak_rate()
    print(f"peak rate: {peak / 1e9:.0f} GFLOP per CPU second (float32 2048^3, threads: {args.threads})")
    store = store_overhead(args.model_dir, args.width, args.store_pairs, args.batch, args.store_k, peak)
    print(
        f"gradient store (k = {args.store_k}, D = {store['D']}, a model of {store['parameters']} parameters, "
        f"{args.store_pairs} pairs): plain step "
        f"{store['plain_s']:.3f} s, stored step {store['stored_s']:.3f} s, "
        f"overhead {overhead(store['ratio'])}; "
        f"{store['gflop']:.2f} GFLOP against {store['plain_gflop']:.2f}: "
        f"{100 * (store['flop_ratio'] - 1):+.1f}% at the plain step's rate, "
        f"{100 * (store['at_peak'] - 1):+.1f}% at peak\n"
    )
    floor = store_floor(args.model_dir, args.width, args.store_pairs, args.batch, args.store_k)
    print(
        f"store floor ({floor['outputs']} nn.Linear outputs' blocks in bare hooks, nothing else; "
        f"{args.store_pairs} pairs): plain step {floor['plain_s']:.3f} s, with the hooks "
        f"{floor['bare_s']:.3f} s, overhead {overhead(floor['ratio'])}\n"
    )
    if args.store_only:
        return
    split = split_overhead(args.model_dir, args.width, args.store_pairs, args.batch)
    every = TrackingConfig().track_every
    print(
        f"the split, on every step of a tracked run ({args.store_pairs} pairs): unsplit step "
        f"{split['unsplit_s']:.3f} s, split step {split['split_s']:.3f} s, "
        f"overhead {overhead(split['ratio'])}\n"
        f"(below, 'plain' is a split step; a run tracked every {every} steps costs about "
        f"split x (1 + (tracked / plain - 1) / {every}) of an untracked one: the last column)\n"
    )
    configs = [("kronecker", k, p) for p in args.probes for k in args.ks]
    if args.exact:
        configs += [("exact", None, p) for p in args.probes]
    header = (
        "| kind | k | probes | D | plain step (CPU s) | step after a tracked one (CPU s) "
        "| tracked step (CPU s) | tracked / plain | tracked floor / plain "
        "| GFLOP tracked / plain | FLOP ratio | at peak "
        "| gen r exact | gen r features | gen r kernel~current | gen r sgd~current "
        "| und r exact | und r features | und r kernel~current | und r sgd~current "
        f"| run overhead at --track-every {every} |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kind, k, p in configs:
        r = run(args.model_dir, args.width, kind, k, p, args.rounds, args.batch, peak)
        tracked = r["tracked_ratio"]
        print(
            f"| {r['kind']} | {r['k'] or '-'} | {r['probes']} | {r['D']} | {r['plain_s']:.3f} | "
            f"{r['after_s']:.3f} | {r['tracked_s']:.2f} | "
            f"{tracked.estimate:.1f}x [{tracked.lo:.1f}, {tracked.hi:.1f}] | "
            f"{r['floor_ratio'].estimate:.1f}x [{r['floor_ratio'].lo:.1f}, {r['floor_ratio'].hi:.1f}] | "
            f"{r['gflop']:.1f} / {r['plain_gflop']:.1f} | {r['flop_ratio']:.1f}x | {r['at_peak']:.1f}x | "
            + " | ".join(
                f"{r[f'{b}_{name}']:.3f}"
                for b in ("gen", "und")
                for name in ("exact", "features", "kernel_vs_current", "sgd_vs_current")
            )
            + f" | {100 * (split['ratio'].estimate * (1 + (tracked.estimate - 1) / every) - 1):+.0f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
