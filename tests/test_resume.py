"""A run killed with SIGKILL and resumed gives the logs, tracker rows and final numbers of an uninterrupted
run; --resume refuses a checkpoint that would have to be unpickled."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_gradient_stores, assert_same_values

from ntkdyn.rundir import RunDir, read_jsonl
from ntkdyn.track import main, parse_args, run

pytestmark = pytest.mark.usefixtures("one_thread")


ARGS = (
    "--model toy-tiny --run sft --judge none --prompts 6 --candidates 2 --gen-batch 3 "
    "--max-steps 8 --rounds 2 --batch-size 4 --micro-batch-size 2 --checkpoint-every 4 --eval-every 5 "
    "--eval-prompts 6 --eval-candidates 2 --track-every 3 --probes-per-category 1 --proj-kind exact "
    "--store-k 4 --anchor-pool 16 --no-figures"
).split()

# Runs ntkdyn.track with one more hook that sends SIGKILL to its own process right after optimizer step K.
DRIVER = """
import os, signal, sys
import ntkdyn.track as track
from ntkdyn.trainer import loop


KILL_AT, init = int(sys.argv[1]), loop.Trainer.__init__

class Kill:
    def before_step(self, step, model, loss_fn, batch):
        pass

    def after_step(self, step, model, lr):
        if step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

def with_kill(self, *args, hooks=(), **kwargs):
    init(self, *args, hooks=[*hooks, Kill()], **kwargs)

loop.Trainer.__init__ = with_kill
track.main(sys.argv[2:])
"""


def _same_rows(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert_same_values(x, y)


def _run_killed(tmp_path, kill_at: int, args, out: Path) -> None:
    """Run ntkdyn.track with ``args`` in a subprocess that SIGKILLs itself right after update ``kill_at``."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(driver), str(kill_at), *args, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_kill9_then_resume_matches_an_uninterrupted_run(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    _run_killed(tmp_path, 6, ARGS, killed)
    # killed right after update 6 (before its row): the last checkpoint is step 4; the rows of step 5
    # (training and evaluation), round 1's data row and the tracker's rows and kernels of step 6 came
    # after it: dropped and written again, once
    assert [r["step"] for r in read_jsonl(killed / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in read_jsonl(killed / "eval.jsonl")] == [0, 5]
    assert [r["step"] for r in read_jsonl(killed / "ntk.jsonl")] == [3, 6]

    resumed = run(parse_args([*ARGS, "--out", str(killed), "--resume"]))
    reference = run(parse_args([*ARGS, "--out", str(whole)]))
    for name in ("metrics.jsonl", "eval.jsonl", "data.jsonl", "dynamics.jsonl", "ntk.jsonl"):
        _same_rows(read_jsonl(killed / name), read_jsonl(whole / name))
    assert [r["step"] for r in read_jsonl(killed / "ntk.jsonl")] == [3, 6]
    assert [p.name for p in RunDir(killed).kernel_files()] == [p.name for p in RunDir(whole).kernel_files()]
    assert [r["step"] for r in read_jsonl(killed / "metrics.jsonl")] == list(range(1, 9))
    assert [r["step"] for r in read_jsonl(killed / "eval.jsonl")] == [0, 5, 8]
    assert [r["round"] for r in read_jsonl(killed / "data.jsonl")] == [0, 1]
    assert resumed["steps"] == reference["steps"] == 8
    assert_same_values(resumed["after"], reference["after"])
    # the gradient store: every step's file, those after the checkpoint written again by the resumed run
    assert_same_gradient_stores(killed, whole, steps=8)


SELECTION_ARGS = (
    "--model toy-tiny --run sft --judge none --no-track --prompts 6 --candidates 2 --gen-batch 3 --lr 0.02 "
    "--max-steps 8 --rounds 2 --batch-size 4 --micro-batch-size 2 --checkpoint-every 4 --eval-every 0 "
    "--eval-prompts 6 --eval-candidates 2 --select-every 3 --select-prompts 4 --select-candidates 2 "
    "--anchor-pool 16 --no-figures"
).split()


def test_kill9_then_resume_with_label_free_selection_matches_an_uninterrupted_run(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    _run_killed(tmp_path, 7, SELECTION_ARGS, killed)
    # killed after update 7: the last checkpoint is step 4; the point of step 6 (its row and weights)
    # came after it: dropped and made again
    assert [r["step"] for r in read_jsonl(killed / "selection.jsonl")] == [0, 3, 6]
    assert RunDir(killed).selection_file(6).exists()
    RunDir(killed).selection_file(7).write_bytes(b"")  # any later step's file is deleted on resume

    resumed = run(parse_args([*SELECTION_ARGS, "--out", str(killed), "--resume"]))
    reference = run(parse_args([*SELECTION_ARGS, "--out", str(whole)]))
    for name in ("metrics.jsonl", "eval.jsonl", "data.jsonl", "selection.jsonl"):
        _same_rows(read_jsonl(killed / name), read_jsonl(whole / name))
    assert [r["step"] for r in read_jsonl(killed / "selection.jsonl")] == [0, 3, 6, 8]
    names = [p.name for p in RunDir(killed).selection_files()]
    assert names == [p.name for p in RunDir(whole).selection_files()]
    assert "step_000007.safetensors" not in names
    assert resumed["selection"]["selected_step"] == reference["selection"]["selected_step"]
    assert [p[0] for p in resumed["selection"]["points"]] == [0, 3, 6, 8]
    assert_same_values(resumed["selection"], reference["selection"])
    assert_same_values(resumed["after"], reference["after"])


class RunsCode:
    """Unpickling this object creates ``marker``: what a checkpoint received from someone else could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_checkpoints_whose_pickle_would_run_code(tmp_path, capsys):
    args = (
        "--model toy-tiny --run sft --judge none --no-track --prompts 6 --candidates 2 --gen-batch 3 "
        "--max-steps 2 --batch-size 4 --micro-batch-size 2 --eval-prompts 6 --eval-candidates 2 "
        "--eval-every 0 --anchor-pool 16 --no-figures"
    ).split() + ["--out", str(tmp_path / "run")]
    run(parse_args(args))
    checkpoint, legacy = tmp_path / "run" / "checkpoint.safetensors", tmp_path / "run" / "checkpoint.pt"
    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker)}, legacy)
    torch.load(legacy, weights_only=False)  # the payload is live: unpickling it runs code
    assert marker.exists()
    marker.unlink()

    checkpoint.write_bytes(legacy.read_bytes())  # planted in place of the checkpoint
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--resume"])
    assert exit_.value.code == 2 and "is not a safetensors file" in capsys.readouterr().err
    checkpoint.unlink()  # only the pickle checkpoint of earlier versions
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--resume"])
    assert exit_.value.code == 2 and "is a pickle checkpoint" in capsys.readouterr().err
    assert not marker.exists()
