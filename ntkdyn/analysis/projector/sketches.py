"""Seeded projections of per-sample gradient blocks: Kronecker factors, the SRHT second stage, dense JL.

Every tracked parameter is seen as a matrix G of shape (d0, d1) (its stored shape; 1-D: (n, 1); >2-D:
(shape[0], prod(rest))). A :class:`Sketch` maps the per-sample G_b of every parameter to its block:
  - "kronecker": P0^T G P1 / k^(m/2), P_i a seeded [d_i, k] Rademacher/Gaussian factor or the identity
    when d_i <= k (m = number of projected axes); optionally an SRHT second stage per block;
  - "dense": all blocks flattened and multiplied by one seeded [P, k] JL matrix / sqrt(k);
  - "exact": G itself.
Factors are generated from (seed, parameter name, axis) with torch's CPU generator, never stored: the
same seed gives the same features in every process.

A diagonal preconditioner D (one positive tensor per parameter, e.g. Adam's 1/(√v̂+ε) times the step's
scale; :meth:`Sketch.preconditioned`) is folded in: each block becomes the projection of D ∘ G_b. Exactly
where G_b is formed in full before projecting (kinds "exact"/"dense", Kronecker blocks with no projected
axis, the generic path) and for embeddings (a token's gradient is one row: D's row scales it); where the
Kronecker projection is fused with per-token factors (Σ_t g_t a_t^T, a projected axis) D is replaced by
its factored approximation r c^T (:func:`factored`), so that D ∘ (g a^T) = (r ∘ g)(c ∘ a)^T stays a
Kronecker product of rescaled factors.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ntkdyn.analysis.projector.config import ProjectionConfig, matches
from ntkdyn.kernels.kron_projection import kron_projection

_JL_CHUNK_ENTRIES = 1 << 22  # entries of the dense JL matrix generated at a time


def stable_seed(*parts: Any) -> int:
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


def factored(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column factors (r [d0], c [d1]) of a positive matrix d [d0, d1] with r c^T ≈ d: the
    least-squares fit of log d by log r_i + log c_j (exact when d is rank one; for Adam's preconditioner
    the error is measured in BENCHMARKS.md). Computed in float64."""
    log = d.double().clamp_min(torch.finfo(torch.float64).tiny).log()  # zeros: the smallest normal
    row = log.mean(1)
    col = log.mean(0) - log.mean()
    return row.exp(), col.exp()


def matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """(d0, d1): the matrix view of a parameter."""
    return (param.shape[0], param[0].numel()) if param.dim() >= 1 else (1, 1)


@dataclass
class Block:
    """One tracked parameter's slice of the feature vector."""

    shape2d: tuple[int, int]  # (d0, d1)
    out_size: int  # features of this block: k0 * k1 (k_i = min(d_i, k); kronecker), after a second stage
    offset: int


class Sketch:
    """The projection of the tracked parameters' gradients; blocks are [S, k0, k1] tensors of dtype
    :attr:`dtype` (float64 for kind="exact" on a float64 model, float32 otherwise)."""

    def __init__(self, config: ProjectionConfig, params: dict[str, nn.Parameter]):
        self.config = config
        exact64 = config.kind == "exact" and all(p.dtype == torch.float64 for p in params.values())
        self.dtype = torch.float64 if exact64 else torch.float32
        self.blocks: dict[str, Block] = {}
        offset = 0
        for name, param in params.items():
            shape2d = matrix_shape(param)
            if config.kind == "kronecker":
                out_size = min(shape2d[0], config.k) * min(shape2d[1], config.k)
                if config.second_stage_k is not None and matches(name, config.second_stage_include):
                    out_size = min(out_size, config.second_stage_k)
            else:
                out_size = shape2d[0] * shape2d[1]
            self.blocks[name] = Block(shape2d, out_size, offset)
            offset += 0 if config.kind == "dense" else out_size
        self.feature_dim = config.k if config.kind == "dense" else offset
        self._factors: dict[tuple[str, int, torch.device], torch.Tensor | None] = {}
        self._precondition: dict[str, torch.Tensor] | None = None  # name -> D [d0, d1]
        self._precondition_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.factored_names: set[str] = set()  # blocks that used the factored D in a preconditioned call
        self.drop_zero_tokens = True  # rules mask tokens with zero output-gradient (keeping_zero_tokens)
        self._skip: frozenset[str] = frozenset()
        # name -> its columns of a [B, D] matrix as [B, k0, k1] (writing_into)
        self._destination: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def skipping(self, names: Iterable[str]) -> Iterator[None]:
        """Inside: project, tokens and embedding return None for these names (their blocks come from
        blocks another view already formed in full: views.from_plain)."""
        self._skip = frozenset(names)
        try:
            yield
        finally:
            self._skip = frozenset()

    @contextlib.contextmanager
    def writing_into(self, out: torch.Tensor) -> Iterator[None]:
        """Inside: tokens() (and, under a preconditioner, project() on an axis kept exact: D ∘ G) forms each
        name's first block over every sample straight in its columns of ``out`` [B, D] (kinds kronecker
        without a second stage, and exact), where finish() then leaves it (scaled in place); a later block
        of the same name is formed apart and added to it, as without ``out``."""
        if self.config.kind not in ("kronecker", "exact"):
            yield
            return
        k = self.config.k if self.config.kind == "kronecker" else None
        self._destination = {}
        for name, block in self.blocks.items():
            shape = tuple(d if k is None else min(d, k) for d in block.shape2d)
            if shape[0] * shape[1] == block.out_size:  # no second stage
                part = out[:, block.offset : block.offset + block.out_size]
                self._destination[name] = part.view(out.shape[0], *shape)
        try:
            yield
        finally:
            self._destination = {}

    @contextlib.contextmanager
    def keeping_zero_tokens(self) -> Iterator[None]:
        """Inside: rules do not mask tokens with zero output-gradient (they contribute zero; masking only
        keeps a non-finite activation there out of the features: not needed where the caller's own
        backward already multiplied every activation by its output-gradient, StepCapture)."""
        self.drop_zero_tokens = False
        try:
            yield
        finally:
            self.drop_zero_tokens = True

    def fused(self, name: str) -> bool:
        """Whether the block's Kronecker projection is fused with per-token factors (a projected axis)."""
        return self.config.kind == "kronecker" and any(d > self.config.k for d in self.blocks[name].shape2d)

    @contextlib.contextmanager
    def preconditioned(self, precondition: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside: every block is the projection of D ∘ G (D = precondition[name], [d0, d1], positive)."""
        self._precondition = {
            n: d.reshape(self.blocks[n].shape2d).to(self.dtype) for n, d in precondition.items()
        }
        self._precondition_factors = {
            n: tuple(f.to(self.dtype) for f in factored(d))
            for n, d in self._precondition.items()
            if self.fused(n)
        }
        try:
            yield
        finally:
            self._precondition, self._precondition_factors = None, {}

    def factored_error(self, name: str, d: torch.Tensor) -> float:
        """||d - r c^T|| / ||d|| of the factored approximation of d for this block; 0.0 for a block that
        never used it (D exact: formed in full, an embedding, or not reached yet)."""
        if name not in self.factored_names:
            return 0.0
        d = d.reshape(self.blocks[name].shape2d).double()
        row, col = factored(d)
        return float((d - row[:, None] * col[None, :]).norm() / d.norm())

    def factor(self, name: str, axis: int, device: torch.device) -> torch.Tensor | None:
        """Seeded [d_axis, k] factor of a parameter, or None (identity) when d_axis <= k or not kronecker."""
        key = (name, axis, device)
        if key not in self._factors:
            d = self.blocks[name].shape2d[axis]
            if self.config.kind != "kronecker" or d <= self.config.k:
                self._factors[key] = None
            else:
                seed = stable_seed(self.config.seed, name, axis)
                self._factors[key] = random_matrix(seed, d, self.config.k, self.config.distribution).to(
                    device
                )
        return self._factors[key]

    def project(self, name: str, grads: torch.Tensor) -> torch.Tensor | None:
        """[S, d0, d1] gradients -> [S, k0, k1] = P0^T G P1 (identity axes kept)."""
        if name in self._skip:
            return None
        grads = grads.to(self.dtype)
        p0, p1 = self.factor(name, 0, grads.device), self.factor(name, 1, grads.device)
        if self._precondition is not None:
            out = self._destination_for(name, grads.shape, grads.dtype) if p0 is None and p1 is None else None
            grads = torch.mul(grads, self._precondition[name], out=out)
        if p0 is not None:  # (G^T P0)^T: a batched product (an einsum here ran 5x slower on [96, 256, 128])
            grads = (grads.transpose(1, 2) @ p0).transpose(1, 2)
        if p1 is not None:
            grads = grads @ p1
        return grads

    def tokens(
        self,
        name: str,
        left: torch.Tensor,
        right: torch.Tensor,
        mask: torch.Tensor | None,
        left_zero_where_masked: bool = False,
    ) -> torch.Tensor:
        """sum_t m_t (P0^T left_t)(P1^T right_t)^T: left [S, T, d0], right [S, T, d1], mask [S, T] or None
        (every token) -> [S, k0, k1]. left_zero_where_masked: left's row is zero at every masked token
        (kron_projection's x_zero_where_masked)."""
        if name in self._skip:
            return None
        zero = left_zero_where_masked
        scales = (None, None)
        if name in self._precondition_factors:  # (r ∘ left)(c ∘ right)^T: in the kernel's loads
            self.factored_names.add(name)
            scales = self._precondition_factors[name]
        elif self._precondition is not None:  # the block is formed in full: D exactly
            full = kron_projection(left, right, None, None, mask, "torch", x_zero_where_masked=zero)
            return self.project(name, full.to(self.dtype))
        if self.config.kind != "kronecker":
            out = self._destination_for(name, *_product_of(left, right, None, None))
            full = kron_projection(left, right, None, None, mask, "torch", out=out, x_zero_where_masked=zero)
            return full.to(self.dtype)
        p0, p1 = self.factor(name, 0, left.device), self.factor(name, 1, left.device)
        rademacher = self.config.distribution == "rademacher"
        out = self._destination_for(name, *_product_of(left, right, p0, p1))
        return kron_projection(
            left,
            right,
            p0,
            p1,
            mask,
            self.config.implementation,
            rademacher,
            *scales,
            out=out,
            x_zero_where_masked=zero,
        ).to(self.dtype)

    def _destination_for(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
        """name's columns of the writing_into matrix, once per name, where a block of ``shape`` and
        ``dtype`` fills them exactly; else None (the block is formed apart: a wrong-shaped out would be
        resized)."""
        out = self._destination.pop(name, None)
        if out is None:
            return None
        return out if (tuple(out.shape), out.dtype) == (tuple(shape), dtype) else None

    def embedding(
        self, name: str, ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Embedding weight [V, dim]: sum_t m_t e_{id_t} g_t^T, projected by gathering the rows P0[id_t]
        (never a [S, V, dim] tensor unless the vocabulary axis is kept exact). ids [S, T], g [S, T, dim],
        mask [S, T] or None (every token)."""
        if name in self._skip:
            return None
        gf = g.to(self.dtype)
        if self._precondition is not None:  # token t's gradient is row id_t: D's row id_t scales it
            gf = gf * self._precondition[name][ids]
        p0, p1 = self.factor(name, 0, g.device), self.factor(name, 1, g.device)
        if p1 is not None:
            gf = gf @ p1
        if mask is not None:  # after the projection, which maps each token's row on its own: k wide, not dim
            gf = torch.where(mask.unsqueeze(-1), gf, 0.0)
        if p0 is not None:
            return torch.bmm(p0[ids].transpose(1, 2), gf)
        out = torch.zeros(
            ids.shape[0], self.blocks[name].shape2d[0], gf.shape[-1], dtype=self.dtype, device=g.device
        )
        return out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, gf.shape[-1]), gf)

    def finish(
        self,
        acc: dict[str, torch.Tensor | None],
        B: int,
        device: torch.device,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scale, second stage / dense JL, concatenate: blocks [B, k0, k1] (None = zero) -> [B, D]; written
        into ``out`` (a [B, D] matrix of :attr:`dtype`, overwritten) when given."""
        if out is None:
            out = torch.empty(B, self.feature_dim, dtype=self.dtype, device=device)
        elif out.shape != (B, self.feature_dim) or out.dtype != self.dtype:
            raise ValueError(
                f"Sketch.finish: out is {tuple(out.shape)} {out.dtype}, the features are "
                f"{(B, self.feature_dim)} {self.dtype}"
            )
        if self.config.kind == "dense":
            out.zero_()
            for name in self.blocks:
                if acc.get(name) is not None:
                    out += self._dense_jl(name, acc[name].reshape(B, -1))
            return out
        start = 0
        for name, block in self.blocks.items():
            part, start = out[:, start : start + block.out_size], start + block.out_size
            value = acc.get(name)
            if value is None:
                part.zero_()
                continue
            flat = value.reshape(B, -1).to(self.dtype)
            scale = self._kron_scale(block) if self.config.kind == "kronecker" else 1
            if flat.data_ptr() == part.data_ptr() and flat.stride() == part.stride():  # formed here
                if scale != 1:
                    part.mul_(scale)
                continue
            if block.out_size < flat.shape[1]:
                flat = self._second_stage(name, flat, block.out_size)
            torch.mul(flat, scale, out=part)  # each block written once, in place
        return out

    def _kron_scale(self, block: Block) -> float:
        """1/sqrt(k) per projected axis, so that E[(P^T x)^T (P^T y)] / k = x^T y."""
        projected_axes = sum(d > self.config.k for d in block.shape2d)
        return self.config.k ** (-projected_axes / 2)

    def _second_stage(self, name: str, flat: torch.Tensor, out_size: int) -> torch.Tensor:
        """SRHT: sqrt(n/m) * S H D x (random signs D, orthonormal Hadamard H, m of n coordinates S);
        E[<f(x), f(y)>] = <x, y>."""
        n = flat.shape[1]
        padded = 1 << (n - 1).bit_length()
        generator = torch.Generator().manual_seed(stable_seed(self.config.seed, name, "second-stage"))
        signs = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(flat)
        keep = torch.randperm(padded, generator=generator)[:out_size].to(flat.device)
        x = torch.nn.functional.pad(flat * signs, (0, padded - n))
        return _hadamard(x)[:, keep] * math.sqrt(padded / out_size)

    def _dense_jl(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """flat [B, n] @ P [n, k] / sqrt(k), P generated chunk by chunk of rows from (seed, name, chunk)."""
        k = self.config.k
        rows = max(1, _JL_CHUNK_ENTRIES // k)
        out = torch.zeros(flat.shape[0], k, dtype=flat.dtype, device=flat.device)
        for chunk, start in enumerate(range(0, flat.shape[1], rows)):
            part = flat[:, start : start + rows]
            seed = stable_seed(self.config.seed, name, "dense", chunk)
            out += part @ random_matrix(seed, part.shape[1], k, self.config.distribution).to(flat)
        return out / math.sqrt(k)


def _product_of(
    left: torch.Tensor, right: torch.Tensor, p0: torch.Tensor | None, p1: torch.Tensor | None
) -> tuple[tuple[int, int, int], torch.dtype]:
    """The shape [S, k0, k1] and dtype of kron_projection(left, right, p0, p1) (float64 if left or right
    is, else float32)."""
    k0 = left.shape[-1] if p0 is None else p0.shape[1]
    k1 = right.shape[-1] if p1 is None else p1.shape[1]
    dtype = torch.float64 if torch.float64 in (left.dtype, right.dtype) else torch.float32
    return (left.shape[0], k0, k1), dtype


_FULL_BLOCK_ENTRIES = 1 << 25  # S * d0 * d1 up to which TangentDots.tokens forms the samples' blocks in full


class TangentDots:
    """The sketch interface (project, tokens, embedding, finish) with the exact dots of each sample's
    gradient block with K tangents instead of a projection: block [S, K] = <G_s, V_k>, so that ``finish``
    gives [B, K] = <∇f_b, t_k> (float64), the exact first-order change of f_b along every t_k at once.
    Products in the gradients' dtype (at least float32, as the features' Gram matrix), each block's dots
    returned in float64 and summed over the blocks in float64.

    tangents: K dicts {tracked name: tensor shaped like the parameter}; a block's [K, d0, d1] stack is
    formed only while that block is computed, so at most one block's is held at a time."""

    def __init__(self, blocks: dict[str, Block], tangents: Sequence[dict[str, torch.Tensor]]):
        self.blocks = blocks
        self.dtype = torch.float64
        self._tangents = tangents
        self.K = len(tangents)
        self.drop_zero_tokens = True  # as Sketch's: rules mask tokens with zero output-gradient
        self._skip: frozenset[str] = frozenset()

    @contextlib.contextmanager
    def skipping(self, names: Iterable[str]) -> Iterator[None]:
        """Inside: project, tokens and embedding return None for these names (their dots come from
        blocks another view already formed in full)."""
        self._skip = frozenset(names)
        try:
            yield
        finally:
            self._skip = frozenset()

    def _stacked(self, name: str, *factors: torch.Tensor) -> torch.Tensor:
        """[K, d0, d1]: every tangent's block of the parameter, in the dtype of the products with
        ``factors`` (theirs, at least float32)."""
        shape = self.blocks[name].shape2d
        dtype = functools.reduce(torch.promote_types, [x.dtype for x in factors], torch.float32)
        return torch.stack(
            [t[name].detach().to(factors[0].device, dtype).reshape(shape) for t in self._tangents]
        )

    def project(self, name: str, grads: torch.Tensor) -> torch.Tensor | None:
        """[S, d0, d1] gradients -> [S, K] dots."""
        if name in self._skip:
            return None
        v = self._stacked(name, grads)
        return (grads.reshape(grads.shape[0], -1).to(v.dtype) @ v.reshape(self.K, -1).T).to(self.dtype)

    def tokens(
        self,
        name: str,
        left: torch.Tensor,
        right: torch.Tensor,
        mask: torch.Tensor,
        left_zero_where_masked: bool = False,
    ) -> torch.Tensor:
        """[S, K]: <Σ_t m_t left_t right_t^T, V_k>, by forming each sample's block (when S d0 d1 entries
        fit _FULL_BLOCK_ENTRIES) or else as Σ_t m_t left_t^T V_k right_t tangent by tangent
        (left_zero_where_masked as Sketch.tokens')."""
        if name in self._skip:
            return None
        d0, d1 = self.blocks[name].shape2d
        if left.shape[0] * d0 * d1 <= _FULL_BLOCK_ENTRIES:
            full = kron_projection(
                left, right, None, None, mask, "torch", x_zero_where_masked=left_zero_where_masked
            )
            return self.project(name, full)
        v = self._stacked(name, left, right)
        keep = mask.unsqueeze(-1)  # both factors masked, as kron_projection's (a NaN never leaks)
        lf = left.to(v.dtype) if left_zero_where_masked else torch.where(keep, left.to(v.dtype), 0.0)
        rf = torch.where(keep, right.to(v.dtype), 0.0)
        return torch.stack([((lf @ v[k]) * rf).sum((1, 2)) for k in range(self.K)], dim=1).to(self.dtype)

    def embedding(self, name: str, ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[S, K]: Σ_t m_t <V_k[id_t], g_t> (ids [S, T], g [S, T, dim])."""
        if name in self._skip:
            return None
        v = self._stacked(name, g)
        gf = torch.where(mask.unsqueeze(-1), g.to(v.dtype), 0.0)
        return torch.stack([(v[k][ids] * gf).sum((1, 2)) for k in range(self.K)], dim=1).to(self.dtype)

    def finish(self, acc: dict[str, torch.Tensor | None], B: int, device: torch.device) -> torch.Tensor:
        """Blocks [B, K] (None = zero) summed over the tracked parameters: [B, K]."""
        out = torch.zeros(B, self.K, dtype=self.dtype, device=device)
        for value in acc.values():
            if value is not None:
                out += value
        return out
