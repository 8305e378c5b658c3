"""Recording one run of fn: which torch functions and module calls use the tracked parameters.

While fn runs, a TorchFunctionMode sees every torch function call and its arguments, and hooks on every
submodule of the model keep the stack of module calls in progress. A call of a function that uses a
tracked parameter (its output carries a gradient) is recorded as
  - a :class:`FunctionUse` when a registered rule handles that function with the parameter in one of
    the rule's parameter roles (the weight of F.linear, ...): its inputs and output are kept;
  - otherwise a use by the innermost module call in progress whose module contains the parameter (its
    own or a submodule's): that call is recorded as a :class:`ModuleCall` (its inputs, its output) and
    the parameter's gradient through it is computed by the generic path.
Nothing is guessed from module classes: the rule sees the exact function and the parameter object.
Train-mode dropout and batch statistics (samples interact, or fn is random) are refused on sight.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ntkdyn.analysis.projector.errors import UnsupportedModuleError
from ntkdyn.analysis.projector.rules import RULES, Rule


def describe(name: str, module: nn.Module) -> str:
    """How messages name a module: its qualified name in the model and its class."""
    return f"module '{name}' ({type(module).__name__})" if name else f"the model ({type(module).__name__})"


@dataclass
class Frame:
    """A module call in progress; theta: parameters (path in the module -> tracked name) it uses itself."""

    uid: int
    name: str
    module: nn.Module
    theta: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorded:
    """Something whose output-gradients give per-sample gradients. leaves: the tensors whose gradients
    it needs; ancestors: uids of the module calls in progress around it; params: what it contributes
    to (role or path -> tracked name)."""

    index: int
    where: str
    ancestors: tuple[int, ...]
    leaves: list[torch.Tensor]
    params: dict[str, str]
    versions: list[tuple[torch.Tensor, int]]
    holder: int = 0  # id of the module whose call must be recorded to see this item (scoped recording)


@dataclass(kw_only=True)
class FunctionUse(Recorded):
    """A call of a rule's function with tracked parameters in the rule's parameter roles."""

    rule: Rule
    bound: dict[str, Any]  # the call's non-parameter arguments by role (tensors detached)


@dataclass(kw_only=True)
class ModuleCall(Recorded):
    """A module call that uses tracked parameters itself (params: path in the module -> tracked name)."""

    uid: int
    module: nn.Module
    args: tuple
    kwargs: dict
    positions: list[int]  # where the leaves sit among the output's flattened entries
    expanded: bool  # leaves with 1 row were expanded to B rows (broadcast over the batch)


@dataclass
class Run:
    values: torch.Tensor
    items: list[Recorded]
    no_grad_uses: dict[str, str]  # tracked name -> where: used while gradients were off
    outside: list[tuple[str, str]]  # (tracked name, function): used outside every module call holding it


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return kwargs[name] if name in kwargs else args[index] if len(args) > index else default


# functions that make samples interact or fn random in training mode: (p or None, training) getters
_TRAIN_MODE_ONLY: dict[Callable, Callable[[tuple, dict], tuple[float, bool]]] = {
    **{
        f: lambda a, k: (_arg(a, k, 1, "p", 0.5), _arg(a, k, 2, "training", True))
        for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
    },
    **{
        f: lambda a, k: (_arg(a, k, 1, "p"), _arg(a, k, 2, "train"))
        for f in (
            torch.dropout,
            torch.alpha_dropout,
            torch.feature_dropout,
            torch.feature_alpha_dropout,
            torch.native_dropout,
        )
    },
    F.scaled_dot_product_attention: lambda a, k: (_arg(a, k, 4, "dropout_p", 0.0), True),
    F.batch_norm: lambda a, k: (None, _arg(a, k, 5, "training", False)),
    torch.batch_norm: lambda a, k: (None, _arg(a, k, 5, "training")),
}


def _carries_grad(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    return isinstance(out, (tuple, list)) and any(
        isinstance(o, torch.Tensor) and o.requires_grad for o in out
    )


def _snapshot(tree: Any, copy: bool) -> Any:
    """The tensors of a tree detached (copied too if ``copy``: the model modifies them in place later)."""
    return pytree.tree_map(
        lambda x: (x.detach().clone() if copy else x.detach()) if isinstance(x, torch.Tensor) else x, tree
    )


@dataclass(frozen=True)
class Rewrite:
    """What a second run of fn changes, by index of recorded item: ``expand``: outputs with 1 row are
    expanded to B rows (a broadcast over the batch gets a per-sample gradient); ``copy``: the model gets
    copies of the outputs and the record keeps copies of the inputs (the model modifies them in place
    later, and the per-sample gradients need the values at the call)."""

    expand: frozenset[int] = frozenset()
    copy: frozenset[int] = frozenset()
    B: int | None = None


def _expand_rows(x: Any, B: int) -> Any:
    """A tensor with 1 row broadcast to B rows (a view); anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
        return x.expand(B, *x.shape[1:])
    return x


class Recorder(TorchFunctionMode):
    """Records one run of fn (see the module docstring). names: id(parameter) -> tracked name;
    containers: id(parameter) -> ids of the modules whose subtree holds it.

    scope: None (every torch function call of the run is seen) or the ids of the modules (the
    ``holder`` of every item of an earlier full recording) inside whose calls alone the mode is active
    and whose calls alone form the stack: the same items, from far fewer intercepted calls (a
    StepCapture of a structure calibrated before)."""

    def __init__(
        self,
        model: nn.Module,
        names: dict[int, str],
        containers: dict[int, set[int]],
        rewrite: Rewrite,
        scope: set[int] | None = None,
    ):
        super().__init__()
        self.model, self.names, self.containers, self.rewrite = model, names, containers, rewrite
        self.scope = scope
        self.module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.stack: list[Frame] = []
        self.items: list[Recorded] = []
        self.no_grad_uses: dict[str, str] = {}
        self.outside: list[tuple[str, str]] = []
        self._uids = itertools.count()
        self._paths: dict[tuple[int, int], str] = {}
        self._handles: list = []

    # ------------------------------------------------------------------ hooks: the call stack
    def __enter__(self):
        for module in self.model.modules():
            if self.scope is not None and id(module) not in self.scope:
                continue
            self._handles.append(module.register_forward_pre_hook(self._push, prepend=True))
            self._handles.append(
                module.register_forward_hook(self._pop, prepend=True, with_kwargs=True, always_call=True)
            )
        return super().__enter__() if self.scope is None else self

    def __exit__(self, *exc):
        try:
            if self.scope is None:
                return super().__exit__(*exc)
            if self.stack:  # a scoped call that raised before its forward hook ran
                super().__exit__(*exc)
            return None
        finally:
            for handle in self._handles:
                handle.remove()

    def _push(self, module: nn.Module, args: tuple) -> None:
        if self.scope is not None and not self.stack:
            super().__enter__()
        self.stack.append(Frame(next(self._uids), self.module_names.get(id(module), "?"), module))

    def _pop(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        frame = self.stack.pop()
        if self.scope is not None and not self.stack:
            super().__exit__(None, None, None)
        if not frame.theta:
            return None
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if all(isinstance(x, nn.Parameter) for x in tensors):
            # a function of parameters alone (a parametrization computing a weight): its output is the same
            # for every sample, so its parameters go to the enclosing call that holds them
            for path in frame.theta:
                self._attribute(module.get_parameter(path), type(module).forward)
            return None
        flat, spec = pytree.tree_flatten(output)
        positions = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.requires_grad]
        if not positions:
            return None
        index = len(self.items)
        expanded = index in self.rewrite.expand and any(
            flat[i].dim() > 0 and flat[i].shape[0] == 1 for i in positions
        )
        if expanded:
            flat = [_expand_rows(x, self.rewrite.B) if i in positions else x for i, x in enumerate(flat)]
        copy = index in self.rewrite.copy
        args, kwargs = _snapshot(args, copy), _snapshot(kwargs, copy)
        inputs = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        leaves = [flat[i] for i in positions]
        self.items.append(
            ModuleCall(
                index,
                describe(frame.name, module),
                tuple(f.uid for f in self.stack),
                leaves,
                dict(frame.theta),
                [(x, x._version) for x in leaves + inputs],
                id(module),
                uid=frame.uid,
                module=module,
                args=args,
                kwargs=kwargs,
                positions=positions,
                expanded=expanded,
            )
        )
        if copy:
            flat = [x.clone() if i in positions else x for i, x in enumerate(flat)]
        return pytree.tree_unflatten(flat, spec) if expanded or copy else None

    # ------------------------------------------------------------------ the mode: every torch function
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        train_mode = _TRAIN_MODE_ONLY.get(func)
        if train_mode is not None:
            self._refuse_train_mode(func, *train_mode(args, kwargs))
        used = self._tracked(args, kwargs)
        out = func(*args, **kwargs)
        if not used:
            return out
        if not torch.is_grad_enabled():
            for param in used:
                self.no_grad_uses.setdefault(self.names[id(param)], self._where(param))
            return out
        written = out is None and args and isinstance(args[0], torch.Tensor)  # x[i] = param returns None
        if not (_carries_grad(args[0]) if written else _carries_grad(out)):
            return out
        rule = RULES.get(func)
        bound = rule.bind(args, kwargs) if rule is not None else None
        if bound is not None:
            inputs, roles = bound
            params = {r: self.names[id(p)] for r, p in roles.items() if p is not None and id(p) in self.names}
            if params:
                out = self._record_use(rule, inputs, params, out, used[0])
                covered = {id(roles[r]) for r in params}
                used = [p for p in used if id(p) not in covered]
        for param in used:
            self._attribute(param, func)
        return out

    def _refuse_train_mode(self, func, p: float | None, training: bool) -> None:
        if not training or (p is not None and p == 0):
            return
        where = describe(self.stack[-1].name, self.stack[-1].module) if self.stack else "fn"
        what = f"dropout (p={p})" if p is not None else "batch statistics (samples interact)"
        raise UnsupportedModuleError(
            f"{where} runs {getattr(func, '__name__', func)} in training mode: {what}. Per-sample gradients "
            "need a deterministic fn whose samples do not interact: call model.eval() before per_sample"
        )

    def _tracked(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        found: list[torch.Tensor] = []
        for x in itertools.chain(args, kwargs.values()):
            for y in x if isinstance(x, (list, tuple)) else (x,):
                if isinstance(y, torch.Tensor) and id(y) in self.names and all(y is not f for f in found):
                    found.append(y)
        return found

    def _containing_frame(self, param: torch.Tensor) -> Frame | None:
        """The innermost module call in progress whose module holds param (itself or in a submodule)."""
        holders = self.containers[id(param)]
        return next((f for f in reversed(self.stack) if id(f.module) in holders), None)

    def _where(self, param: torch.Tensor) -> str:
        frame = self._containing_frame(param)
        return describe(frame.name, frame.module) if frame is not None else "fn"

    def _record_use(self, rule: Rule, inputs: dict, params: dict, out: torch.Tensor, param) -> torch.Tensor:
        index = len(self.items)
        if index in self.rewrite.expand and out.dim() > 0 and out.shape[0] == 1:
            out = _expand_rows(out, self.rewrite.B)
            inputs = {k: _expand_rows(v, self.rewrite.B) for k, v in inputs.items()}
        copy = index in self.rewrite.copy
        inputs = {
            k: (v.detach().clone() if copy else v.detach()) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()
        }
        tensors = [out] + [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        frame = self._containing_frame(param)
        where = describe(frame.name, frame.module) if frame is not None else "fn"
        self.items.append(
            FunctionUse(
                index,
                f"{rule.name} in {where}",
                tuple(f.uid for f in self.stack),
                [out],
                params,
                [(x, x._version) for x in tensors],
                0 if frame is None else id(frame.module),
                rule=rule,
                bound=inputs,
            )
        )
        return out.clone() if copy else out

    def _attribute(self, param: torch.Tensor, func) -> None:
        frame = self._containing_frame(param)
        if frame is None:
            self.outside.append((self.names[id(param)], torch.overrides.resolve_name(func) or repr(func)))
            return
        key = (id(frame.module), id(param))
        if key not in self._paths:
            self._paths[key] = next(
                n for n, p in frame.module.named_parameters(remove_duplicate=False) if p is param
            )
        frame.theta[self._paths[key]] = self.names[id(param)]


def record(
    model: nn.Module,
    fn: Callable,
    batch: Any,
    names: dict[int, str],
    containers: dict[int, set[int]],
    rewrite: Rewrite,
) -> Run:
    """Run fn(model, batch) under a :class:`Recorder`; checks that fn returns Tensor[B] that requires grad."""
    recorder = Recorder(model, names, containers, rewrite)
    with recorder:
        values = fn(model, batch)
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"fn must return a Tensor[B] with one scalar per sample, got shape {shape}")
    if not values.requires_grad:
        raise ValueError("fn's output does not depend on any tracked parameter (it does not require grad)")
    return Run(values, recorder.items, recorder.no_grad_uses, recorder.outside)


def subsume(items: list[Recorded]) -> list[Recorded]:
    """A module call on the generic path for a parameter recomputes the whole call, so every other use of
    that parameter recorded inside the call is already part of its gradient: drop those uses (and the
    items left with nothing to contribute)."""
    generic: dict[str, set[int]] = {}
    for item in items:
        if not isinstance(item, FunctionUse):
            for name in item.params.values():
                generic.setdefault(name, set()).add(item.uid)
    for item in items:
        inside = set(item.ancestors)
        item.params = {k: n for k, n in item.params.items() if not (generic.get(n, set()) & inside)}
    return [item for item in items if item.params]


def modified(item: Recorded) -> bool:
    """Whether a tensor the item recorded was modified in place after the call."""
    return any(tensor._version != version for tensor, version in item.versions)
