"""The command lines built from the config tree: every option lands in its dataclass and in config.json,
a bad value fails with a usage error naming it before any model is loaded, --resume refuses a changed
option by name, and the evaluate and pretrain CLIs are built the same way."""

import importlib
import inspect
import json
from pathlib import Path

import pytest

import ntkdyn.evaluate
import ntkdyn.track
from ntkdyn.cli import config_parser, option_flags, parse_config
from ntkdyn.config import TRACKING_K, RunConfig, changed_options
from ntkdyn.evaluate import EvaluateConfig
from ntkdyn.pretrain import PretrainOptions
from ntkdyn.trainer.config import TrainConfig


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load (or pre-training) fails the test."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(ntkdyn.track, "load_adapter", loaded)
    monkeypatch.setattr(ntkdyn.evaluate, "load_adapter", loaded)


def parse(argv, cls=RunConfig):
    return parse_config(config_parser(cls, "test", ""), cls, argv)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--run", "dpo", "--beta", "0"], "beta"),
        (["--run", "dpo", "--candidates", "1"], "candidates"),
        (["--run", "ppo"], "invalid choice"),
        (["--run", "dpo", "--judge", "none"], "judge"),
        (["--run", "sft", "--lr", "-1"], "lr"),
        (["--track-every", "0"], "track_every"),
        (["--proj-k", "0"], "ProjectionConfig.k"),
        (["--proj-kind", "sparse"], "ProjectionConfig.kind"),
        (["--proj-kind", "exact", "--proj-k", "16"], "ProjectionConfig.k must be unset"),
        (["--probes-per-category", "0"], "probes_per_category"),
        (["--eval-und-pairs", "-1"], "eval_und_pairs"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "janus", "a", "b"], "NAME [PATH]"),
        (["--prompts", "no-such-file.txt"], "prompts"),
        (["--select-every", "-1"], "select_every"),
        (["--select-every", "5", "--select-prompts", "1"], "select_prompts"),
        (["--select-every", "5", "--select-candidates", "0"], "select_candidates"),
        (["--select-every", "5", "--patience", "-1"], "patience"),
        (["--patience", "2"], "patience: early stopping (patience 2) needs selection points"),
    ],
)
def test_bad_options_fail_before_any_model_is_loaded(tmp_path, capsys, no_model_loading, args, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        ntkdyn.track.main([*args, "--out", str(out)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_every_option_reaches_the_config_and_config_json():
    cfg = parse(["--run", "sft", "--lr", "0.01", "--track-every", "7", "--proj-k", "32", "--proj-seed", "3"])
    assert cfg.train.lr == 0.01 and cfg.tracking.track_every == 7
    assert (cfg.tracking.projection.kind, cfg.tracking.projection.k, cfg.tracking.projection.seed) == (
        "kronecker",
        32,
        3,
    )
    saved = cfg.to_dict()
    assert saved["tracking"]["projection"]["k"] == 32 and saved["tracking"]["track_every"] == 7
    flat_options = option_flags(RunConfig)
    for path in flat_options:  # every option has its place in config.json
        node = saved
        for part in path.split("."):
            node = node[part]
    assert flat_options["tracking.projection.k"] == "--proj-k" and flat_options["train.lr"] == "--lr"
    # the projection keeps the tracking default k unless its kind has no k
    assert parse([]).tracking.projection.k == TRACKING_K
    assert parse(["--proj-kind", "dense"]).tracking.projection.k == TRACKING_K
    assert parse(["--proj-kind", "exact"]).tracking.projection.k is None
    assert parse(["--no-track"]).track is False and parse(["--no-figures"]).figures is False
    # derived defaults follow the options, as in a config built directly
    assert parse(["--run", "sft"]).train == RunConfig(train=TrainConfig(run="sft")).train
    assert parse(["--run", "sft"]).train.lr == 3e-4 and parse([]).train.lr == 5e-5


def test_out_dir_holding_another_run_needs_resume_with_the_same_options(tmp_path, capsys, no_model_loading):
    (tmp_path / "config.json").write_text(
        json.dumps(parse(["--run", "sft", "--out", str(tmp_path)]).to_dict())
    )
    with pytest.raises(SystemExit):
        ntkdyn.track.main(["--run", "sft", "--out", str(tmp_path)])
    assert "holds a run" in capsys.readouterr().err
    for changed, flag in (
        (["--beta", "0.2"], "--beta"),
        (["--track-every", "20"], "--track-every"),
        (["--select-every", "20"], "--select-every"),
        (
            ["--proj-k", "64"],
            "--proj-k",
        ),
    ):
        with pytest.raises(SystemExit):
            ntkdyn.track.main(["--run", "sft", "--out", str(tmp_path), "--resume", *changed])
        err = capsys.readouterr().err
        assert "differ" in err and f"{flag} (" in err, err
    # figures are drawn after the run: --no-figures does not change what it computes
    saved = json.loads((tmp_path / "config.json").read_text())
    assert changed_options(saved, parse(["--run", "sft", "--out", str(tmp_path), "--no-figures"])) == []
    assert changed_options(saved, parse(["--run", "sft", "--out", str(tmp_path), "--beta", "0.2"]))


def test_evaluate_and_pretrain_options_are_built_the_same_way(tmp_path, capsys, no_model_loading):
    assert parse(["--model", "janus", "/weights/janus"], EvaluateConfig).model == ["janus", "/weights/janus"]
    assert parse(["--model", "emu3-tiny"]).model == ["emu3-tiny"]
    for bad, message in (["--model", "nope"], "unknown model 'nope'"), (["--candidates", "0"], "candidates"):
        with pytest.raises(SystemExit) as exit_:
            ntkdyn.evaluate.main(bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    options = parse(
        ["--hidden-size", "32", "--num-heads", "2", "--steps", "900", "--out", "x"], PretrainOptions
    )
    assert options.recipe.model.hidden_size == 32 and options.recipe.steps == 900 and options.out == "x"
    assert options.recipe.model.initializer_range == 0.09  # the recipe's default, not ToyConfig's
    weights = parse(["--und-category-weights", "1", "1", "1", "1", "1", "2"], PretrainOptions)
    assert weights.recipe.und_category_weights == (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)
    with pytest.raises(SystemExit):
        parse(["--hidden-size", "30", "--num-heads", "4"], PretrainOptions)  # head size 7.5
    assert "hidden_size" in capsys.readouterr().err


def test_console_scripts_name_the_four_mains():
    """pyproject's ntkdyn-* scripts point at the CLIs' main functions; each main returns an exit code."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "scripts"
    ]
    assert set(scripts) == {"ntkdyn-track", "ntkdyn-evaluate", "ntkdyn-pretrain", "ntkdyn-plot"}
    for name, target in scripts.items():
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        assert module == f"ntkdyn.{name.removeprefix('ntkdyn-')}" and function == "main"
        assert inspect.signature(main).return_annotation in (int, "int")


@pytest.mark.parametrize("module", ["ntkdyn.track", "ntkdyn.evaluate", "ntkdyn.pretrain"])
def test_help_lists_every_option(module, capsys):
    """--help prints (a literal % in a field's help once broke argparse's formatting) and names the store."""
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text
    if module == "ntkdyn.track":
        assert "95%" in text and "--store-k" in text
