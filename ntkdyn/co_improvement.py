"""Co-improvement: how the current model judges the pre-trained model's own generations, against the
exact oracle. Computed at every evaluation of a ``python -m ntkdyn.track`` run (keys ``co/...``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ntkdyn.models.base import UnifiedAdapter


@torch.no_grad()
def co_improvement(adapter: UnifiedAdapter, records: Sequence, chunk: int = 256) -> dict:
    """The current model's judgement of the pre-trained model's generations against the oracle.

    records: the pre-trained evaluation's candidate records (``.prompt`` with ``.text``, ``.image``
    LongTensor[L], ``.verdict`` then, ``.oracle``). With v0 the pre-trained verdict, v the current one
    (P(yes) > 1/2) and o the oracle:
        co/fp_rejected = P(v = 0 | v0 = 1, o = 0)    former false positives now rejected
        co/tp_kept     = P(v = 1 | v0 = 1, o = 1)    true positives kept
        co/fn_accepted = P(v = 1 | v0 = 0, o = 1)    former false negatives now accepted
        co/und_win     = P(v = o | v != v0)          exact-oracle win rate over the pre-trained judge
                                                     (paper's Und-win; 0.5 when no verdict changed)
        co/judge_accuracy = P(v = o)
    A rate whose condition is empty is None.
    """
    images = torch.stack([r.image for r in records])
    texts = [r.prompt.text for r in records]
    p_yes = torch.cat(
        [
            adapter.judge(images[s : s + chunk], texts[s : s + chunk]).p_yes.float().cpu()
            for s in range(0, len(texts), chunk)
        ]
    )
    now = p_yes > 0.5
    then = torch.tensor([bool(r.verdict) for r in records])
    oracle = torch.tensor([bool(r.oracle) for r in records])

    def rate(hit: torch.Tensor, given: torch.Tensor) -> float | None:
        return (hit & given).sum().item() / given.sum().item() if given.any() else None

    changed = now != then
    return {
        "co/fp_rejected": rate(~now, then & ~oracle),
        "co/tp_kept": rate(now, then & oracle),
        "co/fn_accepted": rate(now, ~then & oracle),
        "co/und_win": rate(now == oracle, changed) if changed.any() else 0.5,
        "co/judge_accuracy": (now == oracle).float().mean().item(),
    }
