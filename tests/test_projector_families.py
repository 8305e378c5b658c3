"""GradientProjector(kind="exact") across model families (tests/projector_models.py): on every case the
per-sample features equal an explicit float64 per-sample autograd loop (relative error < 1e-6 per
tracked parameter), or the projector refuses with UnsupportedModuleError naming the module. Cases with
``exact_required`` must not be refused. Anything else (a wrong answer, another exception) fails."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from projector_models import FAMILIES, MUST_REFUSE, Built, block_errors, per_sample_gradients_float64
from torch import nn

from ntkdyn import GradientProjector, ProjectionConfig
from ntkdyn.analysis.projector import UnsupportedModuleError

RTOL = 1e-6  # float64 features against a float64 reference
ALONE_RTOL = 1e-5  # sample alone vs in the batch: transformers' eager attention softmax runs in float32
EXACT = ProjectionConfig(kind="exact")


@functools.cache
def built(name: str) -> Built:
    return FAMILIES[name].build()


def assert_exact(features: torch.Tensor, reference: torch.Tensor, params: dict[str, nn.Parameter]) -> None:
    assert features.shape == reference.shape, (
        f"features {tuple(features.shape)}, reference {tuple(reference.shape)} over the tracked parameters"
    )
    errors = block_errors(features, reference, params)
    wrong = {name: f"{e:.2e}" for name, e in errors.items() if not e < RTOL}
    assert not wrong, f"wrong per-sample features (relative error per parameter): {wrong}"


def names_a_module(message: str, model: nn.Module) -> bool:
    """The message contains the qualified name of a submodule: a dotted name as a whole word (a deeper
    name or a parameter of it may follow after '.'), a one-word name only in quotes."""
    for name, _ in model.named_modules():
        if not name:
            continue
        if "." in name:
            pattern = rf"(?<![\w.]){re.escape(name)}(?![\w])"
        else:
            pattern = rf"['\"`]{re.escape(name)}['\"`]"
        if re.search(pattern, message):
            return True
    return False


def exact_or_refused(name: str, case: Built, batch) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """(exact features, float64 reference, tracked parameters) of ``batch``, or None after checking that
    a refusal is allowed and clear. The reference is taken before the projector runs, and the model
    must give the same values afterwards (no hook or mode left behind)."""
    family = FAMILIES[name]
    values = case.fn(case.model, batch).detach()
    try:
        projector = GradientProjector(case.model, EXACT)
        params = projector.tracked_parameters()
        reference = per_sample_gradients_float64(case.model, case.fn, batch, params)
        features = projector.per_sample(case.fn, batch)
    except UnsupportedModuleError as error:
        message = str(error)
        assert not family.exact_required, f"{name} must be exact, the projector refused: {message}"
        if family.refusal_pattern is not None:
            assert re.search(family.refusal_pattern, message), message
        else:
            assert names_a_module(message, case.model), f"the refusal names no module of the model: {message}"
        return None
    torch.testing.assert_close(case.fn(case.model, batch).detach(), values, rtol=1e-12, atol=0)
    return features, reference, params


def test_unsupported_module_error_is_a_value_error():
    assert issubclass(UnsupportedModuleError, ValueError)


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_features_or_clear_refusal(name, one_thread):
    """FAMILIES[name].exact_required marks the cases that must be exact; the others may be refused."""
    case = built(name)
    result = exact_or_refused(name, case, case.batch)
    if result is not None:
        assert_exact(*result)


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_alone_has_its_row_of_the_batch(name, one_thread):
    """The reference of each sample run alone (no padding, B = 1) equals its row of the batch (so these
    batches are fair tests of padding), and the exact features of sample 1 alone are its gradient."""
    case = built(name)
    if case.alone is None:
        pytest.skip("fn's values are not one sample's each: samples interact")
    params = {n: p for n, p in case.model.named_parameters() if p.requires_grad}
    batched = per_sample_gradients_float64(case.model, case.fn, case.batch, params)
    for b in range(batched.shape[0]):
        alone = per_sample_gradients_float64(case.model, case.fn, case.alone(b), params)
        torch.testing.assert_close(alone[0], batched[b], rtol=ALONE_RTOL, atol=ALONE_RTOL * batched[b].norm())
    result = exact_or_refused(name, case, case.alone(1))
    if result is not None:
        assert_exact(*result)


def test_families_cover_the_issue():
    """At least 12 transformers families; ntkdyn's Janus and Emu3; the listed torch.nn modules."""
    transformers_families = {n.split("-")[0] for n, f in FAMILIES.items() if f.source == "transformers"}
    assert len(transformers_families) >= 12, sorted(transformers_families)
    assert {"janus-gen", "janus-und", "emu3-gen", "emu3-und"} <= set(FAMILIES)
    exact_torch = {n for n, f in FAMILIES.items() if f.source == "torch" and f.exact_required}
    assert len(exact_torch) >= 10, sorted(exact_torch)


@pytest.mark.parametrize("name", MUST_REFUSE)
def test_refused_with_a_clear_message(name, one_thread):
    build, pattern = MUST_REFUSE[name]
    case = build()
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        GradientProjector(case.model, EXACT).per_sample(case.fn, case.batch)
