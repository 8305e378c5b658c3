"""Per-sample features from the caller's own forward and backward (the training step's): no second pass.

    capture = projector.capture(eager)
    with capture:                            # the forward runs under the recorder (capture.py)
        losses = loss_fn(model, batch)       # Tensor[B], one per sample
        capture.watch(losses)                # ends the recording; hooks on the recorded outputs
        (losses.sum() / n).backward()        # the caller's own backward, any weights w_b = dL/dl_b != 0
    measured = capture.features(precondition)   # PerSample, or None: not available from this capture

The hooks see each recorded output's gradient from the caller's backward, g_w = sum_b w_b dl_b/dX, and
the weights w (the gradient reaching the losses, which arrives first); on sample b's part of X,
g_w / w_b = dl_b/dX. ``eager``: each recorded call's blocks of the plain projection are formed in its hook,
during the backward, and its output-gradient and recorded tensors are let go at once (keeping them until
the end kept a step's activations alive through the backward: about 24,000 page faults, some 90 MB of fresh
memory, per stored step on the default toy at k = 16); otherwise the output-gradients are kept until
``features``, which can then also form the preconditioned projection (a preconditioner known only after
the optimizer step: the tracker). Which
part of X is sample b's is not read again: the layouts come from an earlier full recording whose
signature (views.signature: the same calls, parameters and axes of size B) is the same, by the same
projector (GradientProjector.per_sample/per_sample_all on a batch of the same structure, which reads them
from autograd and runs the self-check on its first call with each fn). Without one (or where the
full recording had to rewrite the forward, a weight is zero, or a recorded tensor was modified in place),
``features`` returns None and the caller takes the full recording. A module call on the generic path is
recomputed at the parameters' current values: compute the features before the optimizer changes them
(or with the parameters set back, as the tracker does).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ntkdyn.analysis.projector.capture import FunctionUse, Recorder, Rewrite, Run, modified, subsume
from ntkdyn.analysis.projector.layout import Layout
from ntkdyn.analysis.projector.views import add_item_blocks, from_plain, signature

if TYPE_CHECKING:
    from ntkdyn.analysis.projector.projector import GradientProjector, PerSample


class StepCapture:
    """One recorded forward of the caller's per-sample losses and the gradients its own backward gave."""

    def __init__(self, projector: GradientProjector, eager: bool = False):
        self._projector = projector
        self._eager = eager
        self._stack = contextlib.ExitStack()
        self._recorder: Recorder | None = None
        self._run: Run | None = None
        self._layouts: list[list[Layout | None]] | None = None
        self._weights: torch.Tensor | None = None  # dL/dl [B]
        self._usable = False  # every weight finite and nonzero
        self._uniform = False  # every weight the same (a mean or sum of the losses)
        self._scale_at_end = False  # divide each sample's features by its weight, not the output-gradients
        self._owner: list[tuple[int, int]] = []  # leaf position -> (item position, leaf index)
        self._grads: dict[int, list[torch.Tensor | None]] = {}  # item position -> its leaves' gradients
        self._acc: dict[str, torch.Tensor] = {}  # eager: the plain projection's blocks so far
        self._generic: dict = {}
        self._failed = False  # a recorded output got a gradient but has no known layout

    def __enter__(self) -> StepCapture:
        p = self._projector
        if p._layouts:  # only the modules that held the calibrated recordings' items are watched
            self._recorder = Recorder(p.model, p._names, p._containers, Rewrite(), scope=set(p._scope))
            self._stack.enter_context(p._eager())
            self._stack.enter_context(self._recorder)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def watch(self, values: torch.Tensor) -> None:
        """End the recording at the per-sample losses ``values`` [B] (before the caller's backward)."""
        self._stack.close()
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or not values.requires_grad:
            raise ValueError(
                "StepCapture.watch: expected the per-sample losses, a Tensor[B] that requires grad"
            )
        recorder = self._recorder
        if recorder is None or recorder.outside:  # not calibrated, or a use the calibration did not see
            return
        items = subsume(recorder.items)
        if any(modified(item) for item in items):
            return
        self._layouts = self._projector._layouts.get(signature(items, values.shape[0]))
        if self._layouts is None:
            return
        self._run = Run(values, items, recorder.no_grad_uses, recorder.outside)
        self._recorder = None  # the run holds the items (in eager mode, each until its blocks are formed)
        # every block is linear in sample b's output-gradients: divide its features by w_b at the end when
        # they are smaller than the gradients
        gradient_entries = sum(leaf.numel() for item in items for leaf in item.leaves)
        self._scale_at_end = 2 * values.shape[0] * self._projector.feature_dim <= gradient_entries
        values.register_hook(_weak_hook(self._keep_weights))
        for i, item in enumerate(items):
            for j, leaf in enumerate(item.leaves):
                self._owner.append((i, j))
                leaf.register_hook(_weak_hook(self._keep_leaf, len(self._owner) - 1))

    def _keep_weights(self, grad: torch.Tensor) -> None:
        w = grad.detach()
        self._weights = w
        self._usable = bool((w != 0).all() & w.isfinite().all())
        self._uniform = bool((w == w[0]).all())

    def _keep_leaf(self, position: int, g: torch.Tensor) -> None:
        i, j = self._owner[position]
        grads = self._grads.get(i)
        if grads is None:
            grads = self._grads[i] = [None] * len(self._run.items[i].leaves)
        grads[j] = g.detach()
        if self._eager and self._usable and all(x is not None for x in grads):
            pairs = self._pairs(i)
            if pairs is not None:
                self._add(i, pairs, self._projector._sketch, self._acc)

    def _pairs(self, i: int) -> list | None:
        """Item i's (output-gradient, layout) per leaf (None: no gradient), its gradients let go: dl_b/dX,
        or sum_b w_b dl_b/dX where the features are divided by w_b at the end; None (and the capture
        failed) where a leaf with a nonzero gradient has no known layout."""
        w, pairs = self._weights, []
        for g, layout in zip(self._grads.pop(i), self._layouts[i], strict=True):
            if g is not None and layout is None and bool(g.any()):
                self._failed = True
                return None
            if g is None or layout is None:
                pairs.append(None)
            elif self._scale_at_end:
                pairs.append((g, layout))
            else:  # dl_b/dX from sum_b w_b dl_b/dX
                pairs.append((g * (1 / w[0]) if self._uniform else layout.weigh(g, 1 / w), layout))
        return pairs

    def _add(self, i: int, pairs: list, sketch, acc: dict[str, torch.Tensor]) -> None:
        """Item i's blocks under ``sketch`` into acc, from its leaves' (output-gradient, layout) pairs."""
        item, B = self._run.items[i], self._run.values.shape[0]
        with contextlib.ExitStack() as stack:
            if not isinstance(item, FunctionUse):  # the generic path recomputes the module call
                stack.enter_context(torch.enable_grad())
                stack.enter_context(self._projector._eager())
            stack.enter_context(sketch.keeping_zero_tokens())
            add_item_blocks(acc, item, pairs, B, sketch, self._generic)
        if self._eager:  # let go of the item's inputs and outputs: autograd frees them as in a plain backward
            self._run.items[i] = None

    def features(
        self,
        precondition: dict[str, torch.Tensor] | None = None,
        workspace: dict[str, torch.Tensor] | None = None,
    ) -> PerSample | None:
        """values, features [B, D] and, with ``precondition`` (not in eager mode), preconditioned [B, D],
        as GradientProjector.per_sample_all gives them (written into ``workspace`` as there); None when
        this capture cannot give them (module docstring). Tokens with zero output-gradient are not masked
        (Sketch.keeping_zero_tokens): the caller's own backward multiplied every activation by its
        output-gradient, so a non-finite one there made the step's gradient non-finite too, and the
        features' finiteness check names it."""
        from ntkdyn.analysis.projector.projector import PerSample

        if self._eager and precondition is not None:
            raise ValueError("StepCapture.features: an eager capture forms the plain projection only")
        run = self._run
        if run is None or self._failed or not self._usable:
            return None
        p = self._projector
        views = p._views(precondition)
        accs = [self._acc] if self._eager else []
        B = run.values.shape[0]
        outs = p._view_matrices(views, workspace, B, run.values.device)
        # the items not formed yet (eager mode: those whose every leaf did not get a gradient), each
        # item's pairs formed once for every view
        pairs = {i: self._pairs(i) for i in sorted(self._grads)}
        if self._failed:
            return None
        if self._eager:
            for i, item_pairs in pairs.items():
                self._add(i, item_pairs, views[0][0], accs[0])
        for view, out in zip(views[len(accs) :], outs[len(accs) :], strict=True):
            with from_plain(view, accs, views, out) as acc:
                for i, item_pairs in pairs.items():
                    self._add(i, item_pairs, view[0], acc)
            accs.append(acc)
        w = self._weights
        finished = p._finish(views, accs, B, run.values.device, workspace)
        if self._scale_at_end:  # row b of every block is linear in sample b's output-gradients
            finished = [rows.div_(w.to(rows.device, rows.dtype)[:, None]) for rows in finished]
        return PerSample(
            values=run.values.detach(),
            features=finished[0],
            preconditioned=finished[1] if precondition is not None else None,
            dots=None,
        )


def _weak_hook(method: Callable, *args: int) -> Callable[[torch.Tensor], None]:
    """A tensor hook calling the capture's bound ``method(*args, grad)`` through a weak reference. A hook
    holding the capture itself would close a cycle (the recorded tensors hold their hooks in autograd's C++
    nodes, the capture holds the recorded tensors) that Python's collector never frees: every step's
    activations would stay alive."""
    ref = weakref.WeakMethod(method)

    def hook(grad: torch.Tensor) -> None:
        bound = ref()
        if bound is not None:
            bound(*args, grad)

    return hook
