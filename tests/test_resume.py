"""A run killed with SIGKILL and resumed gives the logs and final numbers of an uninterrupted run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_same_values

from ntkdyn.track import main
from ntkdyn.trainer.checkpoint import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


ARGS = (
    "--model toy-tiny --run sft --judge none --no-track --prompts 6 --candidates 2 --gen-batch 3 "
    "--max-steps 8 --rounds 2 --batch-size 4 --micro-batch-size 2 --checkpoint-every 4 --eval-every 5 "
    "--eval-prompts 6 --eval-candidates 2"
).split()

# Runs ntkdyn.track with one more hook that sends SIGKILL to its own process right after optimizer step K.
DRIVER = """
import os, signal, sys
import ntkdyn.track as track


KILL_AT, inner = int(sys.argv[1]), track.train

class Kill:
    def before_step(self, step, model, loss_fn, batch):
        pass

    def after_step(self, step, model, lr):
        if step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

track.train = lambda *a: inner(*a[:7], [*a[7], Kill()])
track.main(sys.argv[2:])
"""


def _same_rows(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert_same_values(x, y)


def test_kill9_then_resume_matches_an_uninterrupted_run(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(driver), "6", *ARGS, "--out", str(killed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # killed right after update 6 (before its row): the last checkpoint is step 4; the rows of step 5
    # (training and evaluation) and round 1's data row came after it: dropped and written again, once
    assert [r["step"] for r in read_jsonl(killed / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in read_jsonl(killed / "eval.jsonl")] == [0, 5]

    resumed = main([*ARGS, "--out", str(killed), "--resume"])
    reference = main([*ARGS, "--out", str(whole)])
    for name in ("metrics.jsonl", "eval.jsonl", "data.jsonl"):
        _same_rows(read_jsonl(killed / name), read_jsonl(whole / name))
    assert [r["step"] for r in read_jsonl(killed / "metrics.jsonl")] == list(range(1, 9))
    assert [r["step"] for r in read_jsonl(killed / "eval.jsonl")] == [0, 5, 8]
    assert [r["round"] for r in read_jsonl(killed / "data.jsonl")] == [0, 1]
    assert resumed["steps"] == reference["steps"] == 8
    assert_same_values(resumed["after"], reference["after"])
