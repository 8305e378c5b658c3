"""The Bayes step against an explicit per-pair computation on two copies of a tiny toy model."""

import copy

import numpy as np
import pytest
import torch

from ntkdyn.bayes_step import _edit_distance, bayes_step, competing_prompts
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.shapes_probes import Probe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_competing_prompts_are_the_prompt_and_its_nearest_edits():
    world = ToyAdapter.tiny(seed=0).world
    for category in world.categories:
        prompt = world.prompts("eval", category)[0]
        out = competing_prompts(world, prompt, edits=5, seed=0)
        assert out[0] == prompt and 2 <= len(out) <= 6
        assert len({p.key() for p in out}) == len(out)  # one text per meaning
        assert all(p.category == category for p in out)
        distances = [_edit_distance(prompt.key(), p.key()) for p in out[1:]]
        assert distances == sorted(distances) and distances[0] >= 1
        others = {p.key() for s in ("train", "eval") for p in world.prompts(s, category)} - {prompt.key()}
        if len(others) > 5:  # nothing left out is nearer than the farthest taken
            left = others - {p.key() for p in out}
            assert min(_edit_distance(prompt.key(), k) for k in left) >= distances[-1]


def test_bayes_step_against_an_explicit_computation():
    adapter = ToyAdapter.tiny(seed=0)
    world = adapter.world
    g = torch.Generator().manual_seed(0)
    prompts = [world.prompts("eval", c)[0] for c in world.categories]
    probes = [
        Probe(
            p.text,
            tuple(torch.randint(1, adapter.codebook_size, (adapter.image_tokens,), generator=g).tolist()),
            ("aligned", "misaligned")[i % 2],
            True,
            True,
        )
        for i in range(2)
        for p in prompts
    ]
    pretrained_model = copy.deepcopy(adapter.model).eval()
    pretrained = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    with torch.no_grad():
        for p in adapter.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    trained_model = copy.deepcopy(adapter.model).eval()

    got = bayes_step(adapter, world, probes, pretrained, edits=4, seed=0)

    for n, p in adapter.model.named_parameters():  # the trained weights are back
        assert torch.equal(p, dict(trained_model.named_parameters())[n])

    def per_probe(model):
        post, odds, tv, same = [], [], [], []
        with torch.no_grad():
            for probe in probes:
                y_set = competing_prompts(world, world.parse_prompt(probe.prompt), 4, 0)
                x = torch.tensor([probe.image])
                gen = [adapter.gen_logprob([y.text], x, model=model).item() for y in y_set]
                cap = [adapter.caption_logprob(x, [y.text], model=model).item() for y in y_set]
                log_pi_x = np.logaddexp.reduce(gen) - np.log(len(gen))
                post.append(gen[0] - log_pi_x - np.log(len(gen)))  # log p_G(y0|x)
                odds.append(adapter.judge(x, [probe.prompt], model=model).log_odds.item())
                p_g, p_u = np.exp(gen - np.logaddexp.reduce(gen)), np.exp(cap - np.logaddexp.reduce(cap))
                tv.append(0.5 * np.abs(p_g - p_u).sum())
                same.append(np.argmax(p_g) == np.argmax(p_u))
        return np.array(post), np.array(odds), np.array(tv), np.array(same)

    post0, odds0, tv0, same0 = per_probe(pretrained_model)
    post1, odds1, tv1, same1 = per_probe(trained_model)
    predicted, observed = post1 - post0, odds1 - odds0
    stats = got["agreement"]["yes_log_odds"]["all"]
    assert stats["pearson"] == pytest.approx(np.corrcoef(predicted, observed)[0, 1], abs=1e-4)
    assert stats["slope"] == pytest.approx(np.polyfit(predicted, observed, 1)[0], rel=1e-3, abs=1e-4)
    assert stats["n"] == len(probes) and set(got["agreement"]["yes_log_odds"]) == {
        "all",
        "aligned",
        "misaligned",
    }
    u = got["unification"]
    assert u["before"] == pytest.approx(1 - tv0.mean(), abs=1e-5)
    assert u["after"] == pytest.approx(1 - tv1.mean(), abs=1e-5)
    assert (u["same_argmax_before"], u["same_argmax_after"]) == (
        pytest.approx(same0.mean()),
        pytest.approx(same1.mean()),
    )
    with pytest.raises(ValueError, match="no probes"):
        bayes_step(adapter, world, [], pretrained)
