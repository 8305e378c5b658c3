"""Figures of a run: ``python -m ntkdyn.plot RUN_DIR`` writes PNG and PDF into RUN_DIR/figures.

Each figure function takes the run's parsed logs and returns a matplotlib Figure (never shown),
or raises MissingData naming what the run lacks; ``plot_run`` skips those figures and says so.

    co_improvement      eval.jsonl: gen_alignment, und_accuracy, co/fp_rejected (former false
                        positives now rejected), co/tp_kept over training steps; summary.json: the
                        run's ΔAUROC and verdict rates beside the random-direction null's
    dynamics_scatter    dynamics.jsonl: predicted vs observed change per branch (columns) for the
                        exact first-order and the feature predictors (rows), coloured by category
    kernel_heatmaps     kernels/step_*.safetensors: the cosine-normalised eNTK over all probes
                        (blocks gen,gen / und,gen / und,und / caption...) at the first and last step
    shared_kernel       ntk.jsonl: same-pair cosine cos(φ_und(o), φ_gen(o)) per
                        category and kernel alignment between gen and und over training
    attribution         dynamics.jsonl (steps split by loss source): each part's share of the probes'
                        first-order change (Σ part·predicted / Σ predicted²) per branch over training
                        and per category
    adam_kernel         dynamics.jsonl: the Adam-aware kernel's and the SGD form's predictions against
                        the exact current-step part they predict, per branch
    layer_kernel        kernels/step_*.safetensors: per tracked parameter, its share of the Adam-aware
                        kernel's prediction for und probes from the generation source (Clayers)
    horizons            summary.json, ntk.jsonl (--track-window W > 1): cumulative predicted vs observed
                        over H steps (exact, frozen kernel) and the kernel drift within windows
    non_unification     summary.json: non-unification per prompt category, before and after
    data_growth         data.jsonl: training items and discard pool per round (curriculum)

The run is read through ntkdyn.rundir (file names, rows, kernel keys); nothing here imports the
projector, its kernels or Triton. (Over 400 lines: every figure of a run in one module, each a short
function of the run's files.)
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ntkdyn.analysis.statistics import pearson
from ntkdyn.rundir import (
    KernelRow,
    ProbeRow,
    RunDir,
    kernel_file_step,
    kernel_key,
    load_tensors,
    parse_ntk_key,
    read_json,
    read_jsonl,
)


class MissingData(Exception):
    """The run lacks the data a figure needs (the message says which)."""


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise MissingData(message)


def co_improvement(eval_rows: list[dict], summary: dict | None = None) -> Figure:
    """Generation alignment, understanding accuracy and false-positive rejection vs step; with a
    summary holding ``co_improvement`` two more panels: the run's ΔAUROC of P(yes) against the oracle and
    its verdict rates beside the random-direction null's, each with its 95% interval."""
    keys = {
        "gen_alignment": "generation alignment",
        "und_accuracy": "understanding accuracy",
        "co/fp_rejected": "former false positives rejected",
        "co/tp_kept": "true positives kept",
    }
    rows = sorted((r for r in eval_rows if "gen_alignment" in r), key=lambda r: r["step"])
    _need(len(rows) >= 1, "eval.jsonl has no evaluation rows (gen_alignment)")
    co = (summary or {}).get("co_improvement")
    fig = Figure(figsize=(6.5 if co is None else 13, 4), layout="constrained")
    axes = fig.subplots(
        1, 1 if co is None else 3, width_ratios=None if co is None else (2, 1, 1.4), squeeze=False
    )[0]
    ax = axes[0]
    for key, label in keys.items():
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", label=label)
    ax.set(xlabel="optimizer step", ylabel="rate", ylim=(-0.02, 1.02), title="Co-improvement during training")
    ax.legend(loc="best", fontsize=8)
    if co is None:
        return fig
    arms = {"run": co, "random null": co["null_random"]}
    for ax, names, title in (
        (axes[1], ["delta_auroc"], "ΔAUROC of P(yes) vs oracle"),
        (axes[2], ["fp_rejected", "tp_kept", "und_win"], "verdict rates, frozen set"),
    ):
        for offset, (arm, report) in zip((-0.12, 0.12), arms.items(), strict=True):
            for i, name in enumerate(names):
                value, (lo, hi) = report.get(name), report.get(f"{name}_ci", (None, None))
                if value is None or lo is None or hi is None:
                    continue
                ax.errorbar(
                    i + offset,
                    value,
                    yerr=[[value - lo], [hi - value]],
                    fmt="o" if arm == "run" else "s",
                    color="C0" if arm == "run" else "C7",
                    capsize=4,
                    label=arm if i == 0 else None,
                )
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    axes[1].axhline(0, color="k", lw=0.5)
    fig.suptitle(co["verdict"], fontsize=8)
    return fig


def dynamics_scatter(rows: Sequence[ProbeRow]) -> Figure:
    """Predicted vs observed change of every probe at every tracked step, per branch; Pearson in titles."""
    _need(bool(rows), "dynamics.jsonl has no probe rows (was tracking on?)")
    branches = list(dict.fromkeys(r["branch"] for r in rows))
    categories = list(dict.fromkeys(r["category"] for r in rows))
    tab10 = colormaps["tab10"]
    palette = {c: tab10(i % tab10.N) for i, c in enumerate(categories)}
    predictors = {"predicted": "exact first order (jvp)", "predicted_features": "features <φ, PΔθ>"}
    fig = Figure(figsize=(4.2 * len(branches), 7.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(predictors), len(branches), squeeze=False))
    for i, (key, label) in enumerate(predictors.items()):
        for j, branch in enumerate(branches):
            ax = axes[i, j]
            in_branch = [r for r in rows if r["branch"] == branch]
            x = np.array([r[key] for r in in_branch])
            y = np.array([r["observed"] for r in in_branch])
            ax.scatter(x, y, s=14, c=[palette[r["category"]] for r in in_branch], edgecolors="white", lw=0.3)
            if i == 0 and j == len(branches) - 1:
                ax.legend(
                    handles=[Line2D([], [], ls="", marker="o", color=palette[c], label=c) for c in categories]
                )
            lim = float(max(np.abs(x).max(), np.abs(y).max(), 1e-12)) * 1.05
            ax.plot([-lim, lim], [-lim, lim], color="0.5", lw=0.8, ls="--")
            ax.set(
                xlim=(-lim, lim),
                ylim=(-lim, lim),
                xlabel=f"predicted: {label}",
                ylabel="observed change",
                title=f"{branch}: Pearson {pearson(x, y):.3f} (n={len(x)})",
            )
            ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    fig.suptitle("Predicted vs observed change per probe and tracked step")
    return fig


def _probe_kernel(path: Path) -> tuple[np.ndarray, list[str], list[int]]:
    """The cosine-normalised kernel over all probes (measurements in order), their names and the
    block boundaries, from one kernels/step_*.safetensors file."""
    tensors, metadata = load_tensors(path)
    labels = json.loads(metadata["labels"])
    measurements = list(labels)
    sizes = [len(labels[m]) for m in measurements]
    full = np.zeros((sum(sizes), sum(sizes)))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for i, a in enumerate(measurements):
        for j, b in enumerate(measurements[: i + 1]):
            block = tensors[kernel_key("Kcos", a, b)].numpy()
            full[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]] = block
            full[offsets[j] : offsets[j + 1], offsets[i] : offsets[i + 1]] = block.T
    return full, measurements, offsets.tolist()


def kernel_heatmaps(kernel_paths: list[Path]) -> Figure:
    """Cosine-normalised eNTK over all probes at the first and the last tracked step."""
    _need(bool(kernel_paths), "kernels/ holds no step_*.safetensors (was tracking on?)")
    chosen = [kernel_paths[0], kernel_paths[-1]] if len(kernel_paths) > 1 else kernel_paths[:1]
    fig = Figure(figsize=(6 * len(chosen), 5.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(chosen)))
    for ax, path in zip(axes, chosen, strict=True):
        full, measurements, offsets = _probe_kernel(path)
        n = full.shape[0]  # cell (i, j) spans [j, j + 1] x [i, i + 1], row 0 at the top
        image = ax.imshow(full, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest", extent=(0, n, n, 0))
        fig.colorbar(image, ax=ax, label="cos(∇f(o), ∇f(o'))")
        for edge in offsets[1:-1]:
            ax.axhline(edge, color="k", lw=0.8)
            ax.axvline(edge, color="k", lw=0.8)
        centres = [(offsets[i] + offsets[i + 1]) / 2 for i in range(len(measurements))]
        ax.set_xticks(centres, measurements)
        ax.set_yticks(centres, measurements)
        ax.set_title(f"eNTK between probes, step {kernel_file_step(path)}")
    return fig


def shared_kernel(kernel_rows: Sequence[KernelRow]) -> Figure:
    """The shared und/gen kernel over training: same-pair cosine per category and kernel alignment."""
    rows = sorted(kernel_rows, key=lambda r: r["step"])
    keys = {k: parse_ntk_key(k) for r in rows for k in r if k.startswith("ntk/")}
    cos_keys = sorted(k for k, p in keys.items() if p.stat == "cross_cos" and (p.a, p.b) == ("und", "gen"))
    align_keys = sorted(k for k, p in keys.items() if p.stat == "alignment")
    _need(bool(cos_keys or align_keys), "ntk.jsonl has no ntk/cross_cos or ntk/alignment rows")
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for key in cos_keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        label = keys[key].category or "all probes"
        left.plot(
            *zip(*points, strict=True), marker="o", ms=3, label=label, lw=2 if label == "all probes" else 1
        )
    left.axhline(0, color="0.5", lw=0.8)
    left.set(
        xlabel="optimizer step",
        ylabel="mean cos(∇ und(o), ∇ gen(o))",
        title="Shared kernel: same-pair cosine per category",
    )
    left.legend(fontsize=8)
    for key in align_keys:
        right.plot(
            *zip(*[(r["step"], r[key]) for r in rows if key in r], strict=True),
            marker="o",
            ms=3,
            label=f"{keys[key].a},{keys[key].b}",
        )
    right.set(
        xlabel="optimizer step", ylabel="kernel alignment", title="Alignment between measurement kernels"
    )
    if align_keys:
        right.legend(fontsize=8)
    return fig


def _share(rows: Sequence[ProbeRow], part: str) -> float:
    """Σ part·predicted / Σ predicted² over rows (the parts' shares sum to 1)."""
    pred = np.array([r["predicted"] for r in rows])
    value = np.array([r["predicted_by_source"][part] for r in rows])
    return float(value @ pred / max(pred @ pred, np.finfo(float).tiny))


def attribution(rows: Sequence[ProbeRow]) -> Figure:
    """Each part of the split update's share of the probes' first-order change, per branch (columns):
    over training (top) and per category over the run (bottom)."""
    rows = [r for r in rows if r.get("predicted_by_source")]
    _need(bool(rows), "dynamics.jsonl has no rows with predicted_by_source (steps not split by source)")
    branches = list(dict.fromkeys(r["branch"] for r in rows))
    parts = list(rows[0]["predicted_by_source"])
    fig = Figure(figsize=(5.0 * len(branches), 7.0), layout="constrained")
    axes = fig.subplots(2, len(branches), squeeze=False)
    for j, branch in enumerate(branches):
        in_branch = [r for r in rows if r["branch"] == branch]
        steps = sorted({r["step"] for r in in_branch})
        categories = list(dict.fromkeys(r["category"] for r in in_branch))
        for part in parts:
            shares = [_share([r for r in in_branch if r["step"] == s], part) for s in steps]
            axes[0, j].plot(steps, shares, marker="o", ms=3, label=part)
        axes[0, j].set(title=f"{branch}: share of the change per tracked step", xlabel="step", ylabel="share")
        width = 0.8 / len(parts)
        for k, part in enumerate(parts):
            shares = [_share([r for r in in_branch if r["category"] == c], part) for c in categories]
            axes[1, j].bar(np.arange(len(categories)) + k * width, shares, width, label=part)
        axes[1, j].set_xticks(np.arange(len(categories)) + 0.4 - width / 2, categories, rotation=20)
        axes[1, j].set(title=f"{branch}: share per category (all tracked steps)", ylabel="share")
        for ax in axes[:, j]:
            ax.axhline(0, color="0.5", lw=0.6)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle("What moved the probes: the split AdamW update (current batch, momentum, decay)")
    return fig


def adam_kernel(rows: Sequence[ProbeRow]) -> Figure:
    """The kernel forms against the exact current-step part: Adam-aware kernel (top), SGD form (bottom)."""
    rows = [
        r for r in rows if r.get("predicted_kernel") is not None and r.get("predicted_current") is not None
    ]
    _need(bool(rows), "dynamics.jsonl has no rows with predicted_kernel (steps not split, or no loss_fn)")
    branches = list(dict.fromkeys(r["branch"] for r in rows))
    fig = Figure(figsize=(4.2 * len(branches), 7.6), layout="constrained")
    axes = fig.subplots(2, len(branches), squeeze=False)
    for i, (key, label) in enumerate(
        {"predicted_kernel": "Adam-aware kernel", "predicted_sgd": "SGD form"}.items()
    ):
        for j, branch in enumerate(branches):
            in_branch = [r for r in rows if r["branch"] == branch and r.get(key) is not None]
            x = np.array([r[key] for r in in_branch])
            y = np.array([r["predicted_current"] for r in in_branch])
            ax = axes[i, j]
            ax.scatter(x, y, s=8)
            lim = float(max(np.abs(y).max(), 1e-12)) * 1.05
            ax.plot([-lim, lim], [-lim, lim], color="0.5", lw=0.8, ls="--")
            r = pearson(x, y) if len(x) > 1 else float("nan")
            ax.set(
                xlabel=f"predicted: {label}",
                ylabel="exact current-step part",
                title=f"{branch}: Pearson {r:.3f}",
            )
            ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    fig.suptitle("The kernel's prediction of the current batch's first-order effect")
    return fig


def layer_kernel(kernel_paths: list[Path]) -> Figure:
    """Per tracked parameter: its share of the Adam-aware kernel's prediction Σ_u c_gen(o, u) for the
    und probes (Σ_o C_l(o) C(o) / Σ_o C(o)², C_l = that parameter's block of Clayers/und,train_gen), per
    tracked step (lines: first, middle, last) ; the blocks' shares sum to 1."""
    key = kernel_key("Clayers", "und", "train_gen")
    found = []
    for path in kernel_paths:
        tensors, metadata = load_tensors(path)
        if key in tensors and "layers" in metadata:
            found.append(
                (kernel_file_step(path), tensors[key].double().numpy(), json.loads(metadata["layers"]))
            )
    _need(bool(found), f"no kernel file holds {key} (steps not split, dense projection, or no gen source)")
    chosen = [found[0], found[len(found) // 2], found[-1]] if len(found) > 2 else found
    layers = chosen[0][2]
    fig = Figure(figsize=(max(8.0, 0.22 * len(layers)), 4.2), layout="constrained")
    ax = fig.subplots()
    for step, blocks, _ in chosen:
        total = blocks.sum(1)
        ax.plot(
            np.arange(len(layers)),
            blocks.T @ total / max(total @ total, np.finfo(float).tiny),
            marker="o",
            ms=3,
            label=f"step {step}",
        )
    ax.set_xticks(np.arange(len(layers)), [n.removeprefix("model.") for n in layers], rotation=90, fontsize=6)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_ylabel("share")
    ax.set_title(
        "und probes, gen source: each parameter's share of the Adam-aware kernel's prediction", fontsize=9
    )
    ax.legend(fontsize=7)
    return fig


def horizons(summary: dict, kernel_rows: Sequence[KernelRow]) -> Figure:
    """Tracking windows: Pearson of the cumulative change over H steps, predicted step by step (exact)
    and by the window's first features (frozen kernel), per branch (left); kernel drift
    ||K_t - K_start|| / ||K_start|| of each probe block over training (right)."""
    dynamics = summary.get("dynamics", {})
    _need(any("horizons" in s for s in dynamics.values()), "summary.json has no horizons (--track-window 1)")
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    for branch, stats in dynamics.items():
        entries = stats.get("horizons", {})
        hs = [int(h) for h in entries]
        for name, style in (("exact", "-"), ("frozen", "--")):
            values = [entries[h].get(name, {}).get("pearson") for h in entries]
            left.plot(
                hs, [np.nan if v is None else v for v in values], style, marker="o", label=f"{branch} {name}"
            )
    left.set(xlabel="horizon H (steps)", ylabel="Pearson, cumulative predicted vs observed", xscale="log")
    left.legend(fontsize=7)
    rows = sorted(kernel_rows, key=lambda r: r["step"])
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("ntk/drift/")))
    for key in keys:
        at = [r for r in rows if key in r]
        right.plot(
            [r["step"] for r in at], [r[key] for r in at], marker=".", label=key.removeprefix("ntk/drift/")
        )
    right.set(
        xlabel="step", ylabel="||K_t - K_start|| / ||K_start||", title="kernel drift within each window"
    )
    if keys:
        right.legend(fontsize=6)
    return fig


def non_unification(summary: dict) -> Figure:
    """Non-unification per prompt category (and the mean over categories) before and after training."""
    before, after = summary.get("before", {}), summary.get("after", {})
    cats = [c for c in before.get("per_category", {}) if c in after.get("per_category", {})]
    _need(bool(cats), "summary.json has no before/after per_category metrics")
    names, b_vals, a_vals = [], [], []
    for c in cats:
        b, a = (
            before["per_category"][c].get("non_unification"),
            after["per_category"][c].get("non_unification"),
        )
        if isinstance(b, int | float) and isinstance(a, int | float):
            names.append(c)
            b_vals.append(b)
            a_vals.append(a)
    _need(bool(names), "summary.json's per_category metrics hold no non_unification numbers")
    names.append("mean")
    b_vals.append(float(np.mean(b_vals)))
    a_vals.append(float(np.mean(a_vals)))
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, b_vals, 0.4, label="before")
    ax.bar(x + 0.2, a_vals, 0.4, label="after")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(
        ylabel="non-unification (own generations judged 'no')",
        title=f"Non-unification per category ({summary.get('run', 'run')})",
    )
    ax.legend()
    return fig


def data_growth(data_rows: list[dict]) -> Figure:
    """Training items and discard pool after each data round (curriculum growth)."""
    rows = sorted((r for r in data_rows if "round" in r and "pool" in r), key=lambda r: r["round"])
    _need(bool(rows), "data.jsonl has no data-round rows")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    rounds = [r["round"] for r in rows]
    added = np.cumsum([r.get("added_items", 0) for r in rows])
    ax.plot(rounds, added, marker="o", label="training items (cumulative)")
    ax.plot(rounds, [r["pool"] for r in rows], marker="s", label="discard pool (prompts)")
    ax.set(xlabel="data round", ylabel="count", title="Curriculum: data per round")
    ax.set_xticks(rounds)
    ax.legend()
    return fig


def plot_run(run_dir: str | os.PathLike, formats: tuple[str, ...] = ("png", "pdf")) -> dict[str, str]:
    """Write every figure the run has data for into RUN_DIR/figures; returns {figure: "written" or
    the reason it was skipped}."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise FileNotFoundError(f"run directory {run.root} does not exist")
    summary = read_json(run.summary) if run.summary.exists() else {}
    figures: dict[str, Callable[[], Figure]] = {
        "co_improvement": lambda: co_improvement(read_jsonl(run.eval), summary),
        "dynamics_scatter": lambda: dynamics_scatter(read_jsonl(run.dynamics)),
        "kernel_heatmaps": lambda: kernel_heatmaps(run.kernel_files()),
        "shared_kernel": lambda: shared_kernel(read_jsonl(run.ntk)),
        "attribution": lambda: attribution(read_jsonl(run.dynamics)),
        "adam_kernel": lambda: adam_kernel(read_jsonl(run.dynamics)),
        "layer_kernel": lambda: layer_kernel(run.kernel_files()),
        "horizons": lambda: horizons(summary, read_jsonl(run.ntk)),
        "non_unification": lambda: non_unification(summary),
        "data_growth": lambda: data_growth(read_jsonl(run.data_log)),
    }
    out = run.figures
    out.mkdir(exist_ok=True)
    status = {}
    for name, make in figures.items():
        try:
            fig = make()
        except MissingData as e:
            status[name] = f"skipped: {e}"
            continue
        for fmt in formats:
            fig.savefig(out / f"{name}.{fmt}", dpi=150)
        status[name] = "written"
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ntkdyn.plot RUN_DIR``: exit code 0, or 2 when RUN_DIR is not a directory."""
    parser = argparse.ArgumentParser(prog="python -m ntkdyn.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory of python -m ntkdyn.track")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        parser.error(f"run directory {args.run_dir} does not exist")
    for name, state in plot_run(args.run_dir).items():
        print(f"{name:<18} {state}")
    print(f"figures in {RunDir(args.run_dir).figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
