"""The self-improvement training loop (SFT / DPO / curriculum), top to bottom.

    for round r in 0..rounds-1:
        data:   Algorithm 1 on all training prompts (round 0, and every round of an iterated sft/dpo run)
                or Algorithm 2 on the discard pool (rounds r > 0 of a curriculum run, data added)
        train:  steps on the round's data; each step takes the next batch_size items of the round's
                stream (seeded permutations of the data, one per epoch, concatenated), adds one
                understanding-replay pair per item, calls the hooks' before_step, runs the micro-batches
                (DDP: this rank's share of the batch), clips, steps AdamW, calls after_step, logs
        evaluate every eval_every steps and at the end; checkpoint every checkpoint_every steps and at
        the end of every round
Step numbers count optimizer steps from 1 (the row of step s is written after the s-th update; step 0
is the pre-trained model). The learning rate is a function of the position in the round: linear
warm-up over warmup_steps, then cosine / linear decay to 0 or constant.

Hooks (the learning-dynamics tracker) are objects with
    before_step(step, model, loss_fn, batch)  before any forward/backward of the step
    after_step(step, model, lr)               right after optimizer.step()
and optionally state_dict()/load_state_dict(state) (saved in the checkpoint). ``model`` is always the
underlying nn.Module (never the DDP wrapper), and while a hook runs ``adapter.model`` is that module.
``batch`` is this rank's share of the step's batch, all micro-batches concatenated (the whole batch in
one process); ``loss_fn(model, batch) -> Tensor[B]`` is the per-sample training loss whose mean over
the batch is the step's loss: the SFT or DPO term, the NLL on chosen and the understanding replay of
the same item (batch keys: ntkdyn.trainer.losses). Not included: nothing (weight decay is applied by
AdamW outside the loss).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.trainer.checkpoint import JsonlLogger, load_checkpoint, save_checkpoint, truncate_logs
from ntkdyn.trainer.config import RunConfig, TrainConfig
from ntkdyn.trainer.data import (
    TrainSet,
    accepted_mask,
    build_train_set,
    collect_candidates,
    load_round,
    replay_batch,
    save_round,
    seeded_generator,
    select,
    to_device,
)
from ntkdyn.trainer.distributed import Dist
from ntkdyn.trainer.losses import make_loss_fn, objective_terms
from ntkdyn.world import Prompt, ShapesWorld

EvaluateFn = Callable[[UnifiedAdapter], dict]


def learning_rate(cfg: TrainConfig, k: int, steps: int) -> float:
    """lr of the k-th step (0-based) of a round of ``steps`` steps: warm-up, then the schedule."""
    if k < cfg.warmup_steps:
        return cfg.lr * (k + 1) / (cfg.warmup_steps + 1)
    progress = (k - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr


def round_steps(cfg: TrainConfig, round_index: int, size: int) -> int:
    """Optimizer steps of a round with ``size`` items: ceil(epochs * size / batch_size), capped by the
    round's share of max_steps (max_steps // rounds, the remainder to the last round; max_steps 0: no cap);
    0 without data."""
    steps = math.ceil(cfg.epochs * size / cfg.batch_size)
    if cfg.max_steps:
        share = cfg.max_steps // cfg.rounds
        share += cfg.max_steps - share * cfg.rounds if round_index == cfg.rounds - 1 else 0
        steps = min(steps, share)
    return steps


def stream_indices(size: int, batch_size: int, k: int, seed: int, round_index: int) -> torch.Tensor:
    """Item indices of the round's k-th batch: positions [k*B, (k+1)*B) of the concatenated per-epoch
    permutations of range(size) (epoch e permuted by a generator seeded with (seed, round, e))."""
    position, out = k * batch_size, []
    while sum(len(o) for o in out) < batch_size:
        epoch, offset = divmod(position, size)
        perm = torch.randperm(size, generator=seeded_generator(seed, round_index, 1000 + epoch))
        take = perm[offset : offset + batch_size - sum(len(o) for o in out)]
        out.append(take)
        position += len(take)
    return torch.cat(out)


def trained_parameters(adapter: UnifiedAdapter, which: str) -> list[nn.Parameter]:
    """Set requires_grad on exactly the trained parameters ("shared": adapter.shared_parameter_names(),
    "all": every parameter) and return them in model order."""
    model = adapter.model
    names = {n for n, _ in model.named_parameters()}
    chosen = set(adapter.shared_parameter_names()) if which == "shared" else names
    unknown = chosen - names
    if unknown:
        raise ValueError(f"shared_parameter_names() lists parameters the model lacks: {sorted(unknown)[:5]}")
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return [p for n, p in model.named_parameters() if n in chosen]


@contextlib.contextmanager
def running(adapter: UnifiedAdapter, model: nn.Module):
    """Temporarily make ``adapter.model`` the given module (the DDP wrapper or the raw model)."""
    saved = adapter.model
    adapter.model = model
    try:
        yield
    finally:
        adapter.model = saved


def collect_round(
    adapter: UnifiedAdapter,
    world: ShapesWorld,
    prompts: Sequence[Prompt],
    cfg: RunConfig,
    round_index: int,
    pool: torch.Tensor | None,
    previous: TrainSet | None,
    dist: Dist,
) -> tuple[TrainSet, torch.Tensor, dict]:
    """The data of a round: (training set, discard pool after it, a row describing the round).

    Algorithm 1 on every prompt, except in rounds r > 0 of a curriculum run: Algorithm 2, only the pool
    (prompts with no accepted candidate so far) is regenerated and judged by the current model, and what
    it now accepts is added to ``previous``. pool: LongTensor of run-level prompt indices."""
    dc, objective = cfg.data, cfg.train.objective
    revisit = cfg.train.run == "curriculum" and round_index > 0
    index = pool if revisit else torch.arange(len(prompts))
    adapter.model.eval()
    candidates = collect_candidates(
        adapter,
        world,
        [prompts[i] for i in index.tolist()],
        index,
        dc.candidates,
        dc.temperature,
        dc.gen_batch,
        cfg.train.seed,
        round_index,
        dist,
    )
    accepted = accepted_mask(candidates, dc.judge, dc.accept_threshold)
    thresholds = (dc.sft_threshold, dc.dpo_margin) if dc.judge == "self" else (0.0, 0.0)
    selection = select(candidates.p_yes, accepted, *thresholds)
    new = build_train_set(adapter, candidates, selection, prompts, objective, dc.gen_batch, dist)
    new_pool = index[selection.discard]
    train_set = previous.concat(new) if revisit else new
    row = {
        "round": round_index,
        "kind": "curriculum" if revisit else "collect",
        "prompts": len(index),
        "added_prompts": len(index) - len(new_pool),
        "added_items": len(new),
        "pool": len(new_pool),
        "candidate_precision": candidates.oracle.float().mean().item(),
        "accept_rate": accepted.float().mean().item(),
        **train_set.stats(),
    }
    if dist.is_main:
        save_round(
            Path(cfg.out), round_index, prompts, candidates, accepted, selection, train_set, new_pool, row
        )
    dist.barrier()
    return train_set, new_pool, row


def train(
    adapter: UnifiedAdapter,
    world: ShapesWorld,
    prompts: Sequence[Prompt],
    cfg: RunConfig,
    dist: Dist,
    evaluate_fn: EvaluateFn,
    before: dict,
    hooks: Sequence = (),
) -> dict:
    """Run (or resume, when cfg.resume) the training of cfg in cfg.out; returns the final evaluation.

    prompts: the training prompts; evaluate_fn(adapter) -> metrics on the eval prompts (run on rank 0);
    before: those metrics of the pre-trained model (logged as step 0)."""
    tc = cfg.train
    run_dir = Path(cfg.out)
    if tc.batch_size % dist.world_size:
        raise ValueError(f"batch_size: {tc.batch_size} is not divisible by the {dist.world_size} processes")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    raw = adapter.model
    params = trained_parameters(adapter, tc.trainable)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    terms_fn = objective_terms(adapter, tc.objective, tc.beta, tc.nll_weight, tc.replay_weight)
    loss_fn = make_loss_fn(terms_fn)
    ddp = DistributedDataParallel(raw) if dist.enabled else raw
    metrics_log = JsonlLogger(run_dir / "metrics.jsonl", dist.is_main)
    eval_log = JsonlLogger(run_dir / "eval.jsonl", dist.is_main)
    data_log = JsonlLogger(run_dir / "data.jsonl", dist.is_main)

    def evaluate_now(step: int) -> dict:
        raw.eval()
        metrics = evaluate_fn(adapter) if dist.is_main else None
        metrics = dist.broadcast_object(metrics)
        eval_log.log({"step": step, **metrics})
        return metrics

    def checkpoint(step: int, round_index: int, round_step: int, pool: torch.Tensor) -> None:
        if dist.is_main:
            save_checkpoint(
                run_dir,
                {
                    "step": step,
                    "round": round_index,
                    "round_step": round_step,
                    "pool": pool,
                    "model": raw.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in hooks],
                },
            )
        dist.barrier()

    # 1. start or resume: position (step, round, step in round), model, optimizer, hooks, logs
    state = load_checkpoint(run_dir) if cfg.resume else None
    if state is None:
        if dist.is_main:
            truncate_logs(run_dir, {})
        step, start_round, start_k, pool = 0, 0, 0, torch.arange(len(prompts))
        eval_log.log({"step": 0, **before})
        checkpoint(0, 0, 0, pool)
    else:
        if dist.is_main:
            truncate_logs(run_dir, state["logs"])
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for h, h_state in zip(hooks, state["hooks"], strict=False):  # a stateless extra hook may differ
            if h_state is not None:
                h.load_state_dict(h_state)
        step, start_round, start_k, pool = state["step"], state["round"], state["round_step"], state["pool"]
        dist.barrier()

    train_set = None
    for r in range(start_round, tc.rounds):
        # 2. the round's data (made by an earlier life of this run if the file exists)
        path = run_dir / "data" / f"round_{r}.safetensors"
        if cfg.resume and path.exists():
            train_set, pool, row = load_round(path)
        else:
            train_set, pool, row = collect_round(adapter, world, prompts, cfg, r, pool, train_set, dist)
        k0 = start_k if r == start_round else 0
        if k0 == 0:
            data_log.log({"step": step, **row})
        steps = round_steps(tc, r, len(train_set))

        # 3. the round's optimizer steps
        raw.train()
        for k in tqdm(range(k0, steps), desc=f"{tc.objective} round {r}", disable=not dist.is_main):
            step += 1
            lr = learning_rate(tc, k, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = stream_indices(len(train_set), tc.batch_size, k, tc.seed, r)
            batch = train_set.batch(index)
            if tc.replay_weight:
                batch.update(replay_batch(adapter, world, prompts, tc.batch_size, tc.seed, step))
            share = tc.batch_size // dist.world_size
            local = to_device(slice_batch(batch, dist.rank * share, (dist.rank + 1) * share), dist.device)

            with running(adapter, raw):
                for h in hooks:
                    h.before_step(step, raw, loss_fn, local)
            sums: dict[str, torch.Tensor] = {}
            starts = list(range(0, share, tc.micro_batch_size))
            with running(adapter, ddp):
                for i, s in enumerate(starts):
                    micro = slice_batch(local, s, s + tc.micro_batch_size)
                    sync = i == len(starts) - 1 or not dist.enabled
                    with contextlib.nullcontext() if sync else ddp.no_sync():
                        terms = terms_fn(ddp, micro)
                        (terms["loss"].sum() / share).backward()
                    for name, value in terms.items():
                        sums[name] = sums.get(name, 0.0) + value.detach().float().sum()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with running(adapter, raw):
                for h in hooks:
                    h.after_step(step, raw, lr)

            # 4. log, evaluate, checkpoint
            names = sorted(sums)
            totals = dist.all_reduce_sum(torch.stack([sums[n] for n in names])) / tc.batch_size
            row = {
                "step": step,
                "round": r,
                "epoch": (k + 1) * tc.batch_size / len(train_set),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                **dict(zip(names, totals.tolist(), strict=True)),
            }
            if tc.objective == "dpo":
                row["rewards/margin"] = row["rewards/chosen"] - row["rewards/rejected"]
            metrics_log.log(row)
            last = r == tc.rounds - 1 and k == steps - 1  # the final evaluation comes after the loop
            if tc.eval_every and step % tc.eval_every == 0 and not last:
                evaluate_now(step)
                raw.train()
            if step % tc.checkpoint_every == 0 or k == steps - 1:
                checkpoint(step, r, k + 1, pool)
    final = evaluate_now(step) if step else before
    raw.eval()
    return {"step": step, **final}


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    """Items [start, stop) of a batch dict (lists and tensors sliced along the first axis)."""
    return {k: v[start:stop] for k, v in batch.items()}


@torch.no_grad()
def co_improvement(adapter: UnifiedAdapter, records: Sequence, chunk: int = 256) -> dict:
    """The current model's judgement of the pre-trained model's generations against the oracle.

    records: the pre-trained evaluation's candidate records (``.prompt`` with ``.text``, ``.image``
    LongTensor[L], ``.verdict`` then, ``.oracle``). With v0 the pre-trained verdict, v the current one
    (P(yes) > 1/2) and o the oracle:
        co/fp_rejected = P(v = 0 | v0 = 1, o = 0)    former false positives now rejected
        co/tp_kept     = P(v = 1 | v0 = 1, o = 1)    true positives kept
        co/fn_accepted = P(v = 1 | v0 = 0, o = 1)    former false negatives now accepted
        co/und_win     = P(v = o | v != v0)          exact-oracle win rate over the pre-trained judge
                                                     (paper's Und-win; 0.5 when no verdict changed)
        co/judge_accuracy = P(v = o)
    A rate whose condition is empty is None.
    """
    images = torch.stack([r.image for r in records])
    texts = [r.prompt.text for r in records]
    p_yes = torch.cat(
        [
            adapter.judge(images[s : s + chunk], texts[s : s + chunk]).p_yes.float().cpu()
            for s in range(0, len(texts), chunk)
        ]
    )
    now = p_yes > 0.5
    then = torch.tensor([bool(r.verdict) for r in records])
    oracle = torch.tensor([bool(r.oracle) for r in records])

    def rate(hit: torch.Tensor, given: torch.Tensor) -> float | None:
        return (hit & given).sum().item() / given.sum().item() if given.any() else None

    changed = now != then
    return {
        "co/fp_rejected": rate(~now, then & ~oracle),
        "co/tp_kept": rate(now, then & oracle),
        "co/fn_accepted": rate(now, ~then & oracle),
        "co/und_win": rate(now == oracle, changed) if changed.any() else 0.5,
        "co/judge_accuracy": (now == oracle).float().mean().item(),
    }
