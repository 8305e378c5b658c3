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

In a run (``Selector``, SelectionConfig select_every > 0): points at step 0, every select_every steps
and at the last step, one ``SelectionRow`` each in selection.jsonl; the trained parameters of each
point kept in selection/step_SSSSSS.safetensors while the point can still be selected; the run's result
is the selected point's model. Scores are P(yes) in [0, 1], so no point's stderr can exceed
0.5 * sqrt(P / (P - 1)) / sqrt(P) = 0.5 / sqrt(P - 1) (the largest standard deviation of P values in
[0, 1]), and the best score never falls: a point scoring below best - 0.5 / sqrt(P - 1) lies below every
threshold to come and can never be selected, so its weights file is deleted (at each checkpoint:
the points that decide a deletion are all in the checkpoint, so a resumed run never needs a deleted
file).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.rundir import JsonlLog, RunDir, SelectionRow, load_tensors, read_jsonl, save_tensors
from ntkdyn.trainer.config import SelectionConfig
from ntkdyn.trainer.data import seeded_generator, stratified_prompts
from ntkdyn.trainer.distributed import Dist
from ntkdyn.world import Prompt, ShapesWorld

SELECTION_STREAM = 2000  # seeded_generator key of the selection draws (data rounds use their round index)


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


def held_out_prompts(
    world: ShapesWorld, train_prompts: Sequence[Prompt], count: int, seed: int
) -> list[Prompt]:
    """``count`` prompts of the world's train split that are not training prompts, in stratified_prompts'
    order (for P counted training prompts: stratified_prompts(world, "train", P + count, seed)[P:]).
    Eval prompts are never among them (they are the other split)."""
    trained = {p.text for p in train_prompts}
    every = stratified_prompts(world, "train", len(world.prompts("train")), seed)
    held = [p for p in every if p.text not in trained]
    if len(held) < count:
        raise ValueError(
            f"select_prompts: asked for {count} held-out prompts, the world's train split has {len(held)} "
            f"besides the {len(trained)} training prompts"
        )
    return held[:count]


class Selector:
    """The label-free selection points of a run (see the module docstring).

    At a point the adapter's current model generates ``select_candidates`` images per held-out prompt
    (chunk c of ``gen_batch`` prompts drawn with seeded_generator(seed, SELECTION_STREAM, c): the same
    draws at every point) and ``judge_model`` judges them: scores [P, N] = its P(yes). ``judge_model`` is
    a frozen copy of the model taken here, so built before any training or restore it is the pre-trained
    model. Rank 0 scores and writes files; every rank gets the points. Only the trained parameters
    (requires_grad) are kept per point: the others never change.
    """

    def __init__(
        self,
        adapter: UnifiedAdapter,
        prompts: Sequence[Prompt],
        cfg: SelectionConfig,
        temperature: float,
        gen_batch: int,
        seed: int,
        run_dir: str | os.PathLike,
        dist: Dist,
    ) -> None:
        if len(prompts) < 2:
            raise ValueError(f"select_prompts: the standard error needs >= 2 prompts, got {len(prompts)}")
        self.adapter, self.prompts, self.cfg = adapter, list(prompts), cfg
        self.temperature, self.gen_batch, self.seed, self.dist = temperature, gen_batch, seed, dist
        self.judge_model = copy.deepcopy(adapter.model).eval().requires_grad_(False)
        self.run = RunDir(run_dir)
        self.log = JsonlLog(self.run.selection_log, dist.is_main)
        self.points: list[SelectionPoint] = []

    def restore(self) -> None:
        """The points of selection.jsonl (after --resume cut it back to the checkpoint)."""
        rows = read_jsonl(self.run.selection_log)
        self.points = [SelectionPoint(r["step"], r["score"], r["stderr"]) for r in rows]

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        """The frozen judge's P(yes) of the current model's generations: Tensor[P, N]. No oracle."""
        texts, n, out = [p.text for p in self.prompts], self.cfg.select_candidates, []
        for c, start in enumerate(range(0, len(texts), self.gen_batch)):
            chunk = texts[start : start + self.gen_batch]
            generator = seeded_generator(self.seed, SELECTION_STREAM, c)
            images = self.adapter.generate(chunk, n, temperature=self.temperature, generator=generator)
            flat, repeated = images.reshape(len(chunk) * n, -1), [t for t in chunk for _ in range(n)]
            p_yes = self.adapter.judge(flat, repeated, model=self.judge_model).p_yes
            out.append(p_yes.float().cpu().reshape(len(chunk), n))
        return torch.cat(out)

    def add_point(self, step: int) -> SelectionPoint:
        """Score the model after ``step`` steps, keep its trained parameters and log its row."""
        model, point = self.adapter.model, None
        if self.dist.is_main:
            training = model.training
            model.eval()
            point = SelectionPoint.from_scores(step, self.scores())
            model.train(training)
            self.run.selection.mkdir(parents=True, exist_ok=True)
            trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
            save_tensors(self.run.selection_file(step), trained, {"step": str(step)})
        point = self.dist.broadcast_object(point)
        self.points.append(point)
        row: SelectionRow = {
            "step": step,
            "score": point.score,
            "stderr": point.stderr,
            "selected_step": select_checkpoint(self.points).step,
            "stop": self.stop,
        }
        self.log.write(row)
        return point

    @property
    def stop(self) -> bool:
        """Training has passed its best: patience > 0 and passed_best(points, patience)."""
        return self.cfg.patience > 0 and passed_best(self.points, self.cfg.patience)

    def prune(self) -> None:
        """Delete the weights of points that can never be selected: score < best - 0.5 / sqrt(P - 1)."""
        if not self.points:
            return
        bound = 0.5 * math.sqrt(len(self.prompts) / (len(self.prompts) - 1)) / math.sqrt(len(self.prompts))
        floor = max(p.score for p in self.points) - bound
        for p in self.points:
            if p.score < floor:
                self.run.selection_file(p.step).unlink(missing_ok=True)

    def select(self) -> SelectionPoint:
        """The selected point (select_checkpoint of the points so far)."""
        return select_checkpoint(self.points)

    def load(self, point: SelectionPoint) -> None:
        """Load a point's saved weights into the model (nothing to do for the last point: the model as
        it is)."""
        if point.step == max(p.step for p in self.points):
            return
        path = self.run.selection_file(point.step)
        if not path.exists():
            raise ValueError(f"selection: {path}, the weights of the selected step {point.step}, is missing")
        tensors, _ = load_tensors(path)
        params = {n: p for n, p in self.adapter.model.named_parameters() if p.requires_grad}
        if tensors.keys() != params.keys():
            raise ValueError(f"selection: {path} holds other parameters than the model's trained ones")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

    def summary(
        self, selected: SelectionPoint, last_step: int, stopped_early: bool, after_last: dict | None
    ) -> dict:
        """summary.json's "selection": selected_step, last_step, stopped_early (the patience rule ended
        training), points [[step, score, stderr], ...], after_last (the evaluation of the last step's
        model when another step was selected, else None)."""
        return {
            "selected_step": selected.step,
            "last_step": last_step,
            "stopped_early": stopped_early,
            "points": [[p.step, p.score, p.stderr] for p in self.points],
            "after_last": after_last,
        }
