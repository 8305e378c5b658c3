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
    for step, batch in enumerate(loader):
        tracker.before_step(step, model, loss_fn, batch)   # loss_fn(model, batch) -> [B] per-sample losses
        loss = loss_fn(model, batch).mean(); loss.backward(); opt.step(); opt.zero_grad()
        tracker.after_step(step, model, lr)
    summary = summarize_dynamics(read_jsonl(run_dir / "dynamics.jsonl"))

Outputs in ``out_dir``: ``dynamics.jsonl`` (one ``kind="probe"`` row per probe and one
``kind="ntk"`` row of scalars per tracked step, appended and flushed row by row) and
``kernels/step_XXXXXX.safetensors`` (written atomically).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import nn

from ntkdyn.analysis.metrics import agreement, cosine_normalise, kernel_alignment
from ntkdyn.analysis.probes import (
    TRAIN,
    Fn,
    ProbeGroup,
    load_probes,
    probe_groups,
    save_probes,
    select_probes,
)
from ntkdyn.analysis.projector import GradientProjector, ProjectionConfig
from ntkdyn.evaluate import oracle_of_images


@dataclass
class _Pending:
    """What before_step captured for one tracked step."""

    step: int
    before: dict[str, torch.Tensor]  # tracked parameters at θ_before (detached copies)
    features: dict[str, torch.Tensor]  # group name -> φ [B_g, D] at θ_before
    train_features: list[torch.Tensor] = field(default_factory=list)  # [B_u, D] per micro-batch
    lr: float = math.nan


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [n_r, D] of every rank along dim 0 in rank order (ranks may hold different n_r)."""
    _, world = _dist_info()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


class _CallFn(nn.Module):
    """Wraps ``fn(model, batch)`` as a module whose parameters are the model's, so that
    torch.func.functional_call can swap them while fn runs the model in its own way."""

    def __init__(self, model: nn.Module, fn: Fn, batch: dict) -> None:
        super().__init__()
        self.model = model
        self.fn = fn
        self.batch = batch

    def forward(self) -> torch.Tensor:
        return self.fn(self.model, self.batch)


def first_order_change(
    model: nn.Module, fn: Fn, batch: dict, params: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(θ), J_f(θ) δ) with θ = ``params`` for the named parameters (the others as they are in
    ``model``): the value and the exact first-order change of ``fn(model, batch)`` [B] along δ.

    Forward-mode AD (torch.autograd.forward_ad): the parameters are swapped for dual tensors
    θ + ε δ by functional_call for the duration of one forward of fn; no backward graph is built.
    (Not torch.func.jvp: module hooks that call requires_grad_, as transformers installs for
    gradient checkpointing, are not allowed inside functorch transforms.) Returns two Tensor[B].
    """
    if set(params) != set(delta):
        raise ValueError(
            f"first_order_change: params and delta name different parameters: "
            f"{sorted(set(params) ^ set(delta))[:5]}"
        )
    wrapper = _CallFn(model, fn, batch)
    with fwad.dual_level(), torch.no_grad():
        duals = {
            f"model.{n}": fwad.make_dual(p.detach(), delta[n].detach().to(p.dtype)) for n, p in params.items()
        }
        value, change = fwad.unpack_dual(torch.func.functional_call(wrapper, duals, ()))
    if change is None:
        raise ValueError("first_order_change: fn's output does not depend on the given parameters")
    return value.detach(), change.detach()


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for every submodule, full precision (autocast off, and a forward
    that accelerate wrapped in autocast for mixed precision run as its original ``_original_forward``:
    bf16 rounding would swamp one step's change), a forked RNG, no DDP gradient sync, and
    every parameter's ``.grad`` kept aside; all restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    wrapped = [
        (m, m.__dict__["forward"])
        for m in model.modules()
        if "_original_forward" in m.__dict__ and "forward" in m.__dict__
    ]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    sync = (
        model.no_sync()
        if isinstance(model, nn.parallel.DistributedDataParallel)
        else contextlib.nullcontext()
    )
    try:
        with torch.random.fork_rng(devices=devices), sync, contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            model.eval()
            for m, _ in wrapped:
                m.forward = m._original_forward
            for p in params:
                p.grad = None
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for m, forward in wrapped:
            m.forward = forward
        for p, g in zip(params, grads, strict=True):
            p.grad = g


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
        self.model = _unwrap(model)
        self.probes = list(probes)
        self.out_dir = Path(out_dir)
        self.every = every
        self.top_contributors = top_contributors
        self.projector = GradientProjector(self.model, config if config is not None else ProjectionConfig())
        self.rank, _ = _dist_info()
        self._pending: _Pending | None = None
        if self.rank == 0:
            (self.out_dir / "kernels").mkdir(parents=True, exist_ok=True)

    @property
    def rows_path(self) -> Path:
        return self.out_dir / "dynamics.jsonl"

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

    def after_step(self, step: int, model: nn.Module, lr: float) -> list[dict]:
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
        ntk_row, tensors = self._kernels(pending, index, gram, rows)
        if self.rank == 0:
            self._write(rows + [ntk_row], tensors, step)
        return rows

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
    ) -> list[dict]:
        rows = []
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
                row: dict[str, Any] = {
                    "kind": "probe",
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
        self, pending: _Pending, index: dict[str, torch.Tensor], gram: torch.Tensor, rows: list[dict]
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        """eNTK blocks between measurements (and the training samples), raw and cosine-normalised,
        and the scalars of the ntk row: kernel alignment <K_aa, K_bb>_F / (|K_aa| |K_bb|) between
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
        row: dict[str, Any] = {"kind": "ntk", "step": pending.step, "lr": pending.lr}
        for i, a in enumerate(order):
            for b in order[: i + 1]:
                k = gram[rows_of[a]][:, rows_of[b]]
                tensors[f"K/{a},{b}"] = k.float().contiguous()
                tensors[f"Kcos/{a},{b}"] = cosine_normalise(k, norms[a], norms[b]).float().contiguous()
        for a in order:
            row[f"ntk/norm/{a}"] = float(norms[a].sqrt().mean())
        probe_ms = [m for m in order if m != TRAIN]
        for i, a in enumerate(probe_ms):
            for b in probe_ms[:i]:
                if rows_of[a].numel() == rows_of[b].numel():
                    row[f"ntk/alignment/{a},{b}"] = kernel_alignment(
                        tensors[f"K/{a},{a}"], tensors[f"K/{b},{b}"]
                    )
                if labels[a] == labels[b]:
                    cos = torch.diagonal(tensors[f"Kcos/{a},{b}"])
                    row[f"ntk/cross_cos/{a},{b}"] = float(cos.mean())
                    for c in dict.fromkeys(categories[a]):
                        chosen = torch.tensor([x == c for x in categories[a]])
                        row[f"ntk/cross_cos/{a},{b}/{c}"] = float(cos[chosen].mean())
            if TRAIN in index:
                row[f"ntk/train_cos/{a}"] = float(tensors[f"Kcos/{TRAIN},{a}"].mean())
        return row, tensors

    def _write(self, rows: list[dict], tensors: dict[str, torch.Tensor], step: int) -> None:
        from safetensors.torch import save_file

        probe_rows = [r for r in rows if r["kind"] == "probe"]
        measurements = dict.fromkeys(r["measurement"] for r in probe_rows)
        labels = {m: [r["probe"] for r in probe_rows if r["measurement"] == m] for m in measurements}
        categories = {m: [r["category"] for r in probe_rows if r["measurement"] == m] for m in measurements}
        path = self.out_dir / "kernels" / f"step_{step:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(
            tensors,
            str(tmp),
            metadata={"step": str(step), "labels": json.dumps(labels), "categories": json.dumps(categories)},
        )
        os.replace(tmp, path)
        with open(self.rows_path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                f.flush()

    def summary(self) -> dict:
        """summarize_dynamics of every row written so far (the whole run, across resumes)."""
        return summarize_dynamics(read_jsonl(self.rows_path))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file ([] if it does not exist); a torn last line (a killed writer) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise
    return rows


def truncate_dynamics(run_dir: str | os.PathLike, max_step: int) -> None:
    """Resume helper: keep only dynamics.jsonl rows with step <= max_step (and a torn last line
    dropped), delete kernel files of later steps. Rewrites the file atomically."""
    run_dir = Path(run_dir)
    path = run_dir / "dynamics.jsonl"
    if path.exists():
        kept = [row for row in read_jsonl(path) if row["step"] <= max_step]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(tmp, path)
    for kernel in (run_dir / "kernels").glob("step_*.safetensors"):
        if int(kernel.stem.split("_")[1]) > max_step:
            kernel.unlink()


PREDICTORS = {"exact": "predicted", "features": "predicted_features", "sgd": "predicted_sgd"}


def _stats(rows: list[dict]) -> dict:
    """agreement() of the exact predictor at the top level, the other predictors nested by name."""
    observed = torch.tensor([r["observed"] for r in rows], dtype=torch.float64)
    out: dict[str, Any] = {}
    for name, key in PREDICTORS.items():
        if any(r.get(key) is None for r in rows):
            continue
        stats = agreement(torch.tensor([r[key] for r in rows], dtype=torch.float64), observed)
        if name == "exact":
            out.update(stats)
        else:
            out[name] = stats
    return out


def summarize_dynamics(rows: Iterable[dict]) -> dict:
    """Agreement of predicted with observed change, pooled over the run.

    Returns ``{branch: {pearson, spearman, sign_agreement, slope, n, features: {...}, sgd: {...},
    categories: {category: {...}}, measurements: {measurement: {...}}}}`` where the top-level
    numbers use the exact first-order predictor over every probe of the branch over all steps;
    ``features`` (<φ, PΔθ>) and ``sgd`` (kernel form) nest the same statistics of the other predictors.
    """
    probe_rows = [r for r in rows if r.get("kind") == "probe"]
    out: dict[str, Any] = {}
    for branch in dict.fromkeys(r["branch"] for r in probe_rows):
        in_branch = [r for r in probe_rows if r["branch"] == branch]
        entry = _stats(in_branch)
        entry["categories"] = {
            c: _stats([r for r in in_branch if r["category"] == c])
            for c in dict.fromkeys(r["category"] for r in in_branch)
        }
        entry["measurements"] = {
            m: _stats([r for r in in_branch if r["measurement"] == m])
            for m in dict.fromkeys(r["measurement"] for r in in_branch)
        }
        out[branch] = entry
    return out


@dataclass
class TrackingConfig:
    """Learning-dynamics tracking of a ``python -m ntkdyn.track`` run (CLI: ``--track-every`` ...)."""

    track_every: int = field(default=40, metadata={"help": "track every K optimizer steps"})
    proj_kind: str = field(
        default="kronecker",
        metadata={
            "help": "projection of the per-sample gradients",
            "choices": ("kronecker", "dense", "exact"),
        },
    )
    proj_k: int = field(
        default=128,
        metadata={
            "help": "projection size k (per factor for kronecker; 128 keeps the feature predictor within "
            "0.05 Pearson of the exact one on the toy, see BENCHMARKS.md)"
        },
    )
    proj_seed: int = field(default=0, metadata={"help": "seed of the projection factors"})
    probes_per_category: int = field(default=8, metadata={"help": "probe pairs per category"})
    probe_seed: int = field(default=0, metadata={"help": "seed of the probe choice"})
    top_contributors: int = field(default=3, metadata={"help": "training samples listed per probe and step"})

    def __post_init__(self) -> None:
        for name in ("track_every", "proj_k", "probes_per_category"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrackingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_contributors < 0:
            raise ValueError(f"TrackingConfig.top_contributors must be >= 0, got {self.top_contributors}")
        if self.proj_kind not in ("kronecker", "dense", "exact"):
            raise ValueError(
                f"TrackingConfig.proj_kind must be kronecker, dense or exact, got {self.proj_kind!r}"
            )

    @classmethod
    def from_args(cls, args: Any) -> TrackingConfig:
        """From any object carrying (some of) the field names as attributes (an argparse
        Namespace; absent ones keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def build_tracker(
    adapter: Any, world: Any, run_dir: str | os.PathLike, args: Any, pretrained_records: Sequence[dict]
) -> DynamicsTracker:
    """The tracker of a ``python -m ntkdyn.track`` run: probes chosen from the pre-trained model's
    judged generations (``pretrained_records``: dicts with prompt, image, verdict, oracle), saved
    to ``run_dir/probes.json`` and reloaded from it on resume; every probe measured as gen, und
    and caption. ``args``: TrackingConfig.from_args(args) gives the options.
    """
    config = TrackingConfig.from_args(args)
    run_dir = Path(run_dir)
    path = run_dir / "probes.json"
    if path.exists():
        probes = load_probes(path)
    else:

        def oracle(text: str, image: torch.Tensor) -> bool:
            return oracle_of_images(adapter, world, [world.parse_prompt(text)], image[None])[0][0]

        probes = select_probes(pretrained_records, config.probes_per_category, config.probe_seed, oracle)
        if _dist_info()[0] == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_probes(probes, path)
    k = None if config.proj_kind == "exact" else config.proj_k
    projection = ProjectionConfig(kind=config.proj_kind, k=k, seed=config.proj_seed)
    return DynamicsTracker(
        adapter.model,
        probe_groups(adapter, probes),
        run_dir,
        every=config.track_every,
        config=projection,
        top_contributors=config.top_contributors,
    )
