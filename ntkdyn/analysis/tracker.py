"""Learning-dynamics tracking: predicted against observed change of fixed probes, step by step.

At every tracked step (``step % every == 0``), for each probe o (a per-sample scalar f(o): a
log-likelihood, a yes log-odds, ...) and the real parameter update Δθ = θ_after - θ_before over
the tracked parameters (paper.md §5):

    predicted           = ∇f(o) · Δθ                 exact first order (forward-mode AD along Δθ)
    predicted_features  = <φ(o), P Δθ>               from projected features (GradientProjector)
    predicted_sgd       = -η Σ_u K(o, u) / B          kernel form, K(o, u) = <φ(o), φ_L(u)>; what plain SGD
                                                      with step η on the mean of the B per-sample training
                                                      losses L(u) would give (SGD-equivalent: the real
                                                      optimizer, e.g. AdamW, preconditions the update)
    observed            = f_after(o) - f_before(o)   the probe re-evaluated after the step

plus the eNTK blocks between measurements (raw and cosine-normalised) and kernel alignments.
Probes and the exact first order run with the model in eval mode (no dropout), in a forked RNG
state, with ``.grad`` of every parameter left as it was: the training step sees no trace of them.

Plain API for a hand-written loop::

    tracker = DynamicsTracker(model, probes=[ProbeGroup(...), ...], out_dir=run_dir, every=10)
    for step, batch in enumerate(loader, 1):
        tracker.before_step(step, model, loss_fn, batch)   # loss_fn(model, batch) -> [B] per-sample losses
        loss = loss_fn(model, batch).mean(); loss.backward(); opt.step(); opt.zero_grad()
        tracker.after_step(step, model, lr)
    summary = tracker.summary()

Outputs in ``out_dir`` (rank 0 only; names and row types in ntkdyn.rundir): ``dynamics.jsonl`` (one
ProbeRow per probe and tracked step), ``ntk.jsonl`` (one KernelRow of kernel scalars per tracked step),
both appended and flushed row by row, and ``kernels/step_SSSSSS.safetensors`` (written atomically).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ntkdyn.analysis.distributed import all_gather_rows, rank_and_world, unwrap
from ntkdyn.analysis.measuring import first_order_change, measuring
from ntkdyn.analysis.probes import TRAIN, Fn, ProbeGroup
from ntkdyn.analysis.projector import GradientProjector, ProjectionConfig
from ntkdyn.analysis.statistics import cosine_normalise, kernel_alignment
from ntkdyn.analysis.summary import summarize_dynamics
from ntkdyn.rundir import (
    JsonlLog,
    KernelRow,
    ProbeRow,
    RunDir,
    kernel_key,
    ntk_key,
    read_jsonl,
    save_tensors,
)


@dataclass
class _Pending:
    """What before_step captured for one tracked step."""

    step: int
    before: dict[str, torch.Tensor]  # tracked parameters at θ_before (detached copies)
    features: dict[str, torch.Tensor]  # group name -> φ [B_g, D] at θ_before
    train_features: list[torch.Tensor] = field(default_factory=list)  # [B_u, D] per micro-batch
    lr: float = math.nan


class DynamicsTracker:
    """Predicted vs observed change of fixed probe groups at every ``every``-th step.

    model: the trained module (unwrapped; the DDP wrapper may be what the hooks get).
    probes: the probe groups, fixed for the run. out_dir: where rows and kernels go (rank 0 only).
    config: the projection of the features. top_contributors: training samples listed per probe.
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Sequence[ProbeGroup],
        out_dir: str | os.PathLike,
        every: int = 10,
        config: ProjectionConfig | None = None,
        top_contributors: int = 3,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if top_contributors < 0:
            raise ValueError(f"top_contributors must be >= 0, got {top_contributors}")
        if not probes:
            raise ValueError("probes: at least one ProbeGroup is needed")
        names = [g.name for g in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"probes: group names must be unique, got {names}")
        self.model = unwrap(model)
        self.probes = list(probes)
        self.run = RunDir(out_dir)
        self.every = every
        self.top_contributors = top_contributors
        self.projector = GradientProjector(self.model, config if config is not None else ProjectionConfig())
        self.rank, _ = rank_and_world()
        self._pending: _Pending | None = None
        if self.rank == 0:
            self.run.kernels.mkdir(parents=True, exist_ok=True)
        self._probe_log = JsonlLog(self.run.dynamics, enabled=self.rank == 0)
        self._kernel_log = JsonlLog(self.run.ntk, enabled=self.rank == 0)

    def is_tracked(self, step: int) -> bool:
        return step % self.every == 0

    @property
    def open_step(self) -> int | None:
        """The step before_step captured and after_step has not closed yet (None if none)."""
        return None if self._pending is None else self._pending.step

    def before_step(self, step: int, model: nn.Module, loss_fn: Fn | None, batch: dict | None) -> None:
        """Capture θ_before, the probes' features and the training samples' features of ``batch``.

        Call before the step's forward/backward. Called again with the same step (gradient
        accumulation), it only adds that micro-batch's training features. ``loss_fn=None``: no
        training features, so no kernel form (predicted_sgd) for this step.
        """
        if not self.is_tracked(step):
            return
        pending = self._pending
        with measuring(model):
            if pending is None or pending.step != step:
                tracked = self.projector.tracked_parameters()
                features = {g.name: self.projector.per_sample(g.fn, g.batch) for g in self.probes}
                before = {n: p.detach().clone() for n, p in tracked.items()}
                pending = self._pending = _Pending(step=step, before=before, features=features)
            if loss_fn is not None:
                if batch is None:
                    raise ValueError("before_step: loss_fn given without its batch")
                pending.train_features.append(all_gather_rows(self.projector.per_sample(loss_fn, batch)))

    def after_step(self, step: int, model: nn.Module, lr: float) -> list[ProbeRow]:
        """Compute predictions and observations for the step captured by before_step, write them
        (rank 0) and return the probe rows. ``lr``: the step size η used by the kernel form.
        A step that was not tracked returns []."""
        pending = self._pending
        if pending is None or pending.step != step:
            return []
        self._pending = None
        pending.lr = float(lr)
        tracked = self.projector.tracked_parameters()
        with measuring(model):
            delta = {n: p.detach() - pending.before[n] for n, p in tracked.items()}
            p_delta = self.projector.project_update(delta)
            values: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
            for g in self.probes:
                f_before, change = first_order_change(self.model, g.fn, g.batch, pending.before, delta)
                with torch.no_grad():
                    f_after = g.fn(model, g.batch).detach()
                values[g.name] = (f_before, f_after, change)
        index, gram = self._gram(pending, p_delta)
        rows = self._probe_rows(pending, values, index, gram)
        kernel_row, tensors = self._kernels(pending, index, gram, rows)
        if self.rank == 0:
            self._write(rows, kernel_row, tensors, step)
        return rows

    def summary(self) -> dict:
        """summarize_dynamics of every probe row written so far (the whole run, across resumes)."""
        return summarize_dynamics(read_jsonl(self.run.dynamics))

    def _gram(self, pending: _Pending, p_delta: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One Gram matrix G = F F^T (float64 on CPU) of all features F = [φ of every probe group;
        φ_L of the training samples; P Δθ]: every kernel entry and every feature prediction is an
        entry of G. float32 products over column chunks of 2^16, summed in float64 (accurate without
        a float64 copy of F). index: group name / TRAIN / "delta" -> rows of F."""
        parts = [pending.features[g.name] for g in self.probes] + pending.train_features + [p_delta[None]]
        features = torch.cat([x.float() for x in parts])
        gram = torch.zeros(features.shape[0], features.shape[0], dtype=torch.float64)
        for chunk in features.split(1 << 16, dim=1):
            gram += (chunk @ chunk.T).double().cpu()
        index: dict[str, torch.Tensor] = {}
        start = 0
        for g in self.probes:
            n = pending.features[g.name].shape[0]
            index[g.name] = torch.arange(start, start + n)
            start += n
        n_train = sum(x.shape[0] for x in pending.train_features)
        if n_train:
            index[TRAIN] = torch.arange(start, start + n_train)
        index["delta"] = torch.tensor([start + n_train])
        return index, gram

    def _probe_rows(
        self,
        pending: _Pending,
        values: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        index: dict[str, torch.Tensor],
        gram: torch.Tensor,
    ) -> list[ProbeRow]:
        rows: list[ProbeRow] = []
        for g in self.probes:
            own = index[g.name]
            f_before, f_after, change = values[g.name]
            if f_before.shape != (own.numel(),):
                raise ValueError(
                    f"probe group {g.name!r}: fn returned shape {tuple(f_before.shape)}, "
                    f"features have {own.numel()} rows"
                )
            from_features = gram[own, index["delta"][0]]  # <φ(o), P Δθ>
            contrib = None
            if TRAIN in index:  # -η K(o, u) / B: [B_g, B_u]
                contrib = -pending.lr * gram[own][:, index[TRAIN]] / index[TRAIN].numel()
            labels, categories = g.sample_labels(own.numel()), g.sample_categories(own.numel())
            for i, label in enumerate(labels):
                row: ProbeRow = {
                    "step": pending.step,
                    "measurement": g.measurement,
                    "branch": g.branch,
                    "category": categories[i],
                    "group": g.name,
                    "probe": label,
                    "before": float(f_before[i]),
                    "observed": float(f_after[i] - f_before[i]),
                    "predicted": float(change[i]),
                    "predicted_features": float(from_features[i]),
                    "predicted_sgd": None,
                    "top_train": [],
                    "lr": pending.lr,
                }
                if contrib is not None:
                    row["predicted_sgd"] = float(contrib[i].sum())
                    k = min(self.top_contributors, contrib.shape[1])
                    top = contrib[i].abs().topk(k).indices.tolist()
                    row["top_train"] = [[u, float(contrib[i, u])] for u in top]
                rows.append(row)
        return rows

    def _kernels(
        self, pending: _Pending, index: dict[str, torch.Tensor], gram: torch.Tensor, rows: list[ProbeRow]
    ) -> tuple[KernelRow, dict[str, torch.Tensor]]:
        """eNTK blocks between measurements (and the training samples), raw and cosine-normalised,
        and the kernel row's scalars: kernel alignment <K_aa, K_bb>_F / (|K_aa| |K_bb|) between
        measurements with equally many probes, and for measurements on the same probe pairs (equal
        labels) the mean same-pair cosine cos(φ_a(o), φ_b(o)) overall and per category."""
        rows_of: dict[str, torch.Tensor] = {}
        for g in self.probes:
            rows_of[g.measurement] = torch.cat(
                [rows_of.get(g.measurement, torch.empty(0, dtype=torch.long)), index[g.name]]
            )
        labels = {m: [r["probe"] for r in rows if r["measurement"] == m] for m in rows_of}
        categories = {m: [r["category"] for r in rows if r["measurement"] == m] for m in rows_of}
        if TRAIN in index:
            rows_of[TRAIN] = index[TRAIN]
        order = list(rows_of)
        diag = torch.diagonal(gram)
        norms = {m: diag[idx] for m, idx in rows_of.items()}
        tensors: dict[str, torch.Tensor] = {}
        row: KernelRow = {"step": pending.step, "lr": pending.lr}
        for i, a in enumerate(order):
            for b in order[: i + 1]:
                k = gram[rows_of[a]][:, rows_of[b]]
                tensors[kernel_key("K", a, b)] = k.float().contiguous()
                tensors[kernel_key("Kcos", a, b)] = (
                    cosine_normalise(k, norms[a], norms[b]).float().contiguous()
                )
        for a in order:
            row[ntk_key("norm", a)] = float(norms[a].sqrt().mean())
        probe_ms = [m for m in order if m != TRAIN]
        for i, a in enumerate(probe_ms):
            for b in probe_ms[:i]:
                if rows_of[a].numel() == rows_of[b].numel():
                    row[ntk_key("alignment", a, b)] = kernel_alignment(
                        tensors[kernel_key("K", a, a)], tensors[kernel_key("K", b, b)]
                    )
                if labels[a] == labels[b]:
                    cos = torch.diagonal(tensors[kernel_key("Kcos", a, b)])
                    row[ntk_key("cross_cos", a, b)] = float(cos.mean())
                    for c in dict.fromkeys(categories[a]):
                        chosen = torch.tensor([x == c for x in categories[a]])
                        row[ntk_key("cross_cos", a, b, c)] = float(cos[chosen].mean())
            if TRAIN in index:
                row[ntk_key("train_cos", a)] = float(tensors[kernel_key("Kcos", TRAIN, a)].mean())
        return row, tensors

    def _write(
        self, rows: list[ProbeRow], kernel_row: KernelRow, tensors: dict[str, torch.Tensor], step: int
    ) -> None:
        """The kernel file (atomically), then the probe rows and the kernel row. The file's metadata:
        step, and per measurement the probes' labels and categories in the blocks' order."""
        measurements = dict.fromkeys(r["measurement"] for r in rows)
        labels = {m: [r["probe"] for r in rows if r["measurement"] == m] for m in measurements}
        categories = {m: [r["category"] for r in rows if r["measurement"] == m] for m in measurements}
        metadata = {"step": str(step), "labels": json.dumps(labels), "categories": json.dumps(categories)}
        save_tensors(self.run.kernel_file(step), tensors, metadata)
        self._probe_log.write(*rows)
        self._kernel_log.write(kernel_row)
