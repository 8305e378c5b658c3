"""Projected per-sample gradients of any per-sample scalar of a PyTorch model.

``GradientProjector(model, config).per_sample(fn, batch)`` returns Phi [B, D] whose row b is a seeded
random projection (sketches.py) of grad_theta fn(model, batch)[b] over the tracked parameters theta:

    E[<Phi_a, Phi_b>] = <grad f_a, grad f_b>          (the empirical NTK, unbiased; kind="exact": equal)
    E[<Phi_b, project_update(delta)>] = grad f_b . delta

``per_sample_all(fn, batch, precondition, tangents)`` gives from the same single recording fn's values,
Phi, the preconditioned Phi and the exact dots <grad f_b, t_k> with K tangents (the first-order change of
f_b along each t_k; sketches.TangentDots), the views the tracker needs at a tracked step.

How, for one call:
  1. capture.py   ONE forward of fn, recording every torch function call that uses a tracked
                  parameter (a TorchFunctionMode) and the stack of module calls (hooks). A call whose
                  function has a rule (rules.py: F.linear, torch.addmm, F.embedding, conv1d/2d, a 1-D
                  parameter scaling the last axis as RMSNorm's weight does) with the
                  parameter in a parameter role keeps its input and output; any other use goes to the
                  innermost module call holding the parameter, which is recorded whole. A second forward
                  only where needed: outputs with 1 row broadcast over the batch are expanded to B rows,
                  tensors the model modifies in place later are copied.
  2. layout.py    TWO backward passes to the recorded outputs, of sum_b f_b and of sum_b r_b f_b: where a
                  part of an output belongs to sample b alone the second is r_b times the first, so each
                  output's sample axis (batch- or sequence-first, flattened [B*T, H] rows, one sample) is
                  read from autograd, never guessed from shapes; an output shared by several samples is
                  refused by name (UnsupportedModuleError). A later recording with the same
                  signature (the same calls, parameters and axes of size B: views.signature) reuses the
                  layouts: one backward.
  3. rules.py     closed forms from inputs and output-gradients (sum_t g_t a_t^T, ...), fused with the
                  Kronecker projection; generic.py: torch.func per sample on the module call with its
                  real positional and keyword inputs, verified against one vjp of the whole call, else a
                  per-sample loop of vjps.
  4. checks.py    Parameters whose gradient path the recorder cannot see (a custom autograd.Function,
                  reentrant checkpointing) are refused by name. The first per_sample call with each fn also
                  runs ``check``: sum_b w_b Phi_b must equal the projection of the full-batch gradient of
                  sum_b w_b f_b for random w (one more forward and backward; SelfCheckError otherwise).

``capture()`` (step_capture.py) gives the features from the caller's own forward and backward instead:
the training step's, with no second pass over the batch, once a full recording of the same structure has
read the layouts (the tracker's training features, the gradient store).

A parameter used in several places (tied embeddings, a layer reused over time) is one block summing
every use. Train-mode dropout and batch statistics are refused (call model.eval()). Padding: tokens
with zero output-gradient contribute exactly nothing (dropped with ``where``, so NaN activations there
cannot leak); nn.Embedding's padding_idx rows get nothing, as in torch. A torch.compile'd model is
unwrapped, compiled submodules run eagerly while recording.
"""

from ntkdyn.analysis.projector.config import (
    DEFAULT_K,
    DISTRIBUTIONS,
    KINDS,
    ProjectionConfig,
    select_parameters,
)
from ntkdyn.analysis.projector.errors import SelfCheckError, UnsupportedModuleError
from ntkdyn.analysis.projector.projector import GradientProjector
from ntkdyn.analysis.projector.rules import RULES, Rule, register
from ntkdyn.analysis.projector.sketches import random_matrix

__all__ = [
    "DEFAULT_K",
    "DISTRIBUTIONS",
    "KINDS",
    "RULES",
    "GradientProjector",
    "ProjectionConfig",
    "Rule",
    "SelfCheckError",
    "UnsupportedModuleError",
    "random_matrix",
    "register",
    "select_parameters",
]
