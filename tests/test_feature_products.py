"""feature_products (one pass over the feature columns) against explicit float64 products. Products
are float32 over chunks of 2^12 columns: entries of size ~sqrt(D)..D agree to ~1e-4; a wrong column,
block or row would be off by O(1) or more."""

import pytest
import torch

from ntkdyn.analysis.feature_products import consecutive_rows, feature_products


def _features(generator, rows, columns):
    return torch.randn(rows, columns, generator=generator)


@pytest.mark.parametrize("train_pairs", [True, False])
@pytest.mark.parametrize("with_slices", [True, False])
@pytest.mark.parametrize("in_place", [True, False])
def test_every_product_equals_the_float64_reference(with_slices, in_place, train_pairs):
    """in_place: every row block is a slice of one matrix (read in place, no copy), else separate tensors.
    Without train_pairs, the products of the rows after the probes with each other are NaN, their
    squared norms on the diagonal, and every other product is the same."""
    g = torch.Generator().manual_seed(0)
    # a block wider than a chunk (2^12 columns), one narrower, one of a single column
    slices = {"w": slice(0, 5000), "b": slice(5000, 5100), "scale": slice(5100, 5101)}
    D = 5101
    sizes = [3, 2, 4, 2, 1, 4, 2]  # probes (2 groups), train (2 sources), P Δθ, conditioned (2 sources)
    if in_place:
        matrix = _features(g, sum(sizes), D)
        pieces = list(matrix.split(sizes))
        assert consecutive_rows(pieces).data_ptr() == matrix.data_ptr()
    else:
        pieces = [_features(g, n, D) for n in sizes]
        assert consecutive_rows(pieces) is None
    probes = pieces[:2]
    train = {"gen": pieces[2], "und": pieces[3]}
    delta = pieces[4][0]
    conditioned = {"gen": pieces[5], "und": pieces[6]}
    got = feature_products(probes, train, delta, conditioned, slices if with_slices else None, train_pairs)

    F = torch.cat([*probes, *train.values(), delta[None]]).double()
    P = torch.cat(probes).double()
    expected = F @ F.T
    if not train_pairs:  # rows 5.. are the training rows and P Δθ
        off_diagonal = ~torch.eye(len(F) - 5, dtype=torch.bool)
        assert bool(got.gram[5:, 5:][off_diagonal].isnan().all())
        expected[5:, 5:][off_diagonal] = got.gram[5:, 5:][off_diagonal]
    torch.testing.assert_close(got.gram, expected, rtol=1e-5, atol=1e-3, equal_nan=True)
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


def test_consecutive_rows_only_for_adjacent_row_blocks_of_one_matrix():
    matrix = torch.arange(24.0).reshape(6, 4)
    assert torch.equal(consecutive_rows([matrix[:2], matrix[2:5]]), matrix[:5])
    assert torch.equal(consecutive_rows([matrix[1:3], matrix[3:3], matrix[3:]]), matrix[1:])
    assert consecutive_rows([matrix[:2], matrix[3:]]) is None  # a gap
    assert consecutive_rows([matrix[2:4], matrix[:2]]) is None  # out of order
    assert consecutive_rows([matrix[:2, :3], matrix[2:, :3]]) is None  # not contiguous
    assert consecutive_rows([matrix[:2], matrix[2:].clone()]) is None  # another matrix
    assert consecutive_rows([matrix[:2], matrix[2:].double()]) is None  # another dtype
