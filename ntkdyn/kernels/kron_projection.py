"""Fused per-sample Kronecker projection: the pure-torch reference and the dispatcher.

For every sample b, with token factors x_{b,t} in R^{DX}, y_{b,t} in R^{DY} and a token mask m_{b,t}:

    out[b] = sum_t m_{b,t} (PX^T x_{b,t}) (PY^T y_{b,t})^T          out: [B, KX, KY]

With x = output-gradients g and y = activations a of an nn.Linear this is P_out^T (sum_t g_t a_t^T) P_in,
the Kronecker-factored random projection of the per-sample weight gradient, computed without ever
forming the [DX, DY] gradient. ``PX``/``PY`` = None means the identity (that axis is kept exact).

The reference (:func:`kron_projection_reference`) is the CPU path and the test oracle; the Triton
kernel lives in :mod:`ntkdyn.kernels.kron_projection_triton`, imported only when it is used.
"""

from __future__ import annotations

import torch

IMPLEMENTATIONS = ("auto", "torch", "triton")


def kron_projection_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    px: torch.Tensor | None,
    py: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    scale_x: torch.Tensor | None = None,
    scale_y: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    x_zero_where_masked: bool = False,
) -> torch.Tensor:
    """out[b] = sum_t m[b,t] (px^T (sx ∘ x[b,t])) (py^T (sy ∘ y[b,t]))^T, in float32 (float64 if x or y
    is float64); written into ``out`` (a [B, KX, KY] tensor of that dtype, any strides) when given.

    x: [B, T, DX], y: [B, T, DY] (fp64/fp32/bf16/fp16); px: [DX, KX] or None (identity); py: [DY, KY] or
    None; mask: bool [B, T] or None (all tokens); scale_x [DX], scale_y [DY]: per-feature scales sx, sy
    or None (ones). Masked tokens are zeroed with ``where`` after the projection, which maps each
    token's row on its own (a NaN there never leaks). ``x_zero_where_masked``: x's row is zero at every
    masked token (the mask marks x's nonzero rows), so its projection is zero there and y alone is
    masked. Returns [B, KX, KY].
    """
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    xf = x.to(dtype) if scale_x is None else x.to(dtype) * scale_x.to(dtype)
    yf = y.to(dtype) if scale_y is None else y.to(dtype) * scale_y.to(dtype)
    xp = xf if px is None else xf @ px.to(dtype)
    yp = yf if py is None else yf @ py.to(dtype)
    if mask is not None and not bool(mask.all()):
        keep = mask.bool().unsqueeze(-1)
        xp = xp if x_zero_where_masked else torch.where(keep, xp, 0.0)
        yp = torch.where(keep, yp, 0.0)
    return torch.bmm(xp.transpose(1, 2), yp, out=out)


def triton_available() -> bool:
    """Whether the triton package can be imported here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kron_projection(
    x: torch.Tensor,
    y: torch.Tensor,
    px: torch.Tensor | None,
    py: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    implementation: str = "auto",
    sign_factors: bool = False,
    scale_x: torch.Tensor | None = None,
    scale_y: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    x_zero_where_masked: bool = False,
) -> torch.Tensor:
    """out[b] = sum_t m[b,t] (px^T (sx ∘ x[b,t])) (py^T (sy ∘ y[b,t]))^T, [B, KX, KY] (dtype: see the
    reference; scales as there, fused into the Triton kernel's loads; ``out`` and
    ``x_zero_where_masked`` as there: the Triton kernel masks both sides in its loads either way).

    implementation: "auto" (Triton on CUDA tensors when triton is installed, torch otherwise), "torch"
    or "triton" (on CPU tensors only under TRITON_INTERPRET=1; ImportError naming triton if it is
    missing). float64 inputs always take the torch path (the kernel accumulates in float32).
    sign_factors: see :func:`ntkdyn.kernels.kron_projection_triton.kron_projection_triton`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    float64 = torch.float64 in (x.dtype, y.dtype)
    use_triton = implementation == "triton" or (implementation == "auto" and x.is_cuda and triton_available())
    if not use_triton or float64:
        return kron_projection_reference(x, y, px, py, mask, scale_x, scale_y, out, x_zero_where_masked)
    try:
        from ntkdyn.kernels.kron_projection_triton import kron_projection_triton
    except ImportError as error:
        raise ImportError(
            "implementation='triton' needs the triton package, which cannot be imported here "
            f"({error}); install triton (Linux) or use implementation='torch'/'auto'"
        ) from error
    result = kron_projection_triton(
        x, y, px, py, mask, sign_factors=sign_factors, scale_x=scale_x, scale_y=scale_y
    )
    return result if out is None else out.copy_(result)
