"""`python -m ntkdyn.track` end to end on the real-model adapters (tiny, offline): candidates judged
through decode + parse, training, tracking, summary and figures."""

import json

import pytest

from ntkdyn.rundir import read_jsonl
from ntkdyn.track import parse_args, run


@pytest.mark.parametrize("model", ["janus-tiny", "emu3-tiny"])
def test_tracked_sft_run_on_a_real_model_adapter(tmp_path, model, one_thread, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--run", "sft", "--judge", "none", "--model", model, "--max-steps", "4", "--prompts", "12"]
    args += ["--anchor-pool", "16"]
    args += ["--eval-prompts", "6", "--eval-candidates", "2", "--candidates", "2", "--eval-every", "0"]
    summary = run(
        parse_args([*args, "--track-every", "2", "--probes-per-category", "2", "--out", str(tmp_path)])
    )
    assert summary["steps"] == 4
    assert json.loads((tmp_path / "summary.json").read_text())["after"].keys() == summary["after"].keys()
    rows = read_jsonl(tmp_path / "dynamics.jsonl")
    assert sorted({r["step"] for r in rows}) == [2, 4]
    assert {r["measurement"] for r in rows} == {"gen", "und", "caption"}
    for branch in ("gen", "und"):  # the exact first order predicts the observed change of every probe
        assert summary["dynamics"][branch]["pearson"] > 0.9
    assert (tmp_path / "figures" / "dynamics_scatter.png").exists()
