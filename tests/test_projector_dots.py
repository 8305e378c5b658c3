"""GradientProjector.per_sample_all: from one recording, the features and preconditioned features equal
per_sample's, and the dots with K tangents equal the exact first-order change along each tangent by
forward-mode AD (measuring.first_order_change, an independent computation), on a float64 Llama (and its
float32 copy, against the float64 changes) whose parameters take every path (linear and embedding rules,
RMSNorm's generic path)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_dynamics import float64_llama, sequence_logprob

from ntkdyn import ProjectionConfig
from ntkdyn.analysis.measuring import first_order_change
from ntkdyn.analysis.projector import GradientProjector, sketches


def _tangents(model, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = [{name: torch.randn(p.shape, generator=g, dtype=p.dtype) for name, p in model.named_parameters()}]
    out += [{name: 0.3 * t for name, t in out[0].items()}]  # linear: 0.3 times the first
    out += [
        {name: torch.randn(p.shape, generator=g, dtype=p.dtype) for name, p in model.named_parameters()}
        for _ in range(n - 3)
    ]
    out += [{name: torch.zeros_like(p) for name, p in model.named_parameters()}]
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("full_blocks", [True, False])
@pytest.mark.parametrize("kind, k", [("kronecker", 4), ("exact", None)])
def test_dots_are_forward_mode_first_order_changes(kind, k, full_blocks, dtype, monkeypatch):
    """A float32 model's dots (float32 products) against the same weights' float64 forward-mode changes."""
    if not full_blocks:  # every linear weight's dots by the token route (Σ_t left_t^T V_k right_t)
        monkeypatch.setattr(sketches, "_FULL_BLOCK_ENTRIES", 0)
    reference = float64_llama()
    model = copy.deepcopy(reference).to(dtype)
    batch = {"input_ids": torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(1))}
    projector = GradientProjector(model, ProjectionConfig(kind=kind, k=k))
    tangents = _tangents(model, 5)
    params = {n: p.detach() for n, p in reference.named_parameters()}
    measured = projector.per_sample_all(sequence_logprob, batch, tangents=tangents)
    assert measured.dots.shape == (4, 5) and measured.dots.dtype == torch.float64
    torch.testing.assert_close(measured.values, sequence_logprob(model, batch).detach(), rtol=0, atol=0)
    for i, t in enumerate(tangents):
        _, change = first_order_change(
            reference, sequence_logprob, batch, params, {n: v.double() for n, v in t.items()}
        )
        # float64: the rotary tables are float32 (~1e-7 relative); float32: the model's own rounding
        tol = 1e-6 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(
            measured.dots[:, i], change, rtol=tol, atol=tol * float(change.abs().max())
        )
    assert bool((measured.dots[:, -1] == 0).all())
    torch.testing.assert_close(
        measured.features, projector.per_sample(sequence_logprob, batch), rtol=0, atol=0
    )
    assert measured.preconditioned is None


def test_preconditioned_and_plain_features_from_one_recording():
    model = float64_llama()
    batch = {"input_ids": torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(2))}
    projector = GradientProjector(model, ProjectionConfig(kind="kronecker", k=4))
    g = torch.Generator().manual_seed(3)
    d = {n: torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.1 for n, p in model.named_parameters()}
    measured = projector.per_sample_all(sequence_logprob, batch, precondition=d)
    torch.testing.assert_close(
        measured.features, projector.per_sample(sequence_logprob, batch), rtol=0, atol=0
    )
    torch.testing.assert_close(
        measured.preconditioned, projector.per_sample(sequence_logprob, batch, precondition=d), rtol=0, atol=0
    )
    assert measured.dots is None


@pytest.mark.parametrize("kind", ["kronecker", "dense"])
def test_workspace_matrices_are_reused_and_give_the_same_features(kind):
    """per_sample_all(workspace=...) writes the features into the workspace's matrices: equal to fresh
    ones bit for bit, the same memory on the next call of that batch size (overwritten), new matrices for
    another batch size."""
    model = float64_llama()
    batches = [
        {"input_ids": torch.randint(0, 11, (B, 6), generator=torch.Generator().manual_seed(B))}
        for B in (3, 3, 2)
    ]
    projector = GradientProjector(model, ProjectionConfig(kind=kind, k=4))
    g = torch.Generator().manual_seed(3)
    d = {n: torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.1 for n, p in model.named_parameters()}
    workspace: dict[str, torch.Tensor] = {}
    pointers = []
    for batch in batches:
        fresh = projector.per_sample_all(sequence_logprob, batch, precondition=d)
        reused = projector.per_sample_all(sequence_logprob, batch, precondition=d, workspace=workspace)
        assert (
            reused.features is workspace["features"] and reused.preconditioned is workspace["preconditioned"]
        )
        torch.testing.assert_close(reused.features, fresh.features, rtol=0, atol=0)
        torch.testing.assert_close(reused.preconditioned, fresh.preconditioned, rtol=0, atol=0)
        pointers.append((reused.features.data_ptr(), reused.preconditioned.data_ptr()))
    assert pointers[0] == pointers[1] and pointers[2] != pointers[1]


def test_tangents_must_cover_the_tracked_parameters():
    model = float64_llama()
    batch = {"input_ids": torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(4))}
    projector = GradientProjector(model, ProjectionConfig(kind="kronecker", k=4))
    tangent = _tangents(model, 3)[0]
    name = next(iter(tangent))
    with pytest.raises(ValueError, match=r"tangents\[0\] lacks tracked parameters"):
        projector.per_sample_all(sequence_logprob, batch, tangents=[dict(list(tangent.items())[1:])])
    with pytest.raises(ValueError, match=r"tangents\[0\]\[.*\] has shape"):
        projector.per_sample_all(sequence_logprob, batch, tangents=[{**tangent, name: tangent[name][:1]}])
