"""The empirical NTK: exact_ntk against torch.func, kind="exact" against exact_ntk, and the accuracy and
unbiasedness of the default projection on a small LlamaForCausalLM."""

import pytest
import torch
from helpers import tiny_llama
from transformers import LlamaForCausalLM

from ntkdyn import ProjectionConfig, empirical_ntk, exact_ntk

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def llama():
    """2 layers, hidden 128 > k = 64, so that the default config really projects every matrix."""
    return tiny_llama(128, 128, 256, num_hidden_layers=2, max_position_embeddings=64)


def make_batch(B, T, seed, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T // 2 :] = 0  # one right-padded sample
    return ids, mask


def lm_logprob(model, batch):
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * mask[:, 1:]).sum(dim=1)


def last_token_entropy(model, batch):
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    return -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)


@pytest.fixture(scope="module")
def reference(llama):
    """float64 exact_ntk blocks of lm_logprob on batch_a and last_token_entropy on batch_b."""
    batch_a, batch_b = make_batch(6, 12, seed=1), make_batch(4, 12, seed=2)
    model64 = LlamaForCausalLM(llama.config).double().eval()
    model64.load_state_dict(llama.state_dict())

    def both(model, batches):  # one Jacobian for all three blocks
        return torch.cat([lm_logprob(model, batches[0]), last_token_entropy(model, batches[1])])

    full = exact_ntk(model64, both, (batch_a, batch_b))
    aa, ab, bb = full[:6, :6], full[:6, 6:], full[6:, 6:]
    return batch_a, batch_b, aa, ab, bb


def relative_error(estimate, exact):
    return ((estimate.double() - exact).norm() / exact.norm()).item()


def test_exact_ntk_matches_torch_func_jacobian():
    """exact_ntk (per-sample autograd loop) against vmap(jacrev) contraction of a functional model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.randn(3, 5, dtype=torch.float64)

    def f(model, inputs):
        return model(inputs).pow(2).sum(-1)

    params = {n: p.detach() for n, p in model.named_parameters()}

    def single(theta, row):
        return torch.func.functional_call(model, theta, (row[None],)).pow(2).sum()

    jac_x = torch.func.vmap(torch.func.jacrev(single), in_dims=(None, 0))(params, x)
    jac_y = torch.func.vmap(torch.func.jacrev(single), in_dims=(None, 0))(params, y)
    expected = sum(jac_x[n].reshape(4, -1) @ jac_y[n].reshape(3, -1).T for n in params)
    torch.testing.assert_close(exact_ntk(model, f, x, f, y), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_kind_reproduces_exact_ntk(llama, reference, dtype):
    """kind="exact" features and kernels come in the model's dtype when it is float64 (float32 otherwise),
    every kernel is accumulated in float64, so the bound follows from the model's dtype alone: float64
    rounding (1e-10) on the float64 model, float32 rounding of its forward and backward (1e-4 = ~1000 eps)
    on the float32 one, against the float64 reference."""
    batch_a, batch_b, aa, ab, _ = reference
    model = LlamaForCausalLM(llama.config).to(dtype).eval()
    model.load_state_dict(llama.state_dict())
    bound = 1e-10 if dtype == torch.float64 else 1e-4
    config = ProjectionConfig(kind="exact")
    kernel = empirical_ntk(model, lm_logprob, batch_a, config=config)
    assert kernel.dtype == dtype
    assert relative_error(kernel, aa) < bound
    cross = empirical_ntk(model, lm_logprob, batch_a, last_token_entropy, batch_b, config=config)
    assert cross.shape == (6, 4)
    assert relative_error(cross, ab) < bound


def test_default_projection_error_at_most_0_1(llama, reference):
    """Relative Frobenius error <= 0.1 on K_aa. The cross block of two unrelated measurements has tiny
    cosines (~0.01 here), so its error is checked on the cosine scale: |K_ab - K^_ab| / |g_a||g_b|."""
    batch_a, batch_b, aa, ab, bb = reference
    config = ProjectionConfig()
    assert config.kind == "kronecker" and config.k == 64
    assert relative_error(empirical_ntk(llama, lm_logprob, batch_a, config=config), aa) <= 0.1
    cross = empirical_ntk(llama, lm_logprob, batch_a, last_token_entropy, batch_b, config=config)
    scale = (aa.diag()[:, None] * bb.diag()[None, :]).sqrt()
    assert ((cross.double() - ab) / scale).pow(2).mean().sqrt() <= 0.05


def test_seed_mean_converges_to_exact(llama, reference):
    """Unbiased: the error of the mean of S seeds shrinks like 1/sqrt(S) of the single-seed rms error."""
    batch_a, _, aa, _, _ = reference
    seeds = 16
    estimates = torch.stack(
        [
            empirical_ntk(llama, lm_logprob, batch_a, config=ProjectionConfig(k=16, seed=s, self_check=False))
            for s in range(seeds)
        ]
    )
    single_rms = (estimates - aa).pow(2).sum(dim=(1, 2)).mean().sqrt()
    mean_error = (estimates.mean(0) - aa).norm()
    assert mean_error < 2.0 * single_rms / seeds**0.5
    assert mean_error / aa.norm() < 0.05
