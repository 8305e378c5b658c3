"""evaluate on a tiny toy: records agree with the world's oracle and the model's own judge,
metrics agree with direct counts, the CLI writes its outputs and rejects bad input clearly."""

import json

import numpy as np
import pytest
import torch

from ntkdyn.evaluate import METRIC_KEYS, CandidateRecord, evaluate, main, read_prompts, understanding_records
from ntkdyn.models.base import Judgement
from ntkdyn.models.scenes import oracle_of_images, resize_pixels, world_images
from ntkdyn.models.toy import ToyAdapter


@pytest.fixture(scope="module")
def toy():
    return ToyAdapter.tiny(seed=0)


@pytest.fixture(scope="module")
def result(toy):
    prompts = [p for c in toy.world.categories for p in toy.world.prompts("eval", c)[:2]]
    return evaluate(toy, toy.world, prompts, candidates=3, seed=0, und_pairs=1)


def test_records_agree_with_oracle_and_judge(toy, result):
    assert len(result.records) == 6 * 2 * 3
    images = torch.stack([r.image for r in result.records])
    p_yes = toy.judge(images, [r.prompt.text for r in result.records]).p_yes
    torch.testing.assert_close(
        torch.tensor([r.p_yes for r in result.records]), p_yes.detach(), rtol=1e-4, atol=1e-5
    )
    for r in result.records:
        assert r.parsed and r.oracle == toy.world.oracle(r.prompt, r.image)
        assert r.verdict == (r.p_yes > 0.5)


def test_metrics_match_direct_counts(result):
    m = result.metrics
    assert set(m) == {*METRIC_KEYS, "per_category"}
    for category, cm in m["per_category"].items():
        rec = [r for r in result.records if r.prompt.category == category]
        v = np.array([r.verdict for r in rec])
        o = np.array([r.oracle for r in rec])
        assert set(cm) == set(METRIC_KEYS)
        assert cm["non_unification"] == pytest.approx(np.mean(~v))
        assert cm["gen_alignment"] == pytest.approx(np.mean(o))
        assert cm["weak_generation"] == (pytest.approx(np.mean(~o[~v])) if (~v).any() else None)
        assert cm["self_precision"] == (pytest.approx(np.mean(o[v])) if v.any() else None)
        assert cm["false_positive_rate"] == (pytest.approx(np.mean(v[~o])) if (~o).any() else None)
        assert cm["false_negative_rate"] == (pytest.approx(np.mean(~v[o])) if o.any() else None)
    cats = m["per_category"].values()
    assert m["non_unification"] == pytest.approx(np.mean([c["non_unification"] for c in cats]))
    kinds = {r.kind for r in result.und_records}
    assert kinds == {"positive", "color", "shape", "count", "added", "removed", "relation"}
    for kind in kinds:
        right = [(r.p_yes > 0.5) == (kind == "positive") for r in result.und_records if r.kind == kind]
        assert m["und_accuracy_per_negative"][kind] == pytest.approx(np.mean(right))


class AlwaysYes(ToyAdapter):
    """A toy whose understanding accepts everything."""

    def judge(self, images, prompts):
        log_odds = torch.full((len(prompts),), 20.0)
        return Judgement(torch.sigmoid(log_odds), log_odds)


def test_evaluate_on_a_toy_that_always_answers_yes(toy):
    """With every answer "yes", each rate follows from the oracle alone."""
    yes = AlwaysYes(toy.model, toy.world, toy.config)
    prompts = toy.world.prompts("eval", "color_attribution")[:3]
    m = evaluate(yes, toy.world, prompts, candidates=4, und_pairs=2).metrics
    assert (
        m["non_unification"] == 0 and m["weak_generation"] is None and m["false_negative_rate"] in (0.0, None)
    )
    assert m["false_positive_rate"] == 1.0 and m["self_precision"] == m["gen_alignment"]
    assert m["und_accuracy_per_negative"]["positive"] == 1.0 and m["und_accuracy"] == 0.5
    negatives = {k: v for k, v in m["und_accuracy_per_negative"].items() if k != "positive"}
    assert negatives == {k: 0.0 for k in ("color", "shape", "count", "added", "removed")}


def test_cli_writes_table_json_and_figure(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "a circle"}\n\n{"text": "a red circle left of a blue square"}\n')
    code = main(
        [
            "--model",
            "toy-tiny",
            "--prompts",
            str(prompts),
            "--candidates",
            "2",
            "--und-pairs",
            "1",
            "--json",
            str(tmp_path / "m.json"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "single_object" in table and "spatial_relation" in table and "overall" in table
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {*METRIC_KEYS, "per_category"}
    assert (tmp_path / "out" / "generations.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "holds no prompts"),
        ("\n  \n", "holds no prompts"),
        ('{"text": "a circle"}\n{"txt": 1}\n', ":2:"),
        ("{not json\n", "not a JSON object"),
        ("a circle\na flying saucer\n", ":2: ShapesWorld cannot read"),
    ],
)
def test_bad_prompts_files_are_rejected(toy, tmp_path, content, message):
    path = tmp_path / ("p.jsonl" if content.startswith("{") else "p.txt")
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompts(path, toy.world)


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "nope"])
    assert exit_.value.code == 2 and "unknown model 'nope'" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["--model", "toy-tiny", "--prompts", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert main(["--model", "toy", str(tmp_path)]) == 2  # a directory without a toy model
    assert "holds no toy model" in capsys.readouterr().err


def test_records_round_trip_as_rows(toy, result):
    rows = [r.to_row() for r in result.records]
    back = [CandidateRecord.from_row(row, toy.world) for row in rows]
    for r, b in zip(result.records, back, strict=True):
        assert torch.equal(r.image, b.image) and (r.prompt, r.p_yes, r.verdict, r.oracle, r.parsed) == (
            b.prompt,
            b.p_yes,
            b.verdict,
            b.oracle,
            b.parsed,
        )


class _ToyAt96px(ToyAdapter):
    """The tiny toy with a 'real model' resolution: decodes to 96 px, encodes 96 px."""

    image_size = 96

    def decode(self, images):
        return resize_pixels(super().decode(images), 96)

    def encode(self, pixels):
        if pixels.shape[1:3] != (96, 96):
            raise ValueError("expects 96 px")
        return super().encode(resize_pixels(pixels, 48, mode="area"))


def test_images_of_another_resolution_round_trip_through_the_oracle(toy):
    """world_images resizes scenes to the adapter's size and oracle_of_images brings its images back:
    the oracle on the pixels equals the oracle on the scenes."""
    wide = _ToyAt96px(toy.model, toy.world, toy.config)
    rng = np.random.default_rng(0)
    prompts = [p for c in toy.world.categories for p in toy.world.prompts("eval", c)[:3]]
    scenes = [toy.world.sample_image(p, rng) for p in prompts]
    asked = [p if i % 2 else prompts[i - 1] for i, p in enumerate(prompts)]  # every other one false
    tokens = world_images(wide, toy.world, scenes)
    assert torch.equal(tokens, torch.stack(scenes))
    oracle, parsed = oracle_of_images(wide, toy.world, asked, tokens)
    assert all(parsed)
    assert oracle == [toy.world.oracle(p, s) for p, s in zip(asked, scenes, strict=True)]
    assert any(oracle) and not all(oracle)


def test_understanding_records_are_the_evaluations_questions(toy, result):
    prompts = [p for c in toy.world.categories for p in toy.world.prompts("eval", c)[:2]]
    again = understanding_records(toy, toy.world, prompts, und_pairs=1, seed=0)
    assert [(r.prompt, r.kind) for r in again] == [(r.prompt, r.kind) for r in result.und_records]
    np.testing.assert_allclose([r.p_yes for r in again], [r.p_yes for r in result.und_records], atol=1e-6)
    other = understanding_records(toy, toy.world, prompts, und_pairs=1, seed=1)
    assert [r.p_yes for r in other] != [r.p_yes for r in again]  # other scenes
