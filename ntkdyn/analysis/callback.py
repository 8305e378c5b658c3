"""Learning-dynamics tracking inside transformers.Trainer and TRL's trainers (SFTTrainer, DPOTrainer).

A TrainerCallback is never handed the step's batch, and the kernel form of the prediction
needs the training samples' gradients. So ``attach(trainer)`` wraps the trainer's
``training_step`` (an instance attribute shadowing the method; the Trainer's inner loop calls
``self.training_step(model, inputs, ...)`` for every micro-batch): before the first micro-batch
of a tracked optimizer step it snapshots θ and the probes' features; every micro-batch adds its
training features. ``on_step_end`` (after ``optimizer.step()``) computes the predictions and
re-evaluates the probes. Usage::

    cb = NTKDynamicsCallback(probes={"gen/held_out": (fn, batch), ...}, out_dir="runs/x", every=10,
                             config=ProjectionConfig(kind="exact"), loss_fn=per_sample_loss)
    trainer.add_callback(cb)
    cb.attach(trainer)           # needed: gives the callback the batches (adds cb if not added yet)
    trainer.train()

With the trainer's optimizer a torch.optim.AdamW or Adam (transformers' "adamw_torch" and
"adamw_torch_fused"), every step is split exactly (ntkdyn.analysis.attribution): each training_step runs
inside the one loss source's context (``source``, "train" by default; the trainer's clip is seen and
undone exactly), so tracked rows carry predicted_by_source ("<source>/current", "<source>/momentum",
"weight_decay"), predicted_current and, with loss_fn, predicted_kernel (the Adam-aware kernel). Other
optimizers: those fields are None. A trainer resumed from its checkpoint has no per-source moments: its
optimizer's first moment becomes the source "before_attach" (momentum only). After each tracked step the
means per branch of the predictions (``dynamics_scalars``) go to ``trainer.log``: into
``state.log_history`` and to every logger of ``report_to``.

probes: ``{name: (fn, batch)}`` with ``fn(model, batch) -> Tensor[B]``; a name
``"measurement/category"`` sets both (e.g. ``"gen/aligned"``), otherwise both are the name.
loss_fn: ``loss_fn(model, inputs) -> Tensor[B]`` per-sample training losses of the trainer's
inputs, whose mean is the step loss; None skips the kernel form (``predicted_sgd``) while the
exact and feature predictions, which only need the real update, remain. Steps are numbered as
``state.global_step`` after the update (1, 2, ...); step s is tracked when s % every == 0.
The outputs are those of every other way of tracking (ntkdyn.analysis.tracker: dynamics.jsonl,
ntk.jsonl, kernels/). A trainer resumed from its own checkpoint (``trainer.train(
resume_from_checkpoint=...)``) continues them: what was written for later steps is dropped at the
start (ntkdyn.rundir.truncate_tracking). Batches go to the model's device with ntkdyn.batch.to_device.
Probes are measured in fp32 and eval mode even when the trainer runs under bf16 autocast
(accelerate's autocast wrapper of the forward is bypassed while measuring): one step's change is
below bf16 resolution.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ntkdyn.analysis.attribution import SourceAttribution
from ntkdyn.analysis.probes import TRAIN, Fn, ProbeGroup
from ntkdyn.analysis.projector import ProjectionConfig
from ntkdyn.analysis.summary import dynamics_scalars
from ntkdyn.analysis.tracker import DynamicsTracker
from ntkdyn.batch import to_device
from ntkdyn.rundir import RunDir, truncate_tracking


class NTKDynamicsCallback(TrainerCallback):
    """Predicted vs observed change of fixed probes at every ``every``-th optimizer step of a
    transformers.Trainer (or a TRL trainer built on it). See the module docstring for usage."""

    def __init__(
        self,
        probes: Mapping[str, tuple[Fn, dict]],
        out_dir: str | os.PathLike,
        every: int = 10,
        config: ProjectionConfig | None = None,
        loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
        top_contributors: int = 3,
        source: str = TRAIN,
    ) -> None:
        if not probes:
            raise ValueError("NTKDynamicsCallback: probes must name at least one (fn, batch)")
        for name, value in probes.items():
            if not (isinstance(value, tuple) and len(value) == 2 and callable(value[0])):
                raise TypeError(f"NTKDynamicsCallback: probes[{name!r}] must be a tuple (fn, batch)")
        if every < 1:
            raise ValueError(f"NTKDynamicsCallback: every must be >= 1, got {every}")
        self.probes = dict(probes)
        self.out_dir = out_dir
        self.every = every
        self.config = config
        self.loss_fn = loss_fn
        self.top_contributors = top_contributors
        self.source = source
        self.tracker: DynamicsTracker | None = None
        self.split: SourceAttribution | None = None
        self._trainer: Trainer | None = None
        self._attached = False
        self._lr = float("nan")

    def attach(self, trainer: Trainer) -> NTKDynamicsCallback:
        """Wrap ``trainer.training_step`` so that the callback sees each micro-batch; add the
        callback to the trainer if it is not there yet. Returns self."""
        if self._attached:
            raise RuntimeError("NTKDynamicsCallback.attach: already attached to a trainer")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        original = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            self._before(trainer, model, inputs)
            if self.split is None:
                return original(model, inputs, *args, **kwargs)
            with self.split.source(self.source):
                return original(model, inputs, *args, **kwargs)

        trainer.training_step = training_step
        self._trainer = trainer
        self._attached = True
        return self

    def _before(self, trainer: Trainer, model: nn.Module, inputs: dict) -> None:
        module = trainer.accelerator.unwrap_model(model)
        device = next(module.parameters()).device
        if self.tracker is None:
            self._start(trainer, module, device)
        step = trainer.state.global_step + 1  # the optimizer step this micro-batch belongs to
        if step % self.every:
            return
        if self.tracker.open_step != step:  # first micro-batch of the step: its learning rate
            scheduler = trainer.lr_scheduler
            self._lr = (
                float(scheduler.get_last_lr()[0]) if scheduler is not None else trainer.args.learning_rate
            )
        losses = None if self.loss_fn is None else {self.source: self.loss_fn}
        self.tracker.before_step(step, model, losses, to_device(inputs, device))

    def _start(self, trainer: Trainer, module: nn.Module, device: torch.device) -> None:
        """The tracker, and the split of the trainer's optimizer when it is torch's Adam or AdamW."""
        groups = [
            ProbeGroup(
                name,
                fn,
                to_device(batch, device),
                measurement=name.split("/")[0],
                category=name.split("/")[-1],
            )
            for name, (fn, batch) in self.probes.items()
        ]
        self.tracker = DynamicsTracker(
            module,
            groups,
            self.out_dir,
            every=self.every,
            config=self.config,
            top_contributors=self.top_contributors,
        )
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
            self.split = self.tracker.attribute(optimizer, module.named_parameters(), (self.source,))

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._attached:
            raise RuntimeError(
                "NTKDynamicsCallback needs the step's batches: call cb.attach(trainer) before trainer.train()"
            )
        if state.global_step > 0 and state.is_world_process_zero:  # resumed from a trainer checkpoint
            truncate_tracking(RunDir(self.out_dir), state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.tracker is not None and state.global_step % self.every == 0:
            rows = self.tracker.after_step(state.global_step, model, self._lr)
            if rows:
                self._trainer.log(dynamics_scalars(rows))
