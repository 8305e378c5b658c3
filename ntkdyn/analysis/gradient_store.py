"""Every training sample's projected gradient at every step, from the training step's own backward.

A training hook (the protocol of ntkdyn.trainer.loop): inside each loss source's forward and backward
(``recording``) it captures the per-sample gradients of that source's loss (GradientProjector.capture:
activations and output-gradients of the step itself, no second pass) and projects them right after the
backward, at θ_before (the optimizer has not stepped yet). The first step, and any step whose batch has
a new structure, calibrates: one full recording of the loss on that micro-batch (the sample layouts
read from autograd, the projector's self-check on the first one).

after_step writes ``gradients/step_SSSSSS.safetensors`` (ntkdyn.rundir; rank 0):
    "<source>"        [B, D] float32: row u = P ∇_θ l_source(u) at θ_before of the step (every rank's
                      samples, rank order), P the store's projection (its own ProjectionConfig)
    "<source>/ids"    [B] int64: the samples' ids, where the batch names them (batch["sample_ids/<source>"])
    metadata          step, lr, and the projection's spec (kind, k, seed, feature_dim, tracked parameters)
so that attribution methods (TracIn: Σ_t η_t <φ_t(test), φ_t(u)>) can read a run's whole gradient history;
``read_gradient_store(run_dir)`` gives them back step by step.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ntkdyn.analysis.distributed import all_gather_rows, rank_and_world, unwrap
from ntkdyn.analysis.measuring import measuring
from ntkdyn.analysis.probes import Fn
from ntkdyn.analysis.projector import GradientProjector, ProjectionConfig
from ntkdyn.analysis.tracker import SAMPLE_IDS
from ntkdyn.rundir import RunDir, load_metadata, save_tensors


class GradientStore:
    """Writes every ``every``-th step's per-sample projected training gradients into ``out_dir``."""

    def __init__(
        self, model: nn.Module, out_dir: str | os.PathLike, config: ProjectionConfig, every: int = 1
    ):
        if every < 1:
            raise ValueError(f"GradientStore: every must be >= 1, got {every}")
        self.model = unwrap(model)
        self.projector = GradientProjector(self.model, config)
        self.run = RunDir(out_dir)
        self.every = every
        self.rank, _ = rank_and_world()
        self._step: int | None = None
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._ids: dict[str, list[torch.Tensor]] = {}

    def stores(self, step: int) -> bool:
        return step % self.every == 0

    def before_step(self, step: int, model: nn.Module, loss_fn: Mapping[str, Fn] | None, batch: dict | None):
        """Start the step: the sample ids of each source (``batch["sample_ids/<source>"]``) are kept."""
        if not self.stores(step):
            return
        self._step, self._rows, self._ids = step, {}, {}
        for source in loss_fn or {}:
            ids = None if batch is None else batch.get(f"{SAMPLE_IDS}/{source}")
            if ids is not None:
                self._ids.setdefault(source, []).append(torch.as_tensor(ids).reshape(-1).cpu())

    @contextlib.contextmanager
    def recording(self, step: int, source: str, fn: Fn, batch: dict) -> Iterator[Callable | None]:
        """Around one forward and backward of source's per-sample loss ``fn`` on ``batch``: yields
        ``watch`` (call it with the per-sample losses before the backward) on stored steps, else None."""
        if self._step != step:
            yield None
            return
        capture = self.projector.capture(eager=True)
        with capture:
            yield capture.watch
        measured = capture.features()
        if measured is None:  # calibration: one full recording of this micro-batch, at θ_before
            with measuring(self.model):
                measured = self.projector.per_sample_all(fn, batch)
        self._rows.setdefault(source, []).append(measured.features)

    def after_step(self, step: int, model: nn.Module, lr: float) -> None:
        """Write the step's file (rank 0; every rank takes part in the gathers)."""
        if self._step != step:
            return
        self._step = None
        if not self._rows:
            raise RuntimeError(
                f"GradientStore: step {step} recorded no training loss; the training loop must run each "
                "source's forward and backward inside the hook's recording(step, source, fn, batch)"
            )
        tensors = {source: all_gather_rows(torch.cat(rows)) for source, rows in self._rows.items()}
        for source, ids in self._ids.items():
            tensors[f"{source}/ids"] = all_gather_rows(torch.cat(ids).reshape(-1, 1).double())[:, 0].long()
        if self.rank == 0:
            spec = {k: v for k, v in self.projector.spec.items() if k != "parameters"}
            metadata = {
                "step": str(step),
                "lr": repr(float(lr)),
                "projection": json.dumps(spec),
                "parameters": json.dumps(list(self.projector.tracked_parameters())),
            }
            self.run.gradients.mkdir(parents=True, exist_ok=True)
            save_tensors(self.run.gradient_file(step), tensors, metadata)


@dataclass
class StoredStep:
    """One step of a run's gradient store: features[source] [B, D] (row u: P ∇l_source(u) at θ_before of
    the step), ids[source] [B] where the batch named its samples, the step's lr and the projection."""

    step: int
    lr: float
    features: dict[str, torch.Tensor]
    ids: dict[str, torch.Tensor]
    projection: dict


def read_gradient_store(run_dir: str | os.PathLike) -> Iterator[StoredStep]:
    """The gradient store of a run directory, step by step (one file read at a time)."""
    from safetensors.torch import load_file

    for path in RunDir(run_dir).gradient_files():
        tensors, metadata = load_file(str(path)), load_metadata(path)
        yield StoredStep(
            step=int(metadata["step"]),
            lr=float(metadata["lr"]),
            features={k: v for k, v in tensors.items() if "/" not in k},
            ids={k.removesuffix("/ids"): v for k, v in tensors.items() if k.endswith("/ids")},
            projection=json.loads(metadata["projection"]),
        )
