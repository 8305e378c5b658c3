"""Exact split of a ``torch.optim.AdamW`` / ``Adam`` step by loss source (paper.md section 7).

Step t of one parameter θ (g_t^s the gradient of source s, c_t the clip coefficient, v from the total):
    m_t = β1 m_{t-1} + (1-β1) c_t Σ_s g_t^s,    v_t = β2 v_{t-1} + (1-β2) (c_t Σ_s g_t^s)²
    Δθ_t = -lr_t/(1-β1^t) · m_t / (√(v_t/(1-β2^t)) + ε)  -  lr_t·wd·θ_{t-1}        (AdamW)
m is linear in the gradients, so m = Σ_s m^s exactly with each m^s under the same recursion, and with
the shared D_t = 1/(√v̂_t + ε):
    Δθ_t = Σ_s (momentum_s + current_s) + weight_decay, where
    momentum_s   = -lr_t/(1-β1^t) · D_t · β1 m^s_{t-1}        (what the past steps of s still push)
    current_s    = -lr_t/(1-β1^t) · D_t · (1-β1) c_t g_t^s    (this step's gradient of s)
    weight_decay = -lr_t·wd·θ_{t-1}                           (AdamW's decoupled decay, applied first)
Adam (``decoupled_weight_decay=False``) instead adds wd·θ_{t-1} to the clipped gradient: there the decay
is the source ``"l2_weight_decay"`` (never clipped) that goes through m and v like any other.
AMSGrad changes only the shared denominator (max of the v's), so it splits exactly too.

Use (``optimizer.step()`` may be called by anyone, a host trainer included: hooks do the work):
    attributed = SourceAttribution(optimizer, model.named_parameters(), sources=("gen", "und"))
    optimizer.zero_grad()
    for micro in micro_batches:
        with attributed.source("gen"):
            (loss_gen(micro) / n).backward()      # what this backward adds to p.grad is g^gen
        with attributed.source("und"):
            (loss_und(micro) / n).backward()
    clip_grad_norm_(params, max_norm)             # c_t: inferred (one scalar for all, verified)
    optimizer.step()
    parts = attributed.last_parts                 # UpdateParts; Σ of all parts = θ_t - θ_{t-1}
c_t is relative to the gradients the contexts saw (after GradScaler's unscale_ it includes 1/scale).
A host trainer's own backward cannot be wrapped: name ``default_source`` and the gradient found at the
step is that source's, seen after clipping (``clip`` reads None then; c_t lies inside the gradient).

Exactness: v, the step counts and the update are torch's own; denominators, step sizes and the decay
factor are recomputed with torch's expressions. The split adds only the rounding of the per-source
sums (float64: ~1e-15 relative). Parts are computed in the parameter's dtype promoted to float32; in
bf16 the real Δθ carries torch's own bf16 rounding, which no split reproduces.
Attached to an optimizer that has state already, the first moment found becomes the source
``"before_attach"`` (momentum only). Per-parameter step counts are honoured; a parameter whose grad
is None at the step is skipped as torch skips it (no decay of its moments), while a zero grad steps.

Memory per parameter: one first moment per source that has reached it (S), the gradients gathered
during the step per source (S) and one copy of p.grad, all in float32 or wider; until the next step
the split keeps the step's c·g^s and m^s_{t-1} (2S) and its decay, and ``last_parts``, formed from
them when first read, 2S+1 more. Time: each source context compares p.grad with its copy and takes
the difference (two passes over the gradients); the step checks p.grad = c·Σ_s g^s and m = Σ_s m^s
(that is how an outside gradient or a desynchronised optimizer state is refused) and advances every
m^s; the parts cost nothing on a step whose ``last_parts`` nobody reads.
DDP: a source's gradient is what its backward adds to p.grad; when every backward all-reduces, that
is already the global average. Under ``no_sync`` (gradient accumulation, or one backward per source,
since DDP's reducer takes one backward per forward) the backwards add this rank's gradients, so pass
``average_over`` (the process group): the gathered source gradients are then averaged over ranks before
the step, and p.grad must by then hold c·Σ_s of those averages (the last backward synchronised, or the
caller all-reduced p.grad itself after the contexts; one all-reduce per source and parameter).

Refused by name: optimizers other than torch.optim.Adam/AdamW (subclasses may change the update),
maximize (negate the loss instead), capturable, differentiable, tensor betas, complex or sparse
gradients, step(closure), a fused step that unscales GradScaler's gradients itself (call
``scaler.unscale_`` first), and gradient that no source context saw (or that the clip did not scale
by one common factor). A tensor lr is fine: torch's rounding of it is reproduced.
The file is over 400 lines because gathering, hooks and checks share one per-parameter state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

BEFORE_ATTACH = "before_attach"
L2_WEIGHT_DECAY = "l2_weight_decay"
_PROPORTIONAL_ULPS = 8  # p.grad = c · Σ_s g^s up to the roundings of the clip (and of an unscale)
_MOMENT_ULPS = 32  # Σ_s m^s vs torch's m: ~ulp per step, accumulated over 1/(1-β1) steps


@dataclass(frozen=True)
class StepCoefficients:
    """Scalars of one parameter's last step. Its current-step part for a gradient source s is
        current_s = current_scale · g^s / denominator,  current_scale = -step_size · (1-β1) · c_t
    (c_t = clip, 1 for "l2_weight_decay"), step_size = lr_t/(1-β1^t), denominator = √v̂_t + ε from
    ``SourceAttribution.denominator``. The Adam-aware kernel of a batch of B samples u:
        c(o, u) = current_scale / B · <∇f(o), ∇l(u) / denominator>."""

    lr: float
    beta1: float
    step: int  # t, this parameter's own step count
    step_size: float  # lr_t / (1 - β1^t), as the optimizer computed it
    clip: float | None  # c_t; None when the gradient was seen only after clipping (default_source)

    @property
    def bias_correction1(self) -> float:
        return 1.0 - self.beta1**self.step

    @property
    def current_scale(self) -> float:
        return -self.step_size * (1.0 - self.beta1) * (1.0 if self.clip is None else self.clip)


@dataclass
class UpdateParts:
    """One step's Δθ split exactly: Σ_s current[s] + Σ_s momentum[s] + weight_decay = θ_t - θ_{t-1}.
    Every dict maps parameter name → tensor shaped like the parameter, over the parameters that were
    stepped (grad not None). ``current`` has the gradient sources (user sources and, for Adam with
    weight decay, "l2_weight_decay"); ``momentum`` also has "before_attach" when there was one."""

    current: dict[str, dict[str, Tensor]]
    momentum: dict[str, dict[str, Tensor]]
    weight_decay: dict[str, Tensor]  # AdamW's decoupled decay (zeros for Adam or wd = 0)
    coefficients: dict[str, StepCoefficients]

    def of_source(self, source: str) -> dict[str, Tensor]:
        """current[source] + momentum[source]: all that this source moved in the step."""
        current = self.current.get(source, {})
        return {n: m + current[n] if n in current else m.clone() for n, m in self.momentum[source].items()}

    def total(self) -> dict[str, Tensor]:
        """The sum of all parts: θ_t - θ_{t-1} (up to rounding)."""
        total = {n: w.clone() for n, w in self.weight_decay.items()}
        for parts in (*self.current.values(), *self.momentum.values()):
            for n, x in parts.items():
                total[n] += x
        return total


class _Slot:
    """One parameter: the source gradients gathered for the coming step and the per-source moments."""

    def __init__(self, name: str, param: Tensor):
        self.name, self.param = name, param
        self.dtype = torch.promote_types(param.dtype, torch.float32)
        self.snapshot: Tensor | None = None  # p.grad when the last source context closed (None: zero)
        self.grads: dict[str, Tensor] = {}  # source → gradient gathered this step (absent: zero)
        self.moments: dict[str, Tensor] = {}  # source → m^s (absent: zero)
        self.magnitude: Tensor | None = None  # mean over ranks of Σ_s |g^s| (average_over only)

    def clear(self) -> None:
        self.snapshot = None
        self.grads = {}
        self.magnitude = None


class _Stepped(NamedTuple):
    """One parameter's last step, as kept for ``last_parts``."""

    slot: _Slot
    group: dict  # the parameter group's settings at the step
    step: float  # t
    clip: float | None
    pushed: dict[str, Tensor]  # source → c·g^s (and Adam's L2 term)
    before: dict[str, Tensor]  # source → m^s_{t-1}
    decay: Tensor  # AdamW's decoupled decay of the step


def _check_group(group: dict) -> None:
    for option in ("maximize", "capturable", "differentiable"):
        if group.get(option):
            raise ValueError(f"SourceAttribution does not split a step with {option}=True")
    if any(isinstance(b, Tensor) for b in group["betas"]):
        raise ValueError("SourceAttribution needs float betas (tensor betas round differently in torch)")


def _denominator(state: dict, group: dict) -> Tensor:
    """√(v_t/(1-β2^t)) + ε exactly as torch forms it (amsgrad: the running max of v)."""
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    bias_correction2 = 1 - group["betas"][1] ** float(state["step"])
    return (v.sqrt() / bias_correction2**0.5).add_(group["eps"])


def _copied(x):
    """A tensor cloned (a tensor lr that a scheduler may change in place), anything else as it is."""
    return x.clone() if isinstance(x, Tensor) else x


def _all_true(flags: list[Tensor]) -> list[bool]:
    """0-dim bool tensors (on any devices) → Python bools, with one transfer."""
    return torch.stack([f.to(flags[0].device) for f in flags]).tolist() if flags else []


class SourceAttribution:
    """Splits every step of ``optimizer`` (exactly torch.optim.Adam or AdamW) by loss source; see the
    module docstring. ``named_parameters``: (name, parameter) pairs naming every parameter of the
    optimizer. After each ``optimizer.step()``, ``last_parts`` holds the step's UpdateParts (None when
    the step was skipped, e.g. GradScaler found inf)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, Tensor]],
        sources: Iterable[str],
        *,
        default_source: str | None = None,
        average_over: torch.distributed.ProcessGroup | None = None,
    ):
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            kind = type(optimizer).__name__
            raise TypeError(
                f"SourceAttribution splits torch.optim.Adam/AdamW only, got {kind} (wrapper: .optimizer)"
            )
        self.sources = tuple(sources)
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources must be distinct names, got {self.sources}")
        reserved = {BEFORE_ATTACH, L2_WEIGHT_DECAY} & set(self.sources)
        if reserved:
            raise ValueError(f"source names {sorted(reserved)} are reserved for the split's own sources")
        if default_source is not None and default_source not in self.sources:
            raise ValueError(f"default_source {default_source!r} is not one of {self.sources}")
        self.default_source, self.average_over = default_source, average_over
        self.optimizer = optimizer
        names: dict[int, str] = {}
        for name, p in named_parameters:
            names.setdefault(id(p), name)
        self._slots: list[_Slot] = []
        for group in optimizer.param_groups:
            _check_group(group)
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(f"an optimizer parameter of shape {tuple(p.shape)} has no name")
                if p.is_complex():
                    raise ValueError(f"SourceAttribution does not split complex parameters ({names[id(p)]})")
                self._slots.append(_Slot(names[id(p)], p))
        self._by_id = {id(s.param): s for s in self._slots}
        self._by_name = {s.name: s for s in self._slots}
        l2 = any(not g["decoupled_weight_decay"] and g["weight_decay"] != 0 for g in optimizer.param_groups)
        self.gradient_sources = self.sources + ((L2_WEIGHT_DECAY,) if l2 else ())
        for slot in self._slots:
            state = optimizer.state.get(slot.param)
            if state and "exp_avg" in state:
                slot.moments[BEFORE_ATTACH] = state["exp_avg"].to(slot.dtype, copy=True)
        attached_late = any(BEFORE_ATTACH in s.moments for s in self._slots)
        self.moment_sources = self.gradient_sources + ((BEFORE_ATTACH,) if attached_late else ())
        self._stepped: list[_Stepped] = []  # the last step's per-parameter record (last_parts)
        self._parts: UpdateParts | None = None
        self._active: str | None = None
        self._plan: list | None = None
        self._clip: float | None = None
        self._hooks = (
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        )

    def remove(self) -> None:
        """Detach from the optimizer (its later steps are no longer split)."""
        for hook in self._hooks:
            hook.remove()

    # ------------------------------------------------------------------ gathering the source gradients
    @contextmanager
    def source(self, name: str) -> Iterator[None]:
        """What the backward passes inside this block add to p.grad is the gradient of source ``name``."""
        if name not in self.sources:
            raise ValueError(f"unknown source {name!r}; the sources are {self.sources}")
        if self._active is not None:
            raise RuntimeError(f"source contexts do not nest ({name!r} inside {self._active!r})")
        self._check_nothing_pending()
        self._active = name
        try:
            yield
        finally:
            self._active = None
        self._gather(name)

    def _check_nothing_pending(self) -> None:
        """p.grad must be what the last context left, or cleared (zero_grad: the gathered gradient is
        dropped, as torch drops it). One comparison per gradient; the finer ones only where it differs."""
        held = []
        for slot in self._slots:
            if slot.param.grad is None:
                slot.clear()
            else:
                held.append(slot)
        # p.grad equals what the last context left (nothing left: p.grad is zero)
        kept = _all_true([(s.param.grad == (0 if s.snapshot is None else s.snapshot)).all() for s in held])
        changed = []
        for slot, ok in zip(held, kept, strict=True):
            if not ok:
                changed.append(slot)
            elif slot.snapshot is None:  # a zero p.grad: nothing gathered
                slot.clear()
        flags = []
        for slot in changed:
            grad = slot.param.grad
            if slot.snapshot is None:
                same = grad.new_zeros((), dtype=bool)
            else:  # NaN equals NaN here: an overflowing backward under GradScaler gathers as usual
                same = ((grad == slot.snapshot) | (grad.isnan() & slot.snapshot.isnan())).all()
            flags += [same, (grad == 0).all()]
        flags = _all_true(flags)
        outside = []
        for slot, same, zero in zip(changed, flags[0::2], flags[1::2], strict=True):
            if zero and not same:
                slot.clear()
            elif not same:
                outside.append(slot.name)
        if outside:
            raise RuntimeError(f"p.grad of {outside} changed outside any source context (no zero_grad?)")

    def _gather(self, source: str) -> None:
        for slot in self._slots:
            grad = slot.param.grad
            if grad is None:
                if slot.snapshot is not None:
                    raise RuntimeError(f"p.grad of {slot.name} was cleared inside source context {source!r}")
                continue
            if grad.is_sparse:
                raise ValueError(f"SourceAttribution does not split sparse gradients ({slot.name})")
            added = grad.to(slot.dtype, copy=True)
            if slot.snapshot is not None:
                added -= slot.snapshot.to(slot.dtype)
            gathered = slot.grads.get(source)
            slot.grads[source] = added if gathered is None else gathered.add_(added)
            slot.snapshot = grad.detach().clone()

    # ------------------------------------------------------------------ the step
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._stepped, self._parts = [], None
        if any(a is not None for a in (*args[1:], *kwargs.values())):  # args[0] is the optimizer
            raise ValueError("SourceAttribution does not split step(closure): call backward before the step")
        if self._active is not None:
            raise RuntimeError(f"optimizer.step() inside the source context {self._active!r}")
        if getattr(optimizer, "grad_scale", None) is not None:
            raise ValueError("a fused step that unscales GradScaler's gradients: call scaler.unscale_ first")
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and float(found_inf):  # GradScaler's fused step will not move
            for slot in self._slots:
                slot.clear()
            return
        plan = []
        for group in optimizer.param_groups:
            _check_group(group)
            l2_on = not group["decoupled_weight_decay"] and group["weight_decay"]
            if l2_on and L2_WEIGHT_DECAY not in self.gradient_sources:
                raise ValueError("Adam's L2 weight_decay was turned on after attaching: attach with it on")
            for p in group["params"]:
                slot = self._by_id.get(id(p))
                if slot is None:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} joined the optimizer after attaching"
                    )
                if p.grad is None:
                    slot.clear()  # torch skips it: no step, no decay
                elif p.grad.is_sparse:
                    raise ValueError(f"SourceAttribution does not split sparse gradients ({slot.name})")
                else:
                    plan.append((slot, group))
        if self.average_over is not None:
            self._average(plan)
        self._clip = self._clip_coefficient(plan)
        self._check_moments(plan)
        self._plan = []
        for slot, group in plan:
            p, state = slot.param, optimizer.state.get(slot.param)
            steps_before = float(state["step"]) if state else 0.0
            wd, lr = group["weight_decay"], group["lr"]
            decoupled = group["decoupled_weight_decay"]
            # torch multiplies θ by (1 - lr·wd): the decay that really happens is θ·((1 - lr·wd) - 1)
            factor = float(1 - lr * wd) - 1.0 if decoupled else 0.0
            decay = p.detach().to(slot.dtype) * factor
            l2 = p.detach().to(slot.dtype) * wd if not decoupled and wd else None
            self._plan.append((slot, group, steps_before, decay, l2))

    def _clip_coefficient(self, plan: list) -> float | None:
        """c with p.grad = c · Σ_s g^s for every stepped parameter (clip_grad_norm_, an unscale)."""
        if all(slot.snapshot is None for slot, _ in plan):  # no source context ran this step
            outside = [slot for slot, _ in plan if slot.param.grad.any()]
            if not outside:
                return 1.0
            if self.default_source is None:
                names = [slot.name for slot in outside]
                raise RuntimeError(f"gradient of {names} was added outside any source context")
            for slot in outside:
                slot.grads = {self.default_source: slot.param.grad.to(slot.dtype, copy=True)}
            return None
        gathered = {slot.name: self._gathered(slot) for slot, _ in plan}
        dots = []  # per parameter <p.grad, Σ_s g^s> and |Σ_s g^s|², float64; c = the median ratio
        for slot, _ in plan:
            if gathered[slot.name] is not None:
                g, s = slot.param.grad.double().flatten(), gathered[slot.name].double().flatten()
                dots.append(torch.stack([torch.dot(g, s), torch.dot(s, s)]).to(plan[0][0].param.device))
        dots = torch.stack(dots)
        ratios = dots[:, 0][dots[:, 1] > 0] / dots[:, 1][dots[:, 1] > 0]
        clip = float(ratios.median()) if len(ratios) else 1.0
        flags = []
        for slot, _ in plan:
            grad = slot.param.grad.to(slot.dtype)
            reference = gathered[slot.name]
            expected = torch.zeros_like(grad) if reference is None else clip * reference.to(slot.dtype)
            tol = _PROPORTIONAL_ULPS * torch.finfo(slot.param.grad.dtype).eps
            scale = expected.abs()
            if slot.magnitude is not None:  # averaged over ranks: the sums' rounding scales with Σ|g|
                world = torch.distributed.get_world_size(self.average_over)
                scale = scale + abs(clip) * world * slot.magnitude.to(slot.dtype)
            tiny = torch.finfo(slot.dtype).tiny
            flags.append(((grad - expected).abs() <= tol * scale + tiny).all())
        bad = [slot.name for (slot, _), ok in zip(plan, _all_true(flags), strict=True) if not ok]
        if bad:
            raise RuntimeError(
                f"p.grad of {bad} at the step is not c·(what the source contexts gathered) with one c = "
                f"{clip:.6g} for all: gradient added outside the contexts, or scaled per parameter"
            )
        return clip

    def _gathered(self, slot: _Slot) -> Tensor | None:
        """Σ_s g^s as p.grad should hold it before the clip: what the contexts left in p.grad, or with
        ``average_over`` the sum of the rank-averaged source gradients (None: nothing gathered)."""
        if self.average_over is None or slot.snapshot is None:
            return slot.snapshot
        return sum(slot.grads.values())

    def _average(self, plan: list) -> None:
        """Each source gradient averaged over ranks, and the mean over ranks of Σ_s |g^s| (``magnitude``:
        the scale of the rounding in p.grad's own average, whose terms may cancel); one all-reduce per
        parameter."""
        world = torch.distributed.get_world_size(self.average_over)
        for slot, _ in plan:
            grads = [slot.grads.get(s, torch.zeros_like(slot.param, dtype=slot.dtype)) for s in self.sources]
            stacked = torch.stack([*grads, sum(g.abs() for g in grads)])
            torch.distributed.all_reduce(stacked, group=self.average_over)
            stacked /= world
            slot.grads = dict(zip(self.sources, stacked[:-1], strict=True))
            slot.magnitude = stacked[-1]

    def _check_moments(self, plan: list) -> None:
        """torch's m must be Σ_s m^s: catches an optimizer state changed behind the split's back."""
        flags = []
        for slot, group in plan:
            state = self.optimizer.state.get(slot.param)
            m = state["exp_avg"] if state else torch.zeros_like(slot.param)
            ours = sum(slot.moments.values(), torch.zeros_like(m, dtype=slot.dtype))
            scale = sum((x.norm() for x in slot.moments.values()), m.norm().to(slot.dtype))
            tol = min(0.5, _MOMENT_ULPS * torch.finfo(m.dtype).eps / (1 - group["betas"][0]))
            flags.append((ours - m).norm() <= tol * scale)
        bad = [slot.name for (slot, _), ok in zip(plan, _all_true(flags), strict=True) if not ok]
        if bad:
            raise RuntimeError(
                f"the optimizer's first moment of {bad} is not the sum of the per-source moments: its state "
                "changed outside the split (optimizer.load_state_dict without the split's load_state_dict?)"
            )

    def _after_step(self, optimizer, args, kwargs) -> None:
        """Advance every m^s; the step's parts are formed from what is kept here when ``last_parts`` is
        first read (most steps nobody reads them)."""
        plan, clip, self._plan = self._plan, self._clip, None
        if plan is None:  # a skipped step
            return
        steps = [float(optimizer.state[slot.param]["step"]) for slot, *_ in plan]
        moved = [t == before + 1 for t, (_, _, before, _, _) in zip(steps, plan, strict=True)]
        if not all(moved):
            raise RuntimeError(
                "the optimizer did not step every parameter with a grad: the split cannot follow"
            )
        # each group's settings as this step used them: a scheduler may change lr or betas before the read
        settings = {id(g): {**g, "lr": _copied(g["lr"])} for g in optimizer.param_groups}
        stepped = []
        for (slot, group, _, decay, l2), t in zip(plan, steps, strict=True):
            group = settings[id(group)]
            beta1 = group["betas"][0]
            pushed = {s: g if clip is None else g * clip for s, g in slot.grads.items()}  # c·g^s
            if l2 is not None:
                pushed[L2_WEIGHT_DECAY] = l2
            before = dict(slot.moments)  # m^s_{t-1}: the updates below make new tensors
            for source in set(slot.moments) | set(pushed):
                m = slot.moments.get(source)
                m = torch.zeros_like(slot.param, dtype=slot.dtype) if m is None else m * beta1
                slot.moments[source] = m if source not in pushed else m.add_(pushed[source], alpha=1 - beta1)
            stepped.append(_Stepped(slot, group, t, clip, pushed, before, decay))
            slot.clear()
        self._stepped = stepped

    @property
    def last_parts(self) -> UpdateParts | None:
        """The last step's UpdateParts (None before the first step and after a skipped one). Formed on the
        first read after the step from its gradients, moments and torch's v (as :meth:`denominator`): read
        it before the next step."""
        if self._parts is None and self._stepped:
            self._parts = self._form_parts(self._stepped)
        return self._parts

    def _form_parts(self, stepped: list[_Stepped]) -> UpdateParts:
        current = {s: {} for s in self.gradient_sources}
        momentum = {s: {} for s in self.moment_sources}
        weight_decay, coefficients = {}, {}
        for slot, group, t, clip, pushed, before, decay in stepped:
            beta1, lr = group["betas"][0], group["lr"]
            step_size = float(lr / (1 - beta1**t))
            denominator = _denominator(self.optimizer.state[slot.param], group)
            zeros = torch.zeros_like(slot.param, dtype=slot.dtype)
            for source in self.moment_sources:
                m = before.get(source)
                momentum[source][slot.name] = (
                    zeros.clone() if m is None else m * (-step_size * beta1) / denominator
                )
            for source in self.gradient_sources:
                g = pushed.get(source)
                scale = -step_size * (1 - beta1)
                current[source][slot.name] = zeros.clone() if g is None else g * scale / denominator
            weight_decay[slot.name] = decay
            coefficients[slot.name] = StepCoefficients(float(lr), beta1, int(t), step_size, clip)
        return UpdateParts(current, momentum, weight_decay, coefficients)

    def denominator(self, name: str) -> Tensor:
        """√v̂_t + ε of the parameter's last step as torch formed it (D_t = 1 / denominator), shaped like
        the parameter; valid until the next step."""
        slot = self._by_name[name]
        state = self.optimizer.state.get(slot.param)
        if not state:
            raise ValueError(f"{name} has not been stepped yet")
        group = next(g for g in self.optimizer.param_groups if any(p is slot.param for p in g["params"]))
        return _denominator(state, group)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """{"moments": {source: {parameter name: m^s}}} (copies; absent: zero). Save it with the
        optimizer's state, between steps."""
        return {
            "moments": {
                source: {s.name: s.moments[source].clone() for s in self._slots if source in s.moments}
                for source in self.moment_sources
            }
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the split: the per-source moments saved with the optimizer state being resumed."""
        moments = state["moments"]
        saved = tuple(s for s in moments if s != BEFORE_ATTACH)
        if saved != self.gradient_sources:
            raise ValueError(f"saved sources {saved} differ from this split's {self.gradient_sources}")
        unknown = sorted({n for per_source in moments.values() for n in per_source} - set(self._by_name))
        if unknown:
            raise ValueError(f"saved moments of unknown parameters {unknown}")
        for slot in self._slots:
            slot.clear()
            slot.moments = {}
            for source, per_source in moments.items():
                if slot.name in per_source:
                    m = per_source[slot.name]
                    if m.shape != slot.param.shape:
                        raise ValueError(
                            f"saved moment of {slot.name}: shape {tuple(m.shape)}, not the parameter's"
                        )
                    slot.moments[source] = m.to(device=slot.param.device, dtype=slot.dtype, copy=True)
        self.moment_sources = self.gradient_sources + ((BEFORE_ATTACH,) if BEFORE_ATTACH in moments else ())
