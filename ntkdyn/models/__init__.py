"""Unified-model adapters and their registry (``load_adapter``)."""

from __future__ import annotations

from ntkdyn.models.base import Judgement, UnifiedAdapter

MODEL_NAMES = ("toy", "toy-tiny", "janus", "janus-tiny", "emu3", "emu3-tiny")


def load_adapter(name: str, path: str | None = None, **kw) -> UnifiedAdapter:
    """The adapter called ``name``.

    toy: the pre-trained toy model, from ``path`` if given, else the cache (pre-trained and
    cached the first time; kw go to ``ntkdyn.pretrain.PretrainConfig``); toy-tiny: a random
    tiny toy (kw: seed); janus / emu3: weights from ``path`` (a local directory or hub id);
    janus-tiny / emu3-tiny: tiny random models built offline (kw: seed).
    """
    if name == "toy":
        if path is not None:
            from ntkdyn.models.toy import ToyAdapter

            return ToyAdapter.from_pretrained(path)
        from ntkdyn.pretrain import PretrainConfig, pretrained_toy

        return pretrained_toy(PretrainConfig(**kw))
    if name == "toy-tiny":
        from ntkdyn.models.toy import ToyAdapter

        return ToyAdapter.tiny(**kw)
    if name in ("janus", "janus-tiny"):
        from ntkdyn.models.janus import JanusAdapter as cls
    elif name in ("emu3", "emu3-tiny"):
        from ntkdyn.models.emu3 import Emu3Adapter as cls
    else:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    if name.endswith("-tiny"):
        return cls.tiny(**kw)
    if path is None:
        raise ValueError(f"model {name!r} needs a path: a local directory or hub id of its weights")
    return cls.from_pretrained(path, **kw)


__all__ = ["MODEL_NAMES", "Judgement", "UnifiedAdapter", "load_adapter"]
