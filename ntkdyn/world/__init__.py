"""ShapesWorld: a grid world of colored shapes with an exact oracle (see shapes.py)."""

from ntkdyn.world.shapes import CATEGORIES, NEGATIVE_KINDS, Prompt, ShapesWorld

__all__ = ["CATEGORIES", "NEGATIVE_KINDS", "Prompt", "ShapesWorld"]
