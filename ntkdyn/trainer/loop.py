"""The self-improvement training loop (SFT / DPO / curriculum): ``Trainer.train`` reads top to bottom.

    for round r in 0..rounds-1:
        data:   Algorithm 1 on all training prompts (round 0, and every round of an iterated sft/dpo run)
                or Algorithm 2 on the discard pool (rounds r > 0 of a curriculum run, data added)
        train:  steps on the round's data; each step takes the next batch_size items of the round's
                stream (seeded permutations of the data, one per epoch, concatenated), adds one
                anchor pair per item (trainer.data.AnchorPool), calls the hooks' before_step, runs the
                micro-batches (DDP: this rank's share of the batch), clips, steps AdamW, after_step, logs
        evaluate every eval_every steps; checkpoint every checkpoint_every steps and at the end of every
        round; with label-free selection (SelectionConfig select_every > 0, ntkdyn.trainer.selection):
        a selection point at step 0, every select_every steps and at the last step, training stopped
        once it has passed its best (patience > 0)
    end: evaluate the result: the last step's model, or the selected point's model with selection
Step numbers count optimizer steps from 1 (the row of step s is written after the s-th update; step 0
is the pre-trained model). The learning rate is a function of the position in the round: linear
warm-up over warmup_steps, then cosine / linear decay to 0 or constant.

Hooks (the learning-dynamics tracker) are objects with
    before_step(step, model, loss_fns, batch)  before any forward/backward of the step
    after_step(step, model, lr)                right after optimizer.step()
and optionally
    recording(step, source, fn, micro_batch)  a context manager around each source's forward and backward
                                               of each micro-batch; it yields None or ``watch``, called
                                               with the per-sample losses [B] before the backward (the
                                               tracker's and the gradient store's features come from the
                                               step's own backward: GradientProjector.capture)
and optionally ``attribute(optimizer, named_parameters, sources, average_over=...)``: the first hook that
has it gets the optimizer once and returns a ntkdyn.analysis.attribution.SourceAttribution, which splits
every step by loss source (the trainer runs each source's backward in its context).
``model`` is the underlying nn.Module (never the DDP wrapper). ``batch`` is this rank's share of the
step's batch, all micro-batches concatenated (the whole batch in one process); ``loss_fns`` maps each
loss source (ntkdyn.trainer.losses.source_terms: "gen", the SFT or DPO term with the NLL on chosen; "und",
the understanding (anchor) term of the same item, when on) to its per-sample loss ``fn(model, batch) ->
Tensor[B]``; the step's loss is the mean over the batch of their sum. Not included: nothing (weight
decay is applied by AdamW outside the loss). ``batch["sample_ids/gen"]``: the items' indices in the
round's training set (data/round_R.jsonl), so that the tracker names the items behind a probe's change.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ntkdyn.batch import slice_batch, to_device
from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.rundir import DataRow, JsonlLog, MetricsRow, RunDir, truncate_logs
from ntkdyn.trainer.checkpoint import Position, load_checkpoint, save_checkpoint
from ntkdyn.trainer.config import DataConfig, SelectionConfig, TrainConfig
from ntkdyn.trainer.data import (
    TrainSet,
    accepted_mask,
    anchor_pool,
    build_train_set,
    collect_candidates,
    judged_scores,
    load_round,
    save_round,
    seeded_generator,
    select,
)
from ntkdyn.trainer.distributed import Dist
from ntkdyn.trainer.losses import source_loss_fns, source_terms
from ntkdyn.trainer.selection import Selector, held_out_prompts
from ntkdyn.world import Prompt, ShapesWorld

EvaluateFn = Callable[[UnifiedAdapter], dict]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU (intra-op) thread count set to ``n`` inside the block, and set back after it; None:
    unchanged."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


class Trainer:
    """Trains ``adapter.model`` on self-improvement data of ``prompts`` (TrainConfig ``train``, DataConfig
    ``data``) into the run directory ``run_dir``.

    evaluate(adapter) -> metrics on the eval prompts (run on rank 0; broadcast). hooks: see the module
    docstring. dist: this process's place in a DDP group (default: one process). selection: label-free
    checkpoint selection on held-out train-split prompts (held_out_prompts; off when None or
    select_every 0); its frozen judge is copied here, before any training or restore. step_threads:
    torch's CPU threads while each optimizer step runs, its hooks included (None: the process's setting,
    which generation, judging and evaluation use): the step's float sums, hence the trained weights,
    depend on it.
    """

    def __init__(
        self,
        adapter: UnifiedAdapter,
        world: ShapesWorld,
        prompts: Sequence[Prompt],
        train: TrainConfig,
        data: DataConfig,
        run_dir: str | os.PathLike,
        evaluate: EvaluateFn,
        dist: Dist | None = None,
        hooks: Sequence = (),
        selection: SelectionConfig | None = None,
        step_threads: int | None = None,
    ) -> None:
        dist = dist or Dist()
        if train.batch_size % dist.world_size:
            raise ValueError(
                f"batch_size: {train.batch_size} is not divisible by the {dist.world_size} processes"
            )
        self.adapter, self.world, self.prompts = adapter, world, prompts
        self.cfg, self.data_cfg = train, data
        self.run = RunDir(run_dir)
        self.evaluate_fn, self.dist, self.hooks = evaluate, dist, list(hooks)
        self.step_threads = step_threads
        self.model = adapter.model
        self.params = trained_parameters(adapter, train.trainable)
        self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay)
        self.source_terms = source_terms(
            adapter, train.objective, train.beta, train.nll_weight, train.understanding_weight
        )
        self.loss_fns = source_loss_fns(self.source_terms)
        self.ddp = DistributedDataParallel(self.model) if dist.enabled else self.model
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        group = torch.distributed.group.WORLD if dist.enabled else None
        attributing = [h for h in self.hooks if hasattr(h, "attribute")]
        self.attribution = (  # splits every step by loss source (ntkdyn.analysis.attribution)
            attributing[0].attribute(self.optimizer, named, tuple(self.source_terms), average_over=group)
            if attributing
            else None
        )
        self.metrics_log = JsonlLog(self.run.metrics, dist.is_main)
        self.eval_log = JsonlLog(self.run.eval, dist.is_main)
        self.data_log = JsonlLog(self.run.data_log, dist.is_main)
        self.anchor = None  # built from the pre-trained model: no training or restore has happened yet
        if train.understanding_weight:
            self.anchor = anchor_pool(adapter, world, prompts, train.anchor_pool, train.anchor, train.seed)
        self.selector = None
        if selection is not None and selection.select_every:
            held_out = held_out_prompts(world, prompts, selection.select_prompts, train.seed)
            self.selector = Selector(
                adapter, held_out, selection, data.temperature, data.gen_batch, train.seed, run_dir, dist
            )

    def train(self, before: dict, resume: bool = False) -> dict:
        """Run the training (``resume``: from the run's last checkpoint); returns the final evaluation
        with ``"step"`` (steps trained) and, with selection, ``"selection"`` (Selector.summary). before:
        the pre-trained model's metrics (logged as step 0)."""
        tc = self.cfg
        if self.dist.is_main:
            self.run.root.mkdir(parents=True, exist_ok=True)
        position = (self.restore() if resume else None) or self.start(before)
        first_round, train_set = position.round, None
        stopped = self.selector is not None and self.selector.stop  # a resumed run that had stopped
        for r in range(first_round, tc.rounds):
            if stopped:
                break
            first_step = position.round_step if r == first_round else 0
            train_set = self.round_data(r, position, train_set, resume, log=first_step == 0)
            steps = round_steps(tc, r, len(train_set))
            self.model.train()
            for k in tqdm(
                range(first_step, steps), desc=f"{tc.objective} round {r}", disable=not self.dist.is_main
            ):
                position = Position(position.step + 1, r, k + 1, position.pool)
                with torch_threads(self.step_threads):
                    row = self.optimizer_step(train_set, r, k, steps, position.step)
                self.metrics_log.write(row)
                last = r == tc.rounds - 1 and k == steps - 1  # the final evaluation comes after the loop
                if tc.eval_every and position.step % tc.eval_every == 0 and not last:
                    self.evaluate(position.step)
                    self.model.train()
                if self.selector and position.step % self.selector.cfg.select_every == 0:
                    self.selector.add_point(position.step)
                    stopped = self.selector.stop
                if position.step % tc.checkpoint_every == 0 or k == steps - 1 or stopped:
                    self.checkpoint(position)
                if stopped:
                    if self.dist.is_main:
                        tqdm.write(f"selection: training passed its best; stopped at step {position.step}")
                    break
        if self.selector is None:
            final = self.evaluate(position.step) if position.step else before
            self.model.eval()
            return {"step": position.step, **final}
        if self.selector.points[-1].step != position.step:  # the last step's point
            self.selector.add_point(position.step)
            self.checkpoint(position)
        selected = self.selector.select()
        after_last = None
        if selected.step != position.step:  # the last step's model too, to compare with the selected one
            after_last = self.evaluate(position.step, selected_step=selected.step, last_step=position.step)
        self.selector.load(selected)
        final = self.evaluate(selected.step, selected_step=selected.step, last_step=position.step)
        self.model.eval()
        return {
            "step": position.step,
            **final,
            "selection": self.selector.summary(selected, position.step, stopped, after_last),
        }

    def start(self, before: dict) -> Position:
        """A fresh run: logs emptied, the pre-trained metrics logged as step 0, a first checkpoint."""
        if self.dist.is_main:
            truncate_logs(self.run, {}, step=0)
        position = Position(step=0, round=0, round_step=0, pool=torch.arange(len(self.prompts)))
        self.eval_log.write({"step": 0, **before})
        if self.selector:
            self.selector.add_point(0)
        self.checkpoint(position)
        return position

    def restore(self) -> Position | None:
        """The last checkpoint's position, model and optimizer restored and the logs cut back to it;
        None when the run has no checkpoint yet."""
        checkpoint = load_checkpoint(self.run.root)
        if checkpoint is None:
            return None
        if self.dist.is_main:
            truncate_logs(self.run, checkpoint.logs, checkpoint.position.step)
        self.model.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        if self.attribution:
            if checkpoint.attribution is None:
                raise ValueError(
                    "resume: the checkpoint holds no per-source first moments (written without tracking or "
                    "by an earlier version), so the split of the next steps by loss source cannot continue"
                )
            self.attribution.load_state_dict(checkpoint.attribution)
        self.dist.barrier()
        if self.selector:
            self.selector.restore()
        return checkpoint.position

    def round_data(
        self, r: int, position: Position, previous: TrainSet | None, resume: bool, log: bool
    ) -> TrainSet:
        """Round r's training set (made by an earlier life of this run if its file exists); sets
        ``position.pool`` to the discard pool after it and logs its data row when ``log``."""
        path = self.run.round_file(r)
        if resume and path.exists():
            train_set, position.pool, row = load_round(path)
        else:
            train_set, position.pool, row = self.collect(r, position.pool, previous)
        if log:
            self.data_log.write({"step": position.step, **row})
        return train_set

    def optimizer_step(self, train_set: TrainSet, r: int, k: int, steps: int, step: int) -> MetricsRow:
        """The k-th step of round r (the run's ``step``-th): batch, hooks, micro-batches, clip, AdamW;
        returns its metrics row (the loss terms averaged over the global batch)."""
        tc, dist = self.cfg, self.dist
        lr = learning_rate(tc, k, steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        items = stream_indices(len(train_set), tc.batch_size, k, tc.seed, r)
        batch = {**train_set.batch(items), "sample_ids/gen": items}  # which items (the tracker's top_train)
        if self.anchor is not None:
            batch.update(self.anchor.batch(tc.batch_size, tc.seed, step))
        share = tc.batch_size // dist.world_size
        local = to_device(slice_batch(batch, dist.rank * share, (dist.rank + 1) * share), dist.device)
        for h in self.hooks:
            h.before_step(step, self.model, self.loss_fns, local)
        sums = self.backward(local, share, step)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, tc.grad_clip if tc.grad_clip else float("inf")
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for h in self.hooks:
            h.after_step(step, self.model, lr)
        names = sorted(sums)
        totals = dist.all_reduce_sum(torch.stack([sums[n] for n in names])) / tc.batch_size
        row: MetricsRow = {
            "step": step,
            "round": r,
            "epoch": (k + 1) * tc.batch_size / len(train_set),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            **dict(zip(names, totals.tolist(), strict=True)),
        }
        if tc.objective == "dpo":
            row["rewards/margin"] = row["rewards/chosen"] - row["rewards/rejected"]
        return row

    def backward(self, local: dict, share: int, step: int) -> dict[str, torch.Tensor]:
        """Gradients of this rank's share of the step's loss, micro-batch by micro-batch and one backward
        per loss source (their forwards are disjoint; with a hook's attribution each backward runs in its
        source's context, inside every hook's ``recording``, which may watch the per-sample losses).
        DDP: every backward without sync (its reducer takes one backward per forward), then one
        all-reduce of the gradients. Returns each loss term summed over the share."""
        sums: dict[str, torch.Tensor] = {}
        recorders = [h for h in self.hooks if hasattr(h, "recording")]
        for s in range(0, share, self.cfg.micro_batch_size):
            micro = slice_batch(local, s, s + self.cfg.micro_batch_size)
            with self.ddp.no_sync() if self.dist.enabled else contextlib.nullcontext():
                for source, terms_fn in self.source_terms.items():
                    with contextlib.ExitStack() as stack:
                        if self.attribution:
                            stack.enter_context(self.attribution.source(source))
                        fn = self.loss_fns[source]
                        watchers = [
                            stack.enter_context(h.recording(step, source, fn, micro)) for h in recorders
                        ]
                        terms = terms_fn(self.ddp, micro)
                        for watch in filter(None, watchers):
                            watch(terms[f"loss/{source}"])
                        (terms[f"loss/{source}"].sum() / share).backward()
                    for name, value in {**terms, "loss": terms[f"loss/{source}"]}.items():
                        sums[name] = sums.get(name, 0.0) + value.detach().float().sum()
        if self.dist.enabled:
            self.dist.average_gradients(self.params)
        return sums

    def evaluate(self, step: int, **row) -> dict:
        """Evaluate the model (rank 0; every rank gets the metrics) and log the metrics as ``step`` (with
        the extra keys ``row``)."""
        self.model.eval()
        metrics = self.evaluate_fn(self.adapter) if self.dist.is_main else None
        metrics = self.dist.broadcast_object(metrics)
        self.eval_log.write({"step": step, **row, **metrics})
        return metrics

    def checkpoint(self, position: Position) -> None:
        """Save the checkpoint, then delete the selection weights no point logged so far can select."""
        if self.dist.is_main:
            attribution = self.attribution.state_dict() if self.attribution else None
            save_checkpoint(self.run.root, position, self.model, self.optimizer, attribution)
            if self.selector:
                self.selector.prune()
        self.dist.barrier()

    def collect(
        self, r: int, pool: torch.Tensor, previous: TrainSet | None
    ) -> tuple[TrainSet, torch.Tensor, DataRow]:
        """The data of round r: (training set, discard pool after it, a row describing the round).

        Algorithm 1 on every prompt, except in rounds r > 0 of a curriculum run: Algorithm 2, only the
        pool (prompts with no accepted candidate so far) is regenerated and judged by the current model,
        and what it now accepts is added to ``previous``. pool: LongTensor of run-level prompt indices."""
        dc, tc, prompts = self.data_cfg, self.cfg, self.prompts
        revisit = tc.run == "curriculum" and r > 0
        index = pool if revisit else torch.arange(len(prompts))
        self.model.eval()
        candidates = collect_candidates(
            self.adapter,
            self.world,
            [prompts[i] for i in index.tolist()],
            index,
            dc.candidates,
            dc.temperature,
            dc.gen_batch,
            tc.seed,
            r,
            self.dist,
        )
        accepted = accepted_mask(candidates, dc.judge, dc.accept_threshold, tc.seed, r)
        thresholds = (dc.sft_threshold, dc.dpo_margin) if dc.judge == "self" else (0.0, 0.0)
        selection = select(judged_scores(candidates, dc.judge, tc.seed, r), accepted, *thresholds)
        new = build_train_set(
            self.adapter, candidates, selection, prompts, tc.objective, dc.gen_batch, self.dist
        )
        new_pool = index[selection.discard]
        train_set = previous.concat(new) if revisit else new
        row: DataRow = {
            "round": r,
            "kind": "curriculum" if revisit else "collect",
            "prompts": len(index),
            "added_prompts": len(index) - len(new_pool),
            "added_items": len(new),
            "pool": len(new_pool),
            "candidate_precision": candidates.oracle.float().mean().item(),
            "accept_rate": accepted.float().mean().item(),
            **train_set.stats(),
        }
        if self.dist.is_main:
            save_round(self.run.root, r, prompts, candidates, accepted, selection, train_set, new_pool, row)
        self.dist.barrier()
        return train_set, new_pool, row
