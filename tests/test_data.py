"""Algorithm 1 (self-improvement data) on a hand-built judge, saving and replay."""

import numpy as np
import pytest
import torch

from ntkdyn.trainer.config import DataConfig
from ntkdyn.trainer.data import (
    Candidates,
    accepted_mask,
    build_train_set,
    collect_candidates,
    judged_scores,
    load_round,
    save_round,
    select,
    stratified_prompts,
)
from ntkdyn.trainer.distributed import Dist
from ntkdyn.world import ShapesWorld

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_algorithm_1(p_yes, accepted, sft_threshold, dpo_margin):
    """Algorithm 1 written as plain loops over prompts and candidates."""
    sft, pairs, discard = [], [], []
    for r, (scores, acc) in enumerate(zip(p_yes.tolist(), accepted.tolist(), strict=True)):
        yes = [i for i, a in enumerate(acc) if a]
        no = [i for i, a in enumerate(acc) if not a]
        sft += [(r, i) for i in yes if scores[i] >= sft_threshold]
        if not yes:
            discard.append(r)
        if yes and no:
            best = max(yes, key=lambda i: scores[i])
            worst = min(no, key=lambda i: scores[i])
            if scores[best] - scores[worst] >= dpo_margin:
                pairs.append((r, best, worst))
    return sft, pairs, discard


@pytest.mark.parametrize("sft_threshold,dpo_margin", [(0.0, 0.0), (0.7, 0.3)])
def test_select_matches_a_loop_reference(sft_threshold, dpo_margin):
    g = torch.Generator().manual_seed(3)
    p_yes = torch.rand(40, 6, generator=g)
    p_yes[:5] *= 0.4  # prompts with no accepted candidate
    p_yes[5:10] = 0.6 + 0.4 * p_yes[5:10]  # prompts with every candidate accepted
    got = select(p_yes, p_yes > 0.5, sft_threshold, dpo_margin)
    sft, pairs, discard = reference_algorithm_1(p_yes, p_yes > 0.5, sft_threshold, dpo_margin)
    assert [tuple(x) for x in got.sft.tolist()] == sft
    assert [tuple(x) for x in got.pairs.tolist()] == pairs
    assert got.discard.tolist() == discard
    assert set(range(5)) <= set(discard) and not set(range(5, 10)) & {r for r, _, _ in pairs}


def test_select_on_a_hand_built_case():
    p_yes = torch.tensor([[0.9, 0.2, 0.6, 0.1], [0.4, 0.3, 0.2, 0.45], [0.55, 0.8, 0.7, 0.95]])
    got = select(p_yes, p_yes > 0.5, sft_threshold=0.65, dpo_margin=0.0)
    assert got.sft.tolist() == [[0, 0], [2, 1], [2, 2], [2, 3]]
    assert got.pairs.tolist() == [[0, 0, 3]]  # prompt 2 has no rejected candidate
    assert got.discard.tolist() == [1]
    with pytest.raises(ValueError, match="must be equal"):
        select(p_yes, p_yes[:, :2] > 0.5, 0.0, 0.0)


class HandBuiltAdapter:
    """generate: the world's true scene for even candidates, an empty scene for odd ones (seeded);
    judge: P(yes) = 0.9 for non-empty scenes whose first object sits in the top row, else 0.2."""

    def __init__(self, world):
        self.world = world
        self.image_tokens = world.image_tokens

    def generate(self, prompts, n, temperature=1.0, generator=None):
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        out = torch.zeros(len(prompts), n, self.image_tokens, dtype=torch.long)
        for j, text in enumerate(prompts):
            for k in range(0, n, 2):
                out[j, k] = self.world.sample_image(self.world.parse_prompt(text), rng)
        return out

    def judge(self, images, prompts):
        first = (images != 0).float().argmax(1)
        p = torch.where((images != 0).any(1) & (first < self.world.grid_size), 0.9, 0.2)
        return type("J", (), {"p_yes": p, "log_odds": torch.logit(p)})()

    def gen_logprob(self, prompts, images):
        return -images.float().sum(1)

    def decode(self, images):
        return torch.from_numpy(np.stack([self.world.render(image) for image in images]))


def test_collect_and_build_on_a_hand_built_judge(tmp_path):
    world = ShapesWorld(seed=0)
    adapter = HandBuiltAdapter(world)
    prompts = stratified_prompts(world, "train", 10, seed=0)
    cands = collect_candidates(adapter, world, prompts, torch.arange(10), 4, 1.0, 3, 0, 0, Dist())
    assert cands.images.shape == (10, 4, world.image_tokens)
    for r, p in enumerate(prompts):
        for k in range(4):
            image = cands.images[r, k]
            first = int(torch.nonzero(image)[0]) if image.any() else None
            assert cands.p_yes[r, k].item() == pytest.approx(0.9 if first is not None and first < 3 else 0.2)
            assert cands.oracle[r, k].item() == world.oracle(p, image) == (k % 2 == 0)
    again = collect_candidates(adapter, world, prompts, torch.arange(10), 4, 1.0, 3, 0, 0, Dist())
    assert torch.equal(again.images, cands.images)  # seeded per (seed, round, chunk)
    accepted = accepted_mask(cands, "self")
    selection = select(cands.p_yes, accepted, 0.0, 0.0)
    dpo = build_train_set(adapter, cands, selection, prompts, "dpo", 4, Dist())
    for i, (r, c, j) in enumerate(selection.pairs.tolist()):
        assert dpo.prompts[i] == prompts[r].text
        assert torch.equal(dpo.images[i], cands.images[r, c]) and torch.equal(
            dpo.rejected[i], cands.images[r, j]
        )
        assert dpo.ref_chosen[i].item() == -cands.images[r, c].sum().item()
        assert dpo.oracle_chosen[i].item() == cands.oracle[r, c].item()
    oracle_sel = select(cands.p_yes, accepted_mask(cands, "oracle"), 0.0, 0.0)
    oracle_sft = build_train_set(adapter, cands, oracle_sel, prompts, "sft", 4, Dist())
    assert oracle_sft.oracle_chosen.all() and len(oracle_sft) == int(cands.oracle.sum())
    assert (
        len(
            build_train_set(
                adapter,
                cands,
                select(cands.p_yes, accepted_mask(cands, "none"), 0, 0),
                prompts,
                "sft",
                4,
                Dist(),
            )
        )
        == 40
    )
    pool = torch.arange(10)[selection.discard]
    path = save_round(tmp_path, 0, prompts, cands, accepted, selection, dpo, pool, {"round": 0})
    loaded, loaded_pool, info = load_round(path)
    assert loaded.prompts == dpo.prompts and info == {"round": 0} and torch.equal(loaded_pool, pool)
    for k, v in dpo.tensors().items():
        assert torch.equal(getattr(loaded, k), v)
    assert len((tmp_path / "data" / "round_0.jsonl").read_text().splitlines()) == 10


def test_accepted_mask_of_each_judge():
    cands = Candidates(
        torch.arange(2),
        torch.zeros(2, 3, 9, dtype=torch.long),
        torch.tensor([[0.2, 0.6, 0.51], [0.9, 0.5, 0.1]]),
        torch.tensor([[True, False, False], [True, True, False]]),
    )
    assert accepted_mask(cands, "self").tolist() == [[False, True, True], [True, False, False]]
    assert accepted_mask(cands, "self", 0.55).tolist() == [[False, True, False], [True, False, False]]
    assert torch.equal(accepted_mask(cands, "oracle"), cands.oracle)
    assert accepted_mask(cands, "none").all()
    assert accepted_mask(cands, "inverted").tolist() == [[True, False, False], [False, True, True]]


def test_noisy_judge_flips_a_seeded_fraction_of_the_self_verdicts():
    g = torch.Generator().manual_seed(0)
    p_yes = torch.rand(400, 10, generator=g)
    cands = Candidates(torch.arange(400), torch.zeros(400, 10, 1, dtype=torch.long), p_yes, p_yes > 0.3)
    verdict = accepted_mask(cands, "self")
    flipped = accepted_mask(cands, "noisy:0.3", seed=1, round_index=2) ^ verdict
    # 4000 independent Bernoulli(0.3) flips: the share is within 5 standard errors (0.036) of 0.3
    assert abs(flipped.float().mean().item() - 0.3) < 5 * (0.3 * 0.7 / 4000) ** 0.5
    assert torch.equal(flipped, accepted_mask(cands, "noisy:0.3", seed=1, round_index=2) ^ verdict)
    assert not torch.equal(flipped, accepted_mask(cands, "noisy:0.3", seed=2, round_index=2) ^ verdict)
    assert not torch.equal(flipped, accepted_mask(cands, "noisy:0.3", seed=1, round_index=3) ^ verdict)
    assert torch.equal(accepted_mask(cands, "noisy:1"), accepted_mask(cands, "inverted"))
    for judge in ("self", "inverted", "noisy:0.3"):  # the ranking agrees with the verdicts
        scores = judged_scores(cands, judge, seed=1, round_index=2)
        assert torch.equal(scores > 0.5, accepted_mask(cands, judge, seed=1, round_index=2)), judge


def test_an_inverted_judge_pairs_its_most_confident_no_over_its_most_confident_yes():
    p_yes = torch.tensor([[0.2, 0.9, 0.6, 0.05], [0.7, 0.8, 0.95, 0.6]])
    cands = Candidates(torch.arange(2), torch.zeros(2, 4, 1, dtype=torch.long), p_yes, p_yes > 0.5)
    selection = select(judged_scores(cands, "inverted"), accepted_mask(cands, "inverted"), 0.0, 0.0)
    assert selection.pairs.tolist() == [[0, 3, 1]]  # chosen p = 0.05, rejected p = 0.9
    assert selection.discard.tolist() == [1]  # the model accepts every candidate: the inverted judge none


@pytest.mark.parametrize(
    ("judge", "message"),
    [
        ("noisy:0", "noisy:P needs"),
        ("noisy:1.5", "noisy:P needs"),
        ("noisy:x", "noisy:P needs"),
        ("nois", "expected one of"),
    ],
)
def test_bad_judges_are_refused_by_name(judge, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(judge=judge)
    with pytest.raises(ValueError, match=message):
        accepted_mask(
            Candidates(torch.arange(1), torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1).bool()),
            judge,
        )
    assert DataConfig(judge="noisy:0.25").judge == "noisy:0.25"


def test_stratified_prompts_balance_categories_and_splits():
    world = ShapesWorld(seed=0)
    train = stratified_prompts(world, "train", 40, seed=0)
    available = {c: len(world.prompts("train", c)) for c in world.categories}
    counts = {c: sum(p.category == c for p in train) for c in world.categories}
    assert sum(counts.values()) == 40 and len({p.text for p in train}) == 40
    open_counts = [counts[c] for c in world.categories if counts[c] < available[c]]
    # round-robin: a category is either exhausted or within one prompt of the largest share
    assert max(counts.values()) - min(open_counts) <= 1
    assert all(counts[c] == available[c] or counts[c] >= max(counts.values()) - 1 for c in world.categories)
    assert not {p.text for p in train} & {p.text for p in world.prompts("eval")}
    with pytest.raises(ValueError, match="prompts"):
        stratified_prompts(world, "eval", 10**6, seed=0)
