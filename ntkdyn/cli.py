"""Command lines built from config dataclasses, the same way for every CLI (track, evaluate, pretrain).

Every field of the config dataclass becomes one option ``--field-name`` with the field's ``help``
metadata; a nested dataclass field becomes an argument group of its own fields, named with the
metadata ``cli_prefix`` ("" keeps the bare names: ``--lr`` for ``train.lr``; "proj" gives
``--proj-k`` for ``tracking.projection.k``), restricted to the metadata ``cli_fields`` when given.
Option types follow the annotations: int, float, str, their ``| None`` forms, ``Literal[...]`` and
Enums (choices), ``list[str]`` and ``tuple[float, ...]`` (one or more values), bool (``--name`` for a
field that defaults to False, ``--no-name`` for one that defaults to True).

Parsing builds the config bottom-up from the given options; every other field keeps its default. A
nested config is built anew from the given options, the defaults its owner declares for it (where the
owner's default differs from the class's own: the tracking projection's k = 128) and the class's
defaults, so that derived defaults follow the options (``--run sft`` gets SFT's learning rate); a
declared default that contradicts the given options is dropped (``--proj-kind exact`` has no k).
Every ``__post_init__`` validates, so a bad value fails with argparse's usage error (exit code 2)
naming the option, before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved annotation) of every field of a dataclass."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _is_config(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _flag(prefix: str, name: str) -> str:
    return "--" + "-".join(p for p in (prefix, name.replace("_", "-")) if p)


def _options(cls: type, path: tuple[str, ...] = (), prefix: str = "", owner: Any = None, only=None):
    """(path of the field, flag, field, annotation, default) of every option of ``cls``, nested configs
    expanded; ``owner``: the default instance the nested defaults come from."""
    for f, annotation in _fields(cls):
        if only is not None and f.name not in only:
            continue
        default = _default(f) if owner is None else getattr(owner, f.name)
        if _is_config(annotation):
            nested = f.metadata.get("cli_prefix", f.name)
            yield from _options(annotation, (*path, f.name), nested, default, f.metadata.get("cli_fields"))
        else:
            yield (*path, f.name), _flag(prefix, f.name), f, annotation, default


def option_flags(cls: type) -> dict[str, str]:
    """Dotted field path -> its option, e.g. {"tracking.projection.k": "--proj-k", ...}."""
    return {".".join(path): flag for path, flag, *_ in _options(cls)}


def _argument(annotation: Any) -> dict:
    """add_argument keywords for a field's annotation."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if optional:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        return {"type": type(choices[0]), "choices": choices}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"type": annotation, "choices": list(annotation)}
    if origin in (list, tuple):
        return {"type": typing.get_args(annotation)[0], "nargs": "+"}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"cli: no command-line form for the annotation {annotation!r}")


def config_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of config dataclass ``cls`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    groups: dict[tuple[str, ...], Any] = {}
    for path, flag, f, annotation, default in _options(cls):
        owner = path[:-1]
        if owner not in groups:
            groups[owner] = parser.add_argument_group(".".join(owner)) if owner else parser
        target, dest = groups[owner], ".".join(path)
        helptext = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if annotation is bool:
            action, name = ("store_false", "--no-" + flag[2:]) if default else ("store_true", flag)
            target.add_argument(name, dest=dest, action=action, default=argparse.SUPPRESS, help=helptext)
            continue
        shown = default.value if isinstance(default, enum.Enum) else default
        if isinstance(shown, list | tuple):
            shown = " ".join(map(str, shown))
        kwargs = _argument(annotation)
        if "choices" not in kwargs:
            kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
        target.add_argument(
            flag,
            dest=dest,
            default=argparse.SUPPRESS,
            help=f"{helptext} (default: {shown})" if shown is not None else helptext,
            **kwargs,
        )
    return parser


def _build(cls: type, given: dict[str, Any], path: tuple[str, ...] = (), base: dict | None = None) -> Any:
    """An instance of ``cls`` from the given options (dotted path -> value); the other fields from
    ``base`` (field -> value), else the class's defaults."""
    kwargs = dict(base or {})
    for f, annotation in _fields(cls):
        key = ".".join((*path, f.name))
        if _is_config(annotation):
            mine = {k: v for k, v in given.items() if k.startswith(key + ".")}
            if mine:
                kwargs[f.name] = _nested(annotation, kwargs.get(f.name, _default(f)), mine, (*path, f.name))
        elif key in given:
            kwargs[f.name] = given[key]
    return cls(**kwargs)


def _nested(cls: type, default: Any, given: dict[str, Any], path: tuple[str, ...]) -> Any:
    """A nested config built from the given options, the defaults its owner declares for it (the
    fields where the owner's default instance differs from ``cls()``) and the class's defaults; a
    declared default that contradicts the given options is dropped."""
    reference = cls()
    declared = {
        f.name: getattr(default, f.name)
        for f in dataclasses.fields(cls)
        if f.init and getattr(default, f.name) != getattr(reference, f.name)
    }
    try:
        return _build(cls, given, path, declared)
    except ValueError:
        if not declared:
            raise
        return _build(cls, given, path)


def parse_config(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str] | None) -> Any:
    """Parse ``argv`` into an instance of ``cls``; an invalid value exits with the parser's usage error
    (code 2) naming it."""
    given = vars(parser.parse_args(argv))
    for path, _, _, annotation, _ in _options(cls):
        key = ".".join(path)
        if key in given and typing.get_origin(annotation) is tuple:
            given[key] = tuple(given[key])
    try:
        return _build(cls, given)
    except (ValueError, TypeError) as err:
        parser.error(str(err))


def model_option() -> Any:
    """The ``--model NAME [PATH]`` field of the track and evaluate configs (default: the pre-trained toy);
    the config checks it with ntkdyn.models.check_model_spec."""
    return dataclasses.field(
        default_factory=lambda: ["toy"],
        metadata={
            "help": "adapter name and optional local path, e.g. --model toy or --model janus PATH",
            "metavar": ("NAME", "PATH"),
        },
    )
