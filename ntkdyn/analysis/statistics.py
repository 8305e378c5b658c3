"""The package's statistics, each with its uncertainty: agreement of predicted with observed change
(Pearson, Spearman, slope, sign agreement), AUROC and its paired difference, verdict rates, shares, kernel
normalisation and alignment (uncentred and centred) with a permutation null, and a random-direction null
for a parameter update; percentile-bootstrap intervals over rows or clusters. Generic: torch and numpy only.

Conventions
- Float64 throughout; deterministic given ``seed`` (a private ``torch.Generator``; the global RNG is never
  touched).
- A bootstrap resample is a weight vector w [n]: how many times each row was drawn. With ``clusters`` (an id
  per row) whole clusters are drawn with replacement and each row gets its cluster's draw count, which is
  what repeated measurements of one unit (a probe over tracked steps, a prompt over its candidates) need.
  Every statistic here is a function of the weighted empirical distribution, so computing it with weights
  w equals computing it on the resampled rows; R resamples are one [R, n] weight matrix (vectorised).
- Interval: the percentile bootstrap, the (1 - level)/2 and (1 + level)/2 quantiles (linear interpolation)
  of the resampled statistics.
- A resample whose statistic is undefined (NaN: a constant input to a correlation or slope, one class for
  an AUROC, an empty condition for a rate, a zero denominator for a share) is dropped; the interval comes
  from the remaining resamples (so it is conditional on the statistic being defined) and ``dropped`` says
  how many were left out. An undefined full-sample estimate gives NaN bounds.
- Dict outputs write undefined values as None (JSON null).

One file (~530 lines) because every statistic and interval in the package shares one resampling
convention (weights, draws, the NaN policy) and the report functions compute several statistics on the
same resamples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

_F64 = torch.float64
_CHUNK_ELEMENTS = 1 << 22  # rows of the [R, n] weight matrix are built this many elements at a time
_ALIGNMENT_TIE = 1e-10  # a null alignment within this of the observed one counts as reaching it


@dataclass(frozen=True)
class Interval:
    """A statistic on the full sample with its percentile-bootstrap interval [lo, hi]; ``dropped``: the
    resamples whose statistic was NaN and were left out."""

    estimate: float
    lo: float
    hi: float
    dropped: int = 0

    def bounds(self) -> list[float | None]:
        """[lo, hi], None for an undefined bound (for JSON)."""
        return [_json(self.lo), _json(self.hi)]


def _json(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# ----------------------------------------------------------------------------- inputs


def _vector(x, name: str, n: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", _F64)
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D array (one value per row), got shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name}: has {t.numel()} values but there are {n} rows")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return t


def _binary(x, name: str, n: int | None = None) -> torch.Tensor:
    t = _vector(x, name, n)
    if not ((t == 0) | (t == 1)).all():
        raise ValueError(f"{name}: expected binary values (bool or 0/1)")
    return t == 1


def _weights(w, n: int) -> torch.Tensor:
    """w [n] or [R, n] -> float64 [R, n] of non-negative resample counts."""
    w = torch.as_tensor(w, dtype=_F64)
    w = w[None] if w.dim() == 1 else w
    if w.dim() != 2 or w.shape[1] != n:
        raise ValueError(f"weights: expected shape [R, {n}], got {tuple(w.shape)}")
    if (w < 0).any():
        raise ValueError("weights: resample counts must be non-negative")
    return w


def _cluster_ids(clusters: Sequence | torch.Tensor | np.ndarray | None, n: int) -> tuple[torch.Tensor, int]:
    """Row -> cluster index in 0..C-1 (in order of first appearance), and C. No clusters: each row its own."""
    if clusters is None:
        return torch.arange(n), n
    keys = clusters.tolist() if isinstance(clusters, (torch.Tensor, np.ndarray)) else list(clusters)
    if len(keys) != n:
        raise ValueError(f"clusters: has {len(keys)} ids but there are {n} rows")
    index: dict = {}
    ids = torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)
    return ids, len(index)


# ----------------------------------------------------------------------------- resampling


def _resample_chunks(n: int, resamples: int, seed: int, clusters) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yields (draws [r, C]: drawn cluster indices, weights [r, n]) for consecutive chunks of the
    ``resamples`` resamples; one generator seeded once, so the draws do not depend on the chunking."""
    if not (isinstance(resamples, int) and resamples >= 1):
        raise ValueError(f"resamples: expected a positive int, got {resamples!r}")
    if n < 1:
        raise ValueError("bootstrap: no rows")
    ids, c = _cluster_ids(clusters, n)
    generator = torch.Generator().manual_seed(seed)
    step = max(1, _CHUNK_ELEMENTS // max(n, c))
    for start in range(0, resamples, step):
        draws = torch.randint(c, (min(step, resamples - start), c), generator=generator)
        ones = torch.ones(draws.shape, dtype=_F64)
        counts = torch.zeros(draws.shape, dtype=_F64).scatter_add_(1, draws, ones)
        yield draws, counts[:, ids]


def bootstrap_weights(n: int, resamples: int = 1000, seed: int = 0, clusters=None) -> torch.Tensor:
    """The resamples as weights: [resamples, n] float64, w[r, i] = times row i (its cluster) was drawn."""
    return torch.cat([w for _, w in _resample_chunks(n, resamples, seed, clusters)])


def _interval(estimate: float, samples: torch.Tensor, level: float) -> Interval:
    valid = samples[~torch.isnan(samples)]
    dropped = samples.numel() - valid.numel()
    if math.isnan(estimate) or valid.numel() == 0:
        return Interval(estimate, math.nan, math.nan, dropped)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=_F64)
    lo, hi = torch.quantile(valid, q).tolist()
    return Interval(estimate, lo, hi, dropped)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level}")


def _bootstrap(
    statistics: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    n: int,
    resamples: int,
    level: float,
    seed: int,
    clusters,
) -> dict[str, Interval]:
    """Each weighted statistic (w [R, n] -> [R]) on the full sample and on the same resamples."""
    _check_level(level)
    ones = torch.ones(1, n, dtype=_F64)
    samples: dict[str, list[torch.Tensor]] = {k: [] for k in statistics}
    for _, w in _resample_chunks(n, resamples, seed, clusters):
        for k, f in statistics.items():
            samples[k].append(f(w))
    return {k: _interval(float(f(ones)[0]), torch.cat(samples[k]), level) for k, f in statistics.items()}


def weighted_bootstrap_ci(
    statistic: Callable[..., torch.Tensor],
    *arrays,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    clusters=None,
) -> Interval:
    """Vectorised bootstrap: ``statistic(w, *arrays)`` with w [R, n] returns [R] (the ``weighted_*``
    functions below), e.g. ``weighted_bootstrap_ci(weighted_mean, x, clusters=probe_ids)``."""
    if not arrays:
        raise ValueError("weighted_bootstrap_ci: no arrays to resample")
    n = len(arrays[0])
    return _bootstrap({"s": lambda w: statistic(w, *arrays)}, n, resamples, level, seed, clusters)["s"]


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    clusters=None,
) -> Interval:
    """Generic bootstrap: ``statistic(*arrays)`` -> float, called once per resample on the arrays' rows
    (dim 0 of tensors or numpy arrays) taken jointly at the resampled indices (a cluster resample
    concatenates its clusters' rows). Same draws as ``weighted_bootstrap_ci`` for the same seed; use that
    for the statistics it covers (it is vectorised)."""
    _check_level(level)
    if not arrays:
        raise ValueError("bootstrap_ci: no arrays to resample")
    n = len(arrays[0])
    for i, a in enumerate(arrays):
        if len(a) != n:
            raise ValueError(f"bootstrap_ci: array {i} has {len(a)} rows, array 0 has {n}")
    ids, c = _cluster_ids(clusters, n)
    members = torch.argsort(ids, stable=True).split(torch.bincount(ids, minlength=c).tolist())
    values = []
    for draws, _ in _resample_chunks(n, resamples, seed, clusters):
        for row in draws.tolist():
            idx = torch.cat([members[k] for k in row])
            taken = [a[idx.numpy()] if isinstance(a, np.ndarray) else a[idx] for a in arrays]
            values.append(float(statistic(*taken)))
    return _interval(float(statistic(*arrays)), torch.tensor(values, dtype=_F64), level)


# ----------------------------------------------------------------------------- weighted statistics
# Each takes w [n] or [R, n] (resample counts; ones = the sample itself) and returns [R] float64.


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), math.nan)


def _constant(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[R] bool: x ([n] or [R, n]) takes one value on the rows with w > 0: sum w |x - x_first| = 0 with
    x_first the first such row's value (exact, no tolerance)."""
    first = x.expand_as(w).gather(1, (w > 0).to(torch.uint8).argmax(1, keepdim=True))
    return (w * (x - first).abs()).sum(1) == 0


def _wsum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[R]: sum_i w[r, i] x[i] for x [n] or sum_i w[r, i] x[r, i] for x [R, n]."""
    return w @ x if x.dim() == 1 else (w * x).sum(1)


def _moments(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Weighted (co)variances times sum w: (sum w xc yc, sum w xc^2, sum w yc^2), xc = x - mean_w x."""
    total = w.sum(1)
    xc = x - (_wsum(w, x) / total)[:, None]
    yc = y - (_wsum(w, y) / total)[:, None]
    wxc = w * xc
    return (wxc * yc).sum(1), (wxc * xc).sum(1), (w * yc * yc).sum(1)


def _pearson(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    cov, vx, vy = _moments(w, x, y)
    r = (cov / (vx * vy).sqrt()).clamp(-1, 1)
    return torch.where(_constant(w, x) | _constant(w, y), math.nan, r)


def _midranks(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[R, n]: each row's 1-based average rank among the resample's rows (ties share the mean rank):
    sum of weights of smaller values + (weight of equal values + 1) / 2."""
    _, group = torch.unique(x, return_inverse=True)
    per_value = torch.zeros(w.shape[0], int(group.max()) + 1, dtype=_F64).index_add_(1, group, w)
    below = per_value.cumsum(1) - per_value
    return below[:, group] + (per_value[:, group] + 1) / 2


def _pair(w, x, y, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _vector(x, names[0])
    y = _vector(y, names[1], x.numel())
    return _weights(w, x.numel()), x, y


def weighted_mean(w, x) -> torch.Tensor:
    """sum w x / sum w."""
    x = _vector(x, "x")
    w = _weights(w, x.numel())
    return _ratio(w @ x, w.sum(1))


def weighted_share(w, part, total) -> torch.Tensor:
    """Ratio of sums sum w part / sum w total (e.g. a source's share of the predicted change); NaN when
    the denominator is 0. A conditional rate P(hit | cond) is weighted_share(w, hit & cond, cond)."""
    w, part, total = _pair(w, part, total, ("part", "total"))
    return _ratio(w @ part, w @ total)


def weighted_pearson(w, x, y) -> torch.Tensor:
    """Pearson correlation sum w xc yc / sqrt(sum w xc^2 sum w yc^2); NaN where x or y is constant."""
    return _pearson(*_pair(w, x, y, ("x", "y")))


def weighted_spearman(w, x, y) -> torch.Tensor:
    """Spearman correlation: the weighted Pearson of the resample's tie-averaged ranks."""
    w, x, y = _pair(w, x, y, ("x", "y"))
    return _pearson(w, _midranks(w, x), _midranks(w, y))


def weighted_slope(w, predicted, observed) -> torch.Tensor:
    """OLS slope of observed on predicted with intercept, cov(p, o) / var(p) (1 = calibrated; the slope
    the project reports); NaN where predicted is constant."""
    w, p, o = _pair(w, predicted, observed, ("predicted", "observed"))
    cov, var, _ = _moments(w, p, o)
    return torch.where(_constant(w, p), math.nan, cov / var)


def weighted_slope_through_origin(w, predicted, observed) -> torch.Tensor:
    """OLS slope of observed on predicted through the origin, sum w p o / sum w p^2; NaN when all p = 0."""
    w, p, o = _pair(w, predicted, observed, ("predicted", "observed"))
    return _ratio(w @ (p * o), w @ (p * p))


def weighted_sign_agreement(w, predicted, observed) -> torch.Tensor:
    """Share of rows with sign(predicted) == sign(observed) (0 is its own sign)."""
    w, p, o = _pair(w, predicted, observed, ("predicted", "observed"))
    return _ratio(w @ (torch.sign(p) == torch.sign(o)).to(_F64), w.sum(1))


def weighted_auroc(w, scores, labels) -> torch.Tensor:
    """Mann-Whitney AUROC P(s+ > s-) + P(s+ = s-)/2 over (positive, negative) pairs, pairs weighted by
    w_i w_j; NaN when a class is absent. O(R n) with the scores sorted once."""
    w, s, y = _pair(w, scores, labels, ("scores", "labels"))
    y = _binary(y, "labels")
    _, group = torch.unique(s, return_inverse=True)
    negative = w * (~y)
    neg_per_value = torch.zeros(w.shape[0], int(group.max()) + 1, dtype=_F64).index_add_(1, group, negative)
    neg_below = neg_per_value.cumsum(1) - neg_per_value
    positive = w * y
    wins = (positive * (neg_below[:, group] + 0.5 * neg_per_value[:, group])).sum(1)
    return _ratio(wins, positive.sum(1) * negative.sum(1))


def pearson(x, y) -> float:
    """Pearson correlation of two 1-D arrays (the point estimate of :func:`weighted_pearson`); NaN when
    either is constant."""
    x = _vector(x, "x")
    return float(weighted_pearson(torch.ones(x.numel(), dtype=_F64), x, y)[0])


def auroc(scores, labels) -> float:
    """AUROC of scores against binary labels (ties count 1/2); NaN when a class is absent."""
    return float(weighted_auroc(torch.ones(len(scores), dtype=_F64), scores, labels)[0])


# ----------------------------------------------------------------------------- reports


def _report(name: str, interval: Interval) -> dict:
    return {name: _json(interval.estimate), f"{name}_ci": interval.bounds()}


def agreement_with_ci(
    predicted, observed, *, clusters=None, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict:
    """Predicted vs observed change, all on the same resamples: pearson, spearman, slope (with intercept),
    slope_through_origin, sign_agreement, each with ``<name>_ci`` [lo, hi]; n rows, clusters, resamples,
    level, dropped {name: NaN resamples}."""
    p = _vector(predicted, "predicted")
    o = _vector(observed, "observed", p.numel())
    statistics = {
        "pearson": weighted_pearson,
        "spearman": weighted_spearman,
        "slope": weighted_slope,
        "slope_through_origin": weighted_slope_through_origin,
        "sign_agreement": weighted_sign_agreement,
    }
    intervals = _bootstrap(
        {k: (lambda w, f=f: f(w, p, o)) for k, f in statistics.items()},
        p.numel(),
        resamples,
        level,
        seed,
        clusters,
    )
    out: dict = {"n": p.numel(), "clusters": _cluster_ids(clusters, p.numel())[1]}
    for k, interval in intervals.items():
        out.update(_report(k, interval))
    dropped = {k: v.dropped for k, v in intervals.items()}
    return out | {"resamples": resamples, "level": level, "dropped": dropped}


def delta_auroc_with_ci(
    scores_before,
    scores_after,
    labels,
    *,
    clusters=None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Paired AUROC change on the same items: auroc_before, auroc_after and delta_auroc = after - before,
    each with ``<name>_ci``; one resample of the items serves both AUROCs, so the interval of the
    difference accounts for their correlation. Also n, n_positive, resamples, level, dropped (resamples
    with one class, undefined for all three)."""
    before = _vector(scores_before, "scores_before")
    after = _vector(scores_after, "scores_after", before.numel())
    y = _binary(labels, "labels", before.numel())
    intervals = _bootstrap(
        {
            "auroc_before": lambda w: weighted_auroc(w, before, y),
            "auroc_after": lambda w: weighted_auroc(w, after, y),
            "delta_auroc": lambda w: weighted_auroc(w, after, y) - weighted_auroc(w, before, y),
        },
        y.numel(),
        resamples,
        level,
        seed,
        clusters,
    )
    out: dict = {"n": y.numel(), "n_positive": int(y.sum())}
    for k, interval in intervals.items():
        out.update(_report(k, interval))
    return out | {"resamples": resamples, "level": level, "dropped": intervals["delta_auroc"].dropped}


def verdict_rates_with_ci(
    v0, v, o, *, clusters=None, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict:
    """Verdict rates on a frozen item set, v0 the pre-trained verdict, v the current one, o the oracle:
        fp_rejected    = P(v = 0 | v0 = 1, o = 0)   former false positives now rejected
        tp_kept        = P(v = 1 | v0 = 1, o = 1)   former true positives still accepted
        fn_accepted    = P(v = 1 | v0 = 0, o = 1)   former false negatives now accepted
        und_win        = P(v = o | v != v0)          right among the changed verdicts
        judge_accuracy = P(v = o)
    each with ``<name>_ci`` (bootstrap over items), ``<name>_n`` (items in its condition) and
    ``<name>_dropped`` (resamples with an empty condition). An empty condition gives None and [None, None]
    (und_win too: no changed verdict is no evidence)."""
    v0 = _binary(v0, "v0")
    v = _binary(v, "v", v0.numel())
    o = _binary(o, "o", v0.numel())
    rates = {
        "fp_rejected": (~v, v0 & ~o),
        "tp_kept": (v, v0 & o),
        "fn_accepted": (v, ~v0 & o),
        "und_win": (v == o, v != v0),
        "judge_accuracy": (v == o, torch.ones_like(v)),
    }
    intervals = _bootstrap(
        {k: (lambda w, h=hit & cond, c=cond: weighted_share(w, h, c)) for k, (hit, cond) in rates.items()},
        v0.numel(),
        resamples,
        level,
        seed,
        clusters,
    )
    out: dict = {"n": v0.numel()}
    for k, interval in intervals.items():
        out |= _report(k, interval) | {f"{k}_n": int(rates[k][1].sum()), f"{k}_dropped": interval.dropped}
    return out | {"resamples": resamples, "level": level}


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate x/n: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    with z the (1 + level)/2 normal quantile; (nan, nan) for n = 0."""
    _check_level(level)
    if not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: need 0 <= successes <= trials, got {successes}/{trials}")
    if trials == 0:
        return math.nan, math.nan
    z = float(torch.special.ndtri(torch.tensor((1 + level) / 2, dtype=_F64)))
    p, n = successes / trials, trials
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)


# ----------------------------------------------------------------------------- kernels and nulls


def _centre(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n: subtract row and column means, add back the grand mean."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def cosine_normalise(kernel: torch.Tensor, diag_a: torch.Tensor, diag_b: torch.Tensor) -> torch.Tensor:
    """K_cos[i, j] = K[i, j] / sqrt(diag_a[i] * diag_b[j]) with diag_* = the self-kernels (squared norms).

    kernel: [A, B]; diag_a: [A]; diag_b: [B]. Zero-norm rows/columns give 0.
    """
    if kernel.dim() != 2 or kernel.shape != (diag_a.numel(), diag_b.numel()):
        raise ValueError(
            f"cosine_normalise: kernel {tuple(kernel.shape)} does not match diagonals "
            f"({diag_a.numel()}, {diag_b.numel()})"
        )
    scale = torch.outer(diag_a.clamp_min(0).sqrt(), diag_b.clamp_min(0).sqrt())
    return torch.where(scale > 0, kernel / scale.clamp_min(torch.finfo(kernel.dtype).tiny), 0.0)


def kernel_alignment(k1: torch.Tensor, k2: torch.Tensor, centered: bool = False) -> float:
    """Kernel alignment <K1, K2>_F / (|K1|_F |K2|_F) (Cristianini et al.); ``centered`` first applies
    H K H with H = I - 11^T/n on both sides (centred kernel alignment). K1, K2: [n, m] of equal shape;
    NaN when a kernel is zero. Its permutation null: :func:`alignment_permutation_null`."""
    if k1.shape != k2.shape:
        raise ValueError(f"kernel_alignment: shapes {tuple(k1.shape)} and {tuple(k2.shape)} differ")
    a, b = k1.double(), k2.double()
    if centered:
        a, b = _centre(a), _centre(b)
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if denom > 0 else math.nan


def alignment_permutation_null(
    k1: torch.Tensor, k2: torch.Tensor, *, permutations: int = 1000, seed: int = 0, centred: bool = True
) -> dict:
    """Kernel alignment A = <K1, K2>_F / (|K1|_F |K2|_F) of two [n, n] kernels on the same items (centred,
    Cortes et al. 2012: K -> H K H, H = I - 11^T/n) and its permutation null: K2 -> P K2 P^T for random
    permutations P (rows and columns together; centring commutes with it). Returns alignment, null_mean,
    null_q95 (95% quantile of the null), p_value = (1 + #{null >= A}) / (permutations + 1) (a null within
    1e-10 of A counts), permutations, centred."""
    a, b = (torch.as_tensor(k).detach().to("cpu", _F64) for k in (k1, k2))
    if a.dim() != 2 or a.shape[0] != a.shape[1] or a.shape != b.shape:
        raise ValueError(
            f"alignment: expected two [n, n] kernels on the same items, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("alignment: a kernel contains NaN or Inf")
    if not (isinstance(permutations, int) and permutations >= 1):
        raise ValueError(f"permutations: expected a positive int, got {permutations!r}")
    if centred:
        a, b = _centre(a), _centre(b)
    norm = a.norm() * b.norm()
    if norm == 0:
        raise ValueError(f"alignment: a kernel has zero Frobenius norm{' after centring' if centred else ''}")
    n = a.shape[0]
    alignment = float((a * b).sum() / norm)
    generator = torch.Generator().manual_seed(seed)
    perms = torch.argsort(torch.rand(permutations, n, generator=generator), dim=1)
    step = max(1, _CHUNK_ELEMENTS // (n * n))
    null = torch.cat([(a * b[p[:, :, None], p[:, None, :]]).sum((1, 2)) / norm for p in perms.split(step)])
    return {
        "alignment": alignment,
        "null_mean": float(null.mean()),
        "null_q95": float(torch.quantile(null, 0.95)),
        "p_value": (1 + int((null >= alignment - _ALIGNMENT_TIE).sum())) / (permutations + 1),
        "permutations": permutations,
        "centred": centred,
    }


def random_like_update(delta: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random-direction null of an update: per tensor a standard Gaussian direction rescaled to that
    tensor's Frobenius norm, r_k = g_k |delta_k|_F / |g_k|_F (drawn in float64 on the CPU in sorted-name
    order, so the same seed and names give the same directions on any device; then cast to delta_k's
    dtype and device). A zero tensor stays zero."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(delta):
        d = delta[name]
        if not (isinstance(d, torch.Tensor) and d.is_floating_point()):
            raise ValueError(f"random_like_update: {name!r} is not a floating-point tensor")
        d64 = d.detach().to("cpu", _F64)
        if not torch.isfinite(d64).all():
            raise ValueError(f"random_like_update: {name!r} contains NaN or Inf")
        g = torch.randn(d.shape, generator=generator, dtype=_F64)
        norm = d64.norm()
        r = g * (norm / g.norm()) if norm > 0 else torch.zeros_like(g)
        out[name] = r.to(d.device, d.dtype)
    return {name: out[name] for name in delta}
