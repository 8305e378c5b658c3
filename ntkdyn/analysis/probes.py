"""Probe groups: fixed batches whose per-sample measurements the tracker follows through training.

A probe group is a batch and a measurement function ``fn(model, batch) -> Tensor[B]`` (one scalar per
sample: a log-likelihood, a yes log-odds, ...). Nothing here knows where the probes come from; the
application chooses them (for ShapesWorld runs: ntkdyn.shapes_probes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ntkdyn.rundir import key_part

Fn = Callable[[nn.Module, dict], torch.Tensor]
BRANCH_OF_MEASUREMENT = {"gen": "gen", "und": "und", "caption": "und"}
TRAIN = "train"  # the measurement name of the training losses in kernel keys


@dataclass
class ProbeGroup:
    """A batch of probes measured by one function: ``fn(model, batch) -> Tensor[B]``.

    measurement: what fn measures ("gen", "und", "caption", or any name); category: the probe set
    of every sample (e.g. "aligned"; default: the name), or ``categories``: one per sample; branch:
    the model branch the measurement belongs to, used to pool the summary statistics (default: gen
    for "gen", und for "und"/"caption", else the measurement). labels: one id per sample (default
    ``f"{name}/{i}"``); equal labels under two measurements mark the same probe pair. Measurement and
    category names go into kernel keys: no "/" or "," in them.
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
        self.measurement = key_part(self.measurement or self.name)
        self.category = key_part(self.category or self.name)
        for category in self.categories or ():
            key_part(category)
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
