"""Batches: a dict of B items (tensors with the item axis first, lists of B strings, ...), or nested
dicts/lists/tuples of them. Base layer (torch only): the trainer and the analysis both use it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Every tensor of a (nested) dict/list/tuple batch moved to ``device``; everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def slice_batch(batch: Mapping[str, Any], start: int, stop: int) -> dict:
    """Items [start, stop) of a dict batch (every value sliced along its first axis)."""
    return {k: v[start:stop] for k, v in batch.items()}
