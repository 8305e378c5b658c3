"""Label-free checkpoint selection wired into a run: held-out prompts, the frozen pre-trained judge, the
weights kept per point, early stopping, the selected model as the run's result, and no oracle on the
selection path. (The rule itself: test_selection.py; kill and resume: test_resume.py.)"""

import copy
import json
import sys

import pytest
import torch

import ntkdyn.models.scenes
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.rundir import RunDir, load_tensors, read_jsonl
from ntkdyn.track import parse_args, run
from ntkdyn.trainer.config import DataConfig, SelectionConfig, TrainConfig
from ntkdyn.trainer.data import seeded_generator, stratified_prompts
from ntkdyn.trainer.distributed import Dist
from ntkdyn.trainer.loop import Trainer
from ntkdyn.trainer.selection import SELECTION_STREAM, Selector, held_out_prompts
from ntkdyn.world import ShapesWorld

pytestmark = pytest.mark.usefixtures("one_thread")


def test_held_out_prompts_are_train_split_prompts_never_trained_on(tmp_path):
    world = ToyAdapter.tiny(seed=0).world
    eval_texts = {p.text for p in world.prompts("eval")}
    train = stratified_prompts(world, "train", 20, seed=3)
    held = held_out_prompts(world, train, 12, seed=3)
    assert [p.text for p in held] == [p.text for p in stratified_prompts(world, "train", 32, seed=3)[20:]]
    assert not {p.text for p in held} & ({p.text for p in train} | eval_texts)
    # a prompts file (it may even hold eval prompts): the held-out prompts are the train split's others
    in_file = [*train[:5], world.prompts("eval")[0]]
    held = held_out_prompts(world, in_file, 40, seed=3)
    assert len({p.text for p in held}) == 40
    assert not {p.text for p in held} & ({p.text for p in in_file} | eval_texts)
    with pytest.raises(ValueError, match="select_prompts"):
        held_out_prompts(world, train, len(world.prompts("train")), seed=3)


class StateRecorder:
    """A hook keeping the trained model's parameters after every step."""

    def __init__(self):
        self.after = {}

    def before_step(self, step, model, loss_fn, batch):
        pass

    def after_step(self, step, model, lr):
        self.after[step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_params(a, b, equal=True):
    same = all(torch.equal(a[n], b[n]) for n in a) and a.keys() == b.keys()
    assert same == equal


def test_selected_point_is_the_result_and_training_stops_once_past_its_best(tmp_path, monkeypatch):
    """Synthetic label-free scores (points 0..4: 0.5, 0.7, 0.9, 0.6, 0.55, per-prompt spread 0.01):
    with patience 2 training stops at step 4, step 2 is selected, the model ends as it was after step 2,
    and the weights of points below best - 0.5 / sqrt(P - 1) are deleted."""
    spread = torch.tensor([[0.0], [0.01], [0.0], [0.01]]).expand(4, 3)
    curve = [v + spread for v in (0.5, 0.7, 0.9, 0.6, 0.55)]
    monkeypatch.setattr(Selector, "scores", lambda self: curve[len(self.points)])

    adapter, initial = ToyAdapter.tiny(seed=0), _params(ToyAdapter.tiny(seed=0).model)
    prompts = stratified_prompts(adapter.world, "train", 6, seed=0)
    train = TrainConfig(
        run="sft", max_steps=10, batch_size=4, micro_batch_size=2, lr=0.05, checkpoint_every=3, anchor_pool=16
    )
    data = DataConfig(judge="none", prompts="6", candidates=2, gen_batch=3)
    selection = SelectionConfig(select_every=1, select_prompts=4, select_candidates=3, patience=2)
    recorder = StateRecorder()

    evaluated = []  # the parameters of every evaluated model

    def evaluate(model_adapter):
        evaluated.append(_params(model_adapter.model))
        return {"m": 1.0}

    def trainer(model_adapter, hooks=()):
        return Trainer(
            model_adapter, adapter.world, prompts, train, data, tmp_path, evaluate, hooks=hooks,
            selection=selection,
        )  # fmt: skip

    first = trainer(adapter, [recorder])
    assert not {p.text for p in first.selector.prompts} & {p.text for p in prompts}
    out = first.train({"m": 0.0})
    assert out["step"] == 4 and sorted(recorder.after) == [1, 2, 3, 4]
    assert out["selection"] == {
        "selected_step": 2,
        "last_step": 4,
        "stopped_early": True,
        "points": [[s, first.selector.points[s].score, first.selector.points[s].stderr] for s in range(5)],
        "after_last": {"m": 1.0},
    }
    assert [p.score for p in first.selector.points] == pytest.approx([0.505, 0.705, 0.905, 0.605, 0.555])
    rows = read_jsonl(tmp_path / "selection.jsonl")
    assert [(r["step"], r["selected_step"], r["stop"]) for r in rows] == [
        (0, 0, False),
        (1, 1, False),
        (2, 2, False),
        (3, 2, False),
        (4, 2, True),
    ]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert read_jsonl(tmp_path / "eval.jsonl")[-2:] == [  # the last step's model, then the selected one
        {"step": 4, "selected_step": 2, "last_step": 4, "m": 1.0},
        {"step": 2, "selected_step": 2, "last_step": 4, "m": 1.0},
    ]
    # floor 0.905 - 0.5 / sqrt(3) = 0.616: the weights of steps 0, 3 and 4 can never be selected
    run_dir = RunDir(tmp_path)
    assert [p.name for p in run_dir.selection_files()] == [
        "step_000001.safetensors",
        "step_000002.safetensors",
    ]
    final = _params(adapter.model)
    _assert_params(final, recorder.after[2])
    _assert_params(final, recorder.after[4], equal=False)
    _assert_params(evaluated[-2], recorder.after[4])
    _assert_params(evaluated[-1], recorder.after[2])
    _assert_params(load_tensors(run_dir.selection_file(2))[0], final)
    # the frozen judge is the pre-trained model, after training ...
    _assert_params(_params(first.selector.judge_model), initial)
    _assert_params(final, initial, equal=False)

    # ... and after a restore; a resumed run that had stopped trains no further and selects the same step
    fresh = ToyAdapter.tiny(seed=0)
    resumed = trainer(fresh)
    again = resumed.train({"m": 0.0}, resume=True)
    assert again["selection"] == out["selection"]
    _assert_params(_params(resumed.selector.judge_model), initial)
    _assert_params(_params(fresh.model), final)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(tmp_path / "selection.jsonl")] == [0, 1, 2, 3, 4]


def _refuse(*args, **kwargs):
    raise AssertionError("the label-free selection read the oracle")


ARGS = (
    "--model toy-tiny --run sft --judge none --no-track --prompts 6 --candidates 2 --gen-batch 3 "
    "--max-steps 4 --batch-size 4 --micro-batch-size 2 --checkpoint-every 2 --eval-every 0 --lr 0.02 "
    "--eval-prompts 6 --eval-candidates 2 --anchor-pool 16 --no-figures"
).split()


def test_selection_reads_no_oracle_and_leaves_training_unchanged(tmp_path, monkeypatch):
    """While the selector scores, every oracle the run uses raises; the run with selection trains exactly
    as the run without, which writes no selection files."""
    scored, score, oracle_of_images = [], Selector.scores, ntkdyn.models.scenes.oracle_of_images

    def scores_without_oracle(self):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ShapesWorld, "oracle", _refuse)
            for name, module in list(sys.modules.items()):
                if name.startswith("ntkdyn") and "oracle_of_images" in vars(module):
                    assert vars(module)["oracle_of_images"] is oracle_of_images
                    mp.setattr(module, "oracle_of_images", _refuse)
            result = score(self)
        scored.append(result)
        return result

    monkeypatch.setattr(Selector, "scores", scores_without_oracle)
    on, off = tmp_path / "on", tmp_path / "off"
    select = ["--select-every", "2", "--select-prompts", "5", "--select-candidates", "2"]
    summary = run(parse_args([*ARGS, *select, "--out", str(on)]))
    assert len(scored) == 3 and all(s.shape == (5, 2) for s in scored)  # steps 0, 2, 4
    assert [r["step"] for r in read_jsonl(on / "selection.jsonl")] == [0, 2, 4]
    saved = json.loads((on / "summary.json").read_text())["selection"]
    assert saved == summary["selection"] and saved["last_step"] == 4
    assert [p[0] for p in saved["points"]] == [0, 2, 4]
    assert json.loads((on / "config.json").read_text())["selection"]["select_every"] == 2

    plain = run(parse_args([*ARGS, "--out", str(off)]))
    assert "selection" not in plain
    assert not (off / "selection.jsonl").exists() and not (off / "selection").exists()
    assert read_jsonl(on / "metrics.jsonl") == read_jsonl(off / "metrics.jsonl")
    assert read_jsonl(on / "data.jsonl") == read_jsonl(off / "data.jsonl")
    assert all("selected_step" not in r for r in read_jsonl(off / "eval.jsonl"))
    if saved["selected_step"] == 4:  # the same model evaluated the same way
        assert summary["after"] == plain["after"]


def test_selection_points_score_the_current_model_with_the_frozen_judge(tmp_path):
    """scores() equals generating with the current model (the selector's seeded draws) and judging with
    a separate copy of the pre-trained model: a changed current model changes what is judged, never the
    judge."""
    adapter = ToyAdapter.tiny(seed=0)
    pretrained = copy.deepcopy(adapter.model)
    prompts = stratified_prompts(adapter.world, "train", 6, seed=0)
    cfg = SelectionConfig(select_every=1, select_prompts=4, select_candidates=2)
    selector = Selector(adapter, prompts[:4], cfg, 1.0, 3, 0, tmp_path, Dist())
    with torch.no_grad():
        for p in adapter.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    got = selector.scores()

    other = ToyAdapter.tiny(seed=0)  # judging with the pre-trained model as an adapter's own model
    other.model.load_state_dict(pretrained.state_dict())
    texts = [p.text for p in prompts[:4]]
    expected = []
    for c, start in enumerate(range(0, 4, 3)):
        chunk = texts[start : start + 3]
        images = adapter.generate(chunk, 2, 1.0, generator=seeded_generator(0, SELECTION_STREAM, c))
        with torch.no_grad():
            judged = other.judge(images.reshape(len(chunk) * 2, -1), [t for t in chunk for _ in range(2)])
        expected.append(judged.p_yes.reshape(len(chunk), 2))
    torch.testing.assert_close(got, torch.cat(expected), rtol=0, atol=0)
    assert torch.equal(got, selector.scores())  # the same draws at every point
