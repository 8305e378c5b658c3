"""The learning-dynamics tracker: the exact first-order predictor against finite differences,
predicted vs observed change in a hand-written loop (plain API) on the toy unified model, the
logged kernels against exact_ntk, probes, statistics and the tracker's resume truncation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import spawn_workers
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from ntkdyn import ProjectionConfig, exact_ntk
from ntkdyn.analysis.measuring import first_order_change
from ntkdyn.analysis.probes import ProbeGroup
from ntkdyn.analysis.statistics import cosine_normalise, kernel_alignment, pearson
from ntkdyn.analysis.summary import summarize_dynamics
from ntkdyn.analysis.tracker import DynamicsTracker
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.rundir import RunDir, kernel_key, ntk_key, read_jsonl, truncate_tracking
from ntkdyn.shapes_probes import load_probes, probe_groups, save_probes, select_probes
from ntkdyn.trainer.distributed import leave_process_group


def float64_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=11,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation="eager").double().eval()


def sequence_logprob(model, batch):
    logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1], -1)
    return logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0].sum(1)


def test_first_order_change_matches_finite_differences():
    model = float64_llama()
    batch = {"input_ids": torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(1))}
    # a subset of the parameters moves; the others stay as they are in the model
    params = {n: p.detach().clone() for n, p in model.named_parameters() if "layers.0" in n}
    g = torch.Generator().manual_seed(2)
    direction = {n: 0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}

    def f(eps: float) -> torch.Tensor:
        moved = {n: p + eps * direction[n] for n, p in params.items()}
        with torch.no_grad():
            return torch.func.functional_call(model, moved, (), {"input_ids": batch["input_ids"]}).logits

    def value(eps: float) -> torch.Tensor:
        logp = torch.log_softmax(f(eps)[:, :-1], -1)
        return logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0].sum(1)

    f0, jvp = first_order_change(model, sequence_logprob, batch, params, direction)
    torch.testing.assert_close(f0, value(0.0), rtol=1e-12, atol=1e-12)
    # central difference, error O(eps^2); the model's rotary tables are float32 (noise ~1e-7), so eps
    # cannot be tiny
    eps = 1e-2
    central = (value(eps) - value(-eps)) / (2 * eps)
    torch.testing.assert_close(jvp, central, rtol=1e-4, atol=1e-6)
    # one-sided: the remainder f(θ+εd) - f(θ) - ε J d is second order (halving ε quarters it)
    r1 = (value(0.2) - f0 - 0.2 * jvp).abs()
    r2 = (value(0.1) - f0 - 0.1 * jvp).abs()
    assert torch.all((r1 / r2 > 3.5) & (r1 / r2 < 4.5)), r1 / r2


def toy_probes(adapter: ToyAdapter, per_category: int = 2):
    world = adapter.world
    prompts = [p.text for p in world.prompts("eval")][::7][:8]
    images = adapter.generate(prompts, 2, generator=torch.Generator().manual_seed(0))
    judged = adapter.judge(images.flatten(0, 1), [p for p in prompts for _ in range(2)]).p_yes
    records = []
    for i, prompt in enumerate(prompts):
        for j in range(2):
            image = (
                images[i, j]
                if i % 2
                else torch.as_tensor(world.sample_image(world.parse_prompt(prompt), np.random.default_rng(i)))
            )  # some truly aligned images
            records.append(
                {
                    "prompt": prompt,
                    "image": image.tolist(),
                    "verdict": bool(judged[2 * i + j] > 0.5)
                    if i % 3
                    else not bool(world.oracle(world.parse_prompt(prompt), image)),
                    "oracle": bool(world.oracle(world.parse_prompt(prompt), image)),
                }
            )

    def oracle(text, image):
        return world.oracle(world.parse_prompt(text), image)

    return records, select_probes(records, per_category, seed=0, oracle=oracle)


def train_batch(adapter: ToyAdapter, step: int) -> dict:
    world = adapter.world
    prompts = [p.text for p in world.prompts("train")][step::50][:3]
    rng = np.random.default_rng(step)
    images = torch.stack([torch.as_tensor(world.sample_image(world.parse_prompt(p), rng)) for p in prompts])
    return {"prompts": prompts, "images": images}


def test_probe_selection_categories_and_round_trip(tmp_path):
    adapter = ToyAdapter.tiny()
    records, probes = toy_probes(adapter, per_category=3)
    for p in probes:
        if p.category == "unrelated":
            assert p.oracle == adapter.world.oracle(
                adapter.world.parse_prompt(p.prompt), torch.tensor(p.image)
            )
            assert p.prompt not in [r["prompt"] for r in records if tuple(r["image"]) == p.image]
            assert p.verdict is None
        else:
            expected = "aligned" if p.oracle else ("false_positive" if p.verdict else "misaligned")
            assert p.category == expected
            assert any(r["prompt"] == p.prompt and tuple(r["image"]) == p.image for r in records)
    counts = {c: sum(p.category == c for p in probes) for c in {p.category for p in probes}}
    assert set(counts) == {"aligned", "misaligned", "false_positive", "unrelated"}
    assert all(n <= 3 for n in counts.values())
    save_probes(probes, tmp_path / "probes.json")
    assert load_probes(tmp_path / "probes.json") == probes
    with pytest.raises(ValueError, match="lacks keys"):
        select_probes([{"prompt": "a red circle"}], 2)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_tracker_in_hand_written_loop(tmp_path, optimizer):
    adapter = ToyAdapter.tiny()
    model = adapter.model
    _, probes = toy_probes(adapter, per_category=1)
    groups = probe_groups(adapter, probes)
    gen = adapter.measurement("gen")

    def loss_fn(m, batch):  # per-sample SFT loss -log pi(x|y)
        return -gen(m, batch)

    tracker = DynamicsTracker(model, groups, tmp_path, every=2, config=ProjectionConfig(kind="exact"))
    lr = 2e-4 if optimizer == "sgd" else 5e-5
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW)(model.parameters(), lr=lr)
    model.train()
    for step in range(1, 5):
        batch = train_batch(adapter, step)
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)  # stale gradients must survive the tracker untouched
        rng = torch.get_rng_state()
        tracker.before_step(step, model, loss_fn, batch)
        assert model.training and torch.equal(torch.get_rng_state(), rng)
        assert all(torch.all(p.grad == 0.5) for p in model.parameters())
        opt.zero_grad()
        loss_fn(model, batch).mean().backward()
        opt.step()
        rows = tracker.after_step(step, model, lr)
        assert model.training and len(rows) == (sum(len(g.labels) for g in groups) if step % 2 == 0 else 0)

    probe_rows = read_jsonl(tmp_path / "dynamics.jsonl")
    ntk_rows = read_jsonl(tmp_path / "ntk.jsonl")
    assert {r["step"] for r in probe_rows} == {r["step"] for r in ntk_rows} == {2, 4}
    assert {"step", "measurement", "probe", "category", "predicted", "predicted_features", "observed"} <= set(
        probe_rows[0]
    )
    predicted = torch.tensor([r["predicted"] for r in probe_rows])
    features = torch.tensor([r["predicted_features"] for r in probe_rows])
    sgd = torch.tensor([r["predicted_sgd"] for r in probe_rows])
    scale = predicted.abs().max()
    torch.testing.assert_close(features, predicted, atol=1e-4 * scale, rtol=1e-3)
    if optimizer == "sgd":  # the real update is -lr * mean_u grad L(u): the kernel form is exact
        torch.testing.assert_close(sgd, predicted, atol=1e-3 * scale, rtol=1e-3)
        # per-sample contributions sum to the kernel form
        for r in probe_rows:
            if len(r["top_train"]) == 3:
                assert sum(c for _, _, c in r["top_train"]) == pytest.approx(
                    r["predicted_sgd"], rel=1e-4, abs=1e-7
                )
    summary = summarize_dynamics(probe_rows)
    assert summary == tracker.summary()
    assert set(summary) == {"gen", "und"}
    for branch in ("gen", "und"):
        assert summary[branch]["pearson"] > 0.99
        assert abs(summary[branch]["features"]["pearson"] - summary[branch]["pearson"]) < 1e-3
        assert set(summary[branch]["categories"]) == {p.category for p in probes}
    assert set(summary["und"]["measurements"]) == {"und", "caption"}

    from safetensors import safe_open

    with safe_open(str(tmp_path / "kernels" / "step_000002.safetensors"), "pt") as f:
        k_und_gen = f.get_tensor(kernel_key("K", "und", "gen"))
        k_cos = f.get_tensor(kernel_key("Kcos", "gen", "gen"))
        labels = json.loads(f.metadata()["labels"])
    # gen and und probes are the same pairs in the same order: the shared block's diagonal is per pair
    assert labels["gen"] == labels["und"] == groups[0].labels
    torch.testing.assert_close(torch.diagonal(k_cos), torch.ones(k_cos.shape[0]), atol=1e-5, rtol=0)
    assert k_und_gen.shape == (len(labels["und"]), len(labels["gen"]))
    cross_cos, alignment = (
        ntk_rows[0][ntk_key("cross_cos", "und", "gen")],
        ntk_rows[0]["ntk/alignment/und,gen"],
    )
    assert -1 <= cross_cos <= 1 and 0 <= alignment <= 1


def test_logged_kernel_equals_exact_ntk(tmp_path):
    adapter = ToyAdapter.tiny()
    _, probes = toy_probes(adapter)
    groups = probe_groups(
        adapter, [p for p in probes if p.category == "aligned"], measurements=("gen", "und")
    )
    gen_group, und_group = groups
    expected = exact_ntk(adapter.model, und_group.fn, und_group.batch, gen_group.fn, gen_group.batch)
    tracker = DynamicsTracker(adapter.model, groups, tmp_path, every=1, config=ProjectionConfig(kind="exact"))
    tracker.before_step(1, adapter.model, None, None)
    with torch.no_grad():
        for p in adapter.model.parameters():
            p.add_(1e-3)
    rows = tracker.after_step(1, adapter.model, 0.0)
    assert all(r["predicted_sgd"] is None for r in rows)  # no loss_fn: no kernel form
    from safetensors.torch import load_file

    kernels = load_file(str(tmp_path / "kernels" / "step_000001.safetensors"))
    assert kernel_key("K", "train", "gen") not in kernels
    torch.testing.assert_close(
        kernels[kernel_key("K", "und", "gen")], expected, rtol=1e-4, atol=1e-4 * expected.abs().max()
    )


def test_kernel_between_training_samples_only_with_train_kernel(tmp_path):
    """By default the kernel file holds no K/train,train block (its B^2 products are skipped); with
    train_kernel it does, equal to the exact eNTK of the training losses at θ_before, and every other
    block is the same in both files."""
    adapter = ToyAdapter.tiny()
    _, probes = toy_probes(adapter, per_category=1)
    groups = probe_groups(adapter, probes, measurements=("gen",))
    gen = adapter.measurement("gen")

    def loss_fn(m, batch):
        return -gen(m, batch)

    batch = train_batch(adapter, 1)
    expected = exact_ntk(adapter.model, loss_fn, batch, loss_fn, batch)
    state = {n: p.detach().clone() for n, p in adapter.model.state_dict().items()}
    kernels = {}
    for train_kernel in (False, True):
        adapter.model.load_state_dict(state)
        out = tmp_path / str(train_kernel)
        tracker = DynamicsTracker(
            adapter.model,
            groups,
            out,
            every=1,
            config=ProjectionConfig(kind="exact"),
            train_kernel=train_kernel,
        )
        tracker.before_step(1, adapter.model, loss_fn, batch)
        opt = torch.optim.SGD(adapter.model.parameters(), lr=1e-4)
        loss_fn(adapter.model, batch).mean().backward()
        opt.step()
        tracker.after_step(1, adapter.model, 1e-4)
        kernels[train_kernel] = load_file(str(out / "kernels" / "step_000001.safetensors"))
    pair = {kernel_key("K", "train", "train"), kernel_key("Kcos", "train", "train")}
    assert set(kernels[True]) - set(kernels[False]) == pair
    assert kernel_key("K", "train", "gen") in kernels[False]
    for key, value in kernels[False].items():
        torch.testing.assert_close(kernels[True][key], value, rtol=0, atol=0)
    got = kernels[True][kernel_key("K", "train", "train")]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_truncate_tracking_and_torn_lines(tmp_path):
    run = RunDir(tmp_path)
    rows = [{"step": s, "x": i} for s in (1, 2, 3) for i in range(2)]
    run.kernels.mkdir()
    for s in (1, 2, 3):
        run.kernel_file(s).write_bytes(b"x")
    run.dynamics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "x"')  # killed mid-row
    run.ntk.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    assert read_jsonl(run.dynamics) == rows
    truncate_tracking(run, 2)
    assert read_jsonl(run.dynamics) == [r for r in rows if r["step"] <= 2]
    assert read_jsonl(run.ntk) == [{"step": 1}, {"step": 2}]
    assert [p.name for p in run.kernel_files()] == ["step_000001.safetensors", "step_000002.safetensors"]


def test_kernel_statistics_against_direct_formulas():
    """(Agreement statistics and their intervals: tests/test_statistics.py.)"""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 9, generator=g, dtype=torch.float64)
    k = feats @ feats.T
    cos = cosine_normalise(k, torch.diagonal(k), torch.diagonal(k))
    unit = feats / feats.norm(dim=1, keepdim=True)
    torch.testing.assert_close(cos, unit @ unit.T)
    assert kernel_alignment(k, 3 * k) == pytest.approx(1.0)
    other = torch.randn(6, 6, generator=g, dtype=torch.float64)
    expected = float((k * other).sum() / (k.norm() * other.norm()))
    assert kernel_alignment(k, other) == pytest.approx(expected)
    centred = [m - m.mean(0) - m.mean(1, keepdim=True) + m.mean() for m in (k, other)]
    expected = float((centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm()))
    assert kernel_alignment(k, other, centered=True) == pytest.approx(expected)
    with pytest.raises(ValueError, match="differ"):
        kernel_alignment(k, other[:5])


def test_summary_pools_branches_and_categories():
    rows = [
        {
            "step": s,
            "branch": b,
            "measurement": m,
            "category": c,
            "group": f"{m}/{c}",
            "probe": f"{c}/{i}",
            "before": -1.0,
            "observed": o,
            "predicted": o * 1.1 + 0.01 * s,
            "predicted_features": o,
            "predicted_sgd": None,
            "top_train": [],
        }
        for s in (1, 2)
        for b, m in (("gen", "gen"), ("und", "und"), ("und", "caption"))
        for c in ("aligned", "false_positive")
        for i, o in enumerate((0.1 * s, -0.2, 0.05 * s))
    ]
    summary = summarize_dynamics(rows)
    assert summary["und"]["clusters"] == 12 and summary["gen"]["clusters"] == 6  # probes, not rows
    lo, hi = summary["und"]["pearson_ci"]
    assert lo <= summary["und"]["pearson"] <= hi
    und = [r for r in rows if r["branch"] == "und"]
    assert summary["und"]["pearson"] == pytest.approx(
        pearson(torch.tensor([r["predicted"] for r in und]), torch.tensor([r["observed"] for r in und]))
    )
    assert summary["gen"]["features"]["pearson"] == pytest.approx(1.0)
    assert "sgd" not in summary["gen"]  # no kernel form logged
    assert summary["und"]["categories"]["aligned"]["n"] == 12
    assert summary["und"]["measurements"]["caption"]["n"] == 12


def test_bad_configuration_is_named():
    model = float64_llama()
    group = ProbeGroup("gen", sequence_logprob, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="unique"):
        DynamicsTracker(model, [group, group], "/tmp/unused-ntkdyn", every=1)
    with pytest.raises(ValueError, match="every"):
        DynamicsTracker(model, [group], "/tmp/unused-ntkdyn", every=0)
    with pytest.raises(ValueError, match="'gen/x' cannot be part of a key"):
        ProbeGroup("g", sequence_logprob, {}, measurement="gen/x")


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    raw = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    ddp = torch.nn.parallel.DistributedDataParallel(raw)
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(6, 3, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
    )
    local = {"x": x[3 * rank : 3 * rank + 3], "y": y[3 * rank : 3 * rank + 3]}  # this rank's share

    def loss_fn(m, batch):
        return (m(batch["x"]).squeeze(-1) - batch["y"]) ** 2

    def probe(m, batch):
        return m(batch["x"]).squeeze(-1)

    groups = [ProbeGroup("gen", probe, {"x": torch.randn(4, 3, generator=g, dtype=torch.float64)})]
    tracker = DynamicsTracker(raw, groups, out_dir, every=1, config=ProjectionConfig(kind="exact"))
    opt = torch.optim.SGD(raw.parameters(), lr=0.05)
    tracker.before_step(1, raw, loss_fn, local)
    loss_fn(ddp, local).mean().backward()  # DDP averages the ranks' gradients: the global mean loss
    opt.step()
    tracker.after_step(1, raw, 0.05)
    del ddp  # before the process group (leave_process_group)
    leave_process_group()


def test_ddp_gathers_training_features_and_rank0_writes(tmp_path):
    """Two gloo processes, each with half of the batch: the kernel form over the gathered training
    features equals the exact first order of the DDP update (SGD), and only rank 0 wrote."""
    spawn_workers(_ddp_worker, (2, str(tmp_path / "init"), str(tmp_path / "run")), processes=2)
    rows = read_jsonl(tmp_path / "run" / "dynamics.jsonl")
    assert len(rows) == 4  # one writer
    assert {u for r in rows for _, u, _ in r["top_train"]} <= set(range(6))
    assert max(u for r in rows for _, u, _ in r["top_train"]) >= 3  # rank 1's samples are in the kernel form
    for r in rows:
        assert r["predicted_sgd"] == pytest.approx(r["predicted"], rel=1e-6, abs=1e-10)
        assert r["predicted_features"] == pytest.approx(r["predicted"], rel=1e-6, abs=1e-10)
