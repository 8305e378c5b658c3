"""feature_products (one pass over the feature columns) against explicit float64 products. Products
are float32 over chunks of 2^12 columns: entries of size ~sqrt(D)..D agree to ~1e-4; a wrong column,
block or row would be off by O(1) or more."""

import pytest
import torch

from ntkdyn.analysis.feature_products import feature_products


def _features(generator, rows, columns):
    return torch.randn(rows, columns, generator=generator)


@pytest.mark.parametrize("with_slices", [True, False])
def test_every_product_equals_the_float64_reference(with_slices):
    g = torch.Generator().manual_seed(0)
    # a block wider than a chunk (2^12 columns), one narrower, one of a single column
    slices = {"w": slice(0, 5000), "b": slice(5000, 5100), "scale": slice(5100, 5101)}
    D = 5101
    probes = [_features(g, 3, D), _features(g, 2, D)]
    train = {"gen": _features(g, 4, D), "und": _features(g, 2, D)}
    conditioned = {"gen": _features(g, 4, D), "und": _features(g, 2, D)}
    delta = _features(g, 1, D)[0]
    got = feature_products(probes, train, delta, conditioned, slices if with_slices else None)

    F = torch.cat([*probes, *train.values(), delta[None]]).double()
    P = torch.cat(probes).double()
    torch.testing.assert_close(got.gram, F @ F.T, rtol=1e-5, atol=1e-3)
    assert set(got.conditioned) == {"gen", "und"}
    for source, phi in conditioned.items():
        torch.testing.assert_close(got.conditioned[source], P @ phi.double().T, rtol=1e-5, atol=1e-3)
    if not with_slices:
        assert got.layers == {} and got.conditioned_layers == {}
        return
    for kind, rows in (("layers", train), ("conditioned_layers", conditioned)):
        for source, phi in rows.items():
            expected = torch.stack(
                [P[:, sl] @ phi.double()[:, sl].sum(0) for sl in slices.values()], dim=1
            )  # [n_p, P]: Σ_u <φ(o), φ(u)> over each block's columns
            torch.testing.assert_close(getattr(got, kind)[source], expected, rtol=1e-5, atol=1e-3)


def test_probes_alone():
    """No training features: the Gram matrix of the probes and P Δθ only."""
    g = torch.Generator().manual_seed(1)
    probes = [_features(g, 4, 300)]
    delta = _features(g, 1, 300)[0]
    got = feature_products(probes, {}, delta, {}, {"a": slice(0, 300)})
    F = torch.cat([probes[0], delta[None]]).double()
    torch.testing.assert_close(got.gram, F @ F.T, rtol=1e-5, atol=1e-3)
    assert got.conditioned == {} and got.layers == {}
