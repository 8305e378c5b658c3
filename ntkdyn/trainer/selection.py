"""Label-free checkpoint selection: notice when training passes its best point, without the oracle.

At every selection point (step s) the run scores itself on a held-out slice of its *training* prompts
(prompts it never trains on, so no eval prompt is touched) with a label-free signal: the frozen
pre-trained judge's P(yes) of the current model's generations. With per-prompt mean scores
q_{s,p} (p = 1..P, each the mean over N candidates):

    score_s  = mean_p q_{s,p}
    stderr_s = std_p(q_{s,p}) / sqrt(P)          (prompts are the independent unit)

Selection (the one-standard-error rule): with b = argmax_s score_s, keep the *earliest* point whose
score is at least score_b - stderr_b: the least-trained model that is statistically as good as the best
(step 0, the pre-trained model, is a candidate, so a run that never helps keeps its starting point).
Early stop: training has passed its best when the last ``patience`` points all lie below
score_b - stderr_b.
Nothing here reads an oracle or any external label: the inputs are the model's own scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SelectionPoint:
    """The label-free score of the model after ``step`` optimizer steps."""

    step: int
    score: float
    stderr: float

    @classmethod
    def from_scores(cls, step: int, scores: torch.Tensor) -> SelectionPoint:
        """scores: Tensor[P, N], per held-out prompt and candidate (e.g. the frozen judge's P(yes))."""
        if scores.dim() != 2 or scores.shape[0] < 2 or scores.shape[1] < 1:
            raise ValueError(f"scores must be [P >= 2 prompts, N >= 1 candidates], got {tuple(scores.shape)}")
        if not torch.isfinite(scores).all():
            raise ValueError(f"non-finite label-free scores at step {step}")
        per_prompt = scores.double().mean(dim=1)
        stderr = per_prompt.std(unbiased=True).item() / math.sqrt(per_prompt.numel())
        return cls(step=step, score=per_prompt.mean().item(), stderr=stderr)


def _threshold(points: Sequence[SelectionPoint]) -> float:
    """score_b - stderr_b of the best point b."""
    if not points:
        raise ValueError("no selection points")
    best = max(points, key=lambda p: p.score)
    return best.score - best.stderr


def select_checkpoint(points: Sequence[SelectionPoint]) -> SelectionPoint:
    """The earliest point within one standard error of the best (points in any order)."""
    threshold = _threshold(points)
    return min((p for p in points if p.score >= threshold), key=lambda p: p.step)


def passed_best(points: Sequence[SelectionPoint], patience: int) -> bool:
    """True when the last ``patience`` points (by step) all score below the best's one-SE threshold."""
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    ordered = sorted(points, key=lambda p: p.step)
    if len(ordered) <= patience:
        return False
    threshold = _threshold(ordered)
    return all(p.score < threshold for p in ordered[-patience:])
