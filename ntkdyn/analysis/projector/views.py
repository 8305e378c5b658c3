"""From a recorded run's items and their output-gradients (each leaf's g with its sample layout) to the
per-sample blocks of several views at once: the projection (a Sketch), the preconditioned projection
(a Sketch under a preconditioner D) and the exact dots with K tangents (TangentDots).

Shared work between views: a module call's per-sample gradients (the generic path) are computed once;
the preconditioned and dots views take the blocks that the first (plain) view formed in full, G_b itself
(kind "exact", or kronecker blocks with no projected axis), instead of forming them again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ntkdyn.analysis.projector.capture import FunctionUse, Recorded
from ntkdyn.analysis.projector.generic import generic_blocks, generic_per_sample
from ntkdyn.analysis.projector.layout import Layout
from ntkdyn.analysis.projector.sketches import Sketch, TangentDots

View = tuple[Any, dict[str, torch.Tensor] | None]  # (Sketch or TangentDots, preconditioner by name or None)
OutputGradients = list[list[tuple[torch.Tensor, Layout] | None]]  # per item, per leaf: (g, layout) or None


def signature(items: Sequence[Recorded], B: int) -> tuple:
    """What fixes a recording's sample layouts: per item its kind, place and parameters, and per leaf
    which axes have B entries and whether axis 0 holds B rows per sample or more. Two recordings with
    equal signatures run the same calls on batches of the same structure (the same probe batch at
    every tracked step, the training loss on each step's batch)."""

    def leaf_key(x: torch.Tensor) -> tuple:
        rows = x.dim() > 0 and x.shape[0] > B and x.shape[0] % B == 0
        return (x.dim(), tuple(size == B for size in x.shape), rows)

    items_key = tuple(
        (type(i).__name__, i.where, tuple(sorted(i.params.items())), tuple(map(leaf_key, i.leaves)))
        for i in items
    )
    return (B, items_key)


def nonzero_gradients(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The leaves' gradients with all-zero ones as None (a leaf without gradient needs no layout).
    Non-finite values are not looked for here: they reach the features, whose check names them."""
    return [None if g is None or not bool(g.any()) else g for g in grads]


def with_layouts(
    grads: list[torch.Tensor | None], layouts: list[list[Layout | None]]
) -> OutputGradients | None:
    """Each leaf's gradient with the layout an earlier recording of the same signature found (a leaf
    with no known layout must have no or an all-zero gradient); None when a leaf has a nonzero gradient
    but no known layout."""
    out, position = [], 0
    for known in layouts:
        pairs = []
        for layout in known:
            g = grads[position]
            position += 1
            if g is not None and layout is None and bool(g.any()):
                return None
            pairs.append(None if g is None or layout is None else (g, layout))
        out.append(pairs)
    return out


def merged_layouts(new: list[list[Layout | None]], old: list[list[Layout | None]] | None) -> list[list]:
    """The layouts of a new full recording, with the old one's where the new one found none (a leaf
    whose gradient was zero in one recording, e.g. a loss at its minimum, keeps its known layout)."""
    if old is None:
        return new
    return [
        [n if n is not None else o for n, o in zip(ns, os, strict=True)]
        for ns, os in zip(new, old, strict=True)
    ]


def view_blocks(
    items: Sequence[Recorded],
    output_gradients: OutputGradients,
    B: int,
    views: Sequence[View],
    outs: Sequence[torch.Tensor | None] = (),
) -> list[dict[str, torch.Tensor]]:
    """Per view, its per-sample blocks {tracked name: [B, ...]} (absent: zero); ``outs``: per view, the
    matrix it will be finished into, or None (see from_plain; none given: no view has one)."""
    generic: dict[int, Any] = {}  # item index -> generic_per_sample (computed once for all views)
    accs: list[dict[str, torch.Tensor]] = []
    for view, out in zip(views, outs or [None] * len(views), strict=True):
        with from_plain(view, accs, views, out) as acc:
            for item, grads in zip(items, output_gradients, strict=True):
                add_item_blocks(acc, item, grads, B, view[0], generic)
        accs.append(acc)
    return accs


@contextlib.contextmanager
def from_plain(
    view: View, accs: list[dict[str, torch.Tensor]], views: Sequence[View], out: torch.Tensor | None = None
) -> Iterator[dict]:
    """Inside: the view's sketch preconditioned (if the view has a preconditioner) and, for a view after
    a plain Sketch view (views[0], whose blocks accs[0] holds), skipping the names whose plain blocks are
    each sample's gradient G_b in full (not fused: no projected axis); yields the view's accumulator,
    holding those names' blocks computed from G_b (D ∘ G_b, or the dots with the tangents). ``out``: the
    [B, D] matrix a Sketch view's rows will be finished into; the view forms its blocks in it where it can
    (Sketch.writing_into)."""
    sketch, precondition = view
    known = _full_blocks(accs[0], views[0]) if accs else {}
    writes = out is not None and isinstance(sketch, Sketch)
    with (
        contextlib.nullcontext() if precondition is None else sketch.preconditioned(precondition),
        sketch.writing_into(out) if writes else contextlib.nullcontext(),
    ):
        acc = {name: sketch.project(name, full) for name, full in known.items()}
        with sketch.skipping(known):
            yield acc


def add_item_blocks(
    acc: dict[str, torch.Tensor],
    item: Recorded,
    grads: list,
    B: int,
    sketch: Sketch | TangentDots,
    generic: dict,
) -> None:
    """Add one item's per-sample blocks under ``sketch`` into ``acc`` {tracked name: [B, ...]}; grads:
    (g, layout) or None per leaf; generic: item index -> a module call's per-sample gradients, kept for
    the other views."""
    for name, samples, block in _item_blocks(item, grads, B, sketch, generic):
        if block is None:  # a name the view skips
            continue
        if block.shape[0] != B:  # samples is a subset of arange(B)
            block = torch.zeros(B, *block.shape[1:], dtype=block.dtype, device=block.device).index_add_(
                0, samples, block
            )
        # never in place: a block may be shared with another view (a generic-path gradient)
        acc[name] = block if name not in acc else acc[name] + block


def _full_blocks(acc: dict[str, torch.Tensor], view: View) -> dict[str, torch.Tensor]:
    """The blocks of a plain (unpreconditioned) Sketch view that are each sample's gradient in full."""
    sketch, precondition = view
    if not isinstance(sketch, Sketch) or precondition is not None:
        return {}
    return {name: block for name, block in acc.items() if not sketch.fused(name)}


def _item_blocks(item: Recorded, grads: list, B: int, sketch: Sketch | TangentDots, generic: dict):
    """The item's per-sample blocks under ``sketch``; a module call's per-sample gradients are kept in
    ``generic`` (by item index) for the other views."""
    if isinstance(item, FunctionUse):
        if grads[0] is not None:
            g, layout = grads[0]
            yield from item.rule.blocks(item, g, layout, B, sketch)
        return
    if item.index not in generic:
        generic[item.index] = generic_per_sample(item, grads, B)
    if generic[item.index] is not None:
        yield from generic_blocks(generic[item.index], sketch)
