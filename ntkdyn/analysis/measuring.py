"""Measuring a model in the middle of training without disturbing it, and the exact first-order change
of a measurement along a parameter update (forward-mode AD)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwad
from torch import nn

from ntkdyn.analysis.probes import Fn


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


@contextlib.contextmanager
def parameters_at(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """The named parameters of ``model`` hold ``values`` inside (copied in under no_grad); their own
    values, bit for bit, are copied back on exit."""
    params = dict(model.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ValueError(f"parameters_at: the model has no parameters {unknown[:5]}")
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


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
