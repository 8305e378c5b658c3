"""Two DDP processes (torchrun, gloo) give the results of one process at the same global batch."""

import pytest
import torch
from helpers import assert_same_values, torchrun_track
from safetensors.torch import load_file

from ntkdyn.models.toy import ToyAdapter
from ntkdyn.rundir import read_jsonl
from ntkdyn.state_file import load_state
from ntkdyn.track import parse_args, run
from ntkdyn.trainer.data import collect_candidates, stratified_prompts
from ntkdyn.trainer.distributed import Dist

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_equal_one(tmp_path):
    # a random tiny model says P(yes) ~ 0.47 to everything: accept above the median so that DPO has pairs
    world = ToyAdapter.tiny().world
    prompts = stratified_prompts(world, "train", 12, seed=0)
    probe = collect_candidates(ToyAdapter.tiny(), world, prompts, torch.arange(12), 4, 1.0, 4, 0, 0, Dist())
    threshold = probe.p_yes.median().item()
    args = ["--accept-threshold", str(threshold)] + (
        "--model toy-tiny --run dpo --no-track --prompts 12 --candidates 4 --gen-batch 4 --max-steps 3 "
        "--epochs 100 --batch-size 8 --micro-batch-size 2 --nll-weight 0.5 --lr 1e-3 --eval-prompts 6 "
        "--eval-candidates 2 --anchor-pool 16 --no-figures"
    ).split()
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun_track(args, two)
    summary = run(parse_args([*args, "--out", str(one)]))

    data_one, data_two = (
        load_file(str(one / "data" / "round_0.safetensors")),
        load_file(str(two / "data" / "round_0.safetensors")),
    )
    for k in ("candidates/images", "accepted", "pairs"):
        assert torch.equal(data_one[k], data_two[k]), k  # generation and judging split over ranks
    assert len(data_one["pairs"]) > 0
    torch.testing.assert_close(data_one["train/ref_chosen"], data_two["train/ref_chosen"])
    for name in ("metrics.jsonl", "eval.jsonl", "data.jsonl"):
        rows_one, rows_two = read_jsonl(one / name), read_jsonl(two / name)
        assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]  # rank 1 wrote nothing
        for a, b in zip(rows_one, rows_two, strict=True):
            assert_same_values(a, b)
    assert summary["steps"] == 3
    model_one = load_state(one / "checkpoint.safetensors")["model"]
    model_two = load_state(two / "checkpoint.safetensors")["model"]
    moved = ToyAdapter.tiny().model.state_dict()
    assert any(not torch.allclose(moved[k], model_one[k]) for k in moved)
    for k in model_one:
        torch.testing.assert_close(model_one[k], model_two[k], rtol=1e-5, atol=1e-6)
