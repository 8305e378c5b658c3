"""Triton kernels, each next to its launcher and the pure-torch reference that is the CPU path."""

from ntkdyn.kernels.kron_projection import kron_projection, kron_projection_reference, kron_projection_triton

__all__ = ["kron_projection", "kron_projection_reference", "kron_projection_triton"]
