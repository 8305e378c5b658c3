"""The training loop: one step against a hand-made AdamW step, schedule, data stream, curriculum,
co-improvement and configuration errors."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from ntkdyn.analysis.attribution import SourceAttribution
from ntkdyn.co_improvement import co_improvement, judge_records
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.rundir import read_jsonl
from ntkdyn.trainer.config import DataConfig, TrainConfig
from ntkdyn.trainer.data import collect_candidates, stratified_prompts
from ntkdyn.trainer.distributed import Dist
from ntkdyn.trainer.loop import Trainer, learning_rate, stream_indices
from ntkdyn.trainer.losses import make_loss_fn, objective_terms

pytestmark = pytest.mark.usefixtures("one_thread")


def test_learning_rate_warmup_then_cosine():
    cfg = TrainConfig(lr=0.01, warmup_steps=4, schedule="cosine")
    lrs = [learning_rate(cfg, k, 20) for k in range(20)]
    assert lrs[:4] == pytest.approx([0.01 * (k + 1) / 5 for k in range(4)])
    assert lrs[4:] == pytest.approx(
        [0.01 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 16)) for k in range(4, 20)]
    )
    flat = TrainConfig(lr=0.01, warmup_steps=0, schedule="constant")
    assert {learning_rate(flat, k, 7) for k in range(7)} == {0.01}


def test_stream_covers_every_item_once_per_epoch():
    size, batch = 7, 3
    stream = torch.cat([stream_indices(size, batch, k, seed=0, round_index=1) for k in range(7)])  # 3 epochs
    for e in range(3):
        assert sorted(stream[e * size : (e + 1) * size].tolist()) == list(range(size))
    assert not torch.equal(stream[:size], stream[size : 2 * size])  # reshuffled each epoch


class Recorder:
    """A hook recording what the loop hands to the tracker."""

    def __init__(self, adapter):
        self.adapter, self.calls = adapter, []

    def before_step(self, step, model, loss_fns, batch):
        assert self.adapter.model is model and isinstance(model, torch.nn.Module)
        self.calls.append(
            {
                "step": step,
                "before": copy.deepcopy(model.state_dict()),
                "batch": batch,
                "sources": sorted(loss_fns),
                "loss": sum(fn(model, batch) for fn in loss_fns.values()).detach(),
            }
        )

    def after_step(self, step, model, lr):
        self.calls[-1].update(after=copy.deepcopy(model.state_dict()), lr=lr, after_step=step)


class SplittingRecorder(Recorder):
    """A Recorder that also asks the loop for the optimizer and keeps each step's split."""

    def attribute(self, optimizer, named_parameters, sources, average_over=None):
        self.split = SourceAttribution(optimizer, named_parameters, sources, average_over=average_over)
        return self.split

    def after_step(self, step, model, lr):
        super().after_step(step, model, lr)
        self.calls[-1]["parts"] = self.split.last_parts


def _configs(**train):
    t = dict(
        run="sft",
        max_steps=2,
        batch_size=6,
        micro_batch_size=2,
        warmup_steps=0,
        schedule="constant",
        lr=0.05,
        weight_decay=0.1,
        grad_clip=0.05,
        checkpoint_every=1,
        anchor_pool=16,
    )
    t.update(train)
    return TrainConfig(**t), DataConfig(judge="none", prompts="6", candidates=2, gen_batch=3)


def test_one_step_equals_a_hand_made_adamw_step_on_the_hook_batch(tmp_path):
    adapter = ToyAdapter.tiny(seed=0)
    reference = ToyAdapter.tiny(seed=0)
    prompts = stratified_prompts(adapter.world, "train", 6, seed=0)
    recorder = Recorder(adapter)
    train, data = _configs()
    trainer = Trainer(
        adapter, adapter.world, prompts, train, data, tmp_path, lambda a: {"m": 1.0}, hooks=[recorder]
    )
    out = trainer.train({"m": 0.0})
    assert out == {"step": 2, "m": 1.0}
    first = recorder.calls[0]
    assert first["step"] == first["after_step"] == 1 and first["lr"] == 0.05
    assert first["sources"] == ["gen", "und"]
    assert len(first["batch"]["prompts"]) == 6 and first["batch"]["replay_images"].shape[0] == 6

    reference.model.load_state_dict(first["before"])
    loss_fn = make_loss_fn(objective_terms(reference, "sft", replay_weight=1.0))
    loss = loss_fn(reference.model, first["batch"]).mean()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert rows[0]["loss"] == pytest.approx(first["loss"].mean().item(), rel=1e-5)
    optimizer = torch.optim.AdamW(reference.model.parameters(), lr=0.05, weight_decay=0.1)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.model.parameters(), 0.05)
    assert rows[0]["grad_norm"] == pytest.approx(norm.item(), rel=1e-4) and norm > 0.05  # clipping was active
    optimizer.step()
    # Adam's first update is about lr * sign(grad): entries whose gradient is ~eps amplify float noise,
    # so updates are compared to 2% of lr (a wrong step, clip or batch moves entries by ~lr)
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(first["after"][name], value, rtol=0, atol=0.02 * 0.05)
    moved = max((first["after"][n] - first["before"][n]).abs().max().item() for n in first["before"])
    assert moved > 0.04
    evals = read_jsonl(tmp_path / "eval.jsonl")
    assert evals == [{"step": 0, "m": 0.0}, {"step": 2, "m": 1.0}]


def test_curriculum_revisits_exactly_the_discard_pool(tmp_path):
    adapter = ToyAdapter.tiny(seed=0)
    prompts = stratified_prompts(adapter.world, "train", 12, seed=0)
    probe = collect_candidates(
        ToyAdapter.tiny(seed=0), adapter.world, prompts, torch.arange(12), 3, 1.0, 4, 0, 0, Dist()
    )
    best = probe.p_yes.max(1).values.sort().values
    threshold = float((best[5] + best[6]) / 2)  # half of the prompts get no accepted candidate in round 0
    train = TrainConfig(
        run="curriculum", rounds=3, max_steps=6, batch_size=4, micro_batch_size=4, lr=0.01, anchor_pool=16
    )
    data = DataConfig(judge="self", accept_threshold=threshold, prompts="12", candidates=3, gen_batch=4)
    Trainer(adapter, adapter.world, prompts, train, data, tmp_path, lambda a: {}).train({})
    rows = read_jsonl(tmp_path / "data.jsonl")
    assert [r["kind"] for r in rows] == ["collect", "curriculum", "curriculum"]
    assert rows[0]["pool"] == 6 and rows[0]["prompts"] == 12
    for prev, row in zip(rows, rows[1:], strict=False):
        assert row["prompts"] == prev["pool"]  # the revisit is the previous discard pool
        assert row["pool"] == row["prompts"] - row["added_prompts"]
        assert row["data/size"] == prev["data/size"] + row["added_items"]
    round0 = [json.loads(x) for x in (tmp_path / "data" / "round_0.jsonl").read_text().splitlines()]
    round1 = [json.loads(x) for x in (tmp_path / "data" / "round_1.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in round1] == [r["prompt"] for r in round0 if r["discarded"]]
    assert [r["step"] for r in rows] == [0, 2, 4]


def test_co_improvement_counts_against_the_oracle():
    class Judge:  # hand-built current judge: says yes when the first cell is non-empty
        def judge(self, images, prompts):
            p = (images[:, 0] > 0).float() * 0.8 + 0.1
            return SimpleNamespace(p_yes=p, log_odds=torch.logit(p))

    prompt = SimpleNamespace(text="a red circle")
    cases = [
        (1, True, True),
        (0, True, True),
        (0, True, False),
        (0, True, False),
        (1, True, False),
        (1, False, True),
        (0, False, False),
        (0, False, True),
    ]  # (first cell, verdict then, oracle)
    records = [
        SimpleNamespace(prompt=prompt, image=torch.tensor([c, 0, 0]), verdict=v, oracle=o)
        for c, v, o in cases
    ]
    got = co_improvement(judge_records(Judge(), records), records)
    fp = [c for c in cases if c[1] and not c[2]]
    tp = [c for c in cases if c[1] and c[2]]
    fn = [c for c in cases if not c[1] and c[2]]
    changed = [c for c in cases if bool(c[0]) != c[1]]
    assert got["co/fp_rejected"] == pytest.approx(sum(c[0] == 0 for c in fp) / len(fp))
    assert got["co/tp_kept"] == pytest.approx(sum(c[0] == 1 for c in tp) / len(tp))
    assert got["co/fn_accepted"] == pytest.approx(sum(c[0] == 1 for c in fn) / len(fn))
    assert got["co/und_win"] == pytest.approx(sum(bool(c[0]) == c[2] for c in changed) / len(changed))
    assert got["co/judge_accuracy"] == pytest.approx(sum(bool(c[0]) == c[2] for c in cases) / len(cases))


def _sums_to(parts, name, moved, ulp):
    """Σ parts = θ_after - θ_before up to the rounding of θ and 32 float32 ulps of the parts: the clip
    coefficient is known to 8 ulps (attribution.py) and the parts and torch's step round differently."""
    pieces = [parts.weight_decay[name]] + [
        x[name] for d in (parts.current, parts.momentum) for x in d.values()
    ]
    bound = 2 * ulp + 32 * torch.finfo(torch.float32).eps * sum(x.abs() for x in pieces)
    assert ((parts.total()[name] - moved).abs() <= bound).all(), name


def test_the_loop_splits_each_step_by_source_exactly(tmp_path):
    """The trainer's step split by loss source (gen: the SFT term, und: the replay term) against a
    recomputation from the two losses' gradients: step 1 of AdamW moves θ by -lr c g / (|c g| + ε) - lr wd θ,
    so the current part of a source is -lr c g^s / (|c g| + ε), g^s the mean gradient of that source's
    per-sample loss. Entries with |c g| < 1e-5 (their ratio amplifies float32 noise) are checked by
    the sum of the parts only."""
    adapter = ToyAdapter.tiny(seed=0)
    prompts = stratified_prompts(adapter.world, "train", 6, seed=0)
    recorder = SplittingRecorder(adapter)
    train, data = _configs(max_steps=2, anchor="oracle")  # the self anchor has no gradient at step 1
    Trainer(adapter, adapter.world, prompts, train, data, tmp_path, lambda a: {}, hooks=[recorder]).train({})
    first, second = recorder.calls
    reference = ToyAdapter.tiny(seed=0)
    reference.model.load_state_dict(first["before"])
    params = dict(reference.model.named_parameters())
    terms = objective_terms(reference, "sft", replay_weight=1.0)(reference.model, first["batch"])
    grads = {
        s: dict(
            zip(
                params,
                torch.autograd.grad(terms[f"loss/{s}"].mean(), list(params.values()), retain_graph=True),
                strict=True,
            )
        )
        for s in ("gen", "und")
    }
    total = {n: grads["gen"][n] + grads["und"][n] for n in params}
    clip = min(1.0, 0.05 / torch.cat([g.flatten() for g in total.values()]).norm().item())
    parts = first["parts"]
    for name, p in params.items():
        denominator = (clip * total[name]).abs() + 1e-8
        large = denominator > 1e-5
        for s in ("gen", "und"):
            want = -0.05 * clip * grads[s][name] / denominator
            torch.testing.assert_close(
                parts.current[s][name][large], want[large], rtol=1e-3, atol=1e-6 * 0.05
            )
        torch.testing.assert_close(parts.weight_decay[name], -0.05 * 0.1 * p.detach(), rtol=1e-5, atol=1e-9)
        assert not parts.momentum["gen"][name].any()  # no past steps at step 1
        moved = first["after"][name] - first["before"][name]
        ulp = torch.finfo(torch.float32).eps * first["before"][name].abs().max().item()  # rounding of θ
        _sums_to(parts, name, moved, ulp)
    assert all(parts.current[s][n].any() for s in ("gen", "und") for n in ("model.embed_tokens.weight",))
    # step 2: the past step's first moments push too, and the parts still sum to the real update
    assert any(second["parts"].momentum["und"][n].any() for n in params)
    for name in params:
        moved = second["after"][name] - second["before"][name]
        ulp = torch.finfo(torch.float32).eps * second["before"][name].abs().max().item()  # rounding of θ
        _sums_to(second["parts"], name, moved, ulp)


def test_steps_run_on_step_threads_and_the_rest_on_the_process_setting(tmp_path):
    class ThreadCounts:
        def __init__(self):
            self.seen = []

        def before_step(self, step, model, loss_fns, batch):
            self.seen.append(("before_step", torch.get_num_threads()))

        def after_step(self, step, model, lr):
            self.seen.append(("after_step", torch.get_num_threads()))

    adapter = ToyAdapter.tiny(seed=0)
    prompts = stratified_prompts(adapter.world, "train", 6, seed=0)
    counts = ThreadCounts()

    def evaluate(a):
        counts.seen.append(("evaluate", torch.get_num_threads()))
        return {"m": 1.0}

    train, data = _configs()
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        trainer = Trainer(
            adapter, adapter.world, prompts, train, data, tmp_path, evaluate, hooks=[counts], step_threads=1
        )
        trainer.train({"m": 0.0})
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert counts.seen == [("before_step", 1), ("after_step", 1)] * 2 + [("evaluate", 3)]
    assert after == 3
