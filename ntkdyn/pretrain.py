"""Pre-train the toy unified model on ShapesWorld (``python -m ntkdyn.pretrain``).

Every step draws fresh examples from all the world's prompts and minimises the sum of four
losses through the adapter's own measurements:

    generation     -log pi(x|y) / L                 y -> a random true scene x
    understanding  BCE(log-odds, label)             true scene (label 1) or a negative (label 0)
    captioning     -log pi(y|x) / |y|               true scene -> its prompt
    grounding      -log pi(c|x) / |c|               true scene -> its grounded caption c

A grounded caption names every object of the scene with its cell ("a red circle top left and a
blue square middle right", ShapesWorld.grounded_caption), through the captioning sequence.
Understanding batches are minimal pairs: a prompt with a true scene and with a negative. A
negative is a hard one (ShapesWorld.negatives: a recolored, reshaped, added, removed or
re-counted object, or a relation broken by a swap or move; kinds drawn with
``negative_kind_weights``, relation and color edits more often) with a probability that rises
linearly from ``hard_start`` to ``hard_end`` over the first ``hard_ramp`` of the steps (a
curriculum), else a true scene of another prompt. AdamW, linear warm-up, cosine decay.

Relations need the grounding task, a relation stage and a larger init (measured). Judging "A left
of B" against its swapped twin needs an interaction of the prompt's objects, the scene's codes,
their cells and the relation word, and a swap leaves every lower-order feature equal: trained
with the rest at Llama's init std 0.02 and lr 3e-3, relations stayed at the BCE-ln2 plateau
(accuracy 0.00) while every other kind reached >= 0.98. The recipe therefore (1) grounds objects
(grounded captions teach each object word to fetch its cell, one factor of the interaction, with
its own gradient), (2) starts with a relation stage (``relation_warmup`` steps of understanding
on relation minimal pairs only, plus grounding), and (3) initialises with std 0.09
(~1/sqrt(hidden)) at lr 1e-3. Relation pairs alone, at std 0.09 and lr 1e-3, left the plateau
after ~450 steps without grounding and ~300 with it (train accuracy 0.98 at step 600); at std
0.02 and lr 3e-3 they stayed at chance for 600 steps without grounding and reached 0.54 by step
800 with it.

Why the gap appears: understanding is one binary decision read from the whole scene, and it
gets the larger share of the examples; generation must sample all L cells one at a time at
temperature 1, so the probability mass it leaves on wrong cells compounds over L samples, and
prompts with more constraints (counts, bindings, relations) leave more of it. Nothing corrupts
generation: both branches train to convergence of the same budget.

The default recipe's weights ship with the package (ntkdyn/models/pretrained/toy/, made by this
command on the machine its manifest.json names); ``load_adapter("toy")`` loads them and nothing ever
pre-trains on the way. This command rebuilds a recipe into ``--out`` (default
runs/pretrain/toy-<recipe hash>), with the recipe, the training log and a manifest (weights digest,
torch, machine) beside the weights; use them with ``--model toy DIR``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ntkdyn.cli import config_parser, parse_config
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.models.toy_recipe import PretrainConfig, write_manifest
from ntkdyn.trainer.loop import torch_threads
from ntkdyn.world import Prompt, ShapesWorld


class TaskSampler:
    """Draws the three tasks' examples from all of the world's prompts (pre-training is the
    model's broad supervised stage; the train/eval split separates self-improvement training
    from its evaluation): a category (equally likely, or with ``und_weights`` for
    understanding), then a prompt of it."""

    def __init__(
        self,
        world: ShapesWorld,
        rng: np.random.Generator,
        und_weights: Sequence[float],
        kind_weights: Sequence[float],
    ):
        self.world, self.rng = world, rng
        self.kind_weight = dict(zip(world.negative_kinds, kind_weights, strict=True))
        self.by_category = [world.prompts("train", c) + world.prompts("eval", c) for c in world.categories]
        self.und_p = np.asarray(und_weights, np.float64) / np.sum(und_weights)
        self.relation_prompts = self.by_category[world.categories.index("spatial_relation")]

    def prompt(self, category_p: np.ndarray | None = None) -> Prompt:
        prompts = self.by_category[self.rng.choice(len(self.by_category), p=category_p)]
        return prompts[self.rng.integers(len(prompts))]

    def positives(self, n: int) -> tuple[list[str], torch.Tensor]:
        """n (prompt text, true scene) pairs: texts, LongTensor[n, L]."""
        prompts = [self.prompt() for _ in range(n)]
        return [p.text for p in prompts], torch.stack([self.world.sample_image(p, self.rng) for p in prompts])

    def grounded_captions(self, n: int) -> tuple[list[str], torch.Tensor]:
        """n true scenes with their grounded captions (ShapesWorld.grounded_caption): texts,
        LongTensor[n, L]."""
        scenes = [self.world.sample_image(self.prompt(), self.rng) for _ in range(n)]
        return [self.world.grounded_caption(x, self.rng) for x in scenes], torch.stack(scenes)

    def relation_pairs(self, n: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """n // 2 minimal pairs of spatial_relation prompts: a true scene (label 1) and its relation
        negative (label 0, the two objects swapped or one moved). Same return as :meth:`understanding`."""
        texts, scenes, labels = [], [], []
        for _ in range(n // 2):
            prompt = self.relation_prompts[self.rng.integers(len(self.relation_prompts))]
            scene = self.world.sample_image(prompt, self.rng)
            texts += [prompt.text, prompt.text]
            scenes += [scene, dict(self.world.negatives(prompt, scene, self.rng))["relation"]]
            labels += [1.0, 0.0]
        return texts, torch.stack(scenes), torch.tensor(labels)

    def understanding(self, n: int, hard: float) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """n // 2 minimal pairs (a prompt with a true scene, label 1, and the same prompt with a
        negative, label 0): texts, scenes LongTensor[n, L], labels float[n]. With probability
        ``hard`` the negative is a one-edit hard negative of that very scene, so the pair differs
        in exactly the feature the edit changed; otherwise a true scene of another prompt."""
        texts, scenes, labels = [], [], []
        for _ in range(n // 2):
            prompt = self.prompt(self.und_p)
            scene = self.world.sample_image(prompt, self.rng)
            if self.rng.random() < hard:
                negatives = self.world.negatives(prompt, scene, self.rng)
                weights = np.array([self.kind_weight[kind] for kind, _ in negatives])
                negative = negatives[self.rng.choice(len(negatives), p=weights / weights.sum())][1]
            else:
                negative = scene
                while self.world.oracle(prompt, negative):
                    negative = self.world.sample_image(self.prompt(), self.rng)
            texts += [prompt.text, prompt.text]
            scenes += [scene, negative]
            labels += [1.0, 0.0]
        return texts, torch.stack(scenes), torch.tensor(labels)


def pretrain(config: PretrainConfig, progress: bool = True) -> tuple[ToyAdapter, list[dict]]:
    """Train a toy model from scratch with the recipe; deterministic from config.seed.

    Returns the adapter and a log: one dict per 50 steps with the mean losses and steps/s.
    """
    with torch_threads(config.threads):  # the weights' float sums depend on it
        size = config.model
        world = ShapesWorld(seed=size.world_seed, grid_size=size.grid_size, cell_pixels=size.cell_pixels)
        adapter = ToyAdapter.build(
            world,
            seed=config.seed,
            hidden_size=size.hidden_size,
            num_layers=size.num_layers,
            num_heads=size.num_heads,
            intermediate_size=size.intermediate_size,
            initializer_range=size.initializer_range,
        )
        model = adapter.model
        model.train()
        sampler = TaskSampler(
            world,
            np.random.default_rng([config.seed, 1]),
            config.und_category_weights,
            config.negative_kind_weights,
        )
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=(0.9, 0.98),
        )

        def lr_factor(step: int) -> float:
            if step < config.warmup:
                return (step + 1) / config.warmup
            progress_ = (step - config.warmup) / max(1, config.steps - config.warmup)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

        def caption_loss(texts: list[str], images: torch.Tensor) -> torch.Tensor:
            lengths = torch.tensor([len(t.split()) for t in texts], dtype=torch.float32)
            return -(adapter.caption_logprob(images, texts) / lengths).mean()

        names = ("gen_loss", "und_loss", "caption_loss", "ground_loss", "und_train_acc")
        log, sums, start = [], np.zeros(len(names)), time.perf_counter()
        bar = tqdm(range(config.steps), desc="pretrain toy", disable=not progress)
        for step in bar:
            hard = config.hard_start + (config.hard_end - config.hard_start) * min(
                1.0, step / max(1, config.hard_ramp * config.steps)
            )
            relation_stage = step < config.relation_warmup
            gen_loss, cap_loss, ground_loss = torch.zeros(()), torch.zeros(()), torch.zeros(())
            if relation_stage:
                und_texts, und_images, labels = sampler.relation_pairs(config.und_batch)
            else:
                gen_texts, gen_images = sampler.positives(config.gen_batch)
                gen_loss = -adapter.gen_logprob(gen_texts, gen_images).mean() / adapter.image_tokens
                und_texts, und_images, labels = sampler.understanding(config.und_batch, hard)
            log_odds = adapter.judge(und_images, und_texts).log_odds
            und_loss = torch.nn.functional.binary_cross_entropy_with_logits(log_odds, labels)
            if config.caption_batch and not relation_stage:
                cap_loss = caption_loss(*sampler.positives(config.caption_batch))
            if config.ground_batch:
                ground_loss = caption_loss(*sampler.grounded_captions(config.ground_batch))
            loss = gen_loss + und_loss + cap_loss + ground_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            und_acc = ((log_odds.detach() > 0).float() == labels).float().mean()
            sums += [gen_loss.item(), und_loss.item(), cap_loss.item(), ground_loss.item(), und_acc.item()]
            if (step + 1) % 50 == 0 or step + 1 == config.steps:
                entry = dict(zip(names, sums / ((step % 50) + 1), strict=True))
                entry.update(step=step + 1, hard=hard, steps_per_s=(step + 1) / (time.perf_counter() - start))
                log.append(entry)
                bar.set_postfix(
                    gen=f"{entry['gen_loss']:.3f}",
                    und=f"{entry['und_loss']:.3f}",
                    acc=f"{entry['und_train_acc']:.2f}",
                )
                sums[:] = 0
        model.eval()
    return adapter, log


def save(adapter: ToyAdapter, config: PretrainConfig, log: list[dict], directory: Path) -> None:
    """The weights with the recipe (pretrain_config.json: the flat dict its hash is taken of), the
    training log (pretrain_log.json) and the manifest (toy_recipe.write_manifest)."""
    adapter.save_pretrained(directory)
    (directory / "pretrain_config.json").write_text(json.dumps(config.recipe(), indent=1))
    (directory / "pretrain_log.json").write_text(json.dumps(log, indent=1))
    write_manifest(directory, config)


@dataclass
class PretrainOptions:
    """Options of ``python -m ntkdyn.pretrain``: the recipe, and where the weights go."""

    recipe: PretrainConfig = field(default_factory=PretrainConfig, metadata={"cli_prefix": ""})
    out: str | None = field(
        default=None, metadata={"help": "where the weights go (default: runs/pretrain/toy-<recipe hash>)"}
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ntkdyn.pretrain``: exit code 0 (bad options exit with 2 before any work)."""
    parser = config_parser(PretrainOptions, "python -m ntkdyn.pretrain", __doc__.split("\n\n")[0])
    options = parse_config(parser, PretrainOptions, argv)
    out = Path(options.out or f"runs/pretrain/toy-{options.recipe.recipe_hash()}")
    adapter, log = pretrain(options.recipe)
    save(adapter, options.recipe, log, out)
    print(f"toy model: {out} ({log[-1]['steps_per_s']:.2f} steps/s); use it with --model toy {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
