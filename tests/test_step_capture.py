"""Per-sample features from the caller's own forward and backward (GradientProjector.capture) against
explicit per-sample float64 gradients and the full recording; the layout reuse of repeated recordings;
the elementwise-scale rule (RMSNorm's weight); the gradient store inside a training loop."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_adam_kernel import _ids, _per_sample_grads, _preconditioner
from test_dynamics import float64_llama, sequence_logprob
from test_projector_rules import assert_exact
from torch import nn

from ntkdyn import ProjectionConfig
from ntkdyn.analysis.gradient_store import GradientStore, read_gradient_store
from ntkdyn.analysis.projector import GradientProjector
from ntkdyn.analysis.projector.capture import FunctionUse, Recorder, Rewrite, subsume
from ntkdyn.analysis.projector.views import signature
from ntkdyn.rundir import RunDir


def _explicit(projector, model, fn, batch) -> torch.Tensor:
    """[B, D]: the projection of each sample's gradient, one autograd.grad per sample (the reference)."""
    return torch.stack([projector.project_update(g) for g in _per_sample_grads(model, fn, batch)])


def _captured(projector, model, fn, batch, weights, eager=False, precondition=None):
    """Features from a capture around fn's forward and the backward of sum_b w_b fn_b; the parameters'
    .grad after that backward."""
    model.zero_grad()
    capture = projector.capture(eager=eager)
    with capture:
        values = fn(model, batch)
        capture.watch(values)
        (values * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return capture.features(precondition), grads


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("kind, k", [("exact", None), ("kronecker", 4)])
@pytest.mark.parametrize("uniform", [True, False])
def test_captured_features_are_the_per_sample_gradients(kind, k, eager, uniform):
    model = float64_llama()
    projector = GradientProjector(model, ProjectionConfig(kind=kind, k=k))
    projector.per_sample(sequence_logprob, {"input_ids": _ids(1, n=4)})  # calibration: another batch
    batch = {"input_ids": _ids(2, n=4)}
    weights = torch.full((4,), 0.25, dtype=torch.float64)
    if not uniform:
        weights = torch.tensor([0.3, -1.2, 0.05, 2.0], dtype=torch.float64)
    measured, grads = _captured(projector, model, sequence_logprob, batch, weights, eager)
    want = _explicit(projector, model, sequence_logprob, batch)
    # float64 model, but Llama's RMSNorm and rotary tables compute in float32; kronecker features are float32
    tol = 1e-6 if kind == "exact" else 1e-5
    torch.testing.assert_close(measured.features, want, rtol=tol, atol=tol * float(want.abs().max()))
    torch.testing.assert_close(measured.values, sequence_logprob(model, batch).detach())
    # the caller's own backward is untouched: .grad is the gradient of sum_b w_b f_b
    values = sequence_logprob(model, batch)
    reference = torch.autograd.grad((values * weights).sum(), list(model.parameters()))
    for (name, got), want_grad in zip(grads.items(), reference, strict=True):
        torch.testing.assert_close(got, want_grad, rtol=1e-12, atol=1e-14, msg=name)


def test_captured_preconditioned_features_equal_the_full_recordings():
    model = float64_llama()
    projector = GradientProjector(model, ProjectionConfig(kind="kronecker", k=4))
    projector.per_sample(sequence_logprob, {"input_ids": _ids(1)})
    batch = {"input_ids": _ids(3)}
    d = _preconditioner(model, rank_one=False)
    measured, _ = _captured(
        projector, model, sequence_logprob, batch, torch.ones(3, dtype=torch.float64), False, d
    )
    full = projector.per_sample_all(sequence_logprob, batch, precondition=d)
    torch.testing.assert_close(measured.features, full.features, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(measured.preconditioned, full.preconditioned, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="eager capture forms the plain projection only"):
        _captured(projector, model, sequence_logprob, batch, torch.ones(3, dtype=torch.float64), True, d)


def test_eager_capture_lets_go_of_the_forwards_tensors():
    """In eager mode nothing the recorder kept (each call's inputs and outputs) outlives the caller's
    backward, so autograd frees the activations as in a plain backward; the features stay exact."""
    model = float64_llama()
    projector = GradientProjector(model, ProjectionConfig(kind="kronecker", k=4))
    projector.per_sample(sequence_logprob, {"input_ids": _ids(1)})
    batch = {"input_ids": _ids(2)}
    for eager in (True, False):
        capture = projector.capture(eager=eager)
        with capture:
            values = sequence_logprob(model, batch)
            capture.watch(values)
            recorded = [
                weakref.ref(x)
                for item in capture._run.items
                for x in [*item.leaves, *getattr(item, "bound", {}).values()]
                if isinstance(x, torch.Tensor)
            ]
            values.sum().backward()
        gc.collect()
        alive = sum(ref() is not None for ref in recorded)
        assert (alive == 0) if eager else (alive == len(recorded) > 0)  # kept for the preconditioned view
        want = _explicit(projector, model, sequence_logprob, batch)
        torch.testing.assert_close(
            capture.features().features, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())
        )


@pytest.mark.parametrize("eager", [True, False])
def test_a_dropped_capture_frees_what_it_recorded(eager):
    """Once the caller lets go of the capture (after its features), every tensor it recorded and the
    per-sample losses are freed: its hooks on them must not keep it alive (a cycle through autograd's
    nodes, which Python's collector never frees, kept every step's activations: the tracker's memory
    grew by about 170 MB per tracked step on the default toy)."""
    model = float64_llama()
    projector = GradientProjector(model, ProjectionConfig(kind="kronecker", k=4))
    projector.per_sample(sequence_logprob, {"input_ids": _ids(1)})
    capture = projector.capture(eager=eager)
    with capture:
        values = sequence_logprob(model, {"input_ids": _ids(2)})
        capture.watch(values)
        recorded = [weakref.ref(values)] + [
            weakref.ref(x)
            for item in capture._run.items
            for x in [*item.leaves, *getattr(item, "bound", {}).values()]
            if isinstance(x, torch.Tensor)
        ]
        values.sum().backward()
    assert capture.features() is not None
    del capture, values
    gc.collect()
    assert sum(ref() is not None for ref in recorded) == 0


def test_capture_gives_nothing_it_cannot_know():
    """No calibration, a zero weight (that sample's gradient is not in the backward), a batch of another
    structure (the layouts were read for B = 3): None, so that the caller takes the full recording."""
    model = float64_llama()
    projector = GradientProjector(model, ProjectionConfig(kind="exact"))
    ones = torch.ones(3, dtype=torch.float64)
    assert _captured(projector, model, sequence_logprob, {"input_ids": _ids(2)}, ones)[0] is None
    projector.per_sample(sequence_logprob, {"input_ids": _ids(1)})
    zero = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert _captured(projector, model, sequence_logprob, {"input_ids": _ids(2)}, zero)[0] is None
    five = {"input_ids": _ids(2, n=5)}
    assert _captured(projector, model, sequence_logprob, five, torch.ones(5, dtype=torch.float64))[0] is None
    assert _captured(projector, model, sequence_logprob, {"input_ids": _ids(2)}, ones)[0] is not None


def test_scoped_recording_sees_the_items_of_the_full_one():
    """A recorder active only inside the modules that held the calibrated items records the same items."""
    model = float64_llama()
    projector = GradientProjector(model, ProjectionConfig(kind="exact"))
    batch = {"input_ids": _ids(4)}
    projector.per_sample(sequence_logprob, batch)
    runs = []
    for scope in (None, set(projector._scope)):
        recorder = Recorder(model, projector._names, projector._containers, Rewrite(), scope=scope)
        with recorder:
            values = sequence_logprob(model, batch)
        runs.append(signature(subsume(recorder.items), values.shape[0]))
    assert runs[0] == runs[1]
    assert len(projector._scope) < len(list(model.modules()))


def test_repeated_recordings_reuse_the_layouts(monkeypatch):
    """The second recording of the same structure runs one backward instead of two and gives the same
    features; a leaf whose gradient was zero when the layouts were read is read again, not guessed."""
    model = float64_llama()
    projector = GradientProjector(model, ProjectionConfig(kind="exact"))
    batch = {"input_ids": _ids(4)}
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    first = projector.per_sample_all(sequence_logprob, batch)  # two backwards and the self-check's one
    assert len(calls) == 3
    calls.clear()
    again = projector.per_sample_all(sequence_logprob, {"input_ids": _ids(5)})
    assert len(calls) == 1
    torch.testing.assert_close(
        again.features, _explicit(projector, model, sequence_logprob, {"input_ids": _ids(5)})
    )
    calls.clear()
    torch.testing.assert_close(projector.per_sample_all(sequence_logprob, batch).features, first.features)
    assert len(calls) == 1


class _Scaled(nn.Module):
    """x * w with a 1-D parameter w over the last axis, and the same w on the left of a product."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, dtype=torch.float64))
        self.lin = nn.Linear(6, 6, dtype=torch.float64)

    def forward(self, x):
        return (self.w * torch.tanh(self.lin(x) * self.w)).sum((1, 2))


def test_elementwise_scale_rule_is_exact():
    torch.manual_seed(0)
    model = _Scaled()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    projector = assert_exact(model, lambda m, b: m(b), x)
    recorder = Recorder(model, projector._names, projector._containers, Rewrite())
    with recorder:
        model(x)
    scale_uses = [
        i for i in recorder.items if isinstance(i, FunctionUse) and i.rule.name == "elementwise scale"
    ]
    assert len(scale_uses) == 2  # both uses of w, by the rule (no module call on the generic path)


def test_gradient_store_writes_each_steps_per_sample_gradients(tmp_path):
    """A training loop with the store as a hook: every step's file holds, per source, the projection of
    each sample's loss gradient at θ_before (an independent projector's full recording at that point)."""
    model = float64_llama().float()
    config = ProjectionConfig(kind="kronecker", k=4, seed=3)
    store = GradientStore(model, tmp_path, config)
    reference = GradientProjector(model, config)
    sources = {
        "gen": lambda m, b: -sequence_logprob(m, {"input_ids": b["x"]}),
        "und": lambda m, b: -sequence_logprob(m, {"input_ids": b["y"]}),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    want = {}
    for step in range(1, 4):
        batch = {"x": _ids(10 + step), "y": _ids(20 + step), "sample_ids/gen": torch.tensor([7, 8, 9]) + step}
        store.before_step(step, model, sources, batch)
        opt.zero_grad()
        for name, fn in sources.items():
            with store.recording(step, name, fn, batch) as watch:
                losses = fn(model, batch)
                watch(losses)
                losses.mean().backward()
            want[step, name] = reference.per_sample(fn, batch)
        opt.step()
        store.after_step(step, model, 1e-2)
    files = RunDir(tmp_path).gradient_files()
    assert [f.name for f in files] == [f"step_00000{s}.safetensors" for s in (1, 2, 3)]
    stored = list(read_gradient_store(tmp_path))
    assert [s.step for s in stored] == [1, 2, 3] and all(s.lr == 1e-2 for s in stored)
    for s in stored:
        assert set(s.features) == set(sources) and set(s.ids) == {"gen"}
        for name in sources:
            torch.testing.assert_close(s.features[name], want[s.step, name], rtol=1e-4, atol=1e-5)
        assert s.ids["gen"].tolist() == [7 + s.step, 8 + s.step, 9 + s.step]
        assert s.projection["k"] == 4 and s.projection["feature_dim"] == reference.feature_dim
