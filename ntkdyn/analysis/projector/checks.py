"""Checks of a recorded run and of computed features: parameters whose gradient path the recorder cannot
see, recorded outputs shared by several samples, and the self-check's comparison per feature block."""

from __future__ import annotations

import torch
from torch import nn

from ntkdyn.analysis.projector.capture import Recorded, Run
from ntkdyn.analysis.projector.errors import UnsupportedModuleError
from ntkdyn.analysis.projector.layout import tolerance
from ntkdyn.analysis.projector.sketches import Sketch


def invisible_uses(run: Run, names: dict[int, str]) -> dict[str, str]:
    """{tracked name: why} for parameters whose gradient reaches fn's values by a path the recorder cannot
    see: an input of a custom torch.autograd.Function, a use while gradients are off inside one (reentrant
    checkpointing), or no recorded use at all. names: id(parameter) -> tracked name."""
    reachable: set[int] = set()
    into_function: set[int] = set()
    custom = False
    seen: set[int] = set()
    stack = [run.values.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        is_custom = isinstance(node, torch.autograd.function.BackwardCFunction)
        custom = custom or is_custom
        variable = getattr(node, "variable", None)
        if variable is not None:
            reachable.add(id(variable))
        for child, _ in node.next_functions:
            if is_custom and getattr(child, "variable", None) is not None:
                into_function.add(id(child.variable))
            stack.append(child)
    covered = {name for item in run.items for name in item.params.values()}
    problems: dict[str, str] = {}
    if custom:
        for name, where in run.no_grad_uses.items():
            problems[name] = (
                f"{where} uses it while gradients are off (inside a custom autograd.Function, e.g. "
                "reentrant checkpointing)"
            )
    for i in reachable - into_function:
        if i in names and names[i] not in covered:
            problems.setdefault(names[i], "no use of it was seen")
    for i in into_function & names.keys():
        problems[names[i]] = "it is an input of a custom torch.autograd.Function"
    return problems


def shared_output_error(item: Recorded, leaf: torch.Tensor, B: int, broadcast_tried: bool) -> Exception:
    """The refusal of a recorded output without a layout (see layout.py)."""
    what = f"its output of shape {tuple(leaf.shape)}"
    if broadcast_tried and leaf.dim() > 0 and leaf.shape[0] == 1:
        why = (
            f"has 1 row for fn's {B} samples and is not a broadcast over the batch (re-running fn with "
            "it expanded to B rows changed fn's values or failed)"
        )
    else:
        why = (
            f"gets gradient from several of fn's {B} samples at the same entries: it is computed once for "
            "the whole batch without a batch axis (e.g. a shared position table), or samples interact "
            "after it (batch statistics, attention across the batch), or fn's values do not follow the "
            "samples of the batch, or its rows follow no regular sample layout (e.g. packed sequences)"
        )
    names = sorted(set(item.params.values()))
    return UnsupportedModuleError(
        f"{item.where}: {what} {why}, so the per-sample gradients of {names} are not available from one "
        "backward; exclude them via ProjectionConfig.exclude"
    )


def block_errors(
    sketch: Sketch,
    params: dict[str, nn.Parameter],
    blocks: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor | None],
    w: torch.Tensor,
    compute_dtype: torch.dtype,
) -> tuple[dict[str, float], list[str]]:
    """Per tracked parameter, ||sum_b w_b blocks_b - P(grads)|| relative to the larger of
    sum_b |w_b| ||blocks_b|| and ||P(grads)||, and the parameters whose error exceeds the tolerance of the
    coarsest of the features', the parameter's and the computation's (autocast) dtype. grads: the gradient
    of sum_b w_b f_b. A block is judged against the whole feature's scale at least: a gradient that is zero
    up to rounding (a key bias under softmax) carries the rounding noise of the terms that cancel in it."""
    B = w.shape[0]
    diffs, scales, limits = {}, {}, {}
    for name, param in params.items():
        rows, grad = blocks.get(name), grads[name]
        if rows is None and grad is None:
            continue
        rhs = None if grad is None else sketch.project(name, grad.reshape(1, *sketch.blocks[name].shape2d))[0]
        weights = w.to(device=param.device, dtype=sketch.dtype)
        lhs = torch.zeros_like(rhs) if rows is None else torch.einsum("b...,b->...", rows, weights)
        rhs = torch.zeros_like(lhs) if rhs is None else rhs
        terms = 0.0 if rows is None else float((weights.abs() * rows.reshape(B, -1).norm(dim=1)).sum())
        diffs[name], scales[name] = float((lhs - rhs).norm()), max(terms, float(rhs.norm()))
        limits[name] = tolerance(
            max(sketch.dtype, param.dtype, compute_dtype, key=lambda d: torch.finfo(d).eps)
        )
    total = sum(s**2 for s in scales.values()) ** 0.5
    errors = {name: diffs[name] / scales[name] if scales[name] > 0 else 0.0 for name in diffs}
    return errors, [name for name in diffs if diffs[name] > limits[name] * max(scales[name], total)]
