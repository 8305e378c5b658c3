"""Per-sample training objectives: ``loss_fn(model, batch) -> Tensor[B]``.

A batch is a dict of B items. Always: ``"prompts"`` (list[str]) and ``"images"`` (LongTensor[B, L],
the SFT target or the DPO chosen image). DPO adds ``"rejected"`` (LongTensor[B, L]) and the
reference log-probabilities ``"ref_chosen"``, ``"ref_rejected"`` (Tensor[B], precomputed with the
frozen reference model, so no reference forward happens during training). Understanding replay
adds one replay pair per item: ``"replay_images"`` (LongTensor[B, L]), ``"replay_prompts"``
(list[str]) and ``"replay_labels"`` (Tensor[B]: a bool label or a soft target in [0, 1]).

Per-sample loss of item b (L = image tokens, lp = log pi(x|y) summed over image tokens):
    SFT:  l_b = -lp(x_b|y_b) / L
    DPO:  l_b = -log sigmoid(beta * [(lp(x+_b) - ref(x+_b)) - (lp(x-_b) - ref(x-_b))])
                + nll_weight * (-lp(x+_b) / L)
    both: + replay_weight * BCE(sigmoid(log_odds(replay_b)), label_b)
The step's loss is the mean of l_b over the step's batch. Its loss sources (``source_terms``, split exactly in
the optimizer step by ntkdyn.analysis.attribution): "gen", the SFT or DPO term with its NLL term, and
"und", replay_weight x the replay BCE. The per-token NLL (divided by L) keeps
the SFT/NLL scale independent of the image length; the DPO margin uses summed log-probs, as in
the formula of paper.md §3.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ntkdyn.models.base import UnifiedAdapter

LossFn = Callable[[nn.Module, dict], torch.Tensor]
TermsFn = Callable[[nn.Module, dict], dict[str, torch.Tensor]]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """-log sigmoid(beta * ((pc - rc) - (pr - rr))) per sample: Tensor[B] from four Tensor[B]."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def replay_loss(log_odds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the yes-vs-no log-odds against the anchor's target: Tensor[B].

    With a soft target t in [0, 1] (the self anchor's pre-trained P(yes)): -t log p - (1-t) log(1-p),
    p = sigmoid(log_odds); with t in {0, 1} (the oracle anchor) softplus(-log_odds) or softplus(log_odds).
    """
    return F.binary_cross_entropy_with_logits(log_odds, labels.to(log_odds.dtype), reduction="none")


def objective_terms(
    adapter: UnifiedAdapter,
    objective: str,
    beta: float = 0.1,
    nll_weight: float = 0.0,
    replay_weight: float = 0.0,
) -> TermsFn:
    """``terms(model, batch) -> {name: Tensor[B]}``: "loss" (the per-sample objective above), its loss
    sources "loss/gen" (the SFT or DPO objective with its NLL term) and, with replay, "loss/und"
    (replay_weight x the replay BCE), loss = loss/gen + loss/und, and their parts ("sft/nll"; "dpo/loss",
    "rewards/chosen", "rewards/rejected", "dpo/nll"; "replay/loss").

    Every term runs ``model``: the trainer passes its DistributedDataParallel wrapper (or the model), the
    tracker the module whose parameters it swaps.
    """
    sources = source_terms(adapter, objective, beta, nll_weight, replay_weight)

    def terms(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for source_fn in sources.values():
            out.update(source_fn(model, batch))
        out["loss"] = sum(out[f"loss/{s}"] for s in sources)
        return out

    return terms


def source_terms(
    adapter: UnifiedAdapter,
    objective: str,
    beta: float = 0.1,
    nll_weight: float = 0.0,
    replay_weight: float = 0.0,
) -> dict[str, TermsFn]:
    """One terms function per loss source, ``{"gen": ..., "und": ...}`` ("und" only with replay), each
    running only its own forwards (the sources' forwards are disjoint, so each can have its own backward):
    gen gives "loss/gen" and the objective's parts, und gives "loss/und" and "replay/loss"."""
    if objective not in ("sft", "dpo"):
        raise ValueError(f"objective: expected 'sft' or 'dpo', got {objective!r}")
    tokens = adapter.image_tokens

    def gen(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if objective == "sft":
            out["sft/nll"] = -adapter.gen_logprob(batch["prompts"], batch["images"], model) / tokens
            out["loss/gen"] = out["sft/nll"]
            return out
        # two forwards of B rows each (not one of 2B): the projector needs every forward inside a
        # per-sample fn to have one row per output
        chosen = adapter.gen_logprob(batch["prompts"], batch["images"], model)
        rejected = adapter.gen_logprob(batch["prompts"], batch["rejected"], model)
        out["dpo/loss"] = dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta)
        out["rewards/chosen"] = beta * (chosen - batch["ref_chosen"]).detach()
        out["rewards/rejected"] = beta * (rejected - batch["ref_rejected"]).detach()
        out["dpo/nll"] = -chosen / tokens
        out["loss/gen"] = out["dpo/loss"] + nll_weight * out["dpo/nll"] if nll_weight else out["dpo/loss"]
        return out

    def und(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        log_odds = adapter.judge(batch["replay_images"], batch["replay_prompts"], model).log_odds
        replay = replay_loss(log_odds, batch["replay_labels"])
        return {"replay/loss": replay, "loss/und": replay_weight * replay}

    return {"gen": gen, "und": und} if replay_weight else {"gen": gen}


def source_loss_fns(sources: dict[str, TermsFn]) -> dict[str, LossFn]:
    """``{source: loss_fn(model, batch) -> Tensor[B]}``: each source's per-sample loss ("loss/<source>")."""
    return {s: (lambda model, batch, fn=fn, s=s: fn(model, batch)[f"loss/{s}"]) for s, fn in sources.items()}


def make_loss_fn(terms: TermsFn) -> LossFn:
    """The per-sample training loss ``fn(model, batch) -> Tensor[B]`` of a terms function."""
    return lambda model, batch: terms(model, batch)["loss"]
