"""Figures from a tiny tracked run: every figure is written (PNG and PDF), plots the logged
numbers, and a run lacking a figure's data gets that figure skipped with the reason."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file
from test_dynamics import toy_probes, train_batch

from ntkdyn import ProjectionConfig
from ntkdyn.analysis.tracker import DynamicsTracker
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.plot import (
    _probe_kernel,
    co_improvement,
    dynamics_scatter,
    kernel_heatmaps,
    main,
    plot_run,
    shared_kernel,
)
from ntkdyn.rundir import kernel_key, read_jsonl
from ntkdyn.shapes_probes import probe_groups

CATEGORIES = ("single_object", "counting")


def tiny_run(run_dir):
    """Two tracked SGD steps of the tiny toy model, plus evaluation, data and summary logs in the
    trainer's format."""
    adapter = ToyAdapter.tiny()
    _, probes = toy_probes(adapter, per_category=1)
    tracker = DynamicsTracker(
        adapter.model, probe_groups(adapter, probes), run_dir, every=1, config=ProjectionConfig(kind="exact")
    )
    gen = adapter.measurement("gen")
    opt = torch.optim.SGD(adapter.model.parameters(), lr=1e-4)
    for step in (1, 2):
        batch = train_batch(adapter, step)
        tracker.before_step(step, adapter.model, lambda m, b: -gen(m, b), batch)
        opt.zero_grad()
        (-gen(adapter.model, batch)).mean().backward()
        opt.step()
        tracker.after_step(step, adapter.model, 1e-4)
    evals = [
        {
            "step": s,
            "gen_alignment": 0.2 + 0.1 * s,
            "und_accuracy": 0.9 - 0.01 * s,
            "co/fp_rejected": 0.1 * s,
            "co/tp_kept": 1.0 - 0.05 * s,
        }
        for s in (0, 1, 2)
    ]
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    per_cat = {c: {"non_unification": 0.3 + 0.1 * i} for i, c in enumerate(CATEGORIES)}
    after = {c: {"non_unification": 0.2 + 0.05 * i} for i, c in enumerate(CATEGORIES)}
    (run_dir / "summary.json").write_text(
        json.dumps({"run": "dpo", "before": {"per_category": per_cat}, "after": {"per_category": after}})
    )
    data = [
        {"step": 0, "round": 0, "added_items": 10, "pool": 6},
        {"step": 2, "round": 1, "added_items": 3, "pool": 3},
    ]
    (run_dir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return evals


def test_figures_of_a_tiny_run(tmp_path, capsys):
    evals = tiny_run(tmp_path)
    assert main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for name in (
        "co_improvement",
        "dynamics_scatter",
        "kernel_heatmaps",
        "shared_kernel",
        "non_unification",
        "data_growth",
    ):
        assert f"{name:<18} written" in printed
        for fmt in ("png", "pdf"):
            assert (tmp_path / "figures" / f"{name}.{fmt}").stat().st_size > 1000

    # the curves are the logged numbers
    fig = co_improvement(evals)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    np.testing.assert_allclose(lines["generation alignment"].get_ydata(), [r["gen_alignment"] for r in evals])
    np.testing.assert_allclose(lines["former false positives rejected"].get_xdata(), [0, 1, 2])

    # one scatter point per probe row of the branch, at (predicted, observed)
    rows = read_jsonl(tmp_path / "dynamics.jsonl")
    fig = dynamics_scatter(rows)
    gen_rows = [r for r in rows if r.get("branch") == "gen"]
    offsets = fig.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(
        np.asarray(offsets), [[r["predicted"], r["observed"]] for r in gen_rows], rtol=1e-6
    )

    # the heatmap's kernel is the logged blocks, assembled symmetric with a unit diagonal
    path = tmp_path / "kernels" / "step_000002.safetensors"
    full, measurements, offsets = _probe_kernel(path)
    assert measurements == ["gen", "und", "caption"]
    np.testing.assert_allclose(full, full.T)
    np.testing.assert_allclose(np.diag(full), 1.0, atol=1e-5)
    block = load_file(str(path))[kernel_key("Kcos", "und", "gen")].numpy()
    np.testing.assert_allclose(full[offsets[1] : offsets[2], offsets[0] : offsets[1]], block)
    shown = kernel_heatmaps([path]).axes[0].images[0]
    np.testing.assert_array_equal(shown.get_array(), full)  # row 0 at the top, one cell per probe pair
    assert tuple(shown.get_extent()) == (0, len(full), len(full), 0)

    # the shared-kernel curves are the logged kernel scalars, one line per category and one over all probes
    kernel_rows = read_jsonl(tmp_path / "ntk.jsonl")
    lines = {line.get_label(): line for line in shared_kernel(kernel_rows).axes[0].lines}
    np.testing.assert_allclose(
        lines["all probes"].get_ydata(), [r["ntk/cross_cos/und,gen"] for r in kernel_rows]
    )
    np.testing.assert_allclose(
        lines["aligned"].get_ydata(), [r["ntk/cross_cos/und,gen/aligned"] for r in kernel_rows]
    )


def test_missing_data_is_skipped_with_the_reason(tmp_path):
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"step": 0, "gen_alignment": 0.5, "und_accuracy": 0.9}) + "\n"
    )
    status = plot_run(tmp_path, formats=("png",))
    assert status["co_improvement"] == "written"
    assert status["dynamics_scatter"].startswith("skipped: dynamics.jsonl")
    assert status["kernel_heatmaps"].startswith("skipped: kernels/")
    assert status["non_unification"].startswith("skipped: summary.json")
    assert status["data_growth"].startswith("skipped: data.jsonl")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["co_improvement.png"]
