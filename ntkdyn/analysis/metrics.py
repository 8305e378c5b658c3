"""Agreement statistics between predicted and observed changes, and kernel normalisations.

All functions take 1-D (statistics) or 2-D (kernels) tensors and compute in float64.
"""

from __future__ import annotations

import math

import torch


def _pair(x: torch.Tensor, y: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() != y.numel():
        raise ValueError(f"{name}: x has {x.numel()} values but y has {y.numel()}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(f"{name}: inputs contain NaN or Inf")
    return x, y


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation cov(x, y) / (std x std y); NaN when fewer than 2 values or a constant input."""
    x, y = _pair(x, y, "pearson")
    if x.numel() < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denom = xc.norm() * yc.norm()
    return float((xc @ yc) / denom) if denom > 0 else math.nan


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), 0-based."""
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(values.numel(), dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(values.numel(), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation: the Pearson correlation of the (tie-averaged) ranks."""
    x, y = _pair(x, y, "spearman")
    return pearson(_ranks(x), _ranks(y))


def sign_agreement(predicted: torch.Tensor, observed: torch.Tensor) -> float:
    """Fraction of entries with sign(predicted) == sign(observed) (zeros count as their own sign)."""
    p, o = _pair(predicted, observed, "sign_agreement")
    if p.numel() == 0:
        return math.nan
    return float((torch.sign(p) == torch.sign(o)).double().mean())


def slope(predicted: torch.Tensor, observed: torch.Tensor) -> float:
    """Least-squares slope of observed on predicted (with intercept): cov(p, o) / var(p); 1 = calibrated."""
    p, o = _pair(predicted, observed, "slope")
    if p.numel() < 2:
        return math.nan
    pc = p - p.mean()
    var = pc @ pc
    return float((pc @ (o - o.mean())) / var) if var > 0 else math.nan


def agreement(predicted: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
    """{"pearson", "spearman", "sign_agreement", "slope", "n"} of predicted vs observed."""
    p, o = _pair(predicted, observed, "agreement")
    return {
        "pearson": pearson(p, o),
        "spearman": spearman(p, o),
        "sign_agreement": sign_agreement(p, o),
        "slope": slope(p, o),
        "n": int(p.numel()),
    }


def cosine_normalise(kernel: torch.Tensor, diag_a: torch.Tensor, diag_b: torch.Tensor) -> torch.Tensor:
    """K_cos[i, j] = K[i, j] / sqrt(diag_a[i] * diag_b[j]) with diag_* = the self-kernels (squared norms).

    kernel: [A, B]; diag_a: [A]; diag_b: [B]. Zero-norm rows/columns give 0.
    """
    if kernel.dim() != 2 or kernel.shape != (diag_a.numel(), diag_b.numel()):
        raise ValueError(
            f"cosine_normalise: kernel {tuple(kernel.shape)} does not match diagonals "
            f"({diag_a.numel()}, {diag_b.numel()})"
        )
    scale = torch.outer(diag_a.clamp_min(0).sqrt(), diag_b.clamp_min(0).sqrt())
    return torch.where(scale > 0, kernel / scale.clamp_min(torch.finfo(kernel.dtype).tiny), 0.0)


def kernel_alignment(k1: torch.Tensor, k2: torch.Tensor, centered: bool = False) -> float:
    """Kernel alignment <K1, K2>_F / (||K1||_F ||K2||_F) (Cristianini et al.); ``centered`` first applies
    H K H with H = I - 11^T/n on both sides (centred kernel alignment). K1, K2: [n, m] of equal shape."""
    if k1.shape != k2.shape:
        raise ValueError(f"kernel_alignment: shapes {tuple(k1.shape)} and {tuple(k2.shape)} differ")
    a, b = k1.double(), k2.double()
    if centered:
        a = a - a.mean(0, keepdim=True) - a.mean(1, keepdim=True) + a.mean()
        b = b - b.mean(0, keepdim=True) - b.mean(1, keepdim=True) + b.mean()
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if denom > 0 else math.nan
