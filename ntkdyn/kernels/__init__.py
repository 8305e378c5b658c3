"""Per-sample projection kernels: the pure-torch reference and dispatcher (always importable) and the
Triton kernel (:mod:`ntkdyn.kernels.kron_projection_triton`, imported only where it is used)."""

from ntkdyn.kernels.kron_projection import IMPLEMENTATIONS, kron_projection, kron_projection_reference

__all__ = ["IMPLEMENTATIONS", "kron_projection", "kron_projection_reference"]
