"""The probe set of a ShapesWorld run, chosen once at its start from the pre-trained model's
generations, and the run's tracker built on it.

A probe is a (prompt y, image x) pair; each pair is measured by the generation branch
(``gen``: log π(x|y)) and by the understanding branch (``und``: the yes log-odds of
"Does this image describe y?", and ``caption``: log π(y|x)), so gen and und probes share
their pairs. Categories (after Ren & Sutherland's probe sets):

    aligned          pre-trained generations the oracle accepts
    misaligned       generations the oracle rejects and the pre-trained model rejects too
    false_positive   generations the oracle rejects but the pre-trained model accepted
    unrelated        control: an aligned generation paired with another record's prompt

The set is saved as ``probes.json`` in the run directory so that a resumed run, and the
plots, see exactly the same probes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ntkdyn.analysis.probes import ProbeGroup
from ntkdyn.analysis.tracker import DynamicsTracker
from ntkdyn.config import TrackingConfig
from ntkdyn.models.base import UnifiedAdapter
from ntkdyn.models.scenes import oracle_of_images
from ntkdyn.rundir import RunDir, atomic_write, read_json
from ntkdyn.world import ShapesWorld

PROBE_CATEGORIES = ("aligned", "misaligned", "false_positive", "unrelated")
MEASUREMENTS = ("gen", "und", "caption")
RECORD_KEYS = ("prompt", "image", "verdict", "oracle")


@dataclass(frozen=True)
class Probe:
    """One probe pair. image: the image tokens x (length L); oracle: whether x truly shows
    prompt (the world's exact oracle); verdict: whether the pre-trained model said yes (None for
    the unrelated pairs, which it never judged)."""

    prompt: str
    image: tuple[int, ...]
    category: str
    oracle: bool
    verdict: bool | None


def _category(record: Mapping) -> str:
    if record["oracle"]:
        return "aligned"
    return "false_positive" if record["verdict"] else "misaligned"


def select_probes(
    records: Sequence[Mapping],
    per_category: int,
    seed: int = 0,
    oracle: Callable[[str, torch.Tensor], bool] | None = None,
) -> list[Probe]:
    """Up to ``per_category`` probes of each category, drawn without replacement (seeded).

    records: the pre-trained model's judged generations, each with keys ``prompt`` (str),
    ``image`` (image tokens, list or LongTensor[L]), ``verdict`` (the model said yes) and
    ``oracle`` (the image is aligned). ``oracle(prompt, image LongTensor[L]) -> bool`` (optional)
    gives the oracle of the unrelated pairs; without it they count as misaligned (oracle False).
    A category with no candidate records is left out.
    """
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    for i, r in enumerate(records):
        missing = [k for k in RECORD_KEYS if k not in r]
        if missing:
            raise ValueError(f"record {i} lacks keys {missing}: expected {RECORD_KEYS}")
    rng = np.random.default_rng(seed)
    images = [tuple(int(t) for t in torch.as_tensor(r["image"]).flatten().tolist()) for r in records]
    probes: list[Probe] = []
    for category in PROBE_CATEGORIES[:3]:
        pool = [i for i, r in enumerate(records) if _category(r) == category]
        for i in rng.permutation(pool)[:per_category] if pool else []:
            r = records[int(i)]
            probes.append(Probe(r["prompt"], images[int(i)], category, bool(r["oracle"]), bool(r["verdict"])))
    aligned = [i for i, r in enumerate(records) if r["oracle"]]
    for i in rng.permutation(aligned)[:per_category] if aligned else []:
        others = [j for j, r in enumerate(records) if r["prompt"] != records[int(i)]["prompt"]]
        if not others:
            break
        prompt = records[int(rng.choice(others))]["prompt"]
        image = images[int(i)]
        aligned_here = bool(oracle(prompt, torch.tensor(image))) if oracle is not None else False
        probes.append(Probe(prompt, image, "unrelated", aligned_here, None))
    return probes


def save_probes(probes: Sequence[Probe], path: str | os.PathLike) -> None:
    """Write the probes as JSON (atomically)."""
    atomic_write(path, json.dumps([asdict(p) for p in probes]))


def load_probes(path: str | os.PathLike) -> list[Probe]:
    """The probes save_probes wrote."""
    return [Probe(**{**d, "image": tuple(d["image"])}) for d in read_json(path)]


def probe_groups(
    adapter: UnifiedAdapter, probes: Sequence[Probe], measurements: Sequence[str] = MEASUREMENTS
) -> list[ProbeGroup]:
    """One ProbeGroup per measurement over every probe (one batched evaluation each): name and
    measurement ``measurement``, batch ``{"prompts", "images": LongTensor[B, L]}``, fn
    ``adapter.measurement(measurement)``, per-sample categories, labels ``f"{category}/{i}"``
    (the same label marks the same pair under every measurement)."""
    if not probes:
        raise ValueError("probe_groups: no probes")
    order = sorted(range(len(probes)), key=lambda i: PROBE_CATEGORIES.index(probes[i].category))
    chosen = [probes[i] for i in order]
    labels, seen = [], {}
    for p in chosen:
        labels.append(f"{p.category}/{seen.setdefault(p.category, 0)}")
        seen[p.category] += 1
    batch = {
        "prompts": [p.prompt for p in chosen],
        "images": torch.tensor([p.image for p in chosen], dtype=torch.long),
    }
    return [
        ProbeGroup(
            name=m,
            fn=adapter.measurement(m),
            batch=batch,
            measurement=m,
            labels=labels,
            categories=[p.category for p in chosen],
        )
        for m in measurements
    ]


def build_tracker(
    adapter: UnifiedAdapter,
    world: ShapesWorld,
    run_dir: str | os.PathLike,
    config: TrackingConfig,
    pretrained_records: Sequence[Mapping],
    is_main: bool = True,
) -> DynamicsTracker:
    """The tracker of a ``python -m ntkdyn.track`` run: probes chosen from the pre-trained model's
    judged generations (``pretrained_records``: mappings with prompt, image, verdict, oracle), saved
    to ``run_dir/probes.json`` (by the main process) and reloaded from it on resume; every probe
    measured as gen, und and caption."""
    run = RunDir(run_dir)
    if run.probes.exists():
        probes = load_probes(run.probes)
    else:

        def oracle(text: str, image: torch.Tensor) -> bool:
            return oracle_of_images(adapter, world, [world.parse_prompt(text)], image[None])[0][0]

        probes = select_probes(pretrained_records, config.probes_per_category, config.probe_seed, oracle)
        if is_main:
            run.root.mkdir(parents=True, exist_ok=True)
            save_probes(probes, run.probes)
    return DynamicsTracker(
        adapter.model,
        probe_groups(adapter, probes),
        run.root,
        every=config.track_every,
        window=config.track_window,
        config=config.projection,
        top_contributors=config.top_contributors,
        train_kernel=config.train_kernel,
    )
