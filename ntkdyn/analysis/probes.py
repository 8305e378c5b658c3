"""Fixed probe sets of a run, chosen once at its start from the pre-trained model's generations.

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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ntkdyn.models.base import UnifiedAdapter

PROBE_CATEGORIES = ("aligned", "misaligned", "false_positive", "unrelated")
MEASUREMENTS = ("gen", "und", "caption")
RECORD_KEYS = ("prompt", "image", "verdict", "oracle")

Fn = Callable[[nn.Module, dict], torch.Tensor]
BRANCH_OF_MEASUREMENT = {"gen": "gen", "und": "und", "caption": "und"}
TRAIN = "train"


@dataclass
class ProbeGroup:
    """A batch of probes measured by one function: ``fn(model, batch) -> Tensor[B]``.

    measurement: what fn measures ("gen", "und", "caption", or any name); category: the probe set
    of every sample (e.g. "aligned"; default: the name), or ``categories``: one per sample; branch:
    the model branch the measurement belongs to, used to pool the summary statistics (default: gen
    for "gen", und for "und"/"caption", else the measurement). labels: one id per sample (default
    ``f"{name}/{i}"``); equal labels under two measurements mark the same probe pair.
    """

    name: str
    fn: Fn
    batch: dict
    measurement: str = ""
    category: str = ""
    branch: str = ""
    labels: list[str] | None = None
    categories: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ProbeGroup.name must be a non-empty string")
        if not callable(self.fn):
            raise TypeError(f"ProbeGroup.fn of {self.name!r} must be callable fn(model, batch) -> Tensor[B]")
        self.measurement = self.measurement or self.name
        self.category = self.category or self.name
        self.branch = self.branch or BRANCH_OF_MEASUREMENT.get(self.measurement, self.measurement)
        if self.measurement == TRAIN:
            raise ValueError(f"ProbeGroup.measurement {TRAIN!r} is reserved for the training losses")
        if (
            self.labels is not None
            and self.categories is not None
            and len(self.labels) != len(self.categories)
        ):
            raise ValueError(
                f"ProbeGroup {self.name!r}: {len(self.labels)} labels but {len(self.categories)} categories"
            )

    def sample_labels(self, n: int) -> list[str]:
        """The n samples' labels (checked against ``labels`` when given)."""
        if self.labels is None:
            return [f"{self.name}/{i}" for i in range(n)]
        if len(self.labels) != n:
            raise ValueError(f"probe group {self.name!r}: fn gave {n} samples for {len(self.labels)} labels")
        return list(self.labels)

    def sample_categories(self, n: int) -> list[str]:
        """The n samples' categories."""
        if self.categories is None:
            return [self.category] * n
        if len(self.categories) != n:
            raise ValueError(
                f"probe group {self.name!r}: fn gave {n} samples for {len(self.categories)} categories"
            )
        return list(self.categories)


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
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(p) for p in probes]))
    os.replace(tmp, path)


def load_probes(path: str | os.PathLike) -> list[Probe]:
    """The probes save_probes wrote."""
    return [Probe(**{**d, "image": tuple(d["image"])}) for d in json.loads(Path(path).read_text())]


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
