"""Label-free checkpoint selection on synthetic score curves with known best points."""

import math

import pytest
import torch

from ntkdyn.trainer.selection import SelectionPoint, passed_best, select_checkpoint


def noisy_curve(true_score, steps, prompts=128, candidates=8, seed=0):
    """Selection points whose per-candidate scores are Bernoulli(true_score(step)) draws: the same
    sampling noise as a judge's 0/1 verdicts on P held-out prompts x N candidates."""
    gen = torch.Generator().manual_seed(seed)
    return [
        SelectionPoint.from_scores(
            s, torch.bernoulli(torch.full((prompts, candidates), true_score(s)), generator=gen)
        )
        for s in steps
    ]


def test_from_scores_uses_prompts_as_the_independent_unit():
    scores = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    point = SelectionPoint.from_scores(7, scores)
    per_prompt = torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    assert point.step == 7
    assert point.score == pytest.approx(0.5)
    assert point.stderr == pytest.approx(per_prompt.std().item() / 2)


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="P >= 2"):
        SelectionPoint.from_scores(0, torch.ones(1, 4))
    with pytest.raises(ValueError, match="non-finite"):
        SelectionPoint.from_scores(3, torch.tensor([[0.5], [math.nan]]))
    with pytest.raises(ValueError, match="patience"):
        passed_best([SelectionPoint(0, 0.5, 0.01)], 0)


def test_rise_then_fall_picks_a_point_near_the_peak_and_notices_the_decline():
    """The issue's curve: 0.657 -> 0.721 at step 300, falling to 0.627 at step 1000."""
    steps = list(range(0, 1001, 100))

    def truth(s):
        return 0.657 + 0.064 * s / 300 if s <= 300 else 0.721 - 0.094 * (s - 300) / 700

    for seed in range(5):
        points = noisy_curve(truth, steps, seed=seed)
        chosen = select_checkpoint(points)
        assert truth(chosen.step) >= max(truth(s) for s in steps) - 0.03, (seed, chosen)
        assert passed_best(points, patience=3)
        assert not passed_best(points[:4], patience=3)  # up to the peak nothing has passed


def test_monotone_improvement_is_not_stopped_and_keeps_a_late_checkpoint():
    steps = list(range(0, 1001, 100))
    for seed in range(5):
        points = noisy_curve(lambda s: 0.6 + 0.2 * s / 1000, steps, seed=seed)
        assert not passed_best(points, patience=3)
        assert select_checkpoint(points).step >= 700


def test_training_that_only_hurts_keeps_the_pre_trained_model():
    """Generation falls from the first step on (0.66 -> 0.56): the rule keeps step 0 (or a point within
    one point of it) and notices the decline."""
    steps = list(range(0, 1001, 100))
    for seed in range(5):
        points = noisy_curve(lambda s: 0.66 - 0.1 * s / 1000, steps, seed=seed)
        assert select_checkpoint(points).step <= 100
        assert passed_best(points, patience=3)


def test_selection_does_not_depend_on_point_order():
    points = [SelectionPoint(0, 0.60, 0.01), SelectionPoint(100, 0.70, 0.02), SelectionPoint(200, 0.69, 0.02)]
    assert select_checkpoint(points).step == 100
    assert select_checkpoint(points[::-1]).step == 100
