"""ntkdyn: self-improvement of unified multimodal models with the shared empirical NTK
between generation and understanding tracked during training."""

from ntkdyn.analysis.ntk import empirical_ntk, exact_ntk
from ntkdyn.analysis.projector import GradientProjector, ProjectionConfig

__all__ = ["GradientProjector", "ProjectionConfig", "empirical_ntk", "exact_ntk"]
