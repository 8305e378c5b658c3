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


class _LinearTwice(torch.nn.Module):
    """One nn.Linear called twice in each forward (two uses of one parameter, both by F.linear)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.head = torch.nn.Linear(12, 12), torch.nn.Linear(12, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x))))).sum((1, 2))


def _tied_llama(dtype):
    from test_projector import lm_logprob, tiny_llama

    g = torch.Generator().manual_seed(6)
    mask = torch.tensor([[1] * 7, [1] * 7, [1, 1, 1, 1, 1, 0, 0]])
    return tiny_llama(tied=True).to(dtype), lm_logprob, (torch.randint(1, 40, (3, 7), generator=g), mask)


def _linear_twice(dtype):
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(7), dtype=dtype)
    return _LinearTwice().to(dtype), lambda model, batch: model(batch), x


@pytest.mark.parametrize("model_case", [_tied_llama, _linear_twice])
@pytest.mark.parametrize("kind, dtype", [("kronecker", torch.float32), ("exact", torch.float64)])
def test_blocks_formed_in_the_workspace_equal_blocks_formed_apart(model_case, kind, dtype, monkeypatch):
    """With a workspace, the plain and the preconditioned view form each parameter's first block straight
    in their matrix (Sketch.writing_into; finish then leaves it there): features, preconditioned features
    and dots equal those of a call without a workspace, bit for bit, where a parameter has two uses (a
    Llama's tied embedding: the embedding and the head's F.linear; one nn.Linear called twice) and at
    k = 8 or 40 blocks with projected and unprojected axes."""
    model, fn, batch = model_case(dtype)
    k = {_tied_llama: 40, _linear_twice: 8}[model_case] if kind == "kronecker" else None
    projector = GradientProjector(model, ProjectionConfig(kind=kind, k=k))
    g = torch.Generator().manual_seed(8)
    d = {n: torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.1 for n, p in model.named_parameters()}
    tangents = _tangents(model, 3)
    in_place = []
    original = sketches.kron_projection

    def spy(*args, out=None, **kwargs):
        in_place.append(out is not None)
        return original(*args, out=out, **kwargs)

    destination_for = sketches.Sketch._destination_for
    preconditioned_in_place = []

    def destination_spy(sketch, *args):
        out = destination_for(sketch, *args)
        preconditioned_in_place.append(sketch._precondition is not None and out is not None)
        return out

    monkeypatch.setattr(sketches, "kron_projection", spy)
    monkeypatch.setattr(sketches.Sketch, "_destination_for", destination_spy)
    apart = projector.per_sample_all(fn, batch, precondition=d, tangents=tangents)
    assert not any(in_place) and not any(preconditioned_in_place)
    workspace: dict[str, torch.Tensor] = {}
    for _ in range(2):  # the second call overwrites the first one's matrices
        formed = projector.per_sample_all(fn, batch, precondition=d, tangents=tangents, workspace=workspace)
        torch.testing.assert_close(formed.features, apart.features, rtol=0, atol=0)
        torch.testing.assert_close(formed.preconditioned, apart.preconditioned, rtol=0, atol=0)
        torch.testing.assert_close(formed.dots, apart.dots, rtol=0, atol=0)
    assert any(in_place) and any(preconditioned_in_place)


@pytest.mark.parametrize("full_blocks", [True, False])
def test_tangent_dots_of_masked_tokens_never_leak_nan(full_blocks, monkeypatch):
    """TangentDots.tokens on both routes (each sample's block formed, or tangent by tangent): the tokens
    the mask drops (the output-gradient's zero rows) add nothing even where the activations are not
    finite, against a float64 token loop of <g_t a_t^T, V_k>."""
    if not full_blocks:
        monkeypatch.setattr(sketches, "_FULL_BLOCK_ENTRIES", 0)
    model = torch.nn.Linear(5, 3, bias=False)
    blocks = GradientProjector(model, ProjectionConfig(kind="exact"))._sketch.blocks
    gen = torch.Generator().manual_seed(0)
    tangents = [{"weight": torch.randn(3, 5, generator=gen)} for _ in range(2)]
    g, a = torch.randn(4, 6, 3, generator=gen), torch.randn(4, 6, 5, generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.4
    g[~mask] = 0
    expected = torch.stack(
        [torch.einsum("btd,de,bte->b", g.double(), t["weight"].double(), a.double()) for t in tangents], 1
    )
    a[~mask] = float("nan")
    dots = sketches.TangentDots(blocks, tangents)
    for hint in (True, False):
        measured = dots.tokens("weight", g, a, mask, left_zero_where_masked=hint)
        torch.testing.assert_close(measured, expected, rtol=1e-5, atol=1e-5)


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
