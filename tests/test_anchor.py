"""The understanding anchor: its pool's targets, and no oracle answer shaping a default run's training."""

import pytest
import torch

import ntkdyn.trainer.data as data_module
from ntkdyn.config import RunConfig
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.trainer.config import DataConfig, TrainConfig
from ntkdyn.trainer.data import anchor_pool, collect_candidates, stratified_prompts
from ntkdyn.trainer.distributed import Dist
from ntkdyn.trainer.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_self_pool_targets_are_the_models_own_p_yes_one_pair_at_a_time():
    adapter = ToyAdapter.tiny(seed=0)
    prompts = stratified_prompts(adapter.world, "train", 10, seed=0)
    pool = anchor_pool(adapter, adapter.world, prompts, 9, "self", seed=3, chunk=4)
    assert pool.images.shape == (9, adapter.image_tokens) and pool.targets.dtype == torch.float32
    with torch.no_grad():
        for i in range(9):
            want = adapter.judge(pool.images[i : i + 1], pool.prompts[i : i + 1]).p_yes
            assert pool.targets[i].item() == pytest.approx(want.item(), abs=1e-6)
    again = anchor_pool(adapter, adapter.world, prompts, 9, "self", seed=3)
    assert torch.equal(again.images, pool.images) and again.prompts == pool.prompts


def test_oracle_pool_alternates_true_scenes_and_hard_negatives():
    adapter = ToyAdapter.tiny(seed=0)
    world = adapter.world
    prompts = stratified_prompts(world, "train", 10, seed=0)
    pool = anchor_pool(adapter, world, prompts, 12, "oracle", seed=0)
    assert pool.targets.tolist() == [1.0, 0.0] * 6
    by_text = {p.text: p for p in prompts}
    for image, text, target in zip(pool.images, pool.prompts, pool.targets, strict=True):
        assert world.oracle(by_text[text], image) == bool(target)  # toy image tokens are the scene
    batch = pool.batch(5, seed=1, step=4)
    assert torch.equal(batch["replay_images"], pool.batch(5, seed=1, step=4)["replay_images"])
    assert batch["replay_labels"].shape == (5,)
    with pytest.raises(ValueError, match="anchor"):
        anchor_pool(adapter, world, prompts, 4, "none", seed=0)


def _train(tmp_path, judge: str, anchor: str, lie: bool, monkeypatch) -> dict:
    """Final weights of a tiny SFT run on a fresh tiny model; ``lie``: every oracle answer the training
    data code asks for is inverted."""
    if lie:
        honest = data_module.oracle_of_images

        def inverted(*args):
            oracle, parsed = honest(*args)
            return [not o for o in oracle], parsed

        monkeypatch.setattr(data_module, "oracle_of_images", inverted)
    adapter = ToyAdapter.tiny(seed=0)
    prompts = stratified_prompts(adapter.world, "train", 8, seed=0)
    probe = collect_candidates(
        ToyAdapter.tiny(seed=0), adapter.world, prompts, torch.arange(8), 3, 1.0, 4, 0, 0, Dist()
    )
    threshold = float(probe.p_yes.median())  # about half the candidates accepted by the model's judge
    train = TrainConfig(run="sft", anchor=anchor, anchor_pool=16, max_steps=3, batch_size=4, lr=0.01)
    data = DataConfig(judge=judge, accept_threshold=threshold, prompts="8", candidates=3, gen_batch=4)
    Trainer(
        adapter, adapter.world, prompts, train, data, tmp_path / f"{judge}-{anchor}-{lie}", lambda a: {}
    ).train({})
    monkeypatch.undo()
    return {k: v.clone() for k, v in adapter.model.state_dict().items()}


def test_the_default_run_is_blind_to_the_oracle(tmp_path, monkeypatch):
    defaults = RunConfig()
    assert (defaults.data.judge, defaults.train.anchor) == ("self", "self")
    assert not defaults.external_labels_in_training
    honest = _train(tmp_path, "self", "self", lie=False, monkeypatch=monkeypatch)
    lied_to = _train(tmp_path, "self", "self", lie=True, monkeypatch=monkeypatch)
    for name, value in honest.items():
        assert torch.equal(value, lied_to[name]), name
    # the same lie reaches training when the oracle is the filter: the check above can fail
    oracle_honest = _train(tmp_path, "oracle", "self", lie=False, monkeypatch=monkeypatch)
    oracle_lied_to = _train(tmp_path, "oracle", "self", lie=True, monkeypatch=monkeypatch)
    assert any(not torch.equal(v, oracle_lied_to[n]) for n, v in oracle_honest.items())


def test_external_labels_are_named_in_the_config():
    assert RunConfig(train=TrainConfig(anchor="oracle")).external_labels_in_training
    assert not RunConfig(train=TrainConfig(anchor="oracle", replay_weight=0.0)).external_labels_in_training
    assert RunConfig(data=DataConfig(judge="oracle")).external_labels_in_training
    assert not RunConfig(train=TrainConfig(anchor="none")).external_labels_in_training
