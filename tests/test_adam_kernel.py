"""The Adam-aware kernel: preconditioned projected features against explicit per-sample preconditioned
gradients, and the tracker's split step (predicted_by_source, predicted_current, predicted_kernel) against
an independent float64 recomputation from torch.optim.AdamW's own state."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_gradient_stores, torchrun_track
from test_dynamics import float64_llama, sequence_logprob

from ntkdyn import ProjectionConfig
from ntkdyn.analysis import tracker as tracker_module
from ntkdyn.analysis.feature_products import consecutive_rows
from ntkdyn.analysis.probes import ProbeGroup
from ntkdyn.analysis.projector import GradientProjector
from ntkdyn.analysis.tracker import DynamicsTracker
from ntkdyn.rundir import kernel_key, load_metadata


def _ids(seed: int, n: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 11, (n, length), generator=torch.Generator().manual_seed(seed))


def _per_sample_grads(model, fn, batch) -> list[dict[str, torch.Tensor]]:
    """∇ fn(model, batch)[b] for every b, one autograd.grad per sample (the reference)."""
    params = dict(model.named_parameters())
    values = fn(model, batch)
    return [
        dict(
            zip(params, torch.autograd.grad(values[b], list(params.values()), retain_graph=True), strict=True)
        )
        for b in range(values.shape[0])
    ]


def _preconditioner(model, rank_one: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, p in model.named_parameters():
        rows, cols = p.shape[0], p[0].numel() if p.dim() else 1
        if rank_one:
            d = torch.rand(rows, 1, generator=g, dtype=p.dtype) + 0.5
            d = d * (torch.rand(1, cols, generator=g, dtype=p.dtype) + 0.5)
        else:
            d = torch.rand(rows, cols, generator=g, dtype=p.dtype) + 0.1
        out[name] = d.reshape(p.shape)
    return out


@pytest.mark.parametrize(
    "kind, k, rank_one",
    [("exact", None, False), ("dense", 64, False), ("kronecker", 4, True), ("kronecker", 64, False)],
)
def test_preconditioned_features_project_explicit_preconditioned_gradients(kind, k, rank_one):
    """Row b of per_sample(fn, batch, precondition=D) is the projection of D ∘ ∇f_b: exactly so for
    exact/dense, for Kronecker blocks formed in full (k = 64 keeps every axis) and, with a projected axis,
    when D is rank one (the factored form is then D itself)."""
    model = float64_llama()
    batch = {"input_ids": _ids(1)}
    projector = GradientProjector(model, ProjectionConfig(kind=kind, k=k))
    d = _preconditioner(model, rank_one)
    features = projector.per_sample(sequence_logprob, batch, precondition=d)
    for b, grads in enumerate(_per_sample_grads(model, sequence_logprob, batch)):
        want = projector.project_update({n: d[n] * g for n, g in grads.items()})
        tol = 64 * torch.finfo(features.dtype).eps  # float64 for exact, float32 projections otherwise
        torch.testing.assert_close(features[b], want, rtol=tol, atol=tol * want.abs().max())
    errors = projector.precondition_errors(d)
    assert max(errors.values()) < 1e-12  # exact or rank one: nothing approximated


def test_kronecker_factored_preconditioner_error_is_reported_and_bounds_the_kernel_error():
    """With a projected axis and a general D, the fused blocks use r c^T: precondition_errors names its
    relative error, nonzero exactly on those blocks, and the kernel <φ(f_a), φ_D(f_b)> stays close to
    the exact D's for D near rank one."""
    model = float64_llama()
    batch = {"input_ids": _ids(1)}
    projector = GradientProjector(model, ProjectionConfig(kind="kronecker", k=4))
    exact = GradientProjector(model, ProjectionConfig(kind="exact"))
    d = _preconditioner(model, rank_one=True)
    noise = torch.Generator().manual_seed(5)
    d = {n: x * (1 + 0.05 * torch.rand(x.shape, generator=noise, dtype=x.dtype)) for n, x in d.items()}
    approx = projector.per_sample(sequence_logprob, batch, precondition=d)
    errors = projector.precondition_errors(d)
    # the linear layers' blocks (a projected axis) are factored; the embedding's rows take D exactly
    fused = {n for n, p in model.named_parameters() if p.dim() == 2 and max(p.shape) > 4 and "embed" not in n}
    assert {n for n, e in errors.items() if e > 0} == fused
    assert all(0 < errors[n] < 0.05 for n in fused)
    ours = projector.per_sample(sequence_logprob, batch) @ approx.T
    truth = (
        exact.per_sample(sequence_logprob, batch)
        @ exact.per_sample(sequence_logprob, batch, precondition=d).T
    )
    # the random projection's own error dominates at k = 4: compare with the unpreconditioned kernel's
    plain = projector.per_sample(sequence_logprob, batch) @ projector.per_sample(sequence_logprob, batch).T
    plain_truth = exact.per_sample(sequence_logprob, batch) @ exact.per_sample(sequence_logprob, batch).T
    assert (ours - truth).norm() / truth.norm() < 2 * (plain - plain_truth).norm() / plain_truth.norm() + 0.05


def test_precondition_is_checked_by_name():
    model = float64_llama()
    projector = GradientProjector(model, ProjectionConfig(kind="exact"))
    d = _preconditioner(model, rank_one=False)
    with pytest.raises(ValueError, match="precondition lacks tracked parameters"):
        projector.per_sample(sequence_logprob, {"input_ids": _ids(1)}, precondition=dict(list(d.items())[1:]))
    name = next(iter(d))
    with pytest.raises(ValueError, match="has shape"):
        projector.per_sample(sequence_logprob, {"input_ids": _ids(1)}, precondition={**d, name: d[name][:1]})


def _source_fns():
    def gen(model, batch):
        return -sequence_logprob(model, {"input_ids": batch["x"]}) / 5

    def und(model, batch):
        return -0.5 * sequence_logprob(model, {"input_ids": batch["y"]}) / 5

    return {"gen": gen, "und": und}


@pytest.mark.parametrize("recorded", [False, True])
def test_tracker_splits_the_adamw_step_and_its_kernel_matches_explicit_preconditioned_gradients(
    tmp_path, recorded, monkeypatch
):
    """A hand-written AdamW loop (weight decay, active clipping, two loss sources on disjoint forwards)
    with the tracker's split: at every tracked step the parts sum to predicted, and each source's
    predicted_kernel equals -lr/(1-β1^t)·(1-β1)·c/B Σ_u <∇f(o), D_t ∇l_s(u)> recomputed here from explicit
    per-sample gradients at θ_before and AdamW's own v_t, and equals that source's current part (jvp).
    ``recorded``: the loop runs each source inside tracker.recording (the trainer's protocol), so that
    from the second tracked step on the training features come from the step's own backward. From the
    second tracked step on, the feature rows lie in one matrix and the products read them in place."""
    model = float64_llama()
    probes = [ProbeGroup("p", sequence_logprob, {"input_ids": _ids(7, n=4)}, measurement="gen")]
    tracker = DynamicsTracker(model, probes, tmp_path, every=2, config=ProjectionConfig(kind="exact"))
    lr, wd, max_norm = 1e-2, 0.1, 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    split = tracker.attribute(opt, model.named_parameters(), ("gen", "und"))
    sources = _source_fns()
    params = dict(model.named_parameters())
    recordings = []  # full recordings: one per probe group and, unless captured, per training source
    full = tracker.projector.per_sample_all
    tracker.projector.per_sample_all = lambda fn, *a, **k: recordings.append(fn) or full(fn, *a, **k)
    in_place = []  # per tracked step: whether feature_products got every row in one matrix
    products = tracker_module.feature_products

    def spy(probes, train, delta, conditioned, *args):
        in_place.append(
            consecutive_rows([*probes, *train.values(), delta[None], *conditioned.values()]) is not None
        )
        return products(probes, train, delta, conditioned, *args)

    monkeypatch.setattr(tracker_module, "feature_products", spy)
    for step in range(1, 5):
        batch = {"x": _ids(10 + step), "y": _ids(20 + step)}
        tracker.before_step(step, model, sources, batch)
        before = {n: p.detach().clone() for n, p in params.items()}
        opt.zero_grad()
        for name, fn in sources.items():
            with split.source(name), tracker.recording(step, name, fn, batch) as watch:
                losses = fn(model, batch)
                if recorded and watch is not None:
                    watch(losses)
                losses.mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert norm > max_norm  # the clip is active
        opt.step()
        rows = tracker.after_step(step, model, lr)
        if step % 2:
            continue
        clip = max_norm / (float(norm) + 1e-6)
        t = float(opt.state[params["lm_head.weight"]]["step"])
        scale = -lr / (1 - 0.9**t) * (1 - 0.9) * clip
        denominator = {
            n: (opt.state[p]["exp_avg_sq"] / (1 - 0.999**t)).sqrt() + 1e-8 for n, p in params.items()
        }
        with torch.no_grad():
            now = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.copy_(before[n])
        probe_grads = _per_sample_grads(model, sequence_logprob, probes[0].batch)
        want, want_layers = {}, {}
        for name, fn in sources.items():
            train_grads = _per_sample_grads(model, fn, batch)
            # per tracked parameter n: Σ_u <∇f(o), ∇l(u)>_n, and c_s(o, u) summed over u
            k_layers = [
                [sum(float((go[n] * gu[n]).sum()) for gu in train_grads) for n in params]
                for go in probe_grads
            ]
            c_layers = [
                [
                    scale
                    / len(train_grads)
                    * sum(float((go[n] * gu[n] / denominator[n]).sum()) for gu in train_grads)
                    for n in params
                ]
                for go in probe_grads
            ]
            want_layers[name] = {"Klayers": k_layers, "Clayers": c_layers}
            want[name] = torch.tensor(
                [
                    scale
                    / len(train_grads)
                    * sum(float((go[n] * gu[n] / denominator[n]).sum()) for gu in train_grads for n in params)
                    for go in probe_grads
                ],
                dtype=torch.float64,
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(now[n])
        for i, row in enumerate(rows):
            parts = row["predicted_by_source"]
            assert set(parts) == {
                "gen/current",
                "und/current",
                "gen/momentum",
                "und/momentum",
                "weight_decay",
                "rounding",
            }
            # Llama's RMSNorm computes in float32: jvps and gradients carry float32 rounding
            tol = 1e-5 * sum(abs(v) for v in parts.values())
            without_rounding = sum(v for k, v in parts.items() if k != "rounding")  # the split alone
            assert without_rounding == pytest.approx(row["predicted"], abs=tol)
            assert sum(parts.values()) == pytest.approx(row["predicted"], abs=tol)
            assert abs(parts["rounding"]) < tol  # float64 parameters hold the update
            assert row["predicted_current"] == pytest.approx(
                parts["gen/current"] + parts["und/current"], abs=tol
            )
            for name in sources:
                kernel = row["predicted_kernel_by_source"][name]
                assert kernel == pytest.approx(float(want[name][i]), abs=tol)
                assert kernel == pytest.approx(parts[f"{name}/current"], abs=tol)
            assert row["predicted_kernel"] == pytest.approx(row["predicted_current"], abs=tol)
            top = row["top_train"]
            assert len(top) == 3 and all(s in sources for s, _, _ in top)
    # step 2 records the sources in full (and calibrates the capture), step 4 captures them if recorded
    assert len(recordings) == (4 if recorded else 6)
    assert in_place == [False, True]
    from safetensors.torch import load_file

    from ntkdyn.plot import adam_kernel, attribution
    from ntkdyn.rundir import read_jsonl

    logged = read_jsonl(tmp_path / "dynamics.jsonl")
    fig = attribution(logged)  # top: share of each part per tracked step, Σ part·predicted / Σ predicted²
    lines = {line.get_label(): line for line in fig.axes[0].lines if not line.get_label().startswith("_")}
    assert set(lines) == set(logged[0]["predicted_by_source"])
    for part, line in lines.items():
        for step, share in zip(line.get_xdata(), line.get_ydata(), strict=True):
            at = [r for r in logged if r["step"] == step]
            pred = torch.tensor([r["predicted"] for r in at], dtype=torch.float64)
            value = torch.tensor([r["predicted_by_source"][part] for r in at], dtype=torch.float64)
            assert share == pytest.approx(float(value @ pred / (pred @ pred)), rel=1e-9)
    offsets = adam_kernel(logged).axes[0].collections[0].get_offsets()
    torch.testing.assert_close(
        torch.tensor(offsets.data, dtype=torch.float64),
        torch.tensor([[r["predicted_kernel"], r["predicted_current"]] for r in logged], dtype=torch.float64),
    )

    path = tmp_path / "kernels" / "step_000004.safetensors"
    kernels = load_file(str(path))
    contributions = kernels[kernel_key("C", "gen", "train_gen")]  # c_gen(o, u) [probes, B]
    layers = kernels[kernel_key("Clayers", "gen", "train_gen")]  # Σ_u c_gen(o, u) per parameter
    assert contributions.shape == (4, 3) and layers.shape == (4, len(params))
    torch.testing.assert_close(layers.sum(1), contributions.sum(1), rtol=1e-5, atol=1e-9)
    order = [list(params).index(n) for n in json.loads(load_metadata(path)["layers"])]
    for source in sources:  # each parameter's block against the explicit gradients of step 4
        for kind in ("Klayers", "Clayers"):
            expected = torch.tensor(want_layers[source][kind], dtype=torch.float64)[:, order]
            got = kernels[kernel_key(kind, "gen", f"train_{source}")].double()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    torch.testing.assert_close(
        contributions.sum(1).double(),
        torch.tensor([r["predicted_kernel_by_source"]["gen"] for r in rows], dtype=torch.float64),
        rtol=1e-5,
        atol=1e-9,
    )


def test_two_processes_split_the_step_as_one(tmp_path):
    """torchrun with 2 processes (gloo, micro-batches, one backward per source without DDP sync, the
    gradients averaged once, the split's source gradients averaged over ranks) gives the rows of one
    process: every part, the current part and the Adam-aware kernel, up to float32 summation order
    (1e-4 of the parts' magnitude over 4 steps; a wrong average would be off by O(1))."""
    from safetensors.torch import load_file

    from ntkdyn.rundir import read_jsonl
    from ntkdyn.track import parse_args, run

    args = (
        "--model toy-tiny --run sft --judge none --prompts 12 --candidates 4 --gen-batch 4 --max-steps 4 "
        "--epochs 100 --batch-size 8 --micro-batch-size 2 --lr 1e-3 --eval-prompts 6 --eval-candidates 2 "
        "--track-every 2 --probes-per-category 2 --anchor oracle --anchor-pool 16 --proj-kind exact "
        "--store-k 4 --no-figures"
    ).split()
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun_track(args, two)
    run(parse_args([*args, "--out", str(one)]))
    rows_one, rows_two = read_jsonl(one / "dynamics.jsonl"), read_jsonl(two / "dynamics.jsonl")
    assert len(rows_one) == len(rows_two) == 24
    for a, b in zip(rows_one, rows_two, strict=True):
        scale = sum(abs(v) for v in a["predicted_by_source"].values())
        assert set(a["predicted_by_source"]) == set(b["predicted_by_source"])
        for key, value in a["predicted_by_source"].items():
            assert b["predicted_by_source"][key] == pytest.approx(value, abs=1e-4 * scale)
        for key in ("predicted", "predicted_current", "predicted_kernel"):
            assert b[key] == pytest.approx(a[key], abs=1e-4 * scale)
        # the top contributors are named alike: gen samples by their training-set item (sample_ids/gen)
        assert [(s, u) for s, u, _ in a["top_train"]] == [(s, u) for s, u, _ in b["top_train"]]
    items = {u for r in rows_one for s, u, _ in r["top_train"] if s == "gen"}
    assert items and all(isinstance(u, int) and 0 <= u < 12 * 4 for u in items)
    # the gradient store (--store-k): every step's per-sample gradients, ranks gathered in batch order
    for stored in assert_same_gradient_stores(one, two, steps=4):
        assert set(stored.features) == {"gen", "und"} and set(stored.ids) == {"gen"}
        assert stored.features["gen"].shape[0] == 8
    # the kernel row's centred alignment is that of the logged blocks; its null and the cosine's interval
    from ntkdyn.analysis.statistics import kernel_alignment
    from ntkdyn.rundir import kernel_key, ntk_key

    kernel_row = read_jsonl(one / "ntk.jsonl")[0]
    blocks = load_file(str(one / "kernels" / f"step_{kernel_row['step']:06d}.safetensors"))
    centred = kernel_alignment(
        blocks[kernel_key("K", "und", "und")], blocks[kernel_key("K", "gen", "gen")], True
    )
    assert kernel_row[ntk_key("alignment_centred", "und", "gen")] == pytest.approx(centred, rel=1e-6)
    assert 0 < kernel_row[ntk_key("alignment_p", "und", "gen")] <= 1
    lo, hi = (kernel_row[ntk_key(k, "und", "gen")] for k in ("cross_cos_lo", "cross_cos_hi"))
    assert lo <= kernel_row[ntk_key("cross_cos", "und", "gen")] <= hi


def test_tracking_windows_frozen_kernel_drift_and_horizons(tmp_path):
    """window = 3 from every 3rd step: steps 3-5 and 6-8 are tracked; predicted_frozen is <∇f(θ_start),
    Δθ_t> (recomputed here from per-sample gradients at the window's start), equal to the features'
    prediction at the start; the drift of K starts at 0; the horizons pool each window's cumulative
    change, which telescopes to f(θ_{start+H}) - f(θ_start)."""
    from ntkdyn.analysis.summary import cumulative_horizons
    from ntkdyn.rundir import ntk_key, read_jsonl

    model = float64_llama()
    probes = [ProbeGroup("p", sequence_logprob, {"input_ids": _ids(7, n=4)}, measurement="gen")]
    with pytest.raises(ValueError, match="window"):
        DynamicsTracker(model, probes, tmp_path, every=3, window=4)
    tracker = DynamicsTracker(
        model, probes, tmp_path, every=3, window=3, config=ProjectionConfig(kind="exact")
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = dict(model.named_parameters())
    start_grads, rows = None, {}
    for step in range(1, 9):
        if step == 3:
            start_grads = _per_sample_grads(model, sequence_logprob, probes[0].batch)
        before = {n: p.detach().clone() for n, p in params.items()}
        tracker.before_step(step, model, _source_fns(), {"x": _ids(10 + step), "y": _ids(20 + step)})
        opt.zero_grad()
        sum(
            fn(model, {"x": _ids(10 + step), "y": _ids(20 + step)}).mean() for fn in _source_fns().values()
        ).backward()
        opt.step()
        rows[step] = tracker.after_step(step, model, 1e-2)
        if step in (3, 4, 5):
            delta = {n: p.detach() - before[n] for n, p in params.items()}
            want = [sum(float((g[n] * delta[n]).sum()) for n in params) for g in start_grads]
            got = [r["predicted_frozen"] for r in rows[step]]
            assert got == pytest.approx(want, rel=1e-6)
    assert [s for s, r in rows.items() if r] == [3, 4, 5, 6, 7, 8]
    assert [r["window_start"] for r in rows[5]] == [3] * 4 and [r["window_start"] for r in rows[7]] == [6] * 4
    for r in rows[3] + rows[6]:
        assert r["predicted_frozen"] == pytest.approx(r["predicted_features"], rel=1e-9)
    drift = [r[ntk_key("drift", "gen", "gen")] for r in read_jsonl(tmp_path / "ntk.jsonl")]
    assert drift[0] == drift[3] == 0 and min(drift[1], drift[2], drift[4], drift[5]) > 0
    logged = read_jsonl(tmp_path / "dynamics.jsonl")
    for i in range(4):  # the cumulative observed change telescopes: f before step 6 = f before 3 + Σ
        assert rows[6][i]["before"] == pytest.approx(
            rows[3][i]["before"] + sum(rows[s][i]["observed"] for s in (3, 4, 5))
        )
    horizons = cumulative_horizons(logged)["gen"]
    assert sorted(horizons) == [1, 3] and horizons[3]["windows"] == 2 and horizons[3]["exact"]["n"] == 8
    cumulative = [sum(rows[s][i]["predicted"] for s in (3, 4, 5)) for i in range(4)]
    cumulative += [sum(rows[s][i]["predicted"] for s in (6, 7, 8)) for i in range(4)]
    observed = [sum(rows[s][i]["observed"] for s in (3, 4, 5)) for i in range(4)]
    observed += [sum(rows[s][i]["observed"] for s in (6, 7, 8)) for i in range(4)]
    from ntkdyn.analysis.statistics import pearson

    assert horizons[3]["exact"]["pearson"] == pytest.approx(
        pearson(torch.tensor(cumulative), torch.tensor(observed)), rel=1e-6
    )


def test_verdict_flips_name_the_probes_and_the_samples_behind_them():
    from ntkdyn.analysis.summary import verdict_flips

    def row(probe, step, before, observed, gen, und, top):
        parts = {"gen/current": gen, "und/momentum": und}
        return {
            "group": "und",
            "probe": probe,
            "category": "false_positive",
            "step": step,
            "before": before,
            "observed": observed,
            "predicted": gen + und,
            "predicted_by_source": parts,
            "top_train": top,
        }

    rows = [
        row("fp/0", 1, 0.5, -0.3, -0.2, -0.1, [["gen", 7, -0.2], ["und", 3, -0.05]]),
        row("fp/0", 2, 0.2, -0.4, -0.3, -0.1, [["gen", 7, -0.1], ["gen", 9, -0.25]]),
        row("fp/1", 1, 0.5, -0.1, -0.1, 0.0, []),  # stays yes: 0.4 after
    ]
    (flip,) = verdict_flips(rows)
    assert flip["probe"] == "fp/0" and flip["before"] == 0.5 and flip["after"] == pytest.approx(-0.2)
    assert flip["shares"] == pytest.approx({"gen": 0.5 / 0.7, "und": 0.2 / 0.7})
    assert flip["top_train"] == [["gen", 7, pytest.approx(-0.3)], ["gen", 9, -0.25], ["und", 3, -0.05]]
