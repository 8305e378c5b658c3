"""Checkpoints and logs that survive ``kill -9``.

Logs are JSONL files at the top of the run directory, one row appended and flushed at a time. A
checkpoint (``checkpoint.pt``, written to a temporary file and renamed, so a kill leaves the previous one
intact) holds the model, the optimizer, the data position (round, step), the RNG states, the hooks'
states and the byte length of every top-level ``*.jsonl`` at that moment. Resuming truncates every log
back to those lengths (a file the checkpoint does not know is emptied): the rows written after the
checkpoint, including a half-written last row, are dropped and then written again by the resumed run,
so no row is lost or duplicated. The learning-rate schedule is a pure function of the position, so
the position is the scheduler's state.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


class JsonlLogger:
    """Append rows to ``path`` as JSON lines, flushed after every row; a no-op when not ``enabled``."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def log_lengths(run_dir: Path) -> dict[str, int]:
    """Byte length of every top-level ``*.jsonl`` of the run directory."""
    return {p.name: p.stat().st_size for p in sorted(Path(run_dir).glob("*.jsonl"))}


def truncate_logs(run_dir: Path, lengths: dict[str, int]) -> None:
    """Cut every top-level ``*.jsonl`` back to ``lengths[name]`` bytes (0 for a file not in ``lengths``)."""
    for path in sorted(Path(run_dir).glob("*.jsonl")):
        with open(path, "r+b") as f:
            f.truncate(min(lengths.get(path.name, 0), path.stat().st_size))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write ``state`` (+ RNG states and log lengths) to run_dir/checkpoint.pt atomically."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    torch.save({**state, "rng": rng_state(), "logs": log_lengths(run_dir)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: Path) -> dict | None:
    """The last checkpoint of a run (None when there is none), with this process's RNG states restored.
    The caller (rank 0) truncates the logs with ``truncate_logs(run_dir, state["logs"])``."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state
