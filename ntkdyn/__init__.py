"""ntkdyn: self-improvement of unified multimodal models with the shared empirical NTK
between generation and understanding tracked during training."""

from ntkdyn.analysis.ntk import empirical_ntk, exact_ntk
from ntkdyn.analysis.projector import GradientProjector, ProjectionConfig

__all__ = ["GradientProjector", "NTKDynamicsCallback", "ProjectionConfig", "empirical_ntk", "exact_ntk"]


def __getattr__(name: str):
    """Lazy export: ``ntkdyn.NTKDynamicsCallback`` imports transformers' Trainer only when asked for."""
    if name == "NTKDynamicsCallback":
        from ntkdyn.trainer.callbacks import NTKDynamicsCallback

        return NTKDynamicsCallback
    raise AttributeError(f"module 'ntkdyn' has no attribute {name!r}")
