"""The generic path: exact per-sample gradients of the parameters a module call uses itself.

For a recorded module call y = m(theta; inputs) whose outputs got gradients g (each output with its
verified layout, see layout.py), the gradient of f_b through this call is grad_theta <y(theta), g^(b)>,
g^(b) = g restricted to sample b's part (no other sample's gradient flows through that part). Three
ways to compute it, tried in this order:

  one sample   every output is from one sample b: one vjp of the recorded call.
  slices       torch.func: vmap over the samples of grad_theta <m(theta; inputs_b), g_b>, where
               inputs_b is sample b's slice of every tensor input, positional and keyword (its sample
               axis: the output's when the input has B entries there, else its first axis of size B,
               else the input is shared), each lane a call of the module on one sample. Then verified:
               sum_b w_b grad_b must equal one vjp of the whole call with the cotangent sum_b w_b g^(b)
               (random w), which also catches samples that interact inside the module.
  masked loop  torch.func cannot run the module, or the check failed: one vjp of the whole call per
               sample with the cotangent g^(b), through this module only.

The recomputed output must reproduce the recorded one: a module with state or randomness is refused.
"""

from __future__ import annotations

import warnings

import torch
from torch.func import functional_call
from torch.utils import _pytree as pytree

from ntkdyn.analysis.projector.capture import ModuleCall
from ntkdyn.analysis.projector.errors import UnsupportedModuleError
from ntkdyn.analysis.projector.layout import Layout, tolerance
from ntkdyn.analysis.projector.rules import Blocks
from ntkdyn.analysis.projector.sketches import Sketch

Active = list[tuple[int, torch.Tensor, Layout]]  # (leaf index, output-gradient, layout) of used outputs


def generic_per_sample(
    call: ModuleCall, grads: list[tuple[torch.Tensor, Layout] | None], B: int
) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]] | None:
    """(samples [S], [(tracked name, its per-sample gradients [S, *shape]) per parameter of the call]), or
    None when no leaf has a gradient; grads: (g, layout) per leaf, or None for a leaf without gradient."""
    active = [(i, g, layout) for i, entry in enumerate(grads) if entry is not None for g, layout in [entry]]
    if not active or not call.params:
        return None
    theta = {path: call.module.get_parameter(path).detach() for path in call.params}
    samples, per_sample = _per_sample(call, theta, active, B)
    return samples, [(name, per_sample[path]) for path, name in call.params.items()]


def generic_blocks(per_sample: tuple[torch.Tensor, list[tuple[str, torch.Tensor]]], sketch: Sketch) -> Blocks:
    """Per-sample projected gradient blocks from generic_per_sample's result."""
    samples, grads = per_sample
    for name, value in grads:
        yield name, samples, sketch.project(name, value.reshape(value.shape[0], *sketch.blocks[name].shape2d))


def _per_sample(call: ModuleCall, theta: dict, active: Active, B: int) -> tuple[torch.Tensor, dict]:
    """(samples [S], {path: [S, *shape]})."""
    device = active[0][1].device
    layouts = [layout for _, _, layout in active]
    if all(layout.kind == "one" for layout in layouts) and len({layout.sample for layout in layouts}) == 1:
        theta_req, outputs = _recompute(call, theta, active, B)
        grads = _vjp(theta_req, outputs, [g for _, g, _ in active], retain=False)
        return torch.tensor([layouts[0].sample], device=device), {p: v.unsqueeze(0) for p, v in grads.items()}
    if not any(layout.kind == "one" for layout in layouts):
        try:
            per_sample = _slices(call, theta, active, B)
        except Exception:  # noqa: BLE001 - torch.func cannot run the module, or an input's axis was guessed wrong
            per_sample = None
        if per_sample is not None and _agrees(call, theta, active, per_sample, B):
            return torch.arange(B, device=device), per_sample
    return torch.arange(B, device=device), _masked_loop(call, theta, active, B)


def _recompute(call: ModuleCall, theta: dict, active: Active, B: int) -> tuple[dict, list[torch.Tensor]]:
    """The whole call again with theta as fresh leaves: (theta leaves, the active outputs)."""
    theta_req = {p: v.detach().requires_grad_() for p, v in theta.items()}
    with torch.enable_grad():
        flat = pytree.tree_leaves(functional_call(call.module, theta_req, call.args, call.kwargs))
    outputs = []
    for i, _, _ in active:
        out, recorded = flat[call.positions[i]], call.leaves[i].detach()
        if call.expanded and out.dim() > 0 and out.shape[0] == 1:
            out = out.expand(B, *out.shape[1:])
        tol = tolerance(recorded.dtype)
        if out.shape != recorded.shape or not torch.allclose(
            out.detach(), recorded, rtol=tol, atol=tol * float(recorded.abs().max())
        ):
            raise UnsupportedModuleError(
                f"{call.where}: re-running it on its recorded inputs does not reproduce its output (it "
                "keeps state, draws random numbers or modifies its inputs in place), so the per-sample "
                f"gradients of {sorted(call.params.values())} through it cannot be computed; exclude them "
                "via ProjectionConfig.exclude"
            )
        outputs.append(out)
    return theta_req, outputs


def _vjp(theta_req: dict, outputs: list, cotangents: list, retain: bool) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(
        outputs,
        list(theta_req.values()),
        [c.to(o.dtype) for o, c in zip(outputs, cotangents, strict=True)],
        retain_graph=retain,
        allow_unused=True,
    )
    return {
        p: torch.zeros_like(v) if g is None else g for (p, v), g in zip(theta_req.items(), grads, strict=True)
    }


def _input_dim(x: torch.Tensor, reference: Layout, B: int, rows: int | None) -> tuple[str, int] | None:
    """The guessed sample axis of an input (verified afterwards by _agrees), None = shared."""
    if reference.kind == "axis":
        if x.dim() > reference.axis and x.shape[reference.axis] == B:
            return ("axis", reference.axis)
        axes = [a for a, size in enumerate(x.shape) if size == B]
        return ("axis", axes[0]) if axes else None
    if x.dim() > 0 and x.shape[0] == B * rows:
        return (reference.kind, 0)
    return ("axis", 0) if x.dim() > 0 and x.shape[0] == B else None


def _slices(call: ModuleCall, theta: dict, active: Active, B: int) -> dict[str, torch.Tensor]:
    """vmap over samples of grad_theta <module(theta; inputs_b), g_b>: {path: [B, *shape]}."""
    flat, spec = pytree.tree_flatten((call.args, call.kwargs))
    first, reference = call.leaves[active[0][0]], active[0][2]
    rows = first.shape[0] // B if reference.kind in ("rows", "strided") else None
    dims = {
        i: d
        for i, x in enumerate(flat)
        if isinstance(x, torch.Tensor)
        for d in [_input_dim(x, reference, B, rows)]
        if d is not None
    }
    batched, in_dims = [], []
    for i, (kind, axis) in dims.items():
        x = flat[i]
        if kind == "rows":
            x, axis = x.reshape(B, rows, *x.shape[1:]), 0
        elif kind == "strided":
            x, axis = x.reshape(rows, B, *x.shape[1:]), 1
        batched.append(x)
        in_dims.append(axis)
    parts = [layout.split(g, B) for _, g, layout in active]

    def lane(theta_b, parts_b, *inputs_b):
        entries = list(flat)
        for (i, (kind, axis)), x in zip(dims.items(), inputs_b, strict=True):
            entries[i] = x.unsqueeze(axis) if kind == "axis" else x
        args, kwargs = pytree.tree_unflatten(entries, spec)
        out = pytree.tree_leaves(functional_call(call.module, theta_b, args, kwargs))
        total = 0
        for (i, _, _), g in zip(active, parts_b, strict=True):
            o = out[call.positions[i]]
            total = total + (o * g.reshape(o.shape).to(o.dtype)).sum()
        return total

    with warnings.catch_warnings():  # functorch's "no batching rule, performance drop": an internal choice
        warnings.filterwarnings("ignore", message="There is a performance drop")
        per_sample = torch.func.vmap(torch.func.grad(lane), in_dims=(None, 0, *in_dims))(
            theta, parts, *batched
        )
    return {p: v.detach() for p, v in per_sample.items()}


def _agrees(call: ModuleCall, theta: dict, active: Active, per_sample: dict, B: int) -> bool:
    """sum_b w_b per_sample_b == grad_theta <module(theta; inputs), sum_b w_b g^(b)> for random w."""
    w = torch.randn(B, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta_req, outputs = _recompute(call, theta, active, B)
    whole = _vjp(theta_req, outputs, [layout.weigh(g, w) for _, g, layout in active], retain=False)
    for path, rhs in whole.items():
        rows = per_sample[path]
        weights = w.to(device=rows.device, dtype=rows.dtype)
        lhs = torch.einsum("b...,b->...", rows, weights)
        scale = max(float((weights.abs() * rows.reshape(B, -1).norm(dim=1)).sum()), float(rhs.norm()))
        if float((lhs - rhs).norm()) > tolerance(rows.dtype) * scale:
            return False
    return True


def _masked_loop(call: ModuleCall, theta: dict, active: Active, B: int) -> dict[str, torch.Tensor]:
    """One vjp of the whole call per sample b with the cotangent g^(b): {path: [B, *shape]}."""
    theta_req, outputs = _recompute(call, theta, active, B)
    rows = [
        _vjp(theta_req, outputs, [layout.keep(g, b, B) for _, g, layout in active], retain=b < B - 1)
        for b in range(B)
    ]
    return {p: torch.stack([r[p] for r in rows]) for p in theta}
