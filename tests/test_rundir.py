"""The run-directory module: the JSONL reader after a kill, atomic writes, key builders against their
parsers, and the truncation that --resume applies; and the state file of checkpoints (a model's and
AdamW's state round trip exactly, and an optimizer restored from it continues as the original would)."""

import json
import random

import numpy as np
import pytest
import torch

from ntkdyn.rundir import (
    JsonlLog,
    RunDir,
    atomic_write,
    kernel_file_step,
    kernel_key,
    log_lengths,
    ntk_key,
    parse_kernel_key,
    parse_ntk_key,
    read_jsonl,
    truncate_logs,
)
from ntkdyn.state_file import load_state, save_state


def test_jsonl_log_and_reader_after_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    JsonlLog(path).write({"step": 1}, {"step": 2})
    JsonlLog(path, enabled=False).write({"step": 99})  # not rank 0: writes nothing
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a writer killed mid-row
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # a broken row that is not the last
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_jsonl(path)


def test_atomic_write_replaces_and_leaves_nothing_beside(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    atomic_write(tmp_path / "other.bin", lambda tmp: tmp.write_bytes(b"x"))
    assert path.read_text() == "new" and (tmp_path / "other.bin").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.bin", "summary.json"]


def test_keys_parse_back_to_what_built_them():
    for args in [
        ("norm", "gen"),
        ("alignment", "und", "gen"),
        ("cross_cos", "caption", "gen", "false_positive"),
    ]:
        parsed = parse_ntk_key(ntk_key(*args))
        assert tuple(x for x in parsed if x is not None) == args
    assert parse_kernel_key(kernel_key("Kcos", "train", "und")) == ("Kcos", "train", "und")
    assert kernel_file_step(RunDir("/r").kernel_file(40)) == 40
    with pytest.raises(ValueError, match="cannot be part of a key"):
        ntk_key("cross_cos", "und", "gen", "a/b")
    with pytest.raises(ValueError, match="cannot be part of a key"):
        kernel_key("K", "und,x", "gen")
    with pytest.raises(ValueError, match="not a kernel scalar key"):
        parse_ntk_key("ntk/unknown/und")


def test_state_round_trips_and_an_optimizer_continues_as_before(tmp_path):
    def tied() -> torch.nn.Module:  # two layers sharing one weight, as tied embeddings do
        model = torch.nn.Sequential(
            torch.nn.Linear(3, 3),
            torch.nn.Tanh(),
            torch.nn.Linear(3, 3),
            torch.nn.Tanh(),
            torch.nn.Linear(3, 2),
        )
        model[2].weight = model[0].weight
        return model

    torch.manual_seed(0)
    model = tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(5, 3)

    def step() -> None:
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()

    step()
    step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"numpy": np.random.get_state(), "python": random.getstate(), "torch": torch.get_rng_state()},
        "position": {"step": 2, "pool": torch.arange(3), "note": None, "pair": (1, 2.5)},
    }
    save_state(tmp_path / "state.safetensors", state)
    back = load_state(tmp_path / "state.safetensors")
    assert back["position"]["pair"] == (1, 2.5) and back["position"]["note"] is None
    assert back["rng"]["python"] == random.getstate()
    saved_np, now_np = back["rng"]["numpy"], np.random.get_state()
    assert (
        saved_np[0] == now_np[0] and np.array_equal(saved_np[1], now_np[1]) and saved_np[1].dtype == np.uint32
    )
    assert set(back["optimizer"]["state"]) == set(optimizer.state_dict()["state"])  # int keys stay int

    clone = tied()
    clone.load_state_dict(back["model"])
    clone_optimizer = torch.optim.AdamW(clone.parameters(), lr=1e-2, weight_decay=0.1)
    clone_optimizer.load_state_dict(back["optimizer"])
    step()
    clone_optimizer.zero_grad()
    clone(x).square().sum().backward()
    clone_optimizer.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)  # the restored optimizer took exactly the original's third step


def test_state_refuses_what_it_cannot_store_or_read(tmp_path):
    with pytest.raises(TypeError, match="at 'a/b'"):
        save_state(tmp_path / "x.safetensors", {"a": {"b": object()}})
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95 not safetensors")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_state(tmp_path / "pickle.safetensors")


def test_truncation_to_a_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "pretrained").mkdir()
    run.pretrained_records.write_text('{"a": 1}\n')  # a record, not a log: untouched
    JsonlLog(run.metrics).write({"step": 1})
    JsonlLog(run.dynamics).write({"step": 1})
    lengths = log_lengths(run)
    JsonlLog(run.metrics).write({"step": 2})
    JsonlLog(run.dynamics).write({"step": 2})
    JsonlLog(run.ntk).write({"step": 2})  # a log the checkpoint does not know
    run.kernels.mkdir()
    for s in (1, 2):
        run.kernel_file(s).write_bytes(b"x")
    truncate_logs(run, lengths, step=1)
    assert read_jsonl(run.metrics) == read_jsonl(run.dynamics) == [{"step": 1}]
    assert read_jsonl(run.ntk) == []
    assert [kernel_file_step(p) for p in run.kernel_files()] == [1]
    assert json.loads(run.pretrained_records.read_text()) == {"a": 1}
