"""DPO's squeezing effect, logged (Ren & Sutherland; paper.md §5 and §8): under DPO's negative gradient
log pi of the rejected image falls, log pi of the chosen one can fall too, and the mass goes to the
model's most likely image, which rises.

SqueezingLog is a training hook (the protocol of ntkdyn.trainer.loop: ``before_step(step, model,
loss_fn, batch)`` / ``after_step(step, model, lr)``). At every ``every``-th step it measures, before
and after the optimizer step, log pi(x|y) summed over image tokens (adapter.gen_logprob, measured
without disturbing training: ntkdyn.analysis.measuring) of
    pairs:              the step's chosen (batch "images") and rejected (batch "rejected") images and
                        the greedy image of each pair's prompt
    probes/<category>:  the probe images (ntkdyn.shapes_probes) and the greedy image of each probe's
                        prompt
where the greedy image is decoded by the model before the step (adapter.generate at temperature 0:
each token the argmax given the previous ones, the usual stand-in for the argmax image, which is
intractable) and the same image is measured after the step. An adapter that cannot decode greedily
gets no greedy column ("greedy": None in its rows).

One JSONL row per measured step and group (``squeezing.jsonl`` in the run directory):
    step, group, n, logp/<kind> (mean log pi before the step), delta/<kind> (mean change over the step)
    for kind in chosen, rejected, greedy (pairs) or image, greedy (probes), and for pairs
    squeezed = share of pairs whose chosen and rejected both fell while their greedy image rose.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from ntkdyn.analysis.measuring import measuring
from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.rundir import JsonlLog, RunDir
from ntkdyn.shapes_probes import Probe


def can_decode_greedily(adapter: UnifiedAdapter, prompt: str) -> bool:
    """Whether adapter.generate accepts temperature 0 (greedy decoding)."""
    try:
        adapter.generate([prompt], 1, temperature=0.0)
    except ValueError:
        return False
    return True


class SqueezingLog:
    """The squeezing hook of a run (module docstring). probes: the run's probe set (None or empty: pairs
    only); every: measure steps divisible by it; enabled: whether this process writes the log (rank 0)."""

    def __init__(
        self,
        adapter: UnifiedAdapter,
        run_dir: str | os.PathLike,
        probes: Sequence[Probe] | None = None,
        every: int = 1,
        enabled: bool = True,
    ) -> None:
        if every < 1:
            raise ValueError(f"every: must be >= 1, got {every}")
        self.adapter, self.every = adapter, every
        self.probes = list(probes or [])
        self.log = JsonlLog(RunDir(run_dir).squeezing, enabled)
        self.greedy = can_decode_greedily(adapter, self.probes[0].prompt if self.probes else "a red circle")
        self._pending: list[tuple[str, list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def _logp(self, model: nn.Module, prompts: list[str], images: dict[str, torch.Tensor]) -> dict:
        device = next(model.parameters()).device
        with measuring(model), torch.no_grad():
            return {
                k: self.adapter.gen_logprob(prompts, x.to(device), model=model).double().cpu()
                for k, x in images.items()
            }

    def _greedy(self, prompts: list[str]) -> torch.Tensor:
        with measuring(self.adapter.model), torch.no_grad():
            return self.adapter.generate(prompts, 1, temperature=0.0)[:, 0].cpu()

    def before_step(self, step: int, model: nn.Module, loss_fn, batch: dict) -> None:
        self._pending = []
        if step % self.every:
            return
        groups: list[tuple[str, list[str], dict[str, torch.Tensor]]] = []
        if "rejected" in batch:
            pairs = {"chosen": batch["images"], "rejected": batch["rejected"]}
            groups.append(("pairs", list(batch["prompts"]), pairs))
        for category in dict.fromkeys(p.category for p in self.probes):
            chosen = [p for p in self.probes if p.category == category]
            images = torch.tensor([p.image for p in chosen], dtype=torch.long)
            groups.append((f"probes/{category}", [p.prompt for p in chosen], {"image": images}))
        for name, prompts, images in groups:
            if self.greedy:
                images = {**images, "greedy": self._greedy(prompts)}
            self._pending.append((name, prompts, images, self._logp(model, prompts, images)))

    def after_step(self, step: int, model: nn.Module, lr: float) -> None:
        rows = []
        for name, prompts, images, before in self._pending:
            after = self._logp(model, prompts, images)
            delta = {k: after[k] - before[k] for k in before}
            row = {"step": step, "group": name, "n": len(prompts)}
            for k in (*images, *([] if self.greedy else ["greedy"])):
                row[f"logp/{k}"] = before[k].mean().item() if k in before else None
                row[f"delta/{k}"] = delta[k].mean().item() if k in delta else None
            if name == "pairs":
                squeezed = None
                if self.greedy:
                    both_fell = (delta["chosen"] < 0) & (delta["rejected"] < 0)
                    squeezed = (both_fell & (delta["greedy"] > 0)).double().mean().item()
                row["squeezed"] = squeezed
            rows.append(row)
        self._pending = []
        self.log.write(*rows)


def squeezing_summary(rows: Sequence[dict]) -> dict:
    """Per group, over the logged steps: steps, the first and last logged mean log pi of each kind and
    the summed per-step changes (``total_delta/<kind>``); pairs: the mean ``squeezed`` share."""
    out: dict[str, dict] = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        mine = sorted((r for r in rows if r["group"] == group), key=lambda r: r["step"])
        kinds = [k.split("/", 1)[1] for k in mine[0] if k.startswith("logp/")]
        entry: dict = {"steps": len(mine)}
        for k in kinds:
            values = [r[f"logp/{k}"] for r in mine if r[f"logp/{k}"] is not None]
            deltas = [r[f"delta/{k}"] for r in mine if r[f"delta/{k}"] is not None]
            entry[f"first/{k}"] = values[0] if values else None
            entry[f"last/{k}"] = values[-1] if values else None
            entry[f"total_delta/{k}"] = sum(deltas) if deltas else None
        shares = [r["squeezed"] for r in mine if r.get("squeezed") is not None]
        if group == "pairs":
            entry["squeezed"] = sum(shares) / len(shares) if shares else None
        out[group] = entry
    return out
