"""ntkdyn.analysis.statistics against independent references: explicit pair counting, numpy on the
resampled rows, hand counts, textbook values, and the coverage of the intervals on data with a known truth."""

import math

import numpy as np
import pytest
import torch

from ntkdyn.analysis import statistics as U


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """[R, n] ops on small n: one thread is fastest on the shared 2-core machine."""
    yield


# Coverage over 200 repetitions: a 95% interval covers about 190 times; binomial sd ~ 3 repetitions.
REPS = 200
COVERAGE = (0.88, 0.99)


def _auroc_pairs(scores, labels) -> float:
    """Explicit O(n^2) Mann-Whitney: over (positive, negative) pairs, 1 if s+ > s-, 1/2 if tied."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = 0.0
    for a in pos:
        for b in neg:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(pos) * len(neg))


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based tie-averaged ranks, O(n^2): #smaller + (#equal + 1) / 2."""
    return np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x])


def _covers(interval, truth) -> bool:
    return interval.lo <= truth <= interval.hi


# ----------------------------------------------------------------------------- AUROC


def test_auroc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    for n in (7, 40, 101):
        labels = rng.random(n) < 0.4
        labels[:2] = [True, False]
        scores = np.round(2 * rng.normal(size=n) + 2 * labels) / 2  # many ties, also across classes
        assert len(np.unique(scores)) < n
        assert U.auroc(scores, labels) == pytest.approx(_auroc_pairs(scores, labels), abs=1e-12)
        assert U.auroc(scores, ~labels) == pytest.approx(1 - _auroc_pairs(scores, labels), abs=1e-12)
    assert U.auroc(np.ones(5), np.array([1, 0, 1, 0, 0])) == 0.5  # all tied
    assert math.isnan(U.auroc(np.arange(4.0), np.ones(4, dtype=bool)))  # one class


# ----------------------------------------------------------------------------- weighted = resampled rows


def test_weighted_statistics_equal_numpy_on_the_repeated_rows():
    """A statistic with resample counts w equals numpy's on the rows repeated w times."""
    rng = np.random.default_rng(1)
    n = 60
    x = np.round(rng.normal(size=n), 1)  # ties for the ranks
    y = 0.7 * x + rng.normal(size=n)
    labels = rng.random(n) < 0.5
    part, total = rng.random(n), rng.random(n) + 0.5
    clusters = np.repeat(np.arange(20), 3)
    weights = U.bootstrap_weights(n, resamples=5, seed=3, clusters=clusters)
    assert (weights[:, 0::3] == weights[:, 1::3]).all() and (weights.sum(1) == n).all()
    for w in weights:
        idx = np.repeat(np.arange(n), w.long().numpy())
        xr, yr, lr = x[idx], y[idx], labels[idx]
        reference = {
            U.weighted_mean: xr.mean(),
            U.weighted_pearson: np.corrcoef(xr, yr)[0, 1],
            U.weighted_spearman: np.corrcoef(_midranks(xr), _midranks(yr))[0, 1],
            U.weighted_slope: np.polyfit(xr, yr, 1)[0],
            U.weighted_slope_through_origin: np.linalg.lstsq(xr[:, None], yr, rcond=None)[0][0],
            U.weighted_sign_agreement: (np.sign(xr) == np.sign(yr)).mean(),
        }
        for f, ref in reference.items():
            got = f(w, x) if f is U.weighted_mean else f(w, x, y)
            assert got.item() == pytest.approx(ref, abs=1e-12), f.__name__
        assert U.weighted_share(w, part, total).item() == pytest.approx(part[idx].sum() / total[idx].sum())
        assert U.weighted_auroc(w, x, labels).item() == pytest.approx(_auroc_pairs(xr, lr), abs=1e-12)


def test_generic_and_vectorised_bootstrap_share_the_draws():
    """bootstrap_ci (statistic called on the resampled rows) and weighted_bootstrap_ci give the same
    interval for the same seed, over rows and over clusters of unequal sizes."""
    rng = np.random.default_rng(2)
    n = 50
    x = rng.normal(size=n)
    y = x + rng.normal(size=n)
    clusters = rng.integers(0, 12, size=n)
    for c in (None, clusters, [f"probe{k}" for k in clusters]):
        ci = {"resamples": 300, "seed": 5, "clusters": c}
        generic = U.bootstrap_ci(lambda a, b: np.corrcoef(a, b)[0, 1], x, y, **ci)
        fast = U.weighted_bootstrap_ci(U.weighted_pearson, x, y, **ci)
        assert generic.estimate == pytest.approx(fast.estimate, abs=1e-12)
        assert (generic.lo, generic.hi) == pytest.approx((fast.lo, fast.hi), abs=1e-12)


def test_bootstrap_is_seeded_and_leaves_the_global_rng_alone():
    x = np.random.default_rng(3).normal(size=80)
    state = torch.get_rng_state()
    a = U.weighted_bootstrap_ci(U.weighted_mean, x, seed=11)
    b = U.weighted_bootstrap_ci(U.weighted_mean, x, seed=11)
    c = U.weighted_bootstrap_ci(U.weighted_mean, x, seed=12)
    assert torch.equal(state, torch.get_rng_state())
    assert a == b and (a.lo, a.hi) != (c.lo, c.hi)
    # chunking the [R, n] weights does not change the draws
    assert torch.equal(U.bootstrap_weights(10_000, 450, seed=1)[:3], U.bootstrap_weights(10_000, 3, seed=1))


# ----------------------------------------------------------------------------- coverage


def test_coverage_of_mean_pearson_slope_and_auroc():
    """95% intervals (500 resamples) cover a known truth in about 95% of 200 data sets (n = 100)."""
    rng = np.random.default_rng(4)
    rho, shift = 0.6, 1.0
    true_auroc = 0.5 * (1 + math.erf(shift / 2))  # P(N(shift, 1) > N(0, 1)) = Phi(shift / sqrt 2)
    hits = {"mean": 0, "pearson": 0, "slope": 0, "auroc": 0}
    for rep in range(REPS):
        x = rng.normal(size=100)
        y = rho * x + math.sqrt(1 - rho**2) * rng.normal(size=100)  # corr = slope = rho
        labels = rng.random(100) < 0.5
        scores = rng.normal(size=100) + shift * labels
        ci = {"resamples": 500, "seed": rep}
        hits["mean"] += _covers(U.weighted_bootstrap_ci(U.weighted_mean, x + 2.0, **ci), 2.0)
        hits["pearson"] += _covers(U.weighted_bootstrap_ci(U.weighted_pearson, x, y, **ci), rho)
        hits["slope"] += _covers(U.weighted_bootstrap_ci(U.weighted_slope, x, y, **ci), rho)
        hits["auroc"] += _covers(U.weighted_bootstrap_ci(U.weighted_auroc, scores, labels, **ci), true_auroc)
    for name, h in hits.items():
        assert COVERAGE[0] <= h / REPS <= COVERAGE[1], (name, h / REPS)


def test_cluster_bootstrap_is_wider_and_covers_where_rows_undercover():
    """50 probes measured 6 times each (intra-cluster correlation ~0.99): resampling rows treats 300
    near-copies as independent and undercovers; resampling probes restores coverage."""
    rng = np.random.default_rng(5)
    clusters = np.repeat(np.arange(50), 6)
    naive_hits = cluster_hits = 0
    for rep in range(REPS):
        x = 1.0 + np.repeat(rng.normal(size=50), 6) + 0.1 * rng.normal(size=300)
        naive = U.weighted_bootstrap_ci(U.weighted_mean, x, resamples=500, seed=rep)
        by_cluster = U.weighted_bootstrap_ci(U.weighted_mean, x, resamples=500, seed=rep, clusters=clusters)
        assert by_cluster.hi - by_cluster.lo > 1.5 * (naive.hi - naive.lo)
        naive_hits += _covers(naive, 1.0)
        cluster_hits += _covers(by_cluster, 1.0)
    assert naive_hits / REPS < 0.75
    assert COVERAGE[0] <= cluster_hits / REPS <= COVERAGE[1]


def test_nan_resamples_are_dropped_and_counted():
    """A rate whose condition holds for one item out of 20 is undefined on the resamples that miss it;
    those are dropped and counted (about (19/20)^20 = 36% of them)."""
    n = 20
    v0 = np.zeros(n, bool)
    v0[7] = True  # item 7: the only former positive
    o = np.zeros(n, bool)  # ... and a false positive
    v = np.zeros(n, bool)  # now rejected
    out = U.verdict_rates_with_ci(v0, v, o, resamples=1000, seed=9)
    missed = int((U.bootstrap_weights(n, 1000, seed=9)[:, 7] == 0).sum())
    assert 250 < missed < 450
    assert out["fp_rejected_dropped"] == missed and out["fp_rejected_n"] == 1
    assert out["fp_rejected"] == 1.0 and out["fp_rejected_ci"] == [1.0, 1.0]
    # the generic path drops the same resamples: a statistic undefined without item 7
    generic = U.bootstrap_ci(lambda a: a.mean() if (a == 7).any() else math.nan, np.arange(n), seed=9)
    assert generic.dropped == missed and generic.lo < generic.estimate < generic.hi


# ----------------------------------------------------------------------------- paired delta AUROC


def test_delta_auroc_identical_scores_give_exactly_zero():
    rng = np.random.default_rng(6)
    labels = rng.random(80) < 0.5
    scores = rng.normal(size=80) + labels
    out = U.delta_auroc_with_ci(scores, scores, labels, resamples=1000)
    assert out["delta_auroc"] == 0.0 and out["delta_auroc_ci"] == [0.0, 0.0]
    assert out["auroc_before"] == pytest.approx(_auroc_pairs(scores, labels))


def test_delta_auroc_real_improvement_and_pairing():
    """after = before + a shift for positives: the paired interval lies above 0 and is much narrower than
    the difference of two independently resampled AUROC intervals would suggest."""
    rng = np.random.default_rng(7)
    labels = rng.random(200) < 0.5
    before = rng.normal(size=200) + 0.5 * labels
    after = before + 0.3 * labels + 0.05 * rng.normal(size=200)
    out = U.delta_auroc_with_ci(before, after, labels, resamples=1000, seed=1)
    assert out["delta_auroc"] == pytest.approx(_auroc_pairs(after, labels) - _auroc_pairs(before, labels))
    assert 0 < out["delta_auroc_ci"][0] < out["delta_auroc"] < out["delta_auroc_ci"][1]
    # unpaired: before and after resampled independently (different seeds)
    b = U.bootstrap_weights(200, 1000, seed=1)
    a = U.bootstrap_weights(200, 1000, seed=2)
    unpaired = U.weighted_auroc(a, after, labels) - U.weighted_auroc(b, before, labels)
    unpaired_width = float(torch.quantile(unpaired, 0.975) - torch.quantile(unpaired, 0.025))
    assert out["delta_auroc_ci"][1] - out["delta_auroc_ci"][0] < 0.5 * unpaired_width


# ----------------------------------------------------------------------------- verdict rates


def test_verdict_rates_hand_counted():
    #        item: 0  1  2  3  4  5  6  7  8  9
    v0 = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
    o = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0], bool)
    v = np.array([0, 0, 1, 1, 1, 0, 1, 0, 0, 1], bool)
    out = U.verdict_rates_with_ci(v0, v, o, resamples=1000)
    # former false positives {0, 1, 2}: rejected now {0, 1}
    assert out["fp_rejected"] == pytest.approx(2 / 3) and out["fp_rejected_n"] == 3
    # former true positives {3, 4, 5}: still accepted {3, 4}
    assert out["tp_kept"] == pytest.approx(2 / 3) and out["tp_kept_n"] == 3
    # former false negatives {6, 7}: accepted now {6}
    assert out["fn_accepted"] == pytest.approx(1 / 2) and out["fn_accepted_n"] == 2
    # changed verdicts {0, 1, 5, 6, 9}: right now {0, 1, 6} (5 and 9 changed to the wrong answer)
    assert out["und_win"] == pytest.approx(3 / 5) and out["und_win_n"] == 5
    # right now: {0, 1, 3, 4, 6, 8}
    assert out["judge_accuracy"] == pytest.approx(6 / 10) and out["judge_accuracy_n"] == 10
    for k in ("fp_rejected", "tp_kept", "fn_accepted", "und_win", "judge_accuracy"):
        lo, hi = out[f"{k}_ci"]
        assert 0 <= lo <= out[k] <= hi <= 1


def test_verdict_rates_empty_conditions_are_none():
    v0 = np.zeros(6, bool)  # no former positives, no verdict changed
    o = np.array([1, 1, 0, 0, 1, 0], bool)
    out = U.verdict_rates_with_ci(v0, v0.copy(), o, resamples=100)
    for k in ("fp_rejected", "tp_kept", "und_win"):
        assert out[k] is None and out[f"{k}_ci"] == [None, None] and out[f"{k}_n"] == 0
        assert out[f"{k}_dropped"] == 100
    assert out["fn_accepted"] == 0.0 and out["judge_accuracy"] == pytest.approx(0.5)


def test_wilson_interval():
    # textbook value: 8 of 10 at 95% -> [0.4902, 0.9433]
    lo, hi = U.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert U.wilson_interval(0, 20)[0] == 0.0 and U.wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(b) for b in U.wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes <= trials"):
        U.wilson_interval(3, 2)


# ----------------------------------------------------------------------------- agreement


def test_agreement_with_ci_estimates_and_keys():
    rng = np.random.default_rng(8)
    p = rng.normal(size=120)
    o = 2.0 * p + 0.5 + rng.normal(size=120)
    out = U.agreement_with_ci(p, o, clusters=np.arange(120) // 4, resamples=1000)
    assert out["n"] == 120 and out["clusters"] == 30 and out["resamples"] == 1000
    assert out["pearson"] == pytest.approx(np.corrcoef(p, o)[0, 1], abs=1e-12)
    assert out["slope"] == pytest.approx(np.polyfit(p, o, 1)[0], abs=1e-12)
    assert out["slope_through_origin"] == pytest.approx((p @ o) / (p @ p), abs=1e-12)
    for k in ("pearson", "spearman", "slope", "slope_through_origin", "sign_agreement"):
        lo, hi = out[f"{k}_ci"]
        assert lo < out[k] < hi and out["dropped"][k] == 0
    assert out["slope_ci"][0] < 2.0 < out["slope_ci"][1]


# ----------------------------------------------------------------------------- kernel alignment


def _gram(rng, n=40, d=10, offset=0.0) -> torch.Tensor:
    x = torch.tensor(rng.normal(size=(n, d)) + offset)
    return x @ x.T


def test_alignment_against_numpy():
    rng = np.random.default_rng(9)
    k1, k2 = _gram(rng, offset=2.0), _gram(rng, offset=2.0)  # independent, sharing a mean component
    a, b = k1.numpy(), k2.numpy()
    n = a.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    ac, bc = h @ a @ h, h @ b @ h
    centred = (ac * bc).sum() / (np.linalg.norm(ac) * np.linalg.norm(bc))
    plain = (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))
    out = U.alignment_permutation_null(k1, k2, permutations=10)
    assert out["alignment"] == pytest.approx(centred, abs=1e-12) and out["centred"]
    uncentred = U.alignment_permutation_null(k1, k2, permutations=10, centred=False)
    assert uncentred["alignment"] == pytest.approx(plain, abs=1e-12)
    assert plain > 0.9 > 0.5 > centred  # the shared mean inflates the uncentred alignment
    # centring removes it: the same features without the offset give the same centred alignment
    rng = np.random.default_rng(9)
    k1, k2 = _gram(rng), _gram(rng)
    without_offset = U.alignment_permutation_null(k1, k2, permutations=10)["alignment"]
    assert without_offset == pytest.approx(centred, abs=1e-12)


def test_alignment_null_and_p_value():
    """Independent kernels: p not small on most seeds; a kernel with itself (or with a noisy copy): the
    minimum p = 1 / (P + 1); the null itself is the alignment under explicit permutations."""
    p_values = []
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        out = U.alignment_permutation_null(_gram(rng), _gram(rng), permutations=200, seed=seed)
        assert out["null_mean"] < out["null_q95"]
        p_values.append(out["p_value"])
    assert sum(p <= 0.05 for p in p_values) <= 2, p_values
    rng = np.random.default_rng(10)
    k = _gram(rng)
    assert U.alignment_permutation_null(k, k, permutations=200)["p_value"] == 1 / 201
    noisy = k + 2.0 * _gram(rng)
    assert U.alignment_permutation_null(k, noisy, permutations=200)["p_value"] == 1 / 201
    # null mean against explicit permutations drawn here
    g = torch.Generator().manual_seed(0)
    perms = [torch.randperm(40, generator=g) for _ in range(400)]
    kc, nc = (m - m.mean(0) - m.mean(1, keepdim=True) + m.mean() for m in (k, noisy))
    explicit = np.mean([float((kc * nc[p][:, p]).sum() / (kc.norm() * nc.norm())) for p in perms])
    null_mean = U.alignment_permutation_null(k, noisy, permutations=400)["null_mean"]
    assert null_mean == pytest.approx(explicit, abs=0.02)


# ----------------------------------------------------------------------------- random-direction null


def test_random_like_update():
    rng = np.random.default_rng(11)
    delta = {
        "layer.weight": torch.tensor(rng.normal(size=(100, 200))),
        "layer.bias": torch.tensor(rng.normal(size=50) * 1e-3),
        "frozen": torch.zeros(3, 3, dtype=torch.float64),
        "half": torch.tensor(rng.normal(size=(30, 30)), dtype=torch.float32),
    }
    r = U.random_like_update(delta, seed=0)
    assert list(r) == list(delta)
    for k, d in delta.items():
        assert r[k].shape == d.shape and r[k].dtype == d.dtype
    for k in ("layer.weight", "layer.bias"):
        assert r[k].norm().item() == pytest.approx(delta[k].norm().item(), rel=1e-12)
    assert r["half"].norm().item() == pytest.approx(delta["half"].norm().item(), rel=1e-6)
    assert torch.equal(r["frozen"], delta["frozen"])
    w, dw = r["layer.weight"].flatten(), delta["layer.weight"].flatten()
    assert abs(float(w @ dw / (w.norm() * dw.norm()))) < 0.05  # 20000 entries: |cos| ~ 0.007
    again = U.random_like_update(dict(reversed(list(delta.items()))), seed=0)  # key order does not matter
    assert all(torch.equal(r[k], again[k]) for k in delta)
    other = U.random_like_update(delta, seed=1)
    assert not torch.equal(r["layer.weight"], other["layer.weight"])


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_by_name():
    x = np.arange(5.0)
    with pytest.raises(ValueError, match="observed: has 4 values"):
        U.agreement_with_ci(x, x[:4])
    with pytest.raises(ValueError, match="predicted: contains NaN"):
        U.agreement_with_ci(np.array([1.0, math.nan, 2.0]), x[:3])
    with pytest.raises(ValueError, match="labels: expected binary"):
        U.auroc(x, x)
    with pytest.raises(ValueError, match="clusters: has 3 ids"):
        U.weighted_bootstrap_ci(U.weighted_mean, x, clusters=[0, 0, 1])
    with pytest.raises(ValueError, match="level"):
        U.weighted_bootstrap_ci(U.weighted_mean, x, level=95)
    with pytest.raises(ValueError, match="resamples"):
        U.weighted_bootstrap_ci(U.weighted_mean, x, resamples=0)
    with pytest.raises(ValueError, match=r"\[n, n\] kernels"):
        U.alignment_permutation_null(torch.ones(3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="zero Frobenius norm after centring"):
        U.alignment_permutation_null(torch.ones(4, 4), torch.eye(4))
    with pytest.raises(ValueError, match="'w' is not a floating-point tensor"):
        U.random_like_update({"w": torch.ones(3, dtype=torch.long)})
