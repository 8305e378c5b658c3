"""The empirical NTK between two sets of per-sample scalars of one model.

    K[i, j] = <grad_theta f_a(i), grad_theta f_b(j)>,   f_a = fn_a(model, batch_a): Tensor[B_a]

over the parameters that ``config`` tracks. :func:`empirical_ntk` uses the projected features of
:class:`~ntkdyn.analysis.projector.GradientProjector`; :func:`exact_ntk` is the reference: an explicit
per-sample loop of torch.autograd.grad over one forward (the full Jacobian rows, no hooks, no projection).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from ntkdyn.analysis.projector import GradientProjector, ProjectionConfig, select_parameters

MeasurementFn = Callable[[nn.Module, Any], torch.Tensor]
_CHUNK = 1 << 16  # feature columns converted to float64 at a time


def feature_kernel(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """K = Phi_a Phi_b^T: [B_a, D] x [B_b, D] -> [B_a, B_b] in the features' dtype, accumulated in float64
    (a sum of D products in float32 would lose up to ~D eps; the result is rounded once); raises on
    different D."""
    if features_a.dim() != 2 or features_b.dim() != 2:
        raise ValueError(
            f"features must be [B, D]; got {tuple(features_a.shape)} and {tuple(features_b.shape)}"
        )
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"incompatible feature dimensions {features_a.shape[1]} vs {features_b.shape[1]}: the features "
            "come from projectors with different configs or tracked parameters "
            "(see GradientProjector.check_compatible)"
        )
    kernel = torch.zeros(
        features_a.shape[0], features_b.shape[0], dtype=torch.float64, device=features_a.device
    )
    for start in range(0, features_a.shape[1], _CHUNK):
        part_a = features_a[:, start : start + _CHUNK].double()
        kernel += part_a @ features_b[:, start : start + _CHUNK].double().T
    return kernel.to(torch.promote_types(features_a.dtype, features_b.dtype))


def empirical_ntk(
    model: nn.Module,
    fn_a: MeasurementFn,
    batch_a: Any,
    fn_b: MeasurementFn | None = None,
    batch_b: Any = None,
    config: ProjectionConfig | None = None,
) -> torch.Tensor:
    """Projected eNTK [B_a, B_b] (fn_b/batch_b default to fn_a/batch_a), in the features' dtype. Unbiased
    for projected kinds; for kind="exact" equal to :func:`exact_ntk` up to the rounding of the model's
    dtype (float64 features and kernel on a float64 model)."""
    return _pair_kernel(GradientProjector(model, config).per_sample, fn_a, batch_a, fn_b, batch_b)


def _pair_kernel(
    rows: Callable[[MeasurementFn, Any], torch.Tensor],
    fn_a: MeasurementFn,
    batch_a: Any,
    fn_b: MeasurementFn | None,
    batch_b: Any,
) -> torch.Tensor:
    """R_a R_b^T [B_a, B_b] with R = rows(fn, batch) [B, D]; fn_b/batch_b default to fn_a/batch_a,
    and R_a is reused when both are omitted."""
    rows_a = rows(fn_a, batch_a)
    if fn_b is None and batch_b is None:
        return feature_kernel(rows_a, rows_a)
    rows_b = rows(fn_a if fn_b is None else fn_b, batch_a if batch_b is None else batch_b)
    return feature_kernel(rows_a, rows_b)


def _jacobian(model: nn.Module, params: list[nn.Parameter], fn: MeasurementFn, batch: Any) -> torch.Tensor:
    """[B, P] rows grad_theta fn(model, batch)[b], by one autograd.grad per sample over one forward."""
    with torch.enable_grad():
        values = fn(model, batch)
        if not isinstance(values, torch.Tensor) or values.dim() != 1:
            raise ValueError("fn must return a Tensor[B] with one scalar per sample")
        rows = []
        for b in range(values.shape[0]):
            grads = torch.autograd.grad(values[b], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for p, g in zip(params, grads, strict=True)
                    ]
                )
            )
    return torch.stack(rows)


def exact_ntk(
    model: nn.Module,
    fn_a: MeasurementFn,
    batch_a: Any,
    fn_b: MeasurementFn | None = None,
    batch_b: Any = None,
    config: ProjectionConfig | None = None,
) -> torch.Tensor:
    """Reference eNTK [B_a, B_b] over the parameters ``config`` tracks (its kind, k and seed are ignored):
    J_a J_b^T with Jacobian rows from an explicit per-sample autograd loop in the model's dtype (use a
    float64 model for a float64 reference), accumulated in float64."""
    params = list(select_parameters(model, ProjectionConfig() if config is None else config).values())
    return _pair_kernel(partial(_jacobian, model, params), fn_a, batch_a, fn_b, batch_b)
