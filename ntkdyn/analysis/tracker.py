"""Learning-dynamics tracking: predicted against observed change of fixed probes, step by step.

At every tracked step (``step % every == 0``), for each probe o (a per-sample scalar f(o): a
log-likelihood, a yes log-odds, ...) and the real parameter update Δθ = θ_after - θ_before over
the tracked parameters (paper.md §5):

    predicted           = ∇f(o) · Δθ                 exact first order (the probe's per-sample gradient · Δθ)
    predicted_features  = <φ(o), P Δθ>               from projected features (GradientProjector)
    observed            = f_after(o) - f_before(o)   the probe re-evaluated after the step
With the optimizer's step split by loss source (``attribute``: ntkdyn.analysis.attribution, the exact
AdamW/Adam update Δθ = Σ_s (current_s + momentum_s) + weight_decay):
    predicted_by_source = {"<s>/current": ∇f(o)·current_s, "<s>/momentum": ∇f(o)·momentum_s,
                           "weight_decay": ∇f(o)·weight_decay, "rounding": ∇f(o)·(Δθ - Σ parts)}
                          (exact dot along each part; they sum to predicted. "rounding": storing θ_t in the
                          parameters' dtype rounds the update, relatively more the smaller the step)
    predicted_current   = Σ_s ∇f(o)·current_s        the current batch's exact first-order effect
    predicted_kernel    = Σ_s Σ_u c_s(o, u)           the Adam-aware kernel's prediction of predicted_current:
        c_s(o, u) = -lr_t/(1-β1^t) · (1-β1) · c_t / B · <φ(o), φ_D(l_s(u))>, φ_D the projected D_t ∘ ∇l_s(u)
        (D_t = 1/(√v̂_t + ε), the step's own; GradientProjector.per_sample(precondition=...)), computed
        after the step at θ_before from the batches before_step saw
    predicted_sgd       = -η Σ_s Σ_u K_s(o, u) / B    baseline: the kernel K(o, u) = <φ(o), φ(l(u))> alone,
                                                      as if the step were plain SGD with step η
Windows (``window`` W > 1): the W consecutive steps from every ``every``-th step are tracked, and each
row also carries ``window_start`` and predicted_frozen = <φ_start(o), P Δθ> (the features of the window's
first step along this step's real update: the frozen-kernel picture); the kernel row adds the drift
‖K_t - K_start‖ / ‖K_start‖ of every probe block (ntk_key "drift"). Cumulative horizons: summary.
``top_train``: the training samples [source, u, contribution] with the largest |c_s(o, u)| (the SGD form's
contributions when the step is not split; u is the sample's id when the batch has
``sample_ids/<source>``, e.g. the trainer's training-set item indices). Loss sources: ``loss_fn`` is one
per-sample loss (the source "train") or a dict {source: loss}; names as the attribution's sources.

plus the eNTK blocks between measurements (raw and cosine-normalised) and kernel alignments.
Probes and the exact first order run with the model in eval mode (no dropout), in a forked RNG
state, with ``.grad`` of every parameter left as it was: the training step sees no trace of them.

Plain API for a hand-written loop::

    tracker = DynamicsTracker(model, probes=[ProbeGroup(...), ...], out_dir=run_dir, every=10)
    split = tracker.attribute(opt, model.named_parameters(), ["train"])   # optional: the Adam-aware parts
    for step, batch in enumerate(loader, 1):
        tracker.before_step(step, model, loss_fn, batch)   # loss_fn(model, batch) -> [B] per-sample losses
        with split.source("train"):
            loss_fn(model, batch).mean().backward()
        opt.step(); opt.zero_grad()
        tracker.after_step(step, model, lr)
    summary = tracker.summary()

Outputs in ``out_dir`` (rank 0 only; names and row types in ntkdyn.rundir): ``dynamics.jsonl`` (one
ProbeRow per probe and tracked step), ``ntk.jsonl`` (one KernelRow of kernel scalars per tracked step),
both appended and flushed row by row, and ``kernels/step_SSSSSS.safetensors`` (written atomically): the
blocks K/a,b and Kcos/a,b between measurements and the training sources (measurement "train", or
"train_<source>"; between two training sources only with ``train_kernel``: (B_u)^2 more feature products,
about 5% of a default tracked step on the toy, BENCHMARKS.md), and with a split step C/m,train_<s> (c_s(o, u))
and, per tracked parameter (kinds kronecker and exact, whose features are per-parameter blocks; metadata
"layers"), Klayers/m,train_<s> (Σ_u K_s(o, u) of each block) and Clayers/m,train_<s> (Σ_u c_s(o, u) of
each block): each sums over the blocks to its total.

(Over 400 lines: the predictors, the parts of the split step and the kernel blocks of one tracked step
all read the state before_step captured; splitting them would pass that state around.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ntkdyn.analysis.attribution import SourceAttribution
from ntkdyn.analysis.distributed import all_gather_rows, rank_and_world, unwrap
from ntkdyn.analysis.feature_products import FeatureProducts, consecutive_rows, feature_products
from ntkdyn.analysis.measuring import measuring, parameters_at
from ntkdyn.analysis.probes import TRAIN, Fn, ProbeGroup
from ntkdyn.analysis.projector import GradientProjector, ProjectionConfig
from ntkdyn.analysis.projector.step_capture import StepCapture
from ntkdyn.analysis.statistics import (
    alignment_permutation_null,
    cosine_normalise,
    kernel_alignment,
    weighted_bootstrap_ci,
    weighted_mean,
)
from ntkdyn.analysis.summary import summarize_dynamics
from ntkdyn.rundir import (
    JsonlLog,
    KernelRow,
    ProbeRow,
    RunDir,
    kernel_key,
    key_part,
    ntk_key,
    read_jsonl,
    save_tensors,
)

SAMPLE_IDS = "sample_ids"  # batch key prefix: batch["sample_ids/<source>"] = ids of that source's samples


def train_measurement(source: str) -> str:
    """The kernel measurement name of a training loss source: "train" for the single source "train",
    else "train_<source>"."""
    return TRAIN if source == TRAIN else f"{TRAIN}_{source}"


@dataclass
class _Pending:
    """What before_step captured for one tracked step."""

    step: int
    before: dict[str, torch.Tensor]  # trained parameters at θ_before (detached copies)
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # group name -> φ [B_g, D] at θ_before
    train_features: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # source -> [B_u, D] each
    train_batches: dict[str, list[tuple[Fn, dict]]] = field(default_factory=dict)  # source -> (loss, batch)
    recorded: dict[str, list[tuple[Fn, dict, StepCapture]]] = field(default_factory=dict)  # by recording()
    train_ids: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # source -> local ids [B_u] each
    lr: float = math.nan


@dataclass
class _Split:
    """after_step's view of the split step: the parts' first-order changes per probe group, and the
    Adam-aware contributions c_s(o, u) per probe group and source."""

    parts: dict[str, dict[str, torch.Tensor]]  # group -> {part name: jvp [B_g]}
    contributions: dict[str, dict[str, torch.Tensor]]  # group -> {source: c [B_g, B_u]} (may be empty)
    layers: dict[str, dict[str, torch.Tensor]]  # group -> {source: Σ_u c per tracked parameter [B_g, P]}


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
        window: int = 1,
        train_kernel: bool = False,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not 1 <= window <= every:
            raise ValueError(f"window must be in [1, every={every}], got {window}")
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
        self.every, self.window = every, window
        self.top_contributors = top_contributors
        self.train_kernel = train_kernel
        self._start: tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None  # window
        self.projector = GradientProjector(self.model, config if config is not None else ProjectionConfig())
        self.rank, _ = rank_and_world()
        self.attribution: SourceAttribution | None = None
        self._pending: _Pending | None = None
        # per probe group / training micro-batch: the [B, D] feature matrices of the last tracked step,
        # overwritten by the next (per_sample_all's workspace), on CPU only: there fresh ones cost page faults
        # every tracked step; an accelerator's caching allocator reuses freed memory already, and matrices
        # held between tracked steps would be taken from training
        self._workspaces: dict[tuple, dict[str, torch.Tensor]] | None = (
            {} if all(p.device.type == "cpu" for p in self.model.parameters()) else None
        )
        self._layout: list[tuple[tuple, str]] | None = None  # workspaces to lay out as one matrix (_products)
        if self.rank == 0:
            self.run.kernels.mkdir(parents=True, exist_ok=True)
        self._probe_log = JsonlLog(self.run.dynamics, enabled=self.rank == 0)
        self._kernel_log = JsonlLog(self.run.ntk, enabled=self.rank == 0)

    def attribute(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, torch.Tensor]],
        sources: Sequence[str],
        *,
        default_source: str | None = None,
        average_over: torch.distributed.ProcessGroup | None = None,
    ) -> SourceAttribution:
        """Split every step of ``optimizer`` by loss source (SourceAttribution; the caller runs each
        source's backward in ``split.source(name)``): tracked steps then carry predicted_by_source,
        predicted_current and predicted_kernel. Returns the split."""
        if self.attribution is not None:
            raise RuntimeError("attribute: this tracker already splits an optimizer")
        self.attribution = SourceAttribution(
            optimizer, named_parameters, sources, default_source=default_source, average_over=average_over
        )
        return self.attribution

    def is_tracked(self, step: int) -> bool:
        """Steps every, 2·every, ... and, with a window W, the W - 1 steps after each."""
        return step >= self.every and step % self.every < self.window

    def window_start(self, step: int) -> int:
        return step - step % self.every

    @property
    def open_step(self) -> int | None:
        """The step before_step captured and after_step has not closed yet (None if none)."""
        return None if self._pending is None else self._pending.step

    def before_step(
        self, step: int, model: nn.Module, loss_fn: Fn | Mapping[str, Fn] | None, batch: dict | None
    ) -> None:
        """Capture θ_before and the step's training batch (its features are formed in after_step, at
        θ_before, from the same recording as the preconditioned ones).

        Call before the step's forward/backward. Called again with the same step (gradient
        accumulation), it only adds that micro-batch. ``loss_fn``: the per-sample training loss (the
        source "train") or {source: per-sample loss} whose sum is the loss; None: no training features, so
        no kernel forms (predicted_kernel, predicted_sgd) for this step. ``batch`` is kept until after_step.
        """
        if not self.is_tracked(step):
            return
        sources = _loss_sources(loss_fn)
        if sources and batch is None:
            raise ValueError("before_step: loss_fn given without its batch")
        pending = self._pending
        if pending is None or pending.step != step:
            before = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            pending = self._pending = _Pending(step=step, before=before)
        for source, fn in sources.items():
            pending.train_batches.setdefault(source, []).append((fn, batch))
            ids = batch.get(f"{SAMPLE_IDS}/{source}")
            if ids is not None:
                pending.train_ids.setdefault(source, []).append(torch.as_tensor(ids).reshape(-1).cpu())

    @contextlib.contextmanager
    def recording(self, step: int, source: str, fn: Fn, batch: dict) -> Iterator[Callable | None]:
        """Around one forward and backward of a loss source's per-sample loss ``fn`` on ``batch`` (a
        micro-batch) inside the training step, after before_step: at a tracked step it yields ``watch``,
        to be called with the per-sample losses [B] before the backward, so that this source's training
        features come from the step's own forward and backward (GradientProjector.capture; the first
        tracked step, or a capture that cannot give them, takes a full recording of fn on batch at
        θ_before instead); else None. The source's training samples are then the recorded micro-batches,
        in order (before_step's batch for that source is not recorded again)."""
        pending = self._pending
        if pending is None or pending.step != step:
            yield None
            return
        capture = self.projector.capture()
        with capture:
            yield capture.watch
        pending.recorded.setdefault(source, []).append((fn, batch, capture))

    def after_step(self, step: int, model: nn.Module, lr: float) -> list[ProbeRow]:
        """Compute predictions and observations for the step captured by before_step, write them
        (rank 0) and return the probe rows. ``lr``: the step size η used by the kernel form.
        A step that was not tracked returns [].

        At θ_before, one recording per probe group (GradientProjector.per_sample_all) gives f_before, the
        features and the exact first order along Δθ and along every part of the split step at once; the
        training samples' features and, with a split step, their preconditioned features come from the
        step's own backward where ``recording`` captured it, else from one recording per training batch."""
        pending = self._pending
        if pending is None or pending.step != step:
            return []
        self._pending = None
        pending.lr = float(lr)
        tracked = self.projector.tracked_parameters()
        with measuring(model):
            self._lay_out_workspaces()
            delta = {n: p.detach() - pending.before[n] for n, p in tracked.items()}
            p_delta = self._delta_row(self.projector.project_update(delta))
            parts = self._parts(delta)
            precondition, reference = self._precondition(pending)
            dots: dict[str, torch.Tensor] = {}
            f_before: dict[str, torch.Tensor] = {}
            preconditioned: dict[str, list[torch.Tensor]] = {}
            with parameters_at(self.model, pending.before):
                for g in self.probes:
                    measured = self.projector.per_sample_all(
                        g.fn,
                        g.batch,
                        tangents=[delta, *parts.values()],
                        workspace=self._workspace("probe", g.name),
                    )
                    pending.features[g.name] = measured.features
                    f_before[g.name], dots[g.name] = measured.values, measured.dots
                for source in dict.fromkeys([*pending.train_batches, *pending.recorded]):
                    features, conditioned = self._train_features(pending, source, precondition)
                    pending.train_features[source] = [features]
                    if precondition is not None:
                        preconditioned[source] = [conditioned]
            values: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
            for g in self.probes:
                with torch.no_grad():
                    f_after = g.fn(model, g.batch).detach()
                values[g.name] = (f_before[g.name], f_after, dots[g.name][:, 0])
        index, products = self._products(pending, p_delta, preconditioned)
        split = self._split(list(parts), dots, index, products, reference)
        rows = self._probe_rows(pending, values, index, products.gram, split)
        kernel_row, tensors = self._kernels(pending, index, products, rows, split)
        self._window(pending, p_delta, rows, kernel_row, tensors)
        if self.rank == 0:
            self._write(rows, kernel_row, tensors, step)
        return rows

    def _train_features(
        self, pending: _Pending, source: str, precondition: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A source's training features [B_u, D] and, with ``precondition``, its preconditioned ones, over
        every rank (rank order): from the step's own backward where recording() captured it, else from a
        full recording at θ_before (the caller sets the parameters back)."""
        entries = pending.recorded.get(source) or [(fn, b, None) for fn, b in pending.train_batches[source]]
        plain, conditioned = [], []
        for i, (fn, batch, capture) in enumerate(entries):
            workspace = self._workspace(TRAIN, source, i)
            measured = None if capture is None else capture.features(precondition, workspace)
            if measured is None:
                measured = self.projector.per_sample_all(fn, batch, precondition, workspace=workspace)
            plain.append(measured.features)
            conditioned.append(measured.preconditioned)
        gathered = all_gather_rows(_rows(plain))
        return gathered, None if precondition is None else all_gather_rows(_rows(conditioned))

    def _workspace(self, *key: str | int) -> dict[str, torch.Tensor] | None:
        return None if self._workspaces is None else self._workspaces.setdefault(key, {})

    def _delta_row(self, p_delta: torch.Tensor) -> torch.Tensor:
        """P Δθ [D], copied into the workspace row kept for it where one of its shape is there (so that
        feature_products reads every row in place: _lay_out_workspaces)."""
        workspace = self._workspace("delta")
        if workspace is None:
            return p_delta
        row, wanted = workspace.get("features"), p_delta[None]
        if row is None or (row.shape, row.dtype, row.device) != (wanted.shape, wanted.dtype, wanted.device):
            workspace["features"] = wanted
            return p_delta
        return row[0].copy_(p_delta)

    def _row_order(
        self, pending: _Pending, preconditioned: dict[str, list[torch.Tensor]]
    ) -> list[tuple[tuple, str]] | None:
        """The workspaces' (key, role) in feature_products' row order: the probe groups, each source's
        micro-batches, P Δθ, the preconditioned micro-batches; None without workspaces or over several
        processes (there the gathered training rows are copies anyway)."""
        if self._workspaces is None or rank_and_world()[1] > 1:
            return None
        batches = {
            s: len(pending.recorded.get(s) or pending.train_batches[s]) for s in pending.train_features
        }
        order = [(("probe", g.name), "features") for g in self.probes]
        order += [((TRAIN, s, i), "features") for s, n in batches.items() for i in range(n)]
        order.append((("delta",), "features"))
        order += [((TRAIN, s, i), "preconditioned") for s in preconditioned for i in range(batches[s])]
        return order

    def _lay_out_workspaces(self) -> None:
        """When the last tracked step's feature rows were not one matrix (_products set _layout): let go of
        those workspace matrices and point the workspaces at consecutive row blocks of one new [N, D] matrix
        in their place (never both in memory), so that this step of the same shapes writes its features
        in place and feature_products reads them without a copy."""
        if self._layout is None or self._workspaces is None:
            return
        order, self._layout = self._layout, None
        held = [self._workspaces.get(key, {}).pop(role, None) for key, role in order]
        if any(x is None or x.dim() != 2 for x in held):
            return
        width, dtype, device = held[0].shape[1], held[0].dtype, held[0].device
        if any((x.shape[1], x.dtype, x.device) != (width, dtype, device) for x in held):
            return
        rows = [x.shape[0] for x in held]
        del held  # freed before the new matrix is made
        matrix = torch.empty(sum(rows), width, dtype=dtype, device=device)
        for (key, role), block in zip(order, matrix.split(rows), strict=True):
            self._workspaces[key][role] = block

    def summary(self) -> dict:
        """summarize_dynamics of every probe row written so far (the whole run, across resumes)."""
        return summarize_dynamics(read_jsonl(self.run.dynamics))

    def _window(
        self,
        pending: _Pending,
        p_delta: torch.Tensor,
        rows: list[ProbeRow],
        kernel_row: KernelRow,
        tensors: dict[str, torch.Tensor],
    ) -> None:
        """Every row's window_start and predicted_frozen = <φ_start(o), P Δθ>, and the kernel row's drift
        ||K - K_start|| / ||K_start|| of every probe block. The window's start (its step, probe features
        and probe blocks) is kept from its first step; unknown after a resume inside a window (None)."""
        start_step = self.window_start(pending.step)
        if self.window > 1 and pending.step == start_step:
            probe_blocks = {k: v for k, v in tensors.items() if k.startswith("K/") and not _has_train(k)}
            features = {name: x.clone() for name, x in pending.features.items()}  # not the workspaces'
            self._start = (start_step, features, probe_blocks)
        start = self._start if self.window > 1 and self._start and self._start[0] == start_step else None
        frozen = None
        if start is not None:
            frozen = torch.cat([_cross(start[1][g.name], p_delta[None])[:, 0] for g in self.probes]).tolist()
        for i, row in enumerate(rows):
            row["window_start"] = start_step
            row["predicted_frozen"] = None if frozen is None else frozen[i]
        for key, k0 in ({} if start is None else start[2]).items():
            a, b = key.removeprefix("K/").split(",")
            drift = (tensors[key].double() - k0.double()).norm() / k0.double().norm()
            kernel_row[ntk_key("drift", a, b)] = float(drift)

    def _parts(self, delta: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The split step's parts over the tracked parameters ({} when the step was not split): "<s>/current",
        "<s>/momentum", "weight_decay" and "rounding" = Δθ - Σ parts (the update's rounding into the
        parameters' dtype); a part that does not reach a parameter is zero there."""
        parts = None if self.attribution is None else self.attribution.last_parts
        if parts is None:
            return {}
        tracked = self.projector.tracked_parameters()
        named = {f"{s}/current": d for s, d in parts.current.items()}
        named |= {f"{s}/momentum": d for s, d in parts.momentum.items()}
        named["weight_decay"] = parts.weight_decay
        total = parts.total()
        named["rounding"] = {n: d - total[n].to(d.dtype) if n in total else d for n, d in delta.items()}
        return {
            part: {n: per_parameter.get(n, torch.zeros_like(p)) for n, p in tracked.items()}
            for part, per_parameter in named.items()
        }

    def _precondition(self, pending: _Pending) -> tuple[dict[str, torch.Tensor] | None, float]:
        """(D per tracked parameter, reference scale) of the Adam-aware kernel: D = (current_scale /
        reference) / (√v̂_t + ε), the step's own; (None, 0.0) when the step was not split, had no training
        batch or no current part."""
        parts = None if self.attribution is None else self.attribution.last_parts
        if parts is None or not (pending.train_batches or pending.recorded):
            return None, 0.0
        tracked = self.projector.tracked_parameters()
        scales = {n: parts.coefficients[n].current_scale for n in tracked if n in parts.coefficients}
        reference = next((v for v in scales.values() if v), 0.0)
        if not reference:
            return None, 0.0
        precondition = {
            n: (scales[n] / reference) / self.attribution.denominator(n)
            if n in scales
            else torch.zeros_like(p)
            for n, p in tracked.items()
        }
        return precondition, reference

    def _split(
        self,
        parts: list[str],
        dots: dict[str, torch.Tensor],
        index: dict[str, torch.Tensor],
        products: FeatureProducts,
        reference: float,
    ) -> _Split | None:
        """The parts' first-order changes per probe group (columns 1.. of ``dots``: column 0 is Δθ) and,
        with preconditioned training features φ_D (at θ_before), the Adam-aware contributions
        c_s(o, u) = reference / B · <φ(o), φ_D(l_s(u))> (reference = the step's current_scale, per
        parameter folded into D) and their sums per tracked parameter. None when the step was not split."""
        if not parts:
            return None
        jvps = {g.name: {part: dots[g.name][:, 1 + i] for i, part in enumerate(parts)} for g in self.probes}
        split = _Split(jvps, {g.name: {} for g in self.probes}, {g.name: {} for g in self.probes})
        for source, products_s in products.conditioned.items():
            scale = reference / products_s.shape[1]
            for g in self.probes:
                split.contributions[g.name][source] = scale * products_s[index[g.name]]
                if source in products.conditioned_layers:
                    split.layers[g.name][source] = scale * products.conditioned_layers[source][index[g.name]]
        return split

    def _products(
        self, pending: _Pending, p_delta: torch.Tensor, preconditioned: dict[str, list[torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], FeatureProducts]:
        """feature_products of the step: the Gram matrix G = F F^T (float64 on CPU) of all features F = [φ
        of every probe group; φ_l of each training source's samples; P Δθ] (every kernel entry and every
        feature prediction is an entry of G), the probes' products with the preconditioned training
        features, and both per tracked parameter. index: group name / train_measurement(source) /
        "delta" -> rows of F."""
        train = {s: _rows(x) for s, x in pending.train_features.items()}
        probes = [pending.features[g.name] for g in self.probes]
        conditioned = {s: _rows(x) for s, x in preconditioned.items()}
        products = feature_products(
            probes, train, p_delta, conditioned, self.projector.feature_slices(), self.train_kernel
        )
        if consecutive_rows([*probes, *train.values(), p_delta[None], *conditioned.values()]) is None:
            self._layout = self._row_order(pending, preconditioned)  # laid out at the next tracked step
        index: dict[str, torch.Tensor] = {}
        start = 0
        for name, n in [(g.name, x.shape[0]) for g, x in zip(self.probes, probes, strict=True)] + [
            (train_measurement(s), x.shape[0]) for s, x in train.items()
        ]:
            index[name] = torch.arange(start, start + n)
            start += n
        index["delta"] = torch.tensor([start])
        return index, products

    def _probe_rows(
        self,
        pending: _Pending,
        values: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        index: dict[str, torch.Tensor],
        gram: torch.Tensor,
        split: _Split | None,
    ) -> list[ProbeRow]:
        train = {s: index[train_measurement(s)] for s in pending.train_features}
        ids = {s: _gathered_ids(x) for s, x in pending.train_ids.items()}
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
            sgd = {s: -pending.lr * gram[own][:, u] / u.numel() for s, u in train.items()}  # [B_g, B_u]
            parts = None if split is None else split.parts[g.name]
            adam = None if split is None or not split.contributions[g.name] else split.contributions[g.name]
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
                    "predicted_by_source": None,
                    "predicted_current": None,
                    "predicted_kernel": None,
                    "predicted_kernel_by_source": None,
                    "predicted_sgd": float(sum(c[i].sum() for c in sgd.values())) if sgd else None,
                    "top_train": _top(adam or sgd, i, self.top_contributors, ids),
                    "lr": pending.lr,
                }
                if parts is not None:
                    row["predicted_by_source"] = {k: float(v[i]) for k, v in parts.items()}
                    row["predicted_current"] = float(
                        sum(v[i] for k, v in parts.items() if k.endswith("/current"))
                    )
                if adam is not None:
                    row["predicted_kernel_by_source"] = {s: float(c[i].sum()) for s, c in adam.items()}
                    row["predicted_kernel"] = sum(row["predicted_kernel_by_source"].values())
                rows.append(row)
        return rows

    def _kernels(
        self,
        pending: _Pending,
        index: dict[str, torch.Tensor],
        products: FeatureProducts,
        rows: list[ProbeRow],
        split: _Split | None,
    ) -> tuple[KernelRow, dict[str, torch.Tensor]]:
        """eNTK blocks between measurements (and the training sources), raw and cosine-normalised, the
        Adam-aware contributions and the per-parameter blocks (module docstring), and the kernel row's
        scalars: kernel alignment <K_aa, K_bb>_F / (|K_aa| |K_bb|) between measurements with equally many
        probes, and for measurements on the same probe pairs (equal labels) the centred alignment with its
        permutation null (200 permutations: 95% quantile, p-value) and the mean same-pair cosine
        cos(φ_a(o), φ_b(o)) overall (with a 95% bootstrap interval over the probes, cross_cos_lo/hi) and
        per category."""
        rows_of: dict[str, torch.Tensor] = {}
        for g in self.probes:
            rows_of[g.measurement] = torch.cat(
                [rows_of.get(g.measurement, torch.empty(0, dtype=torch.long)), index[g.name]]
            )
        labels = {m: [r["probe"] for r in rows if r["measurement"] == m] for m in rows_of}
        categories = {m: [r["category"] for r in rows if r["measurement"] == m] for m in rows_of}
        probe_ms = list(rows_of)
        train_ms = [train_measurement(s) for s in pending.train_features]
        for m in train_ms:
            rows_of[m] = index[m]
        order = list(rows_of)
        gram = products.gram
        diag = torch.diagonal(gram)
        norms = {m: diag[idx] for m, idx in rows_of.items()}
        tensors: dict[str, torch.Tensor] = {}
        row: KernelRow = {"step": pending.step, "lr": pending.lr}
        for i, a in enumerate(order):
            for b in order[: i + 1]:
                if a in train_ms and b in train_ms and not self.train_kernel:
                    continue
                k = gram[rows_of[a]][:, rows_of[b]]
                tensors[kernel_key("K", a, b)] = k.float().contiguous()
                tensors[kernel_key("Kcos", a, b)] = (
                    cosine_normalise(k, norms[a], norms[b]).float().contiguous()
                )
        for a in order:
            row[ntk_key("norm", a)] = float(norms[a].sqrt().mean())
        self._source_blocks(pending, index, probe_ms, products, split, tensors)
        for i, a in enumerate(probe_ms):
            for b in probe_ms[:i]:
                if rows_of[a].numel() == rows_of[b].numel():
                    k_aa, k_bb = tensors[kernel_key("K", a, a)], tensors[kernel_key("K", b, b)]
                    row[ntk_key("alignment", a, b)] = kernel_alignment(k_aa, k_bb)
                    if labels[a] == labels[b] and rows_of[a].numel() > 1:  # same probes: a permutation null
                        null = alignment_permutation_null(k_aa, k_bb, permutations=200)
                        row[ntk_key("alignment_centred", a, b)] = null["alignment"]
                        row[ntk_key("alignment_null_q95", a, b)] = null["null_q95"]
                        row[ntk_key("alignment_p", a, b)] = null["p_value"]
                if labels[a] == labels[b]:
                    cos = torch.diagonal(tensors[kernel_key("Kcos", a, b)])
                    row[ntk_key("cross_cos", a, b)] = float(cos.mean())
                    interval = weighted_bootstrap_ci(weighted_mean, cos.double())
                    row[ntk_key("cross_cos_lo", a, b)], row[ntk_key("cross_cos_hi", a, b)] = (
                        interval.lo,
                        interval.hi,
                    )
                    for c in dict.fromkeys(categories[a]):
                        chosen = torch.tensor([x == c for x in categories[a]])
                        row[ntk_key("cross_cos", a, b, c)] = float(cos[chosen].mean())
            for t in train_ms:
                row[ntk_key("train_cos", a, None if t == TRAIN else t)] = float(
                    tensors[kernel_key("Kcos", t, a)].mean()
                )
        return row, tensors

    def _source_blocks(
        self,
        pending: _Pending,
        index: dict[str, torch.Tensor],
        probe_ms: list[str],
        products: FeatureProducts,
        split: _Split | None,
        tensors: dict[str, torch.Tensor],
    ) -> None:
        """C/m,t (c_s(o, u)), Klayers/m,t and Clayers/m,t (per tracked parameter) into ``tensors``."""
        for m in probe_ms:
            groups = [g for g in self.probes if g.measurement == m]
            for source in pending.train_features:
                t = train_measurement(source)
                if source in products.layers:
                    tensors[kernel_key("Klayers", m, t)] = torch.cat(
                        [products.layers[source][index[g.name]] for g in groups]
                    ).float()
                if split is not None and source in split.contributions[groups[0].name]:
                    tensors[kernel_key("C", m, t)] = torch.cat(
                        [split.contributions[g.name][source] for g in groups]
                    ).float()
                    if source in split.layers[groups[0].name]:
                        tensors[kernel_key("Clayers", m, t)] = torch.cat(
                            [split.layers[g.name][source] for g in groups]
                        ).float()

    def _write(
        self, rows: list[ProbeRow], kernel_row: KernelRow, tensors: dict[str, torch.Tensor], step: int
    ) -> None:
        """The kernel file (atomically), then the probe rows and the kernel row. The file's metadata:
        step, and per measurement the probes' labels and categories in the blocks' order."""
        measurements = dict.fromkeys(r["measurement"] for r in rows)
        labels = {m: [r["probe"] for r in rows if r["measurement"] == m] for m in measurements}
        categories = {m: [r["category"] for r in rows if r["measurement"] == m] for m in measurements}
        metadata = {"step": str(step), "labels": json.dumps(labels), "categories": json.dumps(categories)}
        slices = self.projector.feature_slices()
        if slices is not None:
            metadata["layers"] = json.dumps(list(slices))
        save_tensors(self.run.kernel_file(step), tensors, metadata)
        self._probe_log.write(*rows)
        self._kernel_log.write(kernel_row)


def _loss_sources(loss_fn: Fn | Mapping[str, Fn] | None) -> dict[str, Fn]:
    """{source: per-sample loss}: {} for None, {"train": loss_fn} for one callable."""
    if loss_fn is None:
        return {}
    if callable(loss_fn):
        return {TRAIN: loss_fn}
    sources = dict(loss_fn)
    for name, fn in sources.items():
        key_part(name)
        if not callable(fn):
            raise TypeError(f"before_step: the loss of source {name!r} is not callable")
    return sources


def _gathered_ids(local: list[torch.Tensor]) -> list[int]:
    """A source's sample ids over every rank, in the rank order of the gathered features."""
    return all_gather_rows(torch.cat(local).reshape(-1, 1).double())[:, 0].long().tolist()


def _rows(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces (micro-batches) stacked by rows: a view, not a copy, where they are consecutive rows of
    one matrix (the one piece itself, or the workspaces laid out by _lay_out_workspaces)."""
    stacked = consecutive_rows(pieces)
    return torch.cat(pieces) if stacked is None else stacked


def _has_train(key: str) -> bool:
    """Whether a kernel block key "K/a,b" involves a training source (TRAIN or "train_<source>")."""
    return any(m == TRAIN or m.startswith(f"{TRAIN}_") for m in key.split("/", 1)[1].split(","))


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a b^T [n_a, n_b] in float64 on CPU: products in the features' dtype (at least float32) over column
    chunks of 2^16, summed in float64 (accurate without a float64 copy)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for ca, cb in zip(a.to(dtype).split(1 << 16, dim=1), b.to(dtype).split(1 << 16, dim=1), strict=True):
        out += (ca @ cb.T).double().cpu()
    return out


def _top(
    contributions: Mapping[str, torch.Tensor], i: int, k: int, ids: Mapping[str, list[int]]
) -> list[list]:
    """[[source, u, c], ...]: probe i's k largest |c| over every source's samples ({source: [B_g, B_u]});
    u is the sample's id where the batch named them (``sample_ids/<source>``), else its position."""
    if not contributions or not k:
        return []
    names = [(s, ids[s][u] if s in ids else u) for s, c in contributions.items() for u in range(c.shape[1])]
    values = torch.cat([c[i] for c in contributions.values()])
    top = values.abs().topk(min(k, values.numel())).indices.tolist()
    return [[names[j][0], names[j][1], float(values[j])] for j in top]
