"""Projected per-sample gradients of any per-sample scalar of a PyTorch model.

``GradientProjector(model, config).per_sample(fn, batch)`` returns Phi [B, D] whose row b is a seeded
random projection of grad_theta fn(model, batch)[b] over the tracked parameters theta, such that

    E[<Phi_a, Phi_b>] = <grad f_a, grad f_b>          (the empirical NTK, unbiased)
    E[<Phi_b, project_update(delta)>] = grad f_b . delta

How: ONE forward of ``fn`` and ONE backward of ``fn(...).sum()`` to the outputs of the modules that own
tracked parameters; forward hooks capture each module call's input a (and ids for nn.Embedding) and
the backward gives its output-gradient g. Row b of a module call's input/output is sample b, so the
per-sample gradient of a weight is sum_t g_{b,t} a_{b,t}^T. This is exact only when samples do not
interact in the forward (true for transformers without batch norm), and it requires that every
forward of a hooked module inside ``fn`` has batch dimension B, row-aligned with fn's B outputs
(``fn`` may call the model several times, e.g. chosen and rejected for DPO: each call's contribution
is added to its rows). Modules must not modify their outputs in place, and tracked parameters must be
used through their module's forward (hooks see nothing else). Padding: a token that fn masks out gets
an output-gradient of exactly 0, and such tokens are dropped from every module's sum (with ``where``,
so even NaN activations there cannot leak); nn.Embedding's padding_idx rows get nothing, as in torch.

Every tracked parameter is seen as a matrix G of shape (d0, d1) (its stored shape; 1-D: (n, 1);
>2-D: (shape[0], prod(rest))). Kinds:
  - "kronecker": feature = P0^T G P1 / k^(m/2), P_i a seeded [d_i, k] Rademacher/Gaussian factor, or
    the identity when d_i <= k (that axis kept exact), m the number of projected axes. nn.Linear and
    transformers' Conv1D use the fused token projection sum_t (P^T g_t)(P'^T a_t)^T
    (ntkdyn.kernels.kron_projection), bias included; nn.Embedding gathers the rows P0[id_t] (never a
    [B, vocab, dim] tensor); other modules (norms, ...) get exact per-sample gradients by torch.func
    on that module alone, then the same projection. An optional second stage (subsampled randomized
    Hadamard transform) compresses selected blocks.
  - "dense": the materialised per-sample gradient times one seeded [P, k] JL matrix generated block by
    block (TRAK-like), feature dim k.
  - "exact": the materialised per-sample gradient itself (validation on small models).
A parameter owned by several modules (tied embeddings) is one feature block that sums every use.
Factors are generated from (seed, parameter name, axis) with torch's CPU generator, never stored.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ntkdyn.kernels.kron_projection import IMPLEMENTATIONS, kron_projection

KINDS = ("kronecker", "dense", "exact")
DISTRIBUTIONS = ("rademacher", "gaussian")
DEFAULT_K = {"kronecker": 64, "dense": 4096}
_JL_CHUNK_ENTRIES = 1 << 22  # entries of the dense JL matrix generated at a time


@dataclass
class ProjectionConfig:
    """How per-sample gradients are projected (see the module docstring for the math)."""

    kind: str = field(default="kronecker", metadata={"help": "kronecker | dense | exact"})
    k: int | None = field(
        default=None,
        metadata={
            "help": "kronecker: size of each factor (a matrix parameter gives a k x k block; axes of size "
            "<= k stay exact), default 64; dense: total feature size, default 4096; exact: must be unset"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the projection factors"})
    implementation: str = field(
        default="auto", metadata={"help": "auto (Triton on CUDA, torch on CPU) | torch | triton"}
    )
    distribution: str = field(default="rademacher", metadata={"help": "rademacher | gaussian factors"})
    include: tuple[str, ...] = field(
        default=("*",),
        metadata={
            "help": "fnmatch patterns of parameter names to track; a pattern without wildcards asks "
            "for that parameter by name (error if absent or frozen)"
        },
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "fnmatch patterns of names to skip"})
    module_types: tuple[type | str, ...] | None = field(
        default=None,
        metadata={"help": "track only parameters owned by modules of these types (classes or class names)"},
    )
    second_stage_k: int | None = field(
        default=None,
        metadata={"help": "kronecker only: compress each selected k0*k1 block to this size (SRHT)"},
    )
    second_stage_include: tuple[str, ...] = field(
        default=("*",), metadata={"help": "fnmatch patterns of parameters the second stage applies to"}
    )

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ProjectionConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "exact":
            if self.k is not None:
                raise ValueError("ProjectionConfig.k must be unset for kind='exact' (nothing is projected)")
        elif self.k is None:
            self.k = DEFAULT_K[self.kind]
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"ProjectionConfig.k must be a positive int, got {self.k!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"ProjectionConfig.seed must be an int, got {self.seed!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"ProjectionConfig.implementation must be one of {IMPLEMENTATIONS}, "
                f"got {self.implementation!r}"
            )
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"ProjectionConfig.distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}"
            )
        for name in ("include", "exclude", "second_stage_include"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"ProjectionConfig.{name} must be a tuple of name patterns, got {value!r}")
            setattr(self, name, tuple(value))
        if self.module_types is not None:
            if isinstance(self.module_types, (str, type)) or not all(
                isinstance(t, (str, type)) for t in self.module_types
            ):
                raise ValueError(
                    f"ProjectionConfig.module_types must be a tuple of classes or class names, got "
                    f"{self.module_types!r}"
                )
            self.module_types = tuple(self.module_types)
        if self.second_stage_k is not None:
            if self.kind != "kronecker":
                raise ValueError("ProjectionConfig.second_stage_k applies only to kind='kronecker'")
            if not isinstance(self.second_stage_k, int) or self.second_stage_k < 1:
                raise ValueError(
                    f"ProjectionConfig.second_stage_k must be a positive int, got {self.second_stage_k!r}"
                )


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D: y = x @ W + b with W stored [d_in, d_out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(parameter) -> [(module name, module, attribute)] for every module holding it directly."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module_name, module, attr))
    return owners


def select_parameters(model: nn.Module, config: ProjectionConfig) -> dict[str, nn.Parameter]:
    """The tracked parameters: trainable, matching include, not exclude, owned by module_types.

    Each parameter appears once, under its first name in ``model.named_parameters()`` (tied weights).
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    for pattern in config.include:
        if any(ch in pattern for ch in "*?["):
            continue
        if pattern not in named:
            raise ValueError(
                f"ProjectionConfig.include asks for parameter {pattern!r}, which the model lacks"
            )
        if not named[pattern].requires_grad:
            raise ValueError(
                f"ProjectionConfig.include asks for parameter {pattern!r}, which has requires_grad=False"
            )
    owners = _owners(model)
    selected: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        if not _matches(name, config.include) or _matches(name, config.exclude):
            continue
        if config.module_types is not None and not any(
            isinstance(m, t) if isinstance(t, type) else type(m).__name__ == t
            for _, m, _ in owners.get(id(param), [])
            for t in config.module_types
        ):
            continue
        seen.add(id(param))
        selected[name] = param
    if not selected:
        raise ValueError(
            "no tracked parameters: the model has no trainable parameter matching ProjectionConfig "
            f"include={config.include}, exclude={config.exclude}, module_types={config.module_types}"
        )
    return selected


def _stable_seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_matrix(seed: int, rows: int, cols: int, distribution: str) -> torch.Tensor:
    """Seeded float32 [rows, cols] matrix, +-1 (rademacher) or N(0, 1), identical in every process."""
    generator = torch.Generator().manual_seed(seed)
    if distribution == "rademacher":
        return torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8).float() * 2 - 1
    return torch.randn(rows, cols, generator=generator)


def _hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (a power of two)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        x = x.reshape(*lead, n // (2 * h), 2, h)
        x = torch.stack((x[..., 0, :] + x[..., 1, :], x[..., 0, :] - x[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, n) / math.sqrt(n)


@dataclass
class _Block:
    """One tracked parameter's slice of the feature vector."""

    shape2d: tuple[int, int]  # (d0, d1), the matrix view of the stored parameter
    out_size: int  # features of this block: k0 * k1 (k_i = min(d_i, k); kronecker), or after a second stage
    offset: int


@dataclass
class _Call:
    """One forward of a hooked module inside fn."""

    module_name: str
    module: nn.Module
    inputs: tuple  # detached positional inputs
    kwargs: dict
    output: torch.Tensor
    version: int


class GradientProjector:
    """Projected per-sample gradients; see the module docstring.

    model: the nn.Module whose parameters are tracked (hooks are registered on its submodules only
    for the duration of :meth:`per_sample`). config: a :class:`ProjectionConfig`.
    """

    def __init__(self, model: nn.Module, config: ProjectionConfig | None = None):
        self.model = model
        self.config = ProjectionConfig() if config is None else config
        self._params = select_parameters(model, self.config)
        if (
            self.config.implementation == "triton"
            and next(iter(self._params.values())).device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET", "0") != "1"
        ):
            raise RuntimeError(
                "ProjectionConfig.implementation='triton' with a CPU model needs TRITON_INTERPRET=1 "
                "(the Triton interpreter); use 'auto' or 'torch' on CPU"
            )
        owners = _owners(model)
        self._owner_names = {name: [o[0] for o in owners[id(p)]] for name, p in self._params.items()}
        aliases = dict(model.named_parameters(remove_duplicate=False))
        canonical = {id(p): name for name, p in self._params.items()}
        self._alias_to_name = {alias: canonical[id(p)] for alias, p in aliases.items() if id(p) in canonical}
        self._blocks: dict[str, _Block] = {}
        offset = 0
        for name, param in self._params.items():
            shape2d = (param.shape[0], param[0].numel()) if param.dim() >= 1 else (1, 1)
            if self.config.kind == "kronecker":
                k0, k1 = (min(d, self.config.k) for d in shape2d)
                out_size = k0 * k1
                if self.config.second_stage_k is not None and _matches(
                    name, self.config.second_stage_include
                ):
                    out_size = min(out_size, self.config.second_stage_k)
            else:
                out_size = shape2d[0] * shape2d[1]
            self._blocks[name] = _Block(shape2d, out_size, offset)
            offset += 0 if self.config.kind == "dense" else out_size
        self._feature_dim = self.config.k if self.config.kind == "dense" else offset
        # modules whose forward must be hooked: every owner of a tracked parameter
        self._hooked: dict[int, tuple[str, nn.Module]] = {}
        for param in self._params.values():
            for module_name, module, _ in owners[id(param)]:
                self._hooked[id(module)] = (module_name, module)
        self._factors: dict[tuple[str, int, str], torch.Tensor | None] = {}

    # ------------------------------------------------------------------ public API
    def tracked_parameters(self) -> dict[str, nn.Parameter]:
        """Exactly the parameters the features cover, by their first name."""
        return dict(self._params)

    @property
    def feature_dim(self) -> int:
        """D, the length of every feature row."""
        return self._feature_dim

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
            "feature_dim": self._feature_dim,
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

    @torch.enable_grad()
    def per_sample(self, fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any) -> torch.Tensor:
        """Phi [B, D] float32: row b projects grad_theta fn(model, batch)[b] (fn returns Tensor[B]).

        One forward and one backward (also under an outer torch.no_grad); .grad fields are not
        touched. A hooked module called with one row whose output is broadcast over the batch (e.g.
        GPT-2's position embedding on position_ids [1, T]) has no per-sample output-gradient: fn is
        then run a second time with that output expanded to B rows (same values), which gives one.
        """
        values, calls = self._run(fn, batch, {})
        B = values.shape[0]
        broadcast = {id(c.module): B for c in calls if self._batch_rows(c) == 1 and B > 1}
        if broadcast:
            first = values.detach()
            names = sorted({c.module_name for c in calls if id(c.module) in broadcast})
            not_broadcast = ValueError(
                f"forwards of {names} inside fn had 1 row but fn returned {B} values, and they are not "
                "broadcasts over the batch: every forward inside fn must have B rows aligned with fn's output"
            )
            try:
                values, calls = self._run(fn, batch, broadcast)
            except Exception as error:
                raise not_broadcast from error
            if values.shape != first.shape or not torch.allclose(values.detach(), first):
                raise not_broadcast
        for call in calls:
            rows = self._batch_rows(call)
            if rows != B:
                raise ValueError(
                    f"a forward of module {call.module_name!r} inside fn had batch dimension {rows} but fn "
                    f"returned {B} values: every forward inside fn must have B rows aligned with fn's output"
                )
            if call.output._version != call.version:
                raise ValueError(f"the output of module {call.module_name!r} was modified in place inside fn")
        grads = torch.autograd.grad(values.sum(), [c.output for c in calls], allow_unused=True)
        del values
        acc = {name: None for name in self._blocks}  # name -> [B, k0, k1] float32
        for call, g in zip(calls, grads, strict=True):
            if g is None:
                continue
            for name, contribution in self._contributions(call, g):
                acc[name] = contribution if acc[name] is None else acc[name] + contribution
        return self._finish(acc, B, next(iter(self._params.values())).device)

    def _run(self, fn, batch, expand_rows: dict[int, int]) -> tuple[torch.Tensor, list[_Call]]:
        """Run fn with forward hooks recording every call of a hooked module; the outputs (and inputs) of
        modules in expand_rows (id -> B) are expanded from 1 to B rows."""
        calls: list[_Call] = []

        def hook(module, args, kwargs, output):
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return None
            rows = expand_rows.get(id(module))
            detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            if rows is not None:
                output = output.expand(rows, *output.shape[1:])
                detached = tuple(
                    a.expand(rows, *a.shape[1:]) if isinstance(a, torch.Tensor) and a.dim() > 0 else a
                    for a in detached
                )
            kw = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            calls.append(_Call(self._hooked[id(module)][0], module, detached, kw, output, output._version))
            return output if rows is not None else None

        handles = [m.register_forward_hook(hook, with_kwargs=True) for _, m in self._hooked.values()]
        try:
            values = fn(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()
        if not isinstance(values, torch.Tensor) or values.dim() != 1:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"fn must return a Tensor[B] with one scalar per sample, got shape {shape}")
        if not values.requires_grad:
            raise ValueError(
                "fn's output does not depend on any tracked parameter (it does not require grad)"
            )
        if not calls:
            raise ValueError(
                "fn ran no forward of a module owning a tracked parameter (did it call the model?)"
            )
        return values, calls

    def project_update(self, delta: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same projection of a parameter-shaped update: Tensor[D] float32.

        delta: name -> tensor shaped like the parameter, for every tracked parameter (any of a tied
        parameter's names); entries for untracked parameters of the model are ignored.
        """
        by_name: dict[str, torch.Tensor] = {}
        all_names = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        for alias, value in delta.items():
            if alias not in all_names:
                raise ValueError(f"project_update: {alias!r} is not a parameter of the model")
            name = self._alias_to_name.get(alias)
            if name is None:
                continue
            if tuple(value.shape) != tuple(self._params[name].shape):
                raise ValueError(
                    f"project_update: delta[{alias!r}] has shape {tuple(value.shape)}, the parameter has "
                    f"{tuple(self._params[name].shape)}"
                )
            by_name[name] = value
        missing = [n for n in self._params if n not in by_name]
        if missing:
            raise ValueError(f"project_update: delta lacks tracked parameters {missing}")
        device = next(iter(self._params.values())).device
        acc = {}
        for name, block in self._blocks.items():
            matrix = by_name[name].detach().to(device=device, dtype=torch.float32).reshape(1, *block.shape2d)
            acc[name] = self._project_matrix(name, matrix)
        return self._finish(acc, 1, device)[0]

    # ------------------------------------------------------------------ internals
    def _batch_rows(self, call: _Call) -> int:
        if not call.inputs or not isinstance(call.inputs[0], torch.Tensor) or call.inputs[0].dim() == 0:
            return call.output.shape[0] if call.output.dim() > 0 else 0
        return call.inputs[0].shape[0]

    def _factor(self, name: str, axis: int, device: torch.device) -> torch.Tensor | None:
        """Seeded [d_axis, k] factor of a parameter, or None (identity) when d_axis <= k."""
        key = (name, axis, str(device))
        if key not in self._factors:
            d = self._blocks[name].shape2d[axis]
            if self.config.kind != "kronecker" or d <= self.config.k:
                self._factors[key] = None
            else:
                seed = _stable_seed(self.config.seed, name, axis)
                self._factors[key] = random_matrix(seed, d, self.config.k, self.config.distribution).to(
                    device
                )
        return self._factors[key]

    def _project_matrix(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """[B, d0, d1] per-sample gradients -> [B, k0, k1] (P0^T G P1; identity axes kept)."""
        grads = grads.float()
        p0, p1 = self._factor(name, 0, grads.device), self._factor(name, 1, grads.device)
        if p0 is not None:
            grads = torch.einsum("bij,ik->bkj", grads, p0)
        if p1 is not None:
            grads = grads @ p1
        return grads

    def _token_block(
        self, name: str, left: torch.Tensor, right: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """sum_t m (P0^T left_t)(P1^T right_t)^T: [B, k0, k1] (exact kinds: the gradient itself)."""
        if self.config.kind == "kronecker":
            p0, p1 = self._factor(name, 0, left.device), self._factor(name, 1, left.device)
            rademacher = self.config.distribution == "rademacher"
            return kron_projection(left, right, p0, p1, mask, self.config.implementation, rademacher)
        return kron_projection(left, right, None, None, mask, "torch")

    def _contributions(self, call: _Call, g: torch.Tensor):
        """(parameter name, [B, k0, k1]) for each tracked parameter of the module in this call."""
        module = call.module
        tracked = {}  # attribute -> tracked parameter name
        for attr, param in module._parameters.items():
            qualified = f"{call.module_name}.{attr}" if call.module_name else attr
            if param is not None and qualified in self._alias_to_name:
                tracked[attr] = self._alias_to_name[qualified]
        if isinstance(module, (nn.Linear, nn.Embedding)) or _is_conv1d(module):
            B = g.shape[0]
            g3 = g.reshape(B, -1, g.shape[-1])
            mask = (g3 != 0).any(dim=-1)  # tokens with zero output-gradient contribute exactly nothing
            if isinstance(module, nn.Embedding):
                if module.scale_grad_by_freq or module.max_norm is not None:
                    raise ValueError(
                        f"nn.Embedding {call.module_name!r}: scale_grad_by_freq/max_norm unsupported"
                    )
                ids = call.inputs[0].reshape(B, -1)
                if module.padding_idx is not None:
                    mask = mask & (ids != module.padding_idx)
                name = tracked["weight"]
                yield name, self._embedding_block(name, ids, g3, mask)
                return
            a3 = call.inputs[0].reshape(B, -1, call.inputs[0].shape[-1])
            if "weight" in tracked:
                name = tracked["weight"]
                left, right = (a3, g3) if _is_conv1d(module) else (g3, a3)
                yield name, self._token_block(name, left, right, mask)
            if "bias" in tracked:
                name = tracked["bias"]
                yield name, self._token_block(name, g3, torch.ones_like(g3[..., :1]), mask)
            return
        yield from self._generic_contributions(call, g, tracked)

    def _embedding_block(
        self, name: str, ids: torch.Tensor, g3: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Embedding weight [V, dim]: per-sample gradient sum_t e_{id_t} g_t^T, projected by gathering
        the rows P0[id_t] (no [B, V, dim] tensor)."""
        B = ids.shape[0]
        gf = torch.where(mask.unsqueeze(-1), g3.float(), 0.0)
        block = self._blocks[name]
        p0 = self._factor(name, 0, g3.device)
        p1 = self._factor(name, 1, g3.device)
        if p1 is not None:
            gf = gf @ p1
        if p0 is not None:
            return torch.bmm(p0[ids].transpose(1, 2), gf)
        out = torch.zeros(B, block.shape2d[0], gf.shape[-1], device=g3.device)
        return out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, gf.shape[-1]), gf)

    def _generic_contributions(self, call: _Call, g: torch.Tensor, tracked: dict[str, str]):
        """Exact per-sample gradients of a module's own parameters by torch.func on that module alone:
        grad_theta <module(theta, x_b), g_b> for each sample b (vmap over the batch rows)."""
        module = call.module
        B = g.shape[0]
        params = {attr: module._parameters[attr].detach() for attr in tracked}
        batched = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == B for a in call.inputs]

        def inner(theta, g_b, *inputs_b):
            inputs = [x.unsqueeze(0) if is_b else x for x, is_b in zip(inputs_b, batched, strict=True)]
            out = torch.func.functional_call(module, theta, tuple(inputs), call.kwargs)
            return (out.float() * g_b.unsqueeze(0).float()).sum()

        in_dims = (None, 0, *(0 if is_b else None for is_b in batched))
        try:
            per_sample = torch.func.vmap(torch.func.grad(inner), in_dims=in_dims)(params, g, *call.inputs)
        except Exception as error:  # noqa: BLE001 - re-raised with the module named
            raise RuntimeError(
                f"per-sample gradients of module {call.module_name!r} ({type(module).__name__}) by "
                f"torch.func failed: {error}. Exclude its parameters via ProjectionConfig.exclude"
            ) from error
        for attr, name in tracked.items():
            matrix = per_sample[attr].reshape(B, *self._blocks[name].shape2d)
            yield name, self._project_matrix(name, matrix)

    def _finish(self, acc: dict[str, torch.Tensor | None], B: int, device: torch.device) -> torch.Tensor:
        """Scale, second stage / dense JL, NaN check, concatenate: [B, D] float32."""
        features = torch.zeros(B, self._feature_dim, device=device)
        bad = [name for name, value in acc.items() if value is not None and not torch.isfinite(value).all()]
        if bad:
            layers = "; ".join(f"{name} (module {', '.join(self._owner_names[name])})" for name in bad)
            raise FloatingPointError(f"non-finite (NaN/Inf) per-sample gradient features for: {layers}")
        for name, block in self._blocks.items():
            value = acc[name]
            if value is None:
                continue
            flat = value.reshape(B, -1)
            if self.config.kind == "kronecker":
                flat = flat * self._kron_scale(block)
                if block.out_size < flat.shape[1]:
                    flat = self._second_stage(name, flat, block.out_size)
                features[:, block.offset : block.offset + block.out_size] = flat
            elif self.config.kind == "exact":
                features[:, block.offset : block.offset + block.out_size] = flat
            else:
                features += self._dense_jl(name, flat)
        return features

    def _kron_scale(self, block: _Block) -> float:
        """1/sqrt(k) per projected axis, so that E[(P^T x)^T (P^T y)] / k = x^T y."""
        projected_axes = sum(d > self.config.k for d in block.shape2d)
        return self.config.k ** (-projected_axes / 2)

    def _second_stage(self, name: str, flat: torch.Tensor, out_size: int) -> torch.Tensor:
        """SRHT: sqrt(n/m) * S H D x (random signs D, orthonormal Hadamard H, m of n coordinates S);
        E[<f(x), f(y)>] = <x, y>."""
        n = flat.shape[1]
        padded = 1 << (n - 1).bit_length()
        generator = torch.Generator().manual_seed(_stable_seed(self.config.seed, name, "second-stage"))
        signs = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).float().to(flat.device)
        keep = torch.randperm(padded, generator=generator)[:out_size].to(flat.device)
        x = torch.nn.functional.pad(flat * signs, (0, padded - n))
        return _hadamard(x)[:, keep] * math.sqrt(padded / out_size)

    def _dense_jl(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """flat [B, n] @ P [n, k] / sqrt(k), P generated chunk by chunk of rows from (seed, name, chunk)."""
        k = self.config.k
        rows = max(1, _JL_CHUNK_ENTRIES // k)
        out = torch.zeros(flat.shape[0], k, device=flat.device)
        for chunk, start in enumerate(range(0, flat.shape[1], rows)):
            part = flat[:, start : start + rows]
            seed = _stable_seed(self.config.seed, name, "dense", chunk)
            out += part @ random_matrix(seed, part.shape[1], k, self.config.distribution).to(flat.device)
        return out / math.sqrt(k)
