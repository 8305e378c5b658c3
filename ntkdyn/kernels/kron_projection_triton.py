"""The fused per-sample Kronecker projection as a Triton kernel, and its launcher.

Same contract as :func:`ntkdyn.kernels.kron_projection.kron_projection_reference` (the torch path and
the test oracle) for fp32/bf16/fp16 inputs, output float32; imported only when implementation="triton"
(or "auto" on CUDA) needs it, so that ``import ntkdyn`` works where triton is not installed.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def _kron_projection_kernel(
    X,  # [B, T, DX] fp32/bf16/fp16, strides (stride_xb, stride_xt, stride_xd)
    Y,  # [B, T, DY] fp32/bf16/fp16, strides (stride_yb, stride_yt, stride_yd)
    PX,  # [DX, KX] fp32, contiguous
    PY,  # [DY, KY] fp32, contiguous
    MASK,  # [B, T] int8 (nonzero = token counts), strides (stride_mb, stride_mt)
    SX,  # [DX] fp32 scale of x's features (HAS_SCALE), contiguous
    SY,  # [DY] fp32 scale of y's features (HAS_SCALE), contiguous
    OUT,  # [B, SPLITS * DX_SPLITS, KX, KY] fp32 partial sums, contiguous
    T,
    DX,
    DY,
    KX,
    KY,
    TOKENS_PER_SPLIT,  # tokens handled by one program, a multiple of BLOCK_T
    DX_SPLITS,  # x's feature axis cut into this many ranges, one per program
    DX_PER_SPLIT,  # features of x handled by one program, a multiple of BLOCK_D
    stride_xb,
    stride_xt,
    stride_xd,
    stride_yb,
    stride_yt,
    stride_yd,
    stride_mb,
    stride_mt,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KX: tl.constexpr,
    BLOCK_KY: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr,  # 16-bit inputs and factors in {-1, 0, 1}: exact products
    HAS_SCALE: tl.constexpr,  # x and y scaled per feature (a factored diagonal preconditioner r c^T)
):
    """One program = (sample b, token split s, feature range r of x, output tile (kx, ky)).

        acc = 0                                             # [BLOCK_KX, BLOCK_KY] fp32, registers
        for each token block t of split s:
            xp = sum_{d in r} SX[d] X[b, t, d] PX[d, kx]    # [BLOCK_T, BLOCK_KX], registers only
            yp = sum_d SY[d] Y[b, t, d] PY[d, ky]           # [BLOCK_T, BLOCK_KY], registers only
            acc += xp^T yp                                  # masked tokens were loaded as 0
        OUT[b, s * DX_SPLITS + r, kx, ky] = acc

    The product is linear in xp, so the ranges of x's feature axis are summed like the token splits:
    a wide x (an MLP's or LM head's output-gradient) is shared by several programs when B x splits x
    tiles would leave SMs idle (each program then reads all of y for its tokens). With HAS_SCALE, D's
    factors r (SX) and c (SY) scale the loaded features: the preconditioned projection
    (r ∘ g)(c ∘ a)^T in the same pass (sketches.Sketch.tokens). The projected tokens xp, yp never reach
    memory; only the [KX, KY] partial sum of each program does (the launcher sums them: deterministic,
    no atomics). Every tl.dot accumulates in fp32. By
    default inputs are cast to fp32 right after the load and multiplied with IEEE fp32 precision (the
    interpreter computes bf16 arithmetic wrongly, and TF32 would cost 3 decimal digits). On a GPU, with
    bf16/fp16 inputs and factors in {-1, 0, 1} (Rademacher or identity), DOT_IN_INPUT_DTYPE multiplies
    in the input dtype on tensor cores: every product is exact and accumulates in fp32, so the result
    is the same up to summation order. Every block size is >= 16 (tl.dot's minimum); ragged edges (odd
    DX, DY, KX, KY, T) are handled by masked loads with 0 padding.

    The projection factors are *loaded*, not generated in-kernel: they are generated once per
    parameter on the host from the seed (torch's CPU generator), so the CPU path, the interpreter
    and every GPU give bit-identical factors and features; they are small ([D, K], K ~ 64) and are
    re-read from L2 by every program, so in-kernel generation would save little bandwidth while
    requiring a second, Philox-exact reference of Triton's RNG on the CPU.
    """
    b = tl.program_id(0).to(tl.int64)  # B * stride_xb may exceed int32
    split = tl.program_id(1) // DX_SPLITS
    dx_start = (tl.program_id(1) % DX_SPLITS) * DX_PER_SPLIT
    dx_stop = tl.minimum(dx_start + DX_PER_SPLIT, DX)
    tile = tl.program_id(2)
    n_ky_tiles = tl.cdiv(KY, BLOCK_KY)
    offs_kx = (tile // n_ky_tiles) * BLOCK_KX + tl.arange(0, BLOCK_KX)
    offs_ky = (tile % n_ky_tiles) * BLOCK_KY + tl.arange(0, BLOCK_KY)
    kx_ok = offs_kx < KX
    ky_ok = offs_ky < KY
    acc = tl.zeros((BLOCK_KX, BLOCK_KY), dtype=tl.float32)
    for t0 in range(0, TOKENS_PER_SPLIT, BLOCK_T):
        offs_t = split * TOKENS_PER_SPLIT + t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        keep = tl.load(MASK + b * stride_mb + offs_t * stride_mt, mask=t_ok, other=0) != 0
        keep = keep & t_ok
        xp = tl.zeros((BLOCK_T, BLOCK_KX), dtype=tl.float32)
        for d0 in range(dx_start, dx_stop, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < dx_stop
            x = tl.load(
                X + b * stride_xb + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                mask=keep[:, None] & d_ok[None, :],
                other=0.0,
            )
            if HAS_SCALE:
                x = x.to(tl.float32) * tl.load(SX + offs_d, mask=d_ok, other=0.0)[None, :]
            p = tl.load(
                PX + offs_d[:, None] * KX + offs_kx[None, :], mask=d_ok[:, None] & kx_ok[None, :], other=0.0
            )
            if DOT_IN_INPUT_DTYPE:
                xp = tl.dot(x, p.to(x.dtype), xp)
            else:
                xp += tl.dot(x.to(tl.float32), p, input_precision="ieee")
        yp = tl.zeros((BLOCK_T, BLOCK_KY), dtype=tl.float32)
        for d0 in range(0, DY, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < DY
            y = tl.load(
                Y + b * stride_yb + offs_t[:, None] * stride_yt + offs_d[None, :] * stride_yd,
                mask=keep[:, None] & d_ok[None, :],
                other=0.0,
            )
            if HAS_SCALE:
                y = y.to(tl.float32) * tl.load(SY + offs_d, mask=d_ok, other=0.0)[None, :]
            p = tl.load(
                PY + offs_d[:, None] * KY + offs_ky[None, :], mask=d_ok[:, None] & ky_ok[None, :], other=0.0
            )
            if DOT_IN_INPUT_DTYPE:
                yp = tl.dot(y, p.to(y.dtype), yp)
            else:
                yp += tl.dot(y.to(tl.float32), p, input_precision="ieee")
        acc += tl.dot(tl.trans(xp), yp, input_precision="ieee")
    out_ptrs = (
        OUT + ((b * tl.num_programs(1) + tl.program_id(1)) * KX + offs_kx[:, None]) * KY + offs_ky[None, :]
    )
    tl.store(out_ptrs, acc, mask=kx_ok[:, None] & ky_ok[None, :])


@functools.cache
def _compiled_kernel(interpret: bool):
    """triton.jit reads TRITON_INTERPRET when it decorates, so decorate on first use, per mode."""
    del interpret  # the cache key: triton.jit itself reads the environment
    return triton.jit(_kron_projection_kernel)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block(n: int, cap: int) -> int:
    """Power of two >= max(n, 16) (tl.dot's minimum), at most cap."""
    return min(cap, max(16, triton.next_power_of_2(n)))


def kron_projection_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    px: torch.Tensor | None,
    py: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    sign_factors: bool = False,
    splits: int | None = None,
    block_t: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    scale_x: torch.Tensor | None = None,
    scale_y: torch.Tensor | None = None,
    dx_splits: int | None = None,
) -> torch.Tensor:
    """Launch the fused kernel; same contract as the reference (float32 output).

    sign_factors: the caller guarantees px, py have entries in {-1, 0, 1}; then 16-bit CUDA inputs are
    multiplied in their own dtype on tensor cores (exact products; not with scales). splits: token
    splits per sample (each a program writing a partial sum); None picks enough programs to fill the GPU
    (one on the interpreter). scale_x [DX], scale_y [DY]: per-feature scales (both or neither).
    dx_splits: ranges of x's feature axis, one program each; None: 1, or on CUDA enough to fill the GPU
    when samples x token splits x tiles do not. block_t, block_d, num_warps: launch tuning; None takes
    the fastest of the sweep in benchmarks/gpu_projection.py on an H200 (BENCHMARKS.md) on CUDA:
    (64, 128, 8) with 16-bit dots, (64, 64, 8) with fp32 dots; (16, 32, 4) on the interpreter. CPU
    tensors need TRITON_INTERPRET=1.
    """
    if x.device.type == "cpu" and not _interpreter_on():
        raise RuntimeError(
            "implementation='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before running (or use implementation='torch'/'auto' on CPU)"
        )
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(
            f"x and y must be [B, T, D] with equal B, T; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    B, T, DX = x.shape
    DY = y.shape[2]
    px = torch.eye(DX, device=x.device) if px is None else px.float().contiguous()
    py = torch.eye(DY, device=y.device) if py is None else py.float().contiguous()
    KX, KY = px.shape[1], py.shape[1]
    keep = torch.ones(B, T, dtype=torch.int8, device=x.device) if mask is None else mask.to(torch.int8)
    if (scale_x is None) != (scale_y is None):
        raise ValueError("scale_x and scale_y: give both (a factored preconditioner r c^T) or neither")
    has_scale = scale_x is not None
    if has_scale and (scale_x.shape != (DX,) or scale_y.shape != (DY,)):
        raise ValueError(
            f"scale_x, scale_y must be [{DX}], [{DY}]; got {tuple(scale_x.shape)}, {tuple(scale_y.shape)}"
        )
    sx = scale_x.float().contiguous() if has_scale else keep  # any tensor: not read without HAS_SCALE
    sy = scale_y.float().contiguous() if has_scale else keep
    low_precision = (
        sign_factors
        and not has_scale
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and y.dtype == x.dtype
    )
    tuned = (64, 128, 8) if low_precision else (64, 64, 8) if x.is_cuda else (16, 32, 4)
    tuned_t, tuned_d, tuned_warps = tuned
    block_t = tuned_t if block_t is None else block_t
    block_d = tuned_d if block_d is None else block_d
    num_warps = tuned_warps if num_warps is None else num_warps
    block_kx, block_ky = _block(KX, 64), _block(KY, 64)
    tiles = triton.cdiv(KX, block_kx) * triton.cdiv(KY, block_ky)
    t_blocks = triton.cdiv(T, block_t)
    target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    if splits is None:
        splits = max(1, min(t_blocks, triton.cdiv(target, B * tiles)))
    splits = min(splits, t_blocks)
    tokens_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = triton.cdiv(T, tokens_per_split)
    d_blocks = triton.cdiv(DX, block_d)
    if dx_splits is None:  # the grid still underfills the GPU: share x's feature axis too
        dx_splits = max(1, min(d_blocks, triton.cdiv(target, B * splits * tiles)))
    dx_per_split = triton.cdiv(d_blocks, min(dx_splits, d_blocks)) * block_d
    dx_splits = triton.cdiv(DX, dx_per_split)
    out = torch.empty(B, splits * dx_splits, KX, KY, dtype=torch.float32, device=x.device)
    _compiled_kernel(_interpreter_on())[(B, splits * dx_splits, tiles)](
        x,
        y,
        px,
        py,
        keep,
        sx,
        sy,
        out,
        T,
        DX,
        DY,
        KX,
        KY,
        tokens_per_split,
        dx_splits,
        dx_per_split,
        *x.stride(),
        *y.stride(),
        *keep.stride(),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        BLOCK_KX=block_kx,
        BLOCK_KY=block_ky,
        DOT_IN_INPUT_DTYPE=low_precision,
        HAS_SCALE=has_scale,
        num_warps=num_warps,
    )
    return out.sum(dim=1)
