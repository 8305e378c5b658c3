"""Self-improvement data (Algorithm 1 of paper.md §3) and understanding replay.

For every prompt y: sample N candidates x_1..x_N ~ pi^gen(.|y); judge them, s_i = P(yes | x_i, q(y));
    accepted_i = s_i > accept_threshold (--judge self; default 0.5, the model's verdict),
                 the exact oracle (--judge oracle), True (--judge none), s_i <= accept_threshold
                 (--judge inverted) or the self verdict xor a seeded Bernoulli(P) flip (--judge noisy:P):
                 the last two are poor supervision on purpose (co-degradation)
    SFT set:   (y, x_i) for accepted x_i with s_i >= sft_threshold
    DPO pair:  chosen = argmax_{accepted} s_i, rejected = argmin_{rejected} s_i (the most confident
               of each side), kept when s_chosen - s_rejected >= dpo_margin
    discard:   y when no candidate is accepted (revisited by the curriculum, Algorithm 2)
The thresholds act on the model's own P(yes); with another judge they are not applied, and the
candidates are ranked by judged_scores: the model's P(yes), or 1 - P(yes) where the judge flips the
verdict (an inverted judge's DPO pair prefers the candidate the model rejects most confidently).

Generation and judging run in fixed chunks of ``gen_batch`` prompts, chunk c sampled with a generator
seeded by (seed, round, c), and chunk c done by rank ``c % world_size``: the candidates do not depend on
the number of processes. Each round is saved in the run directory (``data/round_R.safetensors`` with
the tensors and the prompt texts in its metadata; ``data/round_R.jsonl`` one readable row per prompt).

The understanding term of training replays a fixed AnchorPool of world scenes: with the default anchor
"self" its targets are the pre-trained model's own P(yes), so no external label enters training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.models.scenes import oracle_of_images, world_images
from ntkdyn.rundir import RunDir, load_tensors, save_tensors, write_jsonl
from ntkdyn.trainer.config import parse_judge
from ntkdyn.trainer.distributed import Dist
from ntkdyn.world import Prompt, ShapesWorld


def seeded_generator(*key: int) -> torch.Generator:
    """A torch.Generator seeded from a tuple of ints (mixed by numpy's SeedSequence)."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


@dataclass
class Candidates:
    """N judged candidates per prompt. images: LongTensor[P, N, L]; p_yes: Tensor[P, N] (the model's own
    P(yes)); oracle: BoolTensor[P, N] (the world's exact answer); prompt_index: LongTensor[P] into the
    run's training prompts."""

    prompt_index: torch.Tensor
    images: torch.Tensor
    p_yes: torch.Tensor
    oracle: torch.Tensor


@dataclass
class Selection:
    """Algorithm 1's decisions over P prompts (indices into the Candidates' rows).

    sft: LongTensor[S, 2] (prompt row, candidate); pairs: LongTensor[D, 3] (prompt row, chosen,
    rejected); discard: LongTensor[K] prompt rows with no accepted candidate.
    """

    sft: torch.Tensor
    pairs: torch.Tensor
    discard: torch.Tensor


def _flipped(candidates: Candidates, judge: str, seed: int, round_index: int) -> torch.Tensor:
    """BoolTensor[P, N]: the candidates whose self verdict the judge reverses (inverted: all; noisy:P:
    each independently with probability P, drawn from a generator seeded by (seed, round_index))."""
    kind, flip = parse_judge(judge)
    if kind == "inverted":
        return torch.ones_like(candidates.oracle)
    if kind == "noisy":
        return torch.rand(candidates.p_yes.shape, generator=seeded_generator(seed, 13, round_index)) < flip
    return torch.zeros_like(candidates.oracle)


def accepted_mask(
    candidates: Candidates, judge: str, threshold: float = 0.5, seed: int = 0, round_index: int = 0
) -> torch.Tensor:
    """BoolTensor[P, N]: which candidates the filter accepts (the module docstring; ``judge`` as
    trainer.config.parse_judge reads it): self: P(yes) > threshold; oracle; none: all; inverted and
    noisy:P: the self verdict reversed where the judge flips it (seeded by (seed, round_index))."""
    kind, _ = parse_judge(judge)
    if kind == "oracle":
        return candidates.oracle.clone()
    if kind == "none":
        return torch.ones_like(candidates.oracle)
    return (candidates.p_yes > threshold) ^ _flipped(candidates, judge, seed, round_index)


def judged_scores(candidates: Candidates, judge: str, seed: int = 0, round_index: int = 0) -> torch.Tensor:
    """Tensor[P, N]: the scores Algorithm 1 ranks by, consistent with accepted_mask (same seed and
    round): the model's P(yes), and 1 - P(yes) where the judge flips the verdict (so an inverted judge's
    DPO pair is its most confident "no" over its most confident "yes")."""
    flipped = _flipped(candidates, judge, seed, round_index)
    return torch.where(flipped, 1 - candidates.p_yes, candidates.p_yes)


def select(p_yes: torch.Tensor, accepted: torch.Tensor, sft_threshold: float, dpo_margin: float) -> Selection:
    """Algorithm 1 on scores p_yes [P, N] and an accept mask [P, N] (see the module docstring)."""
    if p_yes.shape != accepted.shape or p_yes.dim() != 2:
        raise ValueError(
            f"p_yes {tuple(p_yes.shape)} and accepted {tuple(accepted.shape)} must be equal [P, N]"
        )
    sft = torch.nonzero(accepted & (p_yes >= sft_threshold))
    has_yes, has_no = accepted.any(1), (~accepted).any(1)
    chosen = torch.where(accepted, p_yes, torch.full_like(p_yes, -float("inf"))).argmax(1)
    rejected = torch.where(~accepted, p_yes, torch.full_like(p_yes, float("inf"))).argmin(1)
    rows = torch.arange(len(p_yes))
    gap = p_yes[rows, chosen] - p_yes[rows, rejected]
    keep = has_yes & has_no & (gap >= dpo_margin)
    pairs = torch.stack([rows, chosen, rejected], 1)[keep]
    return Selection(sft=sft, pairs=pairs, discard=torch.nonzero(~has_yes).flatten())


@torch.no_grad()
def collect_candidates(
    adapter: UnifiedAdapter,
    world: ShapesWorld,
    prompts: Sequence[Prompt],
    prompt_index: torch.Tensor,
    n: int,
    temperature: float,
    gen_batch: int,
    seed: int,
    round_index: int,
    dist: Dist,
) -> Candidates:
    """Sample n candidates for each prompt, judge them with the model and the oracle (all ranks return the
    whole set). prompts: the P prompts to sample; prompt_index: LongTensor[P], their run-level indices."""
    chunks = [range(s, min(s + gen_batch, len(prompts))) for s in range(0, len(prompts), gen_batch)]
    mine = [c for c in range(len(chunks)) if c % dist.world_size == dist.rank]
    done = {}
    for c in tqdm(mine, desc=f"candidates round {round_index}", disable=not dist.is_main, leave=False):
        texts = [prompts[i].text for i in chunks[c]]
        images = adapter.generate(
            texts, n, temperature=temperature, generator=seeded_generator(seed, round_index, c)
        )
        flat = images.reshape(len(texts) * n, -1)
        p_yes = adapter.judge(flat, [t for t in texts for _ in range(n)]).p_yes.float().reshape(len(texts), n)
        oracle = torch.tensor(
            oracle_of_images(adapter, world, [prompts[i] for i in chunks[c] for _ in range(n)], flat)[0]
        ).reshape(len(texts), n)
        done[c] = (images.cpu(), p_yes.cpu(), oracle)
    merged = {}
    for part in dist.gather_objects(done):
        merged.update(part)
    if not chunks:  # nothing to sample (an empty discard pool)
        images = torch.zeros(0, n, adapter.image_tokens, dtype=torch.long)
        empty = torch.zeros(0, n)
        return Candidates(prompt_index.clone(), images, empty, empty.bool())
    images, p_yes, oracle = (torch.cat([merged[c][k] for c in range(len(chunks))]) for k in range(3))
    return Candidates(prompt_index=prompt_index.clone(), images=images, p_yes=p_yes, oracle=oracle)


@torch.no_grad()
def reference_logprobs(
    adapter: UnifiedAdapter, prompts: Sequence[str], images: torch.Tensor, chunk: int, dist: Dist
) -> torch.Tensor:
    """log pi_ref(x|y) of the current (reference) model: Tensor[B], in chunks split across ranks."""
    starts = list(range(0, len(prompts), chunk))
    done = {
        c: adapter.gen_logprob(prompts[s : s + chunk], images[s : s + chunk]).float().cpu()
        for c, s in enumerate(starts)
        if c % dist.world_size == dist.rank
    }
    merged = {}
    for part in dist.gather_objects(done):
        merged.update(part)
    return torch.cat([merged[c] for c in range(len(starts))]) if starts else torch.zeros(0)


@dataclass
class TrainSet:
    """Training items. prompts: list[str] of n; images: LongTensor[n, L] (SFT target / DPO chosen);
    DPO only: rejected LongTensor[n, L], ref_chosen / ref_rejected Tensor[n] (log pi_ref, summed);
    oracle_chosen / oracle_rejected: BoolTensor[n], the oracle's verdict (data quality, never trained on)."""

    prompts: list[str]
    images: torch.Tensor
    oracle_chosen: torch.Tensor
    rejected: torch.Tensor | None = None
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    oracle_rejected: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("images", "oracle_chosen", "rejected", "ref_chosen", "ref_rejected", "oracle_rejected")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def batch(self, index: torch.Tensor) -> dict:
        """The items at ``index`` as a loss batch (keys of ntkdyn.trainer.losses)."""
        out = {"prompts": [self.prompts[i] for i in index.tolist()], "images": self.images[index]}
        if self.rejected is not None:
            out.update(
                rejected=self.rejected[index],
                ref_chosen=self.ref_chosen[index],
                ref_rejected=self.ref_rejected[index],
            )
        return out

    def concat(self, other: TrainSet) -> TrainSet:
        t, o = self.tensors(), other.tensors()
        return TrainSet(prompts=self.prompts + other.prompts, **{k: torch.cat([t[k], o[k]]) for k in t})

    def stats(self) -> dict:
        """Size and oracle quality: data/size, data/precision (chosen oracle-true), data/pair_accuracy."""
        out = {"data/size": len(self)}
        if len(self):
            out["data/precision"] = self.oracle_chosen.float().mean().item()
            if self.oracle_rejected is not None:
                out["data/pair_accuracy"] = (self.oracle_chosen & ~self.oracle_rejected).float().mean().item()
        return out


def build_train_set(
    adapter: UnifiedAdapter,
    candidates: Candidates,
    selection: Selection,
    prompts: Sequence[Prompt],
    objective: str,
    chunk: int,
    dist: Dist,
) -> TrainSet:
    """SFT items or DPO pairs of a selection; DPO reference log-probs from the current model."""
    texts = [prompts[i].text for i in candidates.prompt_index.tolist()]
    if objective == "sft":
        rows, cols = selection.sft[:, 0], selection.sft[:, 1]
        return TrainSet(
            prompts=[texts[r] for r in rows.tolist()],
            images=candidates.images[rows, cols],
            oracle_chosen=candidates.oracle[rows, cols],
        )
    rows, good, bad = selection.pairs.unbind(1)
    items = [texts[r] for r in rows.tolist()]
    chosen, rejected = candidates.images[rows, good], candidates.images[rows, bad]
    return TrainSet(
        prompts=items,
        images=chosen,
        oracle_chosen=candidates.oracle[rows, good],
        rejected=rejected,
        ref_chosen=reference_logprobs(adapter, items, chosen, chunk, dist),
        ref_rejected=reference_logprobs(adapter, items, rejected, chunk, dist),
        oracle_rejected=candidates.oracle[rows, bad],
    )


def save_round(
    run_dir: Path,
    round_index: int,
    prompts: Sequence[Prompt],
    candidates: Candidates,
    accepted: torch.Tensor,
    selection: Selection,
    train_set: TrainSet,
    pool: torch.Tensor,
    info: dict,
) -> Path:
    """Write data/round_R.safetensors and data/round_R.jsonl (atomically); returns the safetensors path.

    pool: LongTensor of run-level prompt indices still in the discard pool after this round; info: a
    JSON-able description of the round (kept in the safetensors metadata)."""
    run = RunDir(run_dir)
    path = run.round_file(round_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"candidates/{k}": v.contiguous() for k, v in vars(candidates).items()}
    tensors.update({f"train/{k}": v.contiguous() for k, v in train_set.tensors().items()})
    tensors.update(
        {
            "accepted": accepted.contiguous(),
            "pool": pool.contiguous(),
            "sft": selection.sft.contiguous(),
            "pairs": selection.pairs.contiguous(),
            "discard": selection.discard.contiguous(),
        }
    )
    save_tensors(path, tensors, {"train_prompts": json.dumps(train_set.prompts), "info": json.dumps(info)})
    in_sft = {}
    for r, k in selection.sft.tolist():
        in_sft.setdefault(r, []).append(k)
    pair_of = {r: (c, j) for r, c, j in selection.pairs.tolist()}
    discarded = set(selection.discard.tolist())
    rows = (
        {
            "prompt": prompts[i].text,
            "category": prompts[i].category,
            "p_yes": [round(v, 4) for v in candidates.p_yes[r].tolist()],
            "accepted": accepted[r].tolist(),
            "oracle": candidates.oracle[r].tolist(),
            "images": candidates.images[r].tolist(),
            "sft": in_sft.get(r, []),
            "pair": pair_of.get(r),
            "discarded": r in discarded,
        }
        for r, i in enumerate(candidates.prompt_index.tolist())
    )
    write_jsonl(run.round_file(round_index, ".jsonl"), rows)
    return path


def load_round(path: Path) -> tuple[TrainSet, torch.Tensor, dict]:
    """(the round's training set, the discard pool after it, its info) from data/round_R.safetensors."""
    tensors, meta = load_tensors(path)
    fields = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("train/")}
    return (
        TrainSet(prompts=json.loads(meta["train_prompts"]), **fields),
        tensors["pool"],
        json.loads(meta["info"]),
    )


@dataclass
class AnchorPool:
    """The understanding pairs the anchor term replays, fixed for the run (paper.md §3's method trains
    only generation; this term keeps the judge where it was).

    images: LongTensor[N, L]; prompts: list[str] (N); targets: Tensor[N] in [0, 1], the target P(yes):
        anchor "self":   the pre-trained model's own P(yes) (no external label; the loss is the soft
                         cross-entropy to it, i.e. KL(pre-trained || current) plus a constant)
        anchor "oracle": the world's exact answer as 0/1 (external labels in training)
    Half the pairs are true scenes of the prompt (world.sample_image), half hard negatives
    (world.negatives); the pool holds world scenes only, never the model's own generations: anchoring
    the judge on its own generations would freeze exactly the verdicts co-improvement is about.
    """

    images: torch.Tensor
    prompts: list[str]
    targets: torch.Tensor

    def batch(self, size: int, seed: int, step: int) -> dict:
        """``size`` pairs drawn with replacement for optimizer step ``step`` (deterministic in (seed,
        step)): replay_images LongTensor[size, L], replay_prompts list[str], replay_labels Tensor[size]."""
        index = torch.randint(len(self.prompts), (size,), generator=seeded_generator(seed, 7, step))
        return {
            "replay_images": self.images[index],
            "replay_prompts": [self.prompts[i] for i in index.tolist()],
            "replay_labels": self.targets[index],
        }


def anchor_pool(
    adapter: UnifiedAdapter,
    world: ShapesWorld,
    prompts: Sequence[Prompt],
    size: int,
    anchor: str,
    seed: int,
    chunk: int = 64,
) -> AnchorPool:
    """The AnchorPool of ``size`` pairs on ``prompts`` (drawn uniformly; deterministic in ``seed``).
    Call it with the pre-trained model in ``adapter``: with anchor "self" the targets are its P(yes)
    (judged in eval mode, ``chunk`` pairs at a time); the oracle is never called then."""
    if anchor not in ("self", "oracle"):
        raise ValueError(f"anchor: expected 'self' or 'oracle' for a pool, got {anchor!r}")
    rng = np.random.default_rng([seed, 7])
    scenes, texts, chosen = [], [], []
    for b in range(size):
        prompt = prompts[int(rng.integers(len(prompts)))]
        scene = world.sample_image(prompt, rng)
        if b % 2:
            negatives = world.negatives(prompt, scene, rng)
            scene = negatives[int(rng.integers(len(negatives)))][1]
        scenes.append(scene)
        texts.append(prompt.text)
        chosen.append(prompt)
    images = world_images(adapter, world, scenes)
    if anchor == "oracle":
        targets = torch.tensor([float(world.oracle(p, x)) for p, x in zip(chosen, scenes, strict=True)])
    else:
        was_training = adapter.model.training
        adapter.model.eval()
        with torch.no_grad():
            targets = torch.cat(
                [
                    adapter.judge(images[s : s + chunk], texts[s : s + chunk]).p_yes.float()
                    for s in range(0, size, chunk)
                ]
            )
        adapter.model.train(was_training)
    return AnchorPool(images=images, prompts=texts, targets=targets)


def stratified_prompts(world: ShapesWorld, split: str, count: int, seed: int) -> list[Prompt]:
    """``count`` prompts of a split, taken round-robin over the categories from a seeded permutation of
    each (so every category is represented equally while it has prompts left)."""
    pools = []
    for c, category in enumerate(world.categories):
        prompts = world.prompts(split, category)
        order = np.random.default_rng([seed, 11, c]).permutation(len(prompts))
        pools.append([prompts[i] for i in order])
    available = sum(len(p) for p in pools)
    if count > available:
        raise ValueError(f"prompts: asked for {count} {split} prompts, the world has {available}")
    out: list[Prompt] = []
    depth = 0
    while len(out) < count:
        out.extend(p[depth] for p in pools if depth < len(p))
        depth += 1
    return out[:count]
