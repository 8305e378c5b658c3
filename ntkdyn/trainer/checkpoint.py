"""Checkpoints that survive ``kill -9`` and load without unpickling anything.

``checkpoint.safetensors`` (ntkdyn.rundir.save_state: tensors in safetensors, everything else as JSON
in its metadata; written beside and renamed, so a kill leaves the previous checkpoint intact) holds
the position (step, round, step in the round, the discard pool), the model, the optimizer, the RNG
states and the byte length of every log at that moment. Resuming cuts every log back to those
lengths and drops the kernel files of later steps (ntkdyn.rundir.truncate_logs): the rows written
after the checkpoint, a half-written last row included, are dropped and written again by the resumed
run, so no row is lost or duplicated. The learning-rate schedule is a pure function of the position,
so the position is the scheduler's state. A ``checkpoint.pt`` (the pickle format of earlier
versions) is refused: unpickling a file received from someone else can run code.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from ntkdyn.rundir import RunDir, log_lengths
from ntkdyn.state_file import check_state, load_state, save_state


@dataclass
class Position:
    """Where a run stands: ``step`` optimizer steps done, in data round ``round`` at its
    ``round_step``-th step; ``pool``: LongTensor of the prompts with no accepted candidate so far."""

    step: int
    round: int
    round_step: int
    pool: torch.Tensor


@dataclass
class Checkpoint:
    position: Position
    model: dict[str, torch.Tensor]
    optimizer: dict
    logs: dict[str, int]  # log file name -> byte length
    attribution: dict | None  # the per-source first moments (SourceAttribution.state_dict), if any


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


def save_checkpoint(
    run_dir: str | os.PathLike,
    position: Position,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    attribution: dict | None = None,
) -> None:
    """Write the position, model, optimizer, RNG states and log lengths to checkpoint.safetensors
    (and ``attribution``: the state of the optimizer's split by loss source, saved with the optimizer)."""
    run = RunDir(run_dir)
    state = {
        "position": vars(position),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "logs": log_lengths(run),
        "attribution": attribution,
    }
    save_state(run.checkpoint, state)


def check_checkpoint(run_dir: str | os.PathLike) -> None:
    """Raise ValueError, before anything is loaded, when the run's checkpoint cannot be resumed safely:
    a pickle checkpoint.pt, or a checkpoint.safetensors that is not one (only its header is read)."""
    run = RunDir(run_dir)
    if run.pickle_checkpoint.exists() and not run.checkpoint.exists():
        raise ValueError(
            f"resume: {run.pickle_checkpoint} is a pickle checkpoint (the format of earlier ntkdyn "
            f"versions); it is not loaded, since unpickling a file can run code. Start the run again "
            f"in a new --out"
        )
    if run.checkpoint.exists():
        try:
            check_state(run.checkpoint)
        except ValueError as err:
            raise ValueError(f"resume: {err}: not an ntkdyn checkpoint, nothing was loaded") from None


def load_checkpoint(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The last checkpoint of a run (None when there is none), with this process's RNG states restored.
    Raises ValueError for a checkpoint that cannot be loaded safely (see :func:`check_checkpoint`).
    The caller (rank 0) cuts the logs back with ``truncate_logs(run, checkpoint.logs, step)``."""
    check_checkpoint(run_dir)
    run = RunDir(run_dir)
    if not run.checkpoint.exists():
        return None
    state = load_state(run.checkpoint)
    set_rng_state(state["rng"])
    return Checkpoint(
        Position(**state["position"]),
        state["model"],
        state["optimizer"],
        state["logs"],
        state.get("attribution"),
    )
