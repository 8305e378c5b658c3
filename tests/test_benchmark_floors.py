"""benchmarks/tracking.py's store floor forms the real per-sample blocks: P_out^T (dl_b/dW) P_in of every
nn.Linear call, against each sample's own backward (an explicit per-sample loop)."""

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

path = Path(__file__).resolve().parents[1] / "benchmarks" / "tracking.py"
spec = importlib.util.spec_from_file_location("tracking_benchmark", path)
tracking = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tracking
spec.loader.exec_module(tracking)


def test_bare_linear_capture_forms_each_samples_projected_weight_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    x = torch.randn(3, 4, 6, dtype=torch.double)

    def losses(m: nn.Module) -> torch.Tensor:  # [B]: each sample's loss over its tokens
        return (m(x) ** 2).sum((1, 2)) * torch.tensor([1.0, -2.0, 0.5], dtype=torch.double)

    with tracking.bare_linear_capture(model, 4) as (blocks, factors):
        # the hooks read the factors at each call: float64 ones make the comparison exact to rounding
        factors.update({m: tuple(None if f is None else f.double() for f in pf) for m, pf in factors.items()})
        losses(model).sum().backward()
    assert [m for m, _ in blocks] == [model[2], model[0]]  # the backward's order
    assert [tuple(b.shape) for _, b in blocks] == [(3, 3, 4), (3, 4, 4)]  # d_out = 3 <= k kept exact
    for module, block in blocks:
        p_out, p_in = factors[module]
        for b in range(3):
            model.zero_grad()
            losses(model)[b].backward()
            grad = module.weight.grad
            expected = (grad if p_out is None else p_out.T @ grad) @ p_in
            torch.testing.assert_close(block[b], expected, rtol=1e-10, atol=1e-10)
