"""GradientProjector: record one run of fn, read each recorded tensor's sample layout from autograd, turn
output-gradients into per-sample gradient blocks (rules or the generic path), project, and self-check.

(Over 400 lines: one recorded run feeds several views, the plain and preconditioned projections and the
tangent dots of per_sample_all, and the self-check; splitting the class would pass the run's state around.)"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ntkdyn.analysis.projector.capture import Recorded, Rewrite, Run, modified, record, subsume
from ntkdyn.analysis.projector.checks import block_errors, invisible_uses, shared_output_error
from ntkdyn.analysis.projector.config import ProjectionConfig, owners, select_parameters
from ntkdyn.analysis.projector.errors import SelfCheckError, UnsupportedModuleError
from ntkdyn.analysis.projector.layout import Layout, find_layout, sample_codes, tolerance
from ntkdyn.analysis.projector.sketches import Sketch, TangentDots
from ntkdyn.analysis.projector.step_capture import StepCapture
from ntkdyn.analysis.projector.views import (
    OutputGradients,
    View,
    merged_layouts,
    nonzero_gradients,
    signature,
    view_blocks,
    with_layouts,
)
from ntkdyn.kernels.kron_projection import triton_available

Fn = Callable[[nn.Module, Any], torch.Tensor]
_COMPILED_PREFIX = "_orig_mod."


@dataclass
class PerSample:
    """What :meth:`GradientProjector.per_sample_all` gives for one batch of B samples."""

    values: torch.Tensor  # [B] fn's values
    features: torch.Tensor  # [B, D] Phi
    preconditioned: torch.Tensor | None  # [B, D] Phi of D ∘ grad, with a precondition
    dots: torch.Tensor | None  # [B, K] float64 <grad fn[b], t_k>, with tangents


def _is_compiled(module: nn.Module) -> bool:
    """torch.compile(module) (an OptimizedModule wrapper) or module.compile()."""
    wrapper = type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")
    return wrapper or getattr(module, "_compiled_call_impl", None) is not None


class GradientProjector:
    """Projected per-sample gradients; see :mod:`ntkdyn.analysis.projector`.

    model: the nn.Module whose parameters are tracked (a torch.compile'd model is unwrapped; fn gets
    the unwrapped module). config: a :class:`ProjectionConfig`.
    """

    def __init__(self, model: nn.Module, config: ProjectionConfig | None = None):
        self._prefix = ""
        while type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model, self._prefix = model._orig_mod, self._prefix + _COMPILED_PREFIX
        self.model = model
        self.config = ProjectionConfig() if config is None else config
        self._params = select_parameters(model, self.config)
        self._check_implementation()
        holders = owners(model)
        self._owner_names = {name: [o[0] for o in holders[id(p)]] for name, p in self._params.items()}
        canonical = {id(p): name for name, p in self._params.items()}
        self._alias_to_name = {
            alias: canonical[id(p)]
            for alias, p in model.named_parameters(remove_duplicate=False)
            if id(p) in canonical
        }
        self._names = canonical
        self._all_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        self._containers: dict[int, set[int]] = {id(p): set() for p in self._params.values()}
        for module in model.modules():
            for param in module.parameters():
                if id(param) in self._containers:
                    self._containers[id(param)].add(id(module))
        self._compiled = [name for name, m in model.named_modules() if _is_compiled(m)]
        self._sketch = Sketch(self.config, self._params)
        self._checked: list[Fn] = []  # the fns whose first per_sample call passed the self-check
        self._layouts: dict[tuple, list[list[Layout | None]]] = {}  # signature -> layout per item, per leaf
        self._scope: set[int] = set()  # ids of the modules holding the items of those recordings

    def _check_implementation(self) -> None:
        if self.config.implementation != "triton":
            return
        if not triton_available():
            raise ImportError(
                "ProjectionConfig.implementation='triton' needs the triton package, which "
                "cannot be imported here; install triton (Linux) or use 'auto'/'torch'"
            )
        cpu = next(iter(self._params.values())).device.type == "cpu"
        if cpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "ProjectionConfig.implementation='triton' with a CPU model needs TRITON_INTERPRET=1 "
                "(the Triton interpreter); use 'auto' or 'torch' on CPU"
            )

    # ------------------------------------------------------------------ public API
    def tracked_parameters(self) -> dict[str, nn.Parameter]:
        """Exactly the parameters the features cover, by their first name."""
        return dict(self._params)

    @property
    def feature_dim(self) -> int:
        """D, the length of every feature row."""
        return self._sketch.feature_dim

    def feature_slices(self) -> dict[str, slice] | None:
        """Each tracked parameter's columns of the features (kinds "kronecker"/"exact": <Phi_a, Phi_b> is
        the sum over these blocks); None for kind="dense", whose JL mixes all parameters."""
        if self.config.kind == "dense":
            return None
        return {n: slice(b.offset, b.offset + b.out_size) for n, b in self._sketch.blocks.items()}

    @property
    def spec(self) -> dict[str, Any]:
        """Everything that fixes the feature space; equal specs give comparable features."""
        c = self.config
        return {
            "kind": c.kind,
            "k": c.k,
            "seed": c.seed,
            "distribution": c.distribution,
            "second_stage_k": c.second_stage_k,
            "second_stage_include": c.second_stage_include,
            "parameters": tuple((n, tuple(p.shape)) for n, p in self._params.items()),
            "feature_dim": self.feature_dim,
        }

    def check_compatible(self, other: GradientProjector) -> None:
        """Raise ValueError naming what differs if features of the two projectors are not comparable."""
        mine, theirs = self.spec, other.spec
        differing = [key for key in mine if mine[key] != theirs[key]]
        if differing:
            detail = "; ".join(
                f"{key}: {mine[key]!r} vs {theirs[key]!r}" for key in differing if key != "parameters"
            )
            if "parameters" in differing:
                detail += "; tracked parameters differ"
            raise ValueError(
                f"incompatible projectors (feature dims {self.feature_dim} vs {other.feature_dim}): {detail}"
            )

    def per_sample(
        self, fn: Fn, batch: Any, precondition: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Phi [B, D]: row b projects grad_theta fn(model, batch)[b] (fn returns Tensor[B]). float64 for
        kind="exact" on a float64 model, float32 otherwise.

        One forward and two backward passes to the recorded outputs (a second forward when a recorded
        output with 1 row is broadcast over the batch); .grad fields are not touched; works under an
        outer torch.no_grad. The first call with each fn also runs :meth:`check`
        (``ProjectionConfig.self_check``).

        precondition: a diagonal preconditioner, name -> positive tensor shaped like the parameter, for
        every tracked parameter: row b then projects D ∘ grad fn[b], so <Phi_a(f), Phi_b(D-preconditioned
        g)> estimates <grad f_a, D grad g_b> (exact for kind="exact"; with kind="kronecker" D is factored
        where the projection is fused with per-token factors: sketches.py, :meth:`precondition_errors`).
        Such a call is not self-checked (check fn without it).
        """
        if precondition is None:
            return self.per_sample_all(fn, batch).features
        views = [(self._sketch, self._by_tracked_name(precondition, "precondition"))]
        accs, values = self._blocks(fn, batch, views)
        return self._finish(views, accs, values.shape[0], values.device)[0]

    def per_sample_all(
        self,
        fn: Fn,
        batch: Any,
        precondition: dict[str, torch.Tensor] | None = None,
        tangents: Sequence[dict[str, torch.Tensor]] = (),
        workspace: dict[str, torch.Tensor] | None = None,
    ) -> PerSample:
        """Everything one recording of fn gives (the forward and backward passes of :meth:`per_sample`
        once): values [B] (fn's values), features [B, D] (= per_sample(fn, batch), self-checked on the
        first call with fn), with ``precondition`` also preconditioned [B, D] (= per_sample(fn, batch,
        precondition)), and with ``tangents`` (K updates, each name -> tensor shaped like the parameter for
        every tracked parameter, as project_update's delta) also dots [B, K] float64: the exact
        <grad fn[b], t_k>, the first-order change of fn[b] along t_k (what forward-mode AD along t_k gives,
        to float rounding; sketches.TangentDots), for all K at once.

        workspace: a dict the caller keeps from call to call. The features (and preconditioned) are written
        into the matrices it holds where their shapes match, else new ones are made and kept there: the
        returned matrices are the workspace's, overwritten by the next call with it (a caller that calls
        again with the same batch size allocates no [B, D] memory)."""
        views = self._views(precondition, tangents)
        accs, values = self._blocks(fn, batch, views, workspace)
        if self.config.self_check and not any(f is fn for f in self._checked):
            self._compare(fn, batch, accs[0], values)
            self._checked.append(fn)
        finished = self._finish(views, accs, values.shape[0], values.device, workspace)
        return PerSample(
            values=values,
            features=finished[0],
            preconditioned=finished[1] if precondition is not None else None,
            dots=finished[-1] if tangents else None,
        )

    def capture(self, eager: bool = False) -> StepCapture:
        """A recording of the caller's own forward whose own backward gives the per-sample features (the
        training step's, no second pass over the batch); ``eager``: the plain projection formed during
        the backward. See :mod:`ntkdyn.analysis.projector.step_capture`."""
        return StepCapture(self, eager)

    def precondition_errors(self, precondition: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per tracked parameter, ||D - r c^T|| / ||D|| of the factored preconditioner r c^T that the
        preconditioned per_sample calls so far used for its block (0.0 where they applied D exactly:
        blocks formed in full, embeddings, parameters not reached)."""
        by_name = self._by_tracked_name(precondition, "precondition")
        return {name: self._sketch.factored_error(name, d) for name, d in by_name.items()}

    def check(self, fn: Fn, batch: Any) -> dict[str, float]:
        """Self-check: for random per-sample weights w, sum_b w_b phi_b must equal the projection of the
        gradient of sum_b w_b fn(model, batch)[b] (one extra forward and backward), per feature block.
        Returns the relative error per tracked parameter; raises SelfCheckError naming every parameter
        whose error exceeds the tolerance of the computation's dtype, or when fn is not deterministic."""
        views = [(self._sketch, None)]
        accs, values = self._blocks(fn, batch, views)
        self._finish(views, accs, values.shape[0], values.device)
        return self._compare(fn, batch, accs[0], values)

    def project_update(self, delta: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same projection of a parameter-shaped update: Tensor[D] (dtype as per_sample's).

        delta: name -> tensor shaped like the parameter, for every tracked parameter (any of a tied
        parameter's names); entries for untracked parameters of the model are ignored.
        """
        by_name = self._by_tracked_name(delta, "project_update: delta")
        device = next(iter(self._params.values())).device
        blocks = {
            name: self._sketch.project(name, by_name[name].detach().to(device).reshape(1, *block.shape2d))
            for name, block in self._sketch.blocks.items()
        }
        return self._sketch.finish(blocks, 1, device)[0]

    # ------------------------------------------------------------------ internals
    def _by_tracked_name(self, values: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        """{tracked name: tensor} from a dict by any parameter name (untracked ones ignored); every tracked
        parameter must be there, shaped like it."""
        by_name: dict[str, torch.Tensor] = {}
        for alias, value in values.items():
            key = alias.removeprefix(self._prefix) if self._prefix else alias
            if key not in self._all_names:
                raise ValueError(f"{what}: {alias!r} is not a parameter of the model")
            name = self._alias_to_name.get(key)
            if name is None:
                continue
            if tuple(value.shape) != tuple(self._params[name].shape):
                raise ValueError(
                    f"{what}[{alias!r}] has shape {tuple(value.shape)}, the parameter has "
                    f"{tuple(self._params[name].shape)}"
                )
            by_name[name] = value
        missing = [n for n in self._params if n not in by_name]
        if missing:
            raise ValueError(f"{what} lacks tracked parameters {missing}")
        return by_name

    def _eager(self) -> contextlib.AbstractContextManager:
        """torch.compile'd submodules run eagerly (their graphs would hide the calls from the recorder)."""
        if not self._compiled:
            return contextlib.nullcontext()
        if not hasattr(torch.compiler, "set_stance"):
            raise UnsupportedModuleError(
                f"module '{self._compiled[0]}' is torch.compile'd: running it eagerly for the per-sample "
                "gradients needs torch>=2.6 (torch.compiler.set_stance); pass the module before torch.compile"
            )
        return torch.compiler.set_stance("force_eager")

    def _views(
        self, precondition: dict[str, torch.Tensor] | None, tangents: Sequence[dict[str, torch.Tensor]] = ()
    ) -> list[View]:
        """The plain projection, with a precondition the preconditioned one, with tangents their dots."""
        views: list[View] = [(self._sketch, None)]
        if precondition is not None:
            views.append((self._sketch, self._by_tracked_name(precondition, "precondition")))
        if tangents:
            named = [self._by_tracked_name(t, f"tangents[{i}]") for i, t in enumerate(tangents)]
            views.append((TangentDots(self._sketch.blocks, named), None))
        return views

    def _record(self, fn: Fn, batch: Any, rewrite: Rewrite | None = None) -> Run:
        run = record(self.model, fn, batch, self._names, self._containers, rewrite or Rewrite())
        self._refuse_outside(run)
        return run

    def _refuse_outside(self, run: Run) -> None:
        """UnsupportedModuleError for tracked parameters used outside every module call holding them."""
        if run.outside:
            uses = ", ".join(
                f"{name!r} of {self._modules_of(name)} (by {func})" for name, func in run.outside
            )
            raise UnsupportedModuleError(
                f"tracked parameters used outside every call of a module that holds them (e.g. directly in "
                f"fn): {uses}. A use is attributed to the module call in progress that holds the "
                "parameter: call the model (or that module) inside fn, or exclude the parameter via "
                "ProjectionConfig.exclude"
            )

    def _modules_of(self, name: str) -> str:
        """The modules holding a tracked parameter, for messages."""
        return ", ".join(f"module {o!r}" if o else "the model" for o in self._owner_names[name])

    def _blocks(
        self, fn: Fn, batch: Any, views: Sequence[View], workspace: dict[str, torch.Tensor] | None = None
    ) -> tuple[list[dict], torch.Tensor]:
        """From one recording of fn, per view (a sketch, and a preconditioner by tracked name or None) its
        per-sample blocks {name: [B, ...]} (absent: zero); and fn's values [B] (detached). The sample
        layouts of a recording whose signature (views.signature) an earlier one had are reused: one
        backward instead of two. With ``workspace``, each Sketch view forms its blocks where it can in the
        matrix that _finish then fills (views.from_plain)."""
        with torch.enable_grad(), self._eager():
            run = self._record(fn, batch)
            B = run.values.shape[0]
            run, broadcast_tried, rewritten = self._rerun(fn, batch, run, B)
            run.items = subsume(run.items)
            self._check_run(run)
            key = None if rewritten else signature(run.items, B)
            output_gradients = None
            if key in self._layouts:
                output_gradients = self._known_layout_gradients(run, self._layouts[key])
            if output_gradients is None:
                output_gradients = self._output_gradients(run, B, broadcast_tried)
                if key is not None:
                    found = [[None if e is None else e[1] for e in grads] for grads in output_gradients]
                    self._layouts[key] = merged_layouts(found, self._layouts.get(key))
                    self._scope |= {item.holder for item in run.items}
            outs = self._view_matrices(views, workspace, B, run.values.device)
            accs = view_blocks(run.items, output_gradients, B, views, outs)
        return accs, run.values.detach()

    def _check_run(self, run: Run) -> None:
        """Refuse parameters the recorder cannot see and recorded tensors modified in place after use."""
        problems = invisible_uses(run, self._names)
        if problems:
            detail = "; ".join(f"{n!r} of {self._modules_of(n)}: {why}" for n, why in problems.items())
            raise UnsupportedModuleError(
                f"tracked parameters reach fn's output where the projector cannot see them: {detail}. "
                "Exclude them via ProjectionConfig.exclude (with reentrant checkpointing: use "
                "use_reentrant=False)"
            )
        for item in run.items:
            if modified(item):
                raise UnsupportedModuleError(
                    f"{item.where}: a tensor it used or returned was modified in place later inside fn, "
                    "and re-running fn with a copy of it failed or changed fn's values; per-sample "
                    "gradients need its value at the time of the call"
                )

    def _finish(
        self,
        views: Sequence[View],
        accs: list[dict[str, torch.Tensor]],
        B: int,
        device,
        workspace: dict[str, torch.Tensor] | None = None,
    ) -> list:
        """Every view's blocks finished to rows ([B, D] or [B, K]; the Sketch views' into ``workspace``'s
        "features" and "preconditioned" matrices: per_sample_all); FloatingPointError naming the tracked
        parameters whose per-sample blocks are not finite."""
        outs = self._view_matrices(views, workspace, B, device)
        finished = [
            sketch.finish(acc, B, device) if out is None else sketch.finish(acc, B, device, out)
            for (sketch, _), acc, out in zip(views, accs, outs, strict=True)
        ]
        # a NaN or Inf anywhere makes the sum non-finite (so may an overflow of the sum: then look closer)
        if not bool(finished[0].sum().isfinite()) and not bool(finished[0].isfinite().all()):
            bad = [f"{n} ({self._modules_of(n)})" for n, v in accs[0].items() if not v.isfinite().all()]
            raise FloatingPointError(
                "non-finite (NaN/Inf) per-sample gradient features for: " + "; ".join(bad)
            )
        return finished

    def _view_matrices(
        self, views: Sequence[View], workspace: dict[str, torch.Tensor] | None, B: int, device
    ) -> list[torch.Tensor | None]:
        """Per view, the workspace matrix its rows are finished into: a Sketch view's "features" (plain) or
        "preconditioned" (_workspace_matrix); None for the dots view, and for every view without one."""
        return [
            None
            if workspace is None or not isinstance(sketch, Sketch)
            else self._workspace_matrix(
                workspace, "features" if precondition is None else "preconditioned", B, device
            )
            for sketch, precondition in views
        ]

    def _workspace_matrix(
        self, workspace: dict[str, torch.Tensor], role: str, B: int, device
    ) -> torch.Tensor:
        """workspace[role] when it is a [B, D] matrix of the features' dtype on ``device``, else a new one
        kept there (role: "features" or "preconditioned")."""
        out, wanted = workspace.get(role), ((B, self._sketch.feature_dim), self._sketch.dtype, device)
        if out is None or (out.shape, out.dtype, out.device) != wanted:
            out = workspace[role] = torch.empty(wanted[0], dtype=self._sketch.dtype, device=device)
        return out

    def _output_gradients(self, run: Run, B: int, broadcast_tried: bool) -> OutputGradients:
        """Per item, per leaf: (g = d sum_b f_b / d leaf, its layout), or None where g is zero."""
        leaves = [leaf for item in run.items for leaf in item.leaves]
        g1 = torch.autograd.grad(run.values.sum(), leaves, retain_graph=B > 1, allow_unused=True)
        codes = sample_codes(B, run.values.dtype, run.values.device)
        gr = torch.autograd.grad((run.values * codes).sum(), leaves, allow_unused=True) if B > 1 else g1
        g1 = nonzero_gradients(list(g1))
        out, position = [], 0
        for item in run.items:
            grads = []
            for leaf in item.leaves:
                g, g_r = g1[position], gr[position]
                position += 1
                if g is None:
                    grads.append(None)
                    continue
                layout = find_layout(g, g_r, codes)
                if layout is None and not bool(g.isfinite().all()):
                    raise _non_finite(run.items, g1)
                if layout is None:
                    raise shared_output_error(item, leaf, B, broadcast_tried)
                grads.append((g, layout))
            out.append(grads)
        return out

    def _known_layout_gradients(self, run: Run, layouts: list[list[Layout | None]]) -> OutputGradients | None:
        """One backward (of sum_b f_b) with the layouts an earlier recording of the same signature found;
        None when a leaf now has a gradient that had none there (no layout known: the caller reads them)."""
        leaves = [leaf for item in run.items for leaf in item.leaves]
        g1 = torch.autograd.grad(run.values.sum(), leaves, retain_graph=True, allow_unused=True)
        return with_layouts(list(g1), layouts)

    def _rerun(self, fn: Fn, batch: Any, run: Run, B: int) -> tuple[Run, bool, bool]:
        """Run fn again, rewriting two kinds of recorded items (:class:`Rewrite`), when the first run has
        any: outputs with 1 row while fn returned B > 1 values, usually broadcast over the batch (GPT-2's
        position embedding of position_ids [1, T]), which have no per-sample gradient until expanded to
        B rows; tensors the model modified in place after the call. A run is kept only if fn's values
        are the same. If expanding all the 1-row outputs fails, each is tried alone (one more forward
        each) and those that work are expanded together; with none, the first run stands (e.g. fn ran
        the model once per sample) and the layouts and the version check decide. Returns (the run,
        whether an expansion was tried, whether the first run had anything to rewrite)."""
        expand = frozenset(
            item.index
            for item in run.items
            if B > 1 and any(x.dim() > 0 and x.shape[0] == 1 for x in item.leaves)
        )
        copy = frozenset(item.index for item in run.items if modified(item))
        if not expand and not copy:
            return run, False, False
        again = self._same_values(fn, batch, run, Rewrite(expand, copy, B))
        if again is None and len(expand) > 1:
            working = frozenset(
                i for i in expand if self._same_values(fn, batch, run, Rewrite(frozenset({i}), copy, B))
            )
            again = self._same_values(fn, batch, run, Rewrite(working, copy, B))
        return (run if again is None else again), bool(expand), True

    def _same_values(self, fn: Fn, batch: Any, run: Run, rewrite: Rewrite) -> Run | None:
        """fn run with ``rewrite``, or None if that fails or changes fn's values."""
        try:
            again = self._record(fn, batch, rewrite)
        except UnsupportedModuleError:
            raise
        except Exception:  # noqa: BLE001 - the expansion broke the model's shapes: not a broadcast
            return None
        tol = tolerance(run.values.dtype)
        first, second = run.values.detach(), again.values.detach()
        same = second.shape == first.shape and torch.allclose(
            second, first, rtol=tol, atol=tol * float(first.abs().max())
        )
        return again if same else None

    def _compare(
        self, fn: Fn, batch: Any, blocks: dict[str, torch.Tensor], values: torch.Tensor
    ) -> dict[str, float]:
        """The self-check of :meth:`check` on already computed blocks and values."""
        w = torch.randn(values.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        with torch.enable_grad(), self._eager():
            again = fn(self.model, batch)
            tol = tolerance(values.dtype)
            if again.shape != values.shape or not torch.allclose(
                again.detach(), values, rtol=tol, atol=tol * float(values.abs().max())
            ):
                raise SelfCheckError(
                    "fn gave different values on two calls with the same batch: per-sample gradients need a "
                    "deterministic fn; call model.eval() (dropout) and fix any other randomness in fn"
                )
            grads = torch.autograd.grad(
                (again * w.to(again)).sum(), list(self._params.values()), allow_unused=True
            )
        device = values.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else values.dtype
        grads = dict(zip(self._params, grads, strict=True))
        errors, bad = block_errors(self._sketch, self._params, blocks, grads, w, compute)
        if bad:
            detail = "; ".join(
                f"{name} ({self._modules_of(name)}): relative error {errors[name]:.2e}" for name in bad
            )
            raise SelfCheckError(
                "per-sample features disagree with the full-batch gradient (sum_b w_b phi_b vs the projected "
                f"gradient of sum_b w_b f_b) for: {detail}. This is a bug of the projector or a use of the "
                "parameters it cannot see; please report it with the model"
            )
        return errors


def _non_finite(items: list[Recorded], grads: list[torch.Tensor | None]) -> FloatingPointError:
    """The error naming every parameter whose recorded outputs got non-finite gradients."""
    leaves = [item for item in items for _ in item.leaves]
    bad = [
        f"{name} ({item.where})"
        for item, g in zip(leaves, grads, strict=True)
        if g is not None and not bool(g.isfinite().all())
        for name in item.params.values()
    ]
    return FloatingPointError(
        f"non-finite (NaN/Inf) output-gradients, so per-sample features, for: {'; '.join(dict.fromkeys(bad))}"
    )
