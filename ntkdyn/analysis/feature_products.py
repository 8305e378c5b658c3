"""Every inner product of features that a tracked step needs, from one pass over the feature columns.

Rows: F = [φ(o) of every probe o (n_p rows); φ(l_s(u)) of every training sample of each source s;
P Δθ] (N rows), and the preconditioned training features φ_D(l_s(u)) of each source. One pass over the
columns, chunk by chunk (each chunk inside one tracked parameter's block when the blocks are known),
gives:
    gram          [N, N]          F F^T (every eNTK block and feature prediction is an entry); without
                                  ``train_pairs``, the entries between two different rows after the probes
                                  (training rows, P Δθ) are NaN, not computed ((N - n_p)^2 D products
                                  saved), and their diagonal holds the rows' squared norms
    conditioned   s -> [n_p, B_s] <φ(o), φ_D(l_s(u))>
    layers        s -> [n_p, P]   Σ_u <φ(o), φ(l_s(u))> restricted to each tracked parameter's columns
    conditioned_layers  s -> [n_p, P]   the same with φ_D
Products in the features' dtype (at least float32) over chunks of at most 2^12 columns (2^16 on an
accelerator), summed in float64 (accurate without a float64 copy of the features); a chunk's rows are
read once for all of its products: the probe rows against every row, the training rows and P Δθ against
each other. Rows that lie one after another in one matrix (:func:`consecutive_rows`; the tracker keeps
them so) are read in place, column chunk by column chunk; other rows are copied chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_CPU_CHUNK = 1 << 12  # columns per product on CPU: the chunk's rows stay in cache across its products
_ACCELERATOR_CHUNK = 1 << 16  # on an accelerator: fewer, larger products


def consecutive_rows(pieces: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The [Σ n_i, D] matrix whose consecutive row blocks the pieces [n_i, D] are (a view: no copy), or
    None when they are not such blocks of one contiguous matrix (empty pieces hold no rows: skipped)."""
    first = pieces[0]
    if any(
        (x.dim(), x.shape[-1], x.dtype, x.device) != (2, first.shape[-1], first.dtype, first.device)
        for x in pieces
    ):
        return None
    held = [x for x in pieces if x.numel()]
    if not held:
        return None
    storage, at = held[0].untyped_storage().data_ptr(), held[0].data_ptr()
    for x in held:
        if not x.is_contiguous() or x.data_ptr() != at or x.untyped_storage().data_ptr() != storage:
            return None
        at += x.numel() * x.element_size()
    return held[0].as_strided((sum(x.shape[0] for x in held), first.shape[1]), (first.shape[1], 1))


@dataclass
class FeatureProducts:
    """What :func:`feature_products` gives (module docstring); P = the tracked parameters' blocks."""

    gram: torch.Tensor  # [N, N] float64, CPU
    conditioned: dict[str, torch.Tensor]  # source -> [n_p, B_s] float64, CPU
    layers: dict[str, torch.Tensor]  # source -> [n_p, P] float64, CPU ({} without blocks)
    conditioned_layers: dict[str, torch.Tensor]  # source -> [n_p, P] float64, CPU ({} without blocks)


def feature_products(
    probes: list[torch.Tensor],
    train: dict[str, torch.Tensor],
    delta: torch.Tensor,
    conditioned: dict[str, torch.Tensor],
    slices: dict[str, slice] | None,
    train_pairs: bool = True,
) -> FeatureProducts:
    """probes: [n_g, D] per probe group (stacked in order: the n_p probe rows); train: source -> [B_s, D];
    delta: [D] (P Δθ); conditioned: source -> [B_s, D] (φ_D); slices: each tracked parameter's columns
    (None: no per-parameter sums); train_pairs: the products of the training rows and P Δθ with each
    other (else only their squared norms: module docstring)."""
    rows = [*probes, *train.values(), delta[None], *conditioned.values()]
    matrix = consecutive_rows(rows)
    n_p = sum(x.shape[0] for x in probes)
    n = n_p + sum(x.shape[0] for x in train.values()) + 1  # F's rows
    width = n + sum(x.shape[0] for x in conditioned.values())
    dtype = torch.promote_types(rows[0].dtype, torch.float32)
    device = rows[0].device
    # the columns of each source's training rows, then of each source's preconditioned rows
    spans, start = [], n_p
    for x in [*train.values(), delta[None], *conditioned.values()]:
        spans.append(slice(start, start + x.shape[0]))
        start += x.shape[0]
    train_spans, conditioned_spans = spans[: len(train)], spans[len(train) + 1 :]
    membership = torch.zeros(
        width, len(train_spans) + len(conditioned_spans), dtype=torch.float64, device=device
    )
    for j, span in enumerate(train_spans + conditioned_spans):
        membership[span, j] = 1
    top = torch.zeros(n_p, width, dtype=torch.float64, device=device)  # probe rows x every row
    # the training rows and P Δθ against each other ([m, m]), or only their squared norms ([m, 1])
    rest = torch.zeros(n - n_p, n - n_p if train_pairs else 1, dtype=torch.float64, device=device)
    blocks = list(slices.values()) if slices is not None else [slice(0, delta.shape[0])]
    per_block = torch.zeros(len(blocks), n_p, membership.shape[1], dtype=torch.float64, device=device)
    step = _CPU_CHUNK if device.type == "cpu" else _ACCELERATOR_CHUNK
    for p, block in enumerate(blocks):
        for start in range(block.start, block.stop, step):
            end = min(start + step, block.stop)
            if matrix is not None:
                chunk = matrix[:, start:end].to(dtype)
            else:
                chunk = torch.cat([x[:, start:end].to(dtype) for x in rows])
            products = (chunk[:n_p] @ chunk.T).double()
            top += products
            if slices is not None:
                per_block[p] += products @ membership
            if train_pairs:
                rest += (chunk[n_p:n] @ chunk[n_p:n].T).double()
            else:
                rest += chunk[n_p:n].square().sum(1, keepdim=True).double()
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    gram[:n_p] = top[:, :n]
    gram[n_p:, :n_p] = top[:, n_p:n].T
    if train_pairs:
        gram[n_p:, n_p:] = rest
    else:
        gram[n_p:, n_p:] = torch.diag(rest[:, 0]).masked_fill(
            ~torch.eye(n - n_p, dtype=torch.bool, device=device), math.nan
        )
    summed = per_block.permute(2, 1, 0).cpu()  # [sources (training, then preconditioned), n_p, P]
    with_blocks = slices is not None
    return FeatureProducts(
        gram=gram.cpu(),
        conditioned={s: top[:, span].cpu() for s, span in zip(conditioned, conditioned_spans, strict=True)},
        layers={s: summed[j] for j, s in enumerate(train)} if with_blocks else {},
        conditioned_layers={s: summed[len(train) + j] for j, s in enumerate(conditioned)}
        if with_blocks
        else {},
    )
