"""Per-sample SFT/DPO/replay losses against direct computations of their formulas."""

import math

import pytest
import torch

from ntkdyn.models.toy import ToyAdapter
from ntkdyn.trainer.data import anchor_pool, stratified_prompts
from ntkdyn.trainer.losses import dpo_loss, make_loss_fn, objective_terms, replay_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dpo_loss_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    beta = 0.37
    got = dpo_loss(pc, pr, rc, rr, beta)
    for b in range(16):
        z = beta * ((pc[b].item() - rc[b].item()) - (pr[b].item() - rr[b].item()))
        # -log sigmoid(z) = log(1 + exp(-z)), written stably for both signs
        want = math.log1p(math.exp(-z)) if z > 0 else -z + math.log1p(math.exp(z))
        assert math.isclose(got[b].item(), want, rel_tol=1e-12, abs_tol=1e-12)


def test_replay_loss_is_binary_cross_entropy():
    log_odds = torch.tensor([3.0, -1.5, 0.2, -4.0], dtype=torch.float64)
    labels = torch.tensor([True, True, False, False])
    got = replay_loss(log_odds, labels)
    for b in range(4):
        p = 1 / (1 + math.exp(-log_odds[b].item()))
        want = -math.log(p) if labels[b] else -math.log(1 - p)
        assert math.isclose(got[b].item(), want, rel_tol=1e-10)


def _batch(adapter, size):
    world = adapter.world
    prompts = stratified_prompts(world, "train", size, seed=0)
    images = adapter.generate([p.text for p in prompts], 2, generator=torch.Generator().manual_seed(1))
    batch = {"prompts": [p.text for p in prompts], "images": images[:, 0], "rejected": images[:, 1]}
    batch.update(anchor_pool(adapter, world, prompts, 2 * size, "self", seed=0).batch(size, seed=0, step=1))
    return batch


def test_dpo_objective_per_sample_against_an_explicit_loop():
    adapter = ToyAdapter.tiny(seed=0)
    batch = _batch(adapter, 5)
    with torch.no_grad():
        batch["ref_chosen"] = adapter.gen_logprob(batch["prompts"], batch["images"]) + 0.3
        batch["ref_rejected"] = adapter.gen_logprob(batch["prompts"], batch["rejected"]) - 0.2
    beta, nll, replay = 0.5, 0.7, 0.9
    loss_fn = make_loss_fn(objective_terms(adapter, "dpo", beta=beta, nll_weight=nll, replay_weight=replay))
    got = loss_fn(adapter.model, batch)
    assert got.shape == (5,)
    L = adapter.image_tokens
    for b in range(5):
        y = [batch["prompts"][b]]
        lp_c = adapter.gen_logprob(y, batch["images"][b : b + 1]).double().item()
        lp_r = adapter.gen_logprob(y, batch["rejected"][b : b + 1]).double().item()
        z = beta * ((lp_c - batch["ref_chosen"][b].item()) - (lp_r - batch["ref_rejected"][b].item()))
        log_odds = adapter.judge(
            batch["replay_images"][b : b + 1], batch["replay_prompts"][b : b + 1]
        ).log_odds
        p_yes = torch.sigmoid(log_odds.double()).item()
        target = batch["replay_labels"][b].item()  # soft: the pre-trained P(yes)
        bce = -target * math.log(p_yes) - (1 - target) * math.log(1 - p_yes)
        want = math.log1p(math.exp(-z)) + nll * (-lp_c / L) + replay * bce
        assert math.isclose(got[b].item(), want, rel_tol=1e-4), (b, got[b].item(), want)


def test_sft_objective_is_per_token_nll_and_its_gradient_is_the_mean_of_per_sample_gradients():
    adapter = ToyAdapter.tiny(seed=1)
    batch = _batch(adapter, 4)
    loss_fn = make_loss_fn(objective_terms(adapter, "sft"))
    got = loss_fn(adapter.model, batch)
    L = adapter.image_tokens
    params = [p for p in adapter.model.parameters()]
    per_sample_grads = []
    for b in range(4):
        lp = adapter.gen_logprob(batch["prompts"][b : b + 1], batch["images"][b : b + 1])
        assert math.isclose(got[b].item(), -lp.item() / L, rel_tol=1e-5)
        per_sample_grads.append(torch.autograd.grad(-lp.sum() / L, params))
    mean_grad = torch.autograd.grad(got.mean(), params)
    for i, g in enumerate(mean_grad):
        want = sum(s[i] for s in per_sample_grads) / 4
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


def test_every_term_runs_the_model_it_is_given():
    """terms(model, batch) with another module equals the terms of an adapter that owns that module."""
    adapter, other = ToyAdapter.tiny(seed=0), ToyAdapter.tiny(seed=3)
    batch = _batch(adapter, 3)
    batch["ref_chosen"], batch["ref_rejected"] = torch.zeros(3), torch.zeros(3)
    for objective in ("sft", "dpo"):
        given = objective_terms(adapter, objective, nll_weight=0.5, replay_weight=1.0)(other.model, batch)
        owned = objective_terms(other, objective, nll_weight=0.5, replay_weight=1.0)(other.model, batch)
        mine = objective_terms(adapter, objective, nll_weight=0.5, replay_weight=1.0)(adapter.model, batch)
        for name in given:
            torch.testing.assert_close(given[name], owned[name], rtol=0, atol=0)
        assert not torch.allclose(given["loss"], mine["loss"])
