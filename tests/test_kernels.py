"""The fused Kronecker projection kernel (under TRITON_INTERPRET=1) against its torch reference, and the
reference against a float64 token-by-token formula."""

import pytest
import torch

from ntkdyn.kernels.kron_projection import kron_projection, kron_projection_reference
from ntkdyn.kernels.kron_projection_triton import kron_projection_triton

# (B, T, DX, DY, KX, KY): DX = d_out (output-gradient side), DY = d_in (activation side)
SHAPES = [
    (2, 13, 70, 45, 24, 20),  # odd everything, T < BLOCK_T
    (1, 16, 16, 16, 16, 16),  # exactly one block
    (3, 20, 33, 17, 70, 9),  # KX > 64: two output tiles; T spans two token blocks
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def token_loop_float64(x, y, px, py, mask):
    """sum_t m_t (px^T x_t)(py^T y_t)^T, one token at a time in float64."""
    B, T, _ = x.shape
    px = torch.eye(x.shape[2], dtype=torch.float64) if px is None else px.double()
    py = torch.eye(y.shape[2], dtype=torch.float64) if py is None else py.double()
    out = torch.zeros(B, px.shape[1], py.shape[1], dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                out[b] += torch.outer(px.T @ x[b, t].double(), py.T @ y[b, t].double())
    return out


def make_inputs(shape, dtype, seed=0):
    B, T, DX, DY, KX, KY = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DX, generator=gen).to(dtype)
    y = torch.randn(B, T, DY, generator=gen).to(dtype)
    px = torch.randint(0, 2, (DX, KX), generator=gen).float() * 2 - 1
    py = torch.randn(DY, KY, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    return x, y, px, py, mask


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_token_loop(shape):
    x, y, px, py, mask = make_inputs(shape, torch.float32)
    expected = token_loop_float64(x, y, px, py, mask)
    torch.testing.assert_close(
        kron_projection_reference(x, y, px, py, mask).double(), expected, rtol=1e-5, atol=1e-3
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_kernel_matches_reference(shape, dtype):
    x, y, px, py, mask = make_inputs(shape, dtype)
    expected = kron_projection_reference(x, y, px, py, mask)
    for splits in (1, 2):
        out = kron_projection_triton(x, y, px, py, mask, splits=splits)
        assert out.dtype == torch.float32 and out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_feature_axis_splits_and_fused_scales_match_the_reference(shape):
    """x's feature axis cut into ranges (one program each, summed like token splits) and the per-feature
    scales of a factored preconditioner applied in the loads: the reference's sum with sx ∘ x, sy ∘ y,
    itself checked against the float64 token loop on pre-scaled inputs."""
    x, y, px, py, mask = make_inputs(shape, torch.float32, seed=4)
    gen = torch.Generator().manual_seed(5)
    sx, sy = torch.rand(shape[2], generator=gen) + 0.5, torch.rand(shape[3], generator=gen) + 0.5
    expected = kron_projection_reference(x, y, px, py, mask, sx, sy)
    looped = token_loop_float64(x * sx, y * sy, px, py, mask)
    torch.testing.assert_close(expected.double(), looped, rtol=1e-5, atol=1e-3)
    for dx_splits in (1, 2, 3):
        out = kron_projection_triton(x, y, px, py, mask, splits=2, dx_splits=dx_splits, block_d=16)
        torch.testing.assert_close(out, kron_projection_reference(x, y, px, py, mask), rtol=1e-5, atol=1e-3)
        scaled = kron_projection_triton(
            x, y, px, py, mask, scale_x=sx, scale_y=sy, dx_splits=dx_splits, block_d=16
        )
        torch.testing.assert_close(scaled, expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="give both"):
        kron_projection_triton(x, y, px, py, mask, scale_x=sx)


def test_identity_factors_and_strided_inputs():
    """px/py = None keeps an axis exact; non-contiguous inputs are read through their strides."""
    x, y, _, _, mask = make_inputs((2, 13, 20, 45, 16, 16), torch.float32)
    x_strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    expected = token_loop_float64(x, y, None, None, mask)
    out = kron_projection_triton(x_strided, y, None, None, mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-3)


def test_masked_tokens_never_leak_nan():
    x, y, px, py, mask = make_inputs((2, 13, 70, 45, 24, 20), torch.float32)
    x_nan, y_nan = x.clone(), y.clone()
    x_nan[~mask] = float("nan")
    y_nan[~mask] = float("inf")
    expected = token_loop_float64(x, y, px, py, mask).float()
    for implementation in ("torch", "triton"):
        out = kron_projection(x_nan, y_nan, px, py, mask, implementation=implementation)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("px_identity", [False, True])
def test_x_zero_where_masked_masks_y_alone_to_the_same_result(px_identity):
    """With x zero at the masked tokens (an output-gradient's zero rows), masking y alone gives the
    token loop's result even where y is not finite; without the hint, too."""
    x, y, px, py, mask = make_inputs((2, 13, 70, 45, 24, 20), torch.float32)
    px = None if px_identity else px
    x[~mask] = 0
    y_inf = y.clone()
    y_inf[~mask] = float("inf")
    expected = token_loop_float64(x, y, px, py, mask).float()
    for hint in (True, False):
        for implementation in ("torch", "triton"):
            out = kron_projection(
                x, y_inf, px, py, mask, implementation=implementation, x_zero_where_masked=hint
            )
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-3)


def test_triton_on_cpu_without_interpreter_fails_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, y, px, py, mask = make_inputs((1, 4, 16, 16, 16, 16), torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kron_projection(x, y, px, py, mask, implementation="triton")
    with pytest.raises(ValueError, match="implementation"):
        kron_projection(x, y, px, py, mask, implementation="cuda")


def test_float64_inputs_stay_float64_on_every_implementation():
    """kind="exact" on a float64 model: the reference computes in float64 (the kernel is float32-only)."""
    x, y, px, py, mask = make_inputs((2, 13, 20, 45, 16, 16), torch.float64)
    expected = token_loop_float64(x, y, px, py, mask)
    for implementation in ("torch", "triton"):
        out = kron_projection(x, y, px, py, mask, implementation=implementation)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_projector_preconditioned_features_are_the_same_on_the_triton_kernel():
    """GradientProjector's preconditioned features with the factored D fused into the kernel's loads
    (implementation="triton", interpreter) equal the torch path's."""
    from test_adam_kernel import _ids, _preconditioner
    from test_dynamics import float64_llama, sequence_logprob

    from ntkdyn import GradientProjector, ProjectionConfig

    model = float64_llama().float()
    batch = {"input_ids": _ids(1)}
    d = {n: v.float() for n, v in _preconditioner(model, rank_one=False).items()}
    features = [
        GradientProjector(model, ProjectionConfig(k=4, implementation=impl)).per_sample(
            sequence_logprob, batch, precondition=d
        )
        for impl in ("torch", "triton")
    ]
    torch.testing.assert_close(
        features[1], features[0], rtol=1e-5, atol=1e-5 * float(features[0].abs().max())
    )
