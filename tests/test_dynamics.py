"""The learning-dynamics tracker: the exact first-order predictor against finite differences,
predicted vs observed change in a hand-written loop (plain API) on the toy unified model, the
logged kernels against exact_ntk, probes, statistics and the resume helper."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ntkdyn import ProjectionConfig, exact_ntk
from ntkdyn.analysis.dynamics import (
    DynamicsTracker,
    TrackingConfig,
    first_order_change,
    read_jsonl,
    summarize_dynamics,
    truncate_dynamics,
)
from ntkdyn.analysis.metrics import (
    agreement,
    cosine_normalise,
    kernel_alignment,
    pearson,
    sign_agreement,
    slope,
    spearman,
)
from ntkdyn.analysis.probes import ProbeGroup, load_probes, probe_groups, save_probes, select_probes
from ntkdyn.models.toy import ToyAdapter


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

    rows = read_jsonl(tmp_path / "dynamics.jsonl")
    probe_rows = [r for r in rows if r["kind"] == "probe"]
    assert {r["step"] for r in rows} == {2, 4}
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
                assert sum(c for _, c in r["top_train"]) == pytest.approx(
                    r["predicted_sgd"], rel=1e-4, abs=1e-7
                )
    summary = summarize_dynamics(rows)
    assert set(summary) == {"gen", "und"}
    for branch in ("gen", "und"):
        assert summary[branch]["pearson"] > 0.99
        assert abs(summary[branch]["features"]["pearson"] - summary[branch]["pearson"]) < 1e-3
        assert set(summary[branch]["categories"]) == {p.category for p in probes}
    assert set(summary["und"]["measurements"]) == {"und", "caption"}

    from safetensors import safe_open

    with safe_open(str(tmp_path / "kernels" / "step_000002.safetensors"), "pt") as f:
        k_und_gen = f.get_tensor("K/und,gen")
        k_cos = f.get_tensor("Kcos/gen,gen")
        labels = json.loads(f.metadata()["labels"])
    # gen and und probes are the same pairs in the same order: the shared block's diagonal is per pair
    assert labels["gen"] == labels["und"] == groups[0].labels
    torch.testing.assert_close(torch.diagonal(k_cos), torch.ones(k_cos.shape[0]), atol=1e-5, rtol=0)
    assert k_und_gen.shape == (len(labels["und"]), len(labels["gen"]))
    ntk_rows = [r for r in rows if r["kind"] == "ntk"]
    assert -1 <= ntk_rows[0]["ntk/cross_cos/und,gen"] <= 1 and 0 <= ntk_rows[0]["ntk/alignment/und,gen"] <= 1


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
    assert "K/train,gen" not in kernels
    torch.testing.assert_close(kernels["K/und,gen"], expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_truncate_dynamics_and_torn_lines(tmp_path):
    rows = [{"kind": "probe", "step": s, "x": i} for s in (1, 2, 3) for i in range(2)]
    (tmp_path / "kernels").mkdir()
    for s in (1, 2, 3):
        (tmp_path / "kernels" / f"step_{s:06d}.safetensors").write_bytes(b"x")
    path = tmp_path / "dynamics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "pro')  # killed mid-row
    assert read_jsonl(path) == rows
    truncate_dynamics(tmp_path, 2)
    assert read_jsonl(path) == [r for r in rows if r["step"] <= 2]
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [
        "step_000001.safetensors",
        "step_000002.safetensors",
    ]


def test_metrics_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g, dtype=torch.float64)
    y = 0.7 * x + 0.3 * torch.randn(50, generator=g, dtype=torch.float64)
    assert pearson(x, y) == pytest.approx(float(torch.corrcoef(torch.stack([x, y]))[0, 1]), abs=1e-12)
    # no ties: Spearman = 1 - 6 Σ d² / (n (n² - 1))
    d = (x.argsort().argsort() - y.argsort().argsort()).double()
    assert spearman(x, y) == pytest.approx(1 - 6 * float((d**2).sum()) / (50 * (50**2 - 1)), abs=1e-12)
    # ties share their mean rank
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.5, 2.5, 4.0])) == pytest.approx(
        1.0
    )
    solution = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y[:, None]).solution
    assert slope(x, y) == pytest.approx(float(solution[0, 0]), abs=1e-10)
    assert sign_agreement(torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([2.0, 1.0, 1.0, 0.0])) == 0.75
    assert agreement(x, y)["n"] == 50
    feats = torch.randn(6, 9, generator=g, dtype=torch.float64)
    k = feats @ feats.T
    cos = cosine_normalise(k, torch.diagonal(k), torch.diagonal(k))
    unit = feats / feats.norm(dim=1, keepdim=True)
    torch.testing.assert_close(cos, unit @ unit.T)
    assert kernel_alignment(k, 3 * k) == pytest.approx(1.0)
    other = torch.randn(6, 6, generator=g, dtype=torch.float64)
    expected = float((k * other).sum() / (k.norm() * other.norm()))
    assert kernel_alignment(k, other) == pytest.approx(expected)
    with pytest.raises(ValueError, match="3 values but y has 2"):
        pearson(torch.ones(3), torch.ones(2))


def test_summary_pools_branches_and_categories():
    rows = [
        {
            "kind": "probe",
            "step": s,
            "branch": b,
            "measurement": m,
            "category": c,
            "observed": o,
            "predicted": o * 1.1 + 0.01 * s,
            "predicted_features": o,
            "predicted_sgd": None,
        }
        for s in (1, 2)
        for b, m in (("gen", "gen"), ("und", "und"), ("und", "caption"))
        for c in ("aligned", "false_positive")
        for o in (0.1 * s, -0.2, 0.05 * s)
    ]
    summary = summarize_dynamics(rows + [{"kind": "ntk", "step": 1}])
    und = [r for r in rows if r["branch"] == "und"]
    assert summary["und"]["pearson"] == pytest.approx(
        pearson(torch.tensor([r["predicted"] for r in und]), torch.tensor([r["observed"] for r in und]))
    )
    assert summary["gen"]["features"]["pearson"] == pytest.approx(1.0)
    assert "sgd" not in summary["gen"]  # no kernel form logged
    assert summary["und"]["categories"]["aligned"]["n"] == 12
    assert summary["und"]["measurements"]["caption"]["n"] == 12


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="track_every"):
        TrackingConfig(track_every=0)
    with pytest.raises(ValueError, match="proj_kind"):
        TrackingConfig(proj_kind="sparse")
    model = float64_llama()
    group = ProbeGroup("gen", sequence_logprob, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="unique"):
        DynamicsTracker(model, [group, group], "/tmp/unused-ntkdyn", every=1)
    with pytest.raises(ValueError, match="every"):
        DynamicsTracker(model, [group], "/tmp/unused-ntkdyn", every=0)


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
    torch.distributed.destroy_process_group()


def test_ddp_gathers_training_features_and_rank0_writes(tmp_path):
    """Two gloo processes, each with half of the batch: the kernel form over the gathered training
    features equals the exact first order of the DDP update (SGD), and only rank 0 wrote."""
    # spawn, not fork: a child forked from a parent whose OpenMP pool is live can deadlock
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "run")), nprocs=2, start_method="spawn"
    )
    rows = [r for r in read_jsonl(tmp_path / "run" / "dynamics.jsonl") if r["kind"] == "probe"]
    assert len(rows) == 4  # one writer
    assert {u for r in rows for u, _ in r["top_train"]} <= set(range(6))
    assert max(u for r in rows for u, _ in r["top_train"]) >= 3  # rank 1's samples are in the kernel form
    for r in rows:
        assert r["predicted_sgd"] == pytest.approx(r["predicted"], rel=1e-6, abs=1e-10)
        assert r["predicted_features"] == pytest.approx(r["predicted"], rel=1e-6, abs=1e-10)
