"""Seeded projections of per-sample gradient blocks: Kronecker factors, the SRHT second stage, dense JL.

Every tracked parameter is seen as a matrix G of shape (d0, d1) (its stored shape; 1-D: (n, 1); >2-D:
(shape[0], prod(rest))). A :class:`Sketch` maps the per-sample G_b of every parameter to its block:
  - "kronecker": P0^T G P1 / k^(m/2), P_i a seeded [d_i, k] Rademacher/Gaussian factor or the identity
    when d_i <= k (m = number of projected axes); optionally an SRHT second stage per block;
  - "dense": all blocks flattened and multiplied by one seeded [P, k] JL matrix / sqrt(k);
  - "exact": G itself.
Factors are generated from (seed, parameter name, axis) with torch's CPU generator, never stored: the
same seed gives the same features in every process.
"""

from __future__ import annotations

import hashlib
import math
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
        self._factors: dict[tuple[str, int, str], torch.Tensor | None] = {}

    def factor(self, name: str, axis: int, device: torch.device) -> torch.Tensor | None:
        """Seeded [d_axis, k] factor of a parameter, or None (identity) when d_axis <= k or not kronecker."""
        key = (name, axis, str(device))
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

    def project(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """[S, d0, d1] gradients -> [S, k0, k1] = P0^T G P1 (identity axes kept)."""
        grads = grads.to(self.dtype)
        p0, p1 = self.factor(name, 0, grads.device), self.factor(name, 1, grads.device)
        if p0 is not None:
            grads = torch.einsum("bij,ik->bkj", grads, p0)
        if p1 is not None:
            grads = grads @ p1
        return grads

    def tokens(self, name: str, left: torch.Tensor, right: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sum_t m_t (P0^T left_t)(P1^T right_t)^T: left [S, T, d0], right [S, T, d1] -> [S, k0, k1]."""
        if self.config.kind != "kronecker":
            return kron_projection(left, right, None, None, mask, "torch").to(self.dtype)
        p0, p1 = self.factor(name, 0, left.device), self.factor(name, 1, left.device)
        rademacher = self.config.distribution == "rademacher"
        return kron_projection(left, right, p0, p1, mask, self.config.implementation, rademacher).to(
            self.dtype
        )

    def embedding(self, name: str, ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embedding weight [V, dim]: sum_t m_t e_{id_t} g_t^T, projected by gathering the rows P0[id_t]
        (never a [S, V, dim] tensor unless the vocabulary axis is kept exact). ids [S, T], g [S, T, dim]."""
        gf = torch.where(mask.unsqueeze(-1), g.to(self.dtype), 0.0)
        p0, p1 = self.factor(name, 0, g.device), self.factor(name, 1, g.device)
        if p1 is not None:
            gf = gf @ p1
        if p0 is not None:
            return torch.bmm(p0[ids].transpose(1, 2), gf)
        out = torch.zeros(
            ids.shape[0], self.blocks[name].shape2d[0], gf.shape[-1], dtype=self.dtype, device=g.device
        )
        return out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, gf.shape[-1]), gf)

    def finish(self, acc: dict[str, torch.Tensor | None], B: int, device: torch.device) -> torch.Tensor:
        """Scale, second stage / dense JL, concatenate: blocks [B, k0, k1] (None = zero) -> [B, D]."""
        features = torch.zeros(B, self.feature_dim, dtype=self.dtype, device=device)
        for name, block in self.blocks.items():
            value = acc.get(name)
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
