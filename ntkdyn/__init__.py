"""ntkdyn: self-improvement of unified multimodal models with the shared empirical NTK
between generation and understanding tracked during training.

The public names are imported when first used (PEP 562): ``import ntkdyn`` loads nothing heavy, and
``ntkdyn.NTKDynamicsCallback`` imports transformers' Trainer only when asked for.
"""

from importlib import import_module

_EXPORTS = {
    "GradientProjector": "ntkdyn.analysis.projector",
    "ProjectionConfig": "ntkdyn.analysis.projector",
    "empirical_ntk": "ntkdyn.analysis.ntk",
    "exact_ntk": "ntkdyn.analysis.ntk",
    "NTKDynamicsCallback": "ntkdyn.analysis.callback",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ntkdyn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
