"""Which sample each element of a recorded tensor belongs to, read from autograd, not guessed from shapes.

fn returns values [B]. Two backward passes give, for every recorded tensor X (the output of a rule's
function or of a module call), g1 = d(sum_b f_b)/dX and gr = d(sum_b r_b f_b)/dX, with per-sample codes
r_b = +-2^e (distinct for B <= 18). Where a slice of X gets gradient from sample b alone, gr = r_b g1
there, exactly: a cotangent scaled by a power of two scales every step of the backward without rounding
(only the non-determinism of a backward, e.g. atomics on a GPU, is tolerated). A slice that mixes
samples b and c is off by (r_c - r_b) g_c. Candidate layouts, tried in this order:

  axis a     X.shape[a] == B; sample b = index b along a (a = 0 batch-first, 1 sequence-first, ...)
  rows n     X.shape[0] == B n; sample b = rows [b n, (b + 1) n)   (a flattened [B*T, H] call)
  strided n  X.shape[0] == n B; sample b = rows b, b + B, ...      (a flattened [T*B, H] call)
  one b      all of X belongs to sample b                          (a forward of one sample)

The first candidate whose every slice passes is X's layout. With two passing candidates, every element
with a nonzero gradient is assigned to the same sample by both, so the choice does not matter. None
passing: X is shared by several samples (a tensor without a batch axis, or samples that interact).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

_CODES = [s * 2.0**e for e in (0, 1, -1, 2, -2, 3, -3, 4, -4) for s in (1, -1)]
_CHUNK = 1 << 24  # elements compared at a time


def sample_codes(B: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """r [B]: +-2^e, distinct for B <= 18; beyond, each code is reused at seeded random positions (so that
    no fixed pairing of samples, b and b + 18, always shares one)."""
    order = torch.randperm(B, generator=torch.Generator().manual_seed(0)) if B > len(_CODES) else range(B)
    return torch.tensor([_CODES[int(i) % len(_CODES)] for i in order], dtype=dtype, device=device)


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance between two computations of one quantity in ``dtype``. float64 models often run
    some steps in float32 (transformers' eager softmax), hence 1e-6; TF32 matmuls count as 16-bit. A wrong
    rule, a sample's token given to another or a missed use gives errors of order 1."""
    if dtype == torch.float64:
        return 1e-6
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return 1e-3
    return 5e-2


@functools.lru_cache(maxsize=64)
def _every_sample(B: int, device: torch.device) -> torch.Tensor:
    return torch.arange(B, device=device)


@dataclass(frozen=True)
class Layout:
    """Where each sample's part of a tensor lies (see the module docstring)."""

    kind: str  # "axis" | "rows" | "strided" | "one"
    axis: int = 0  # kind "axis"
    sample: int = 0  # kind "one"

    def __str__(self) -> str:
        return {
            "axis": f"sample axis {self.axis}",
            "rows": "samples as consecutive row blocks of axis 0",
            "strided": "samples interleaved along axis 0",
            "one": f"all of it from sample {self.sample}",
        }[self.kind]

    def split(self, x: torch.Tensor, B: int) -> torch.Tensor:
        """[S, ...]: slice s of x is the part of sample ``samples()[s]`` (S = B, or 1 for kind "one")."""
        if self.kind == "axis":
            return x if self.axis == 0 else x.movedim(self.axis, 0)
        if self.kind == "rows":
            return x.reshape(B, x.shape[0] // B, *x.shape[1:])
        if self.kind == "strided":
            return x.reshape(x.shape[0] // B, B, *x.shape[1:]).movedim(1, 0)
        return x.unsqueeze(0)

    def samples(self, B: int, device: torch.device) -> torch.Tensor:
        """The samples of split()'s slices: [sample] for kind "one", else arange(B) (one tensor per B and
        device, made once: an index, never written)."""
        if self.kind == "one":
            return torch.tensor([self.sample], device=device)
        return _every_sample(B, device)

    def weigh(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x with sample b's part multiplied by w[b] (w [B])."""
        w = w.to(device=x.device, dtype=x.dtype)
        if self.kind == "one":
            return x * w[self.sample]
        if self.kind == "axis":
            shape = [1] * x.dim()
            shape[self.axis] = w.shape[0]
            return x * w.view(shape)
        n = x.shape[0] // w.shape[0]
        rows = w.repeat_interleave(n) if self.kind == "rows" else w.repeat(n)
        return x * rows.view(-1, *([1] * (x.dim() - 1)))

    def keep(self, x: torch.Tensor, b: int, B: int) -> torch.Tensor:
        """x with everything outside sample b's part zeroed."""
        return self.weigh(x, torch.nn.functional.one_hot(torch.tensor(b), B))


def _candidates(shape: torch.Size, B: int) -> list[Layout]:
    found = [Layout("axis", axis=a) for a, size in enumerate(shape) if size == B]
    if len(shape) > 0 and shape[0] > B and shape[0] % B == 0:
        found += [Layout("rows"), Layout("strided")]
    return found


def _pure(layout: Layout, g1: torch.Tensor, gr: torch.Tensor, codes: torch.Tensor) -> bool:
    """Every slice s: ||gr_s - r_s g1_s|| <= tol (||gr_s|| + ||r_s g1_s||), in float32 (float64 for float64
    gradients), a few slices at a time (no copy of a large output, such as logits, at once)."""
    B, tol = codes.shape[0], tolerance(g1.dtype)
    dtype = torch.float64 if g1.dtype == torch.float64 else torch.float32
    parts1, partsr = layout.split(g1, B), layout.split(gr, B)
    slice_codes = codes[layout.sample : layout.sample + 1] if layout.kind == "one" else codes
    step = max(1, _CHUNK // max(1, parts1[0].numel()))
    for start in range(0, parts1.shape[0], step):
        expected = parts1[start : start + step].reshape(-1, parts1[0].numel()).to(dtype)
        expected = expected * slice_codes[start : start + step, None].to(dtype)
        got = partsr[start : start + step].reshape(expected.shape).to(dtype)
        if not bool(((got - expected).norm(dim=1) <= tol * (got.norm(dim=1) + expected.norm(dim=1))).all()):
            return False
    return True


def find_layout(g1: torch.Tensor, gr: torch.Tensor, codes: torch.Tensor) -> Layout | None:
    """The layout of a tensor from its two gradients (see the module docstring); None: shared by several
    samples. g1 must not be all zero."""
    B = codes.shape[0]
    if B == 1:
        return Layout("one", sample=0)
    for layout in _candidates(g1.shape, B):
        if _pure(layout, g1, gr, codes):
            return layout
    largest = g1.reshape(-1).abs().argmax()
    ratio = float(gr.reshape(-1)[largest]) / float(g1.reshape(-1)[largest])
    matching = [b for b in range(B) if abs(ratio - float(codes[b])) <= 1e-3 * abs(float(codes[b]))]
    if len(matching) == 1 and _pure(Layout("one", sample=matching[0]), g1, gr, codes):
        return Layout("one", sample=matching[0])
    return None
