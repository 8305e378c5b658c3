"""Unified-model adapters and their registry (``load_adapter``)."""

from __future__ import annotations

from collections.abc import Sequence

from ntkdyn.models.base import Judgement, UnifiedAdapter

MODEL_NAMES = ("toy", "toy-tiny", "janus", "janus-tiny", "emu3", "emu3-tiny")


def check_model_name(name: str) -> str:
    """``name`` if the registry knows it, else ValueError listing the names."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    return name


def check_model_spec(spec: Sequence[str]) -> None:
    """The ``--model NAME [PATH]`` of a command line: one or two items, a name the registry knows."""
    if not 1 <= len(spec) <= 2:
        raise ValueError(f"model: expected NAME [PATH], got {list(spec)!r}")
    check_model_name(spec[0])


def load_adapter(name: str, path: str | None = None, **kw) -> UnifiedAdapter:
    """The adapter called ``name``.

    toy: the pre-trained toy model, from ``path`` if given, else the weights shipped with the package
    (ntkdyn.models.toy_recipe.pretrained_toy_dir; their SHA-256 is checked against their manifest);
    toy-tiny: a random tiny toy (kw: seed); janus / emu3: weights from ``path`` (a local directory or
    hub id); janus-tiny / emu3-tiny: tiny random models built offline (kw: seed).
    """
    check_model_name(name)
    if name == "toy":
        from ntkdyn.models.toy import ToyAdapter
        from ntkdyn.models.toy_recipe import pretrained_toy_dir, verified_toy_dir

        if kw:
            raise ValueError(f"load_adapter('toy') takes no options (got {sorted(kw)}): give a path instead")
        directory = pretrained_toy_dir() if path is None else verified_toy_dir(path)
        return ToyAdapter.from_pretrained(directory)
    if name == "toy-tiny":
        from ntkdyn.models.toy import ToyAdapter

        return ToyAdapter.tiny(**kw)
    if name in ("janus", "janus-tiny"):
        from ntkdyn.models.janus import JanusAdapter as cls
    else:
        from ntkdyn.models.emu3 import Emu3Adapter as cls
    if name.endswith("-tiny"):
        return cls.tiny(**kw)
    if path is None:
        raise ValueError(f"model {name!r} needs a path: a local directory or hub id of its weights")
    return cls.from_pretrained(path, **kw)


__all__ = [
    "MODEL_NAMES",
    "Judgement",
    "UnifiedAdapter",
    "check_model_name",
    "check_model_spec",
    "load_adapter",
]
