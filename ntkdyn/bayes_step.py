"""The paper's Bayes step, measured (paper.md §5 and §8).

For an image x and a finite set Y(x) of competing prompts (the image's own prompt y0 and up to
``edits`` minimal edits of it: prompts of the same category whose meaning differs by the fewest
objects, colours or relation), with a uniform prior p(y) = 1/|Y|:
    generation's posterior   p_G(y|x) = softmax_y log pi(x|y),  log pi(x) = logsumexp_y log pi(x|y) - log|Y|
    understanding's          p_U(y|x) = softmax_y log pi(y|x)   (caption log-likelihoods, the same set)
Bayes: log pi(y0|x) = log pi(x|y0) - log pi(x) + C, so between two models (pre-trained -> trained)
    predicted  ΔU = ΔG - Δlog pi(x) = Δ log p_G(y0|x)
    observed   ΔU = the model's own change of its understanding of (x, y0): Δ log pi(y0|x) (caption)
               and Δ yes-log-odds (the judge)
bayes_step reports, per probe category and over all, Pearson and slope (observed on predicted) with
95% bootstrap intervals (1000 resamples of the probes), and a probability-level unification score before
and after: 1 - mean total-variation distance between p_G(.|x) and p_U(.|x), and the share of probes whose
two posteriors have the same argmax.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ntkdyn.analysis.measuring import parameters_at
from ntkdyn.analysis.statistics import agreement_with_ci
from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.shapes_probes import Probe
from ntkdyn.world import Prompt, ShapesWorld

OBSERVED = ("caption", "yes_log_odds")


def _edit_distance(a: tuple, b: tuple) -> int:
    """Object slots (in the meaning's canonical order) and relation that differ between two prompt keys."""
    (_, objects_a, relation_a), (_, objects_b, relation_b) = a, b
    differ = sum(x != y for x, y in zip(objects_a, objects_b, strict=False))
    return differ + abs(len(objects_a) - len(objects_b)) + (relation_a != relation_b)


def category_meanings(world: ShapesWorld, category: str) -> dict[tuple, Prompt]:
    """Every meaning of a category (both splits), one prompt text each: {Prompt.key(): Prompt}."""
    return {p.key(): p for split in ("train", "eval") for p in world.prompts(split, category)}


def competing_prompts(
    world: ShapesWorld, prompt: Prompt, edits: int, seed: int = 0, meanings: Mapping | None = None
) -> list[Prompt]:
    """Y(x) for an image made for ``prompt``: the prompt itself, then up to ``edits`` prompts of its
    category (both splits; one text per meaning) at the smallest edit distance (ties: a seeded order).
    meanings: category_meanings of the prompt's category (computed when not given)."""
    key = prompt.key()
    meanings = category_meanings(world, prompt.category) if meanings is None else meanings
    others = [(k, p) for k, p in meanings.items() if k != key]
    order = np.random.default_rng([seed, 17]).permutation(len(others))
    nearest = heapq.nsmallest(
        edits, range(len(others)), key=lambda i: (_edit_distance(key, others[i][0]), order[i])
    )
    return [prompt, *(others[i][1] for i in nearest)]


@torch.no_grad()
def _measure(adapter: UnifiedAdapter, probes: Sequence[Probe], sets: Sequence[Sequence[Prompt]]) -> dict:
    """Per probe: log p_G(y0|x), p_G and p_U over its set, caption log pi(y0|x), yes-log-odds of (x, y0)."""
    texts = [p.text for s in sets for p in s]
    images = torch.cat([torch.tensor([probe.image] * len(s)) for probe, s in zip(probes, sets, strict=True)])
    device = next(adapter.model.parameters()).device
    gen, cap = [], []
    for start in range(0, len(texts), 256):
        chunk_images = images[start : start + 256].to(device)
        gen.append(adapter.gen_logprob(texts[start : start + 256], chunk_images).double().cpu())
        cap.append(adapter.caption_logprob(chunk_images, texts[start : start + 256]).double().cpu())
    own = torch.tensor([probe.image for probe in probes]).to(device)
    odds = adapter.judge(own, [probe.prompt for probe in probes]).log_odds.double().cpu()
    sizes = [len(s) for s in sets]
    log_g = [torch.log_softmax(g, 0) for g in torch.cat(gen).split(sizes)]
    log_u = [torch.log_softmax(c, 0) for c in torch.cat(cap).split(sizes)]
    return {
        "log_posterior": torch.stack([g[0] for g in log_g]),
        "caption": torch.stack([c[0] for c in torch.cat(cap).split(sizes)]),
        "yes_log_odds": odds,
        "tv": torch.stack([0.5 * (g.exp() - u.exp()).abs().sum() for g, u in zip(log_g, log_u, strict=True)]),
        "same_argmax": torch.tensor(
            [bool(g.argmax() == u.argmax()) for g, u in zip(log_g, log_u, strict=True)]
        ),
    }


def bayes_step(
    adapter: UnifiedAdapter,
    world: ShapesWorld,
    probes: Sequence[Probe],
    pretrained: Mapping[str, torch.Tensor],
    *,
    edits: int = 7,
    seed: int = 0,
    resamples: int = 1000,
) -> dict:
    """The Bayes step between the pre-trained model (``pretrained``: the pre-trained values of the trained
    parameters, loaded for the measurement) and the adapter's current model, on ``probes`` (module
    docstring). Returns {"edits", "probes", "unification": {before, after, same_argmax_before,
    same_argmax_after}, "agreement": {observed: {category or "all": agreement_with_ci of observed on
    predicted ΔU}}}."""
    if not probes:
        raise ValueError("bayes_step: no probes")
    parsed = [world.parse_prompt(p.prompt) for p in probes]
    meanings = {c: category_meanings(world, c) for c in {p.category for p in parsed}}
    sets = [competing_prompts(world, p, edits, seed, meanings[p.category]) for p in parsed]
    was_training = adapter.model.training
    adapter.model.eval()
    with parameters_at(adapter.model, pretrained):
        before = _measure(adapter, probes, sets)
    after = _measure(adapter, probes, sets)
    adapter.model.train(was_training)
    predicted = after["log_posterior"] - before["log_posterior"]
    categories = [p.category for p in probes]
    agreement: dict[str, dict] = {}
    for name in OBSERVED:
        observed = after[name] - before[name]
        agreement[name] = {}
        for category in ("all", *dict.fromkeys(categories)):
            mine = [i for i, c in enumerate(categories) if category in ("all", c)]
            if len(mine) < 3:
                continue
            stats = agreement_with_ci(predicted[mine], observed[mine], resamples=resamples, seed=seed)
            agreement[name][category] = {
                k: stats[k] for k in ("n", "pearson", "pearson_ci", "slope", "slope_ci")
            }
    return {
        "edits": edits,
        "probes": len(probes),
        "set_size_mean": float(np.mean([len(s) for s in sets])),
        "unification": {
            "before": 1 - before["tv"].mean().item(),
            "after": 1 - after["tv"].mean().item(),
            "same_argmax_before": before["same_argmax"].double().mean().item(),
            "same_argmax_after": after["same_argmax"].double().mean().item(),
        },
        "agreement": agreement,
    }
