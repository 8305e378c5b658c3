"""GradientProjector against explicit per-sample backward loops (float64 models, one sample at a time)."""

import pathlib
import subprocess
import sys

import pytest
import torch
from helpers import tiny_llama as llama
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from ntkdyn import GradientProjector, ProjectionConfig
from ntkdyn.analysis.ntk import feature_kernel
from ntkdyn.analysis.projector import UnsupportedModuleError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


# ---------------------------------------------------------------- models and measurements
def tiny_llama(tied=True, seed=0):
    return llama(40, 32, 48, num_hidden_layers=1, max_position_embeddings=32, tied=tied, seed=seed).double()


def tiny_gpt2(seed=0):
    """Conv1D layers (weights stored [d_in, d_out]), LayerNorm with bias, tied wte, position embeddings."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=40,
        n_embd=24,
        n_layer=1,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).double().eval()


class EmbeddingMLP(nn.Module):
    """Embedding with padding_idx (its row never gets a gradient) -> Linear with bias -> tanh -> Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30, 12, padding_idx=0)
        self.hidden = nn.Linear(12, 20)
        self.out = nn.Linear(20, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.hidden(self.embed(ids))))


def lm_logprob(model, batch):
    """sum of log pi(token_t | tokens_<t) over unmasked tokens: Tensor[B]."""
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * mask[:, 1:]).sum(dim=1)


def mlp_score(model, batch):
    """Every token counts (so padding_idx tokens get a nonzero output-gradient): Tensor[B]."""
    ids, _ = batch
    out = model(ids)
    return (out[..., 0] * torch.arange(1, ids.shape[1] + 1, dtype=out.dtype)).sum(dim=1) + out[..., 1:].pow(
        2
    ).sum(dim=(1, 2))


def token_batch(B=3, T=7, vocab=40, seed=1, lengths=(7, 4, 6)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=gen)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    ids[0, 2] = 0  # a padding_idx token inside a real sequence (EmbeddingMLP)
    return ids, mask


MODELS = {
    "llama_tied": (tiny_llama, lm_logprob, 40),
    "gpt2_conv1d": (tiny_gpt2, lm_logprob, 40),
    "embedding_mlp": (lambda: EmbeddingMLP().double(), mlp_score, 30),
}


def explicit_per_sample_grads(model, params, fn, batch):
    """{name: [B, *shape]}: each sample run alone (B=1) and differentiated with autograd."""
    ids, mask = batch
    rows = []
    for b in range(ids.shape[0]):
        value = fn(model, (ids[b : b + 1], mask[b : b + 1]))[0]
        rows.append(torch.autograd.grad(value, list(params.values()), allow_unused=True))
    return {
        name: torch.stack([torch.zeros_like(p) if r[i] is None else r[i] for r in rows])
        for i, (name, p) in enumerate(params.items())
    }


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, fn, vocab = MODELS[request.param]
    model = build()
    batch = token_batch(vocab=vocab)
    params = GradientProjector(model, ProjectionConfig(kind="exact")).tracked_parameters()
    grads = explicit_per_sample_grads(model, params, fn, batch)
    return model, fn, batch, grads


# ---------------------------------------------------------------- exactness and consistency
def test_exact_kind_equals_explicit_loop(case):
    model, fn, batch, grads = case
    projector = GradientProjector(model, ProjectionConfig(kind="exact"))
    features = projector.per_sample(fn, batch)
    expected = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
    assert features.shape == (batch[0].shape[0], projector.feature_dim) == expected.shape
    torch.testing.assert_close(features.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        ProjectionConfig(k=8, seed=3),
        ProjectionConfig(k=8, distribution="gaussian"),
        ProjectionConfig(kind="dense", k=64),
        ProjectionConfig(k=16, second_stage_k=40),
    ],
    ids=["kronecker", "gaussian", "dense", "second_stage"],
)
def test_per_sample_equals_projected_explicit_gradients(case, config):
    """Hooks/tokens path == parameter-shaped path: a wrong transpose (Conv1D), a missed bias, a leaked
    padding token or a wrong kernel breaks the equality; project_update never sees hooks."""
    model, fn, batch, grads = case
    projector = GradientProjector(model, config)
    features = projector.per_sample(fn, batch)
    for b in range(batch[0].shape[0]):
        expected = projector.project_update({name: g[b] for name, g in grads.items()})
        torch.testing.assert_close(features[b], expected, rtol=1e-4, atol=1e-5)


def test_triton_implementation_matches_torch_through_public_api():
    model = tiny_llama().float()
    batch = token_batch()
    torch_features = GradientProjector(model, ProjectionConfig(k=16, implementation="torch")).per_sample(
        lm_logprob, batch
    )
    triton_features = GradientProjector(model, ProjectionConfig(k=16, implementation="triton")).per_sample(
        lm_logprob, batch
    )
    torch.testing.assert_close(triton_features, torch_features, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        ProjectionConfig(k=4, seed=0),
        ProjectionConfig(k=4, distribution="gaussian"),
        ProjectionConfig(kind="dense", k=32),
        ProjectionConfig(k=8, second_stage_k=24),
    ],
    ids=["kronecker", "gaussian", "dense", "second_stage"],
)
def test_projection_is_unbiased_over_seeds(config):
    """mean_s <phi_a, phi_b> -> <grad f_a, grad f_b> and mean_s <phi_b, P(delta)> -> grad f_b . delta: the
    error of the S-seed mean must shrink like 1/sqrt(S) (a wrong scale leaves a bias that does not)."""
    model = EmbeddingMLP().double()
    batch = token_batch(vocab=30)
    params = GradientProjector(model, ProjectionConfig(kind="exact")).tracked_parameters()
    grads = explicit_per_sample_grads(model, params, mlp_score, batch)
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
    gen = torch.Generator().manual_seed(5)
    delta = {name: torch.randn(p.shape, generator=gen, dtype=p.dtype) for name, p in params.items()}
    flat_delta = torch.cat([d.reshape(-1) for d in delta.values()])
    exact = torch.cat([flat @ flat.T, (flat @ flat_delta)[:, None]], dim=1)
    seeds = 48
    estimates = []
    for seed in range(seeds):
        projector = GradientProjector(
            model, ProjectionConfig(**{**config.__dict__, "seed": seed, "self_check": False})
        )
        features = projector.per_sample(mlp_score, batch).double()
        update = projector.project_update(delta).double()
        estimates.append(torch.cat([features @ features.T, (features @ update)[:, None]], dim=1))
    estimates = torch.stack(estimates)
    single_rms = ((estimates - exact).pow(2).sum(dim=(1, 2)).mean()).sqrt()
    mean_error = (estimates.mean(0) - exact).norm()
    assert single_rms > 1e-3 * exact.norm()  # the projection really is random at this k
    assert mean_error < 2.0 * single_rms / seeds**0.5


# ---------------------------------------------------------------- padding, tying, several forwards
def test_padding_tokens_contribute_nothing():
    """A right-padded sample's features equal those of the same sample alone without padding."""
    model = tiny_llama()
    ids, mask = token_batch()
    projector = GradientProjector(model, ProjectionConfig(k=8, seed=1))
    padded = projector.per_sample(lm_logprob, (ids, mask))
    for b, length in enumerate(mask.sum(1).tolist()):
        alone = projector.per_sample(lm_logprob, (ids[b : b + 1, :length], mask[b : b + 1, :length]))
        torch.testing.assert_close(padded[b], alone[0], rtol=1e-5, atol=1e-6)


def test_nan_activations_at_masked_tokens_do_not_leak():
    """fn masks tokens whose activations are NaN (g = 0 there): the features stay finite and equal to the
    unpadded computation."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    x = torch.randn(2, 4, 6)
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    x_nan = torch.where(keep[..., None], x, float("nan"))

    def fn(model, inputs):
        return torch.where(keep[..., None], model(inputs), 0.0).pow(2).sum(dim=(1, 2))

    for kind in ("kronecker", "exact"):
        config = ProjectionConfig(kind=kind, k=4) if kind == "kronecker" else ProjectionConfig(kind=kind)
        projector = GradientProjector(layer, config)
        torch.testing.assert_close(projector.per_sample(fn, x_nan), projector.per_sample(fn, x))


def test_tied_embedding_is_one_parameter_covering_both_uses():
    model = tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    projector = GradientProjector(model, ProjectionConfig(k=8))
    names = list(projector.tracked_parameters())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == len({id(p) for p in model.parameters()})
    batch = token_batch()
    params = projector.tracked_parameters()
    grads = explicit_per_sample_grads(model, params, lm_logprob, batch)
    features = projector.per_sample(lm_logprob, batch)
    # the update may name the tied weight by either name
    by_alias = {("lm_head.weight" if n == "model.embed_tokens.weight" else n): g[0] for n, g in grads.items()}
    torch.testing.assert_close(features[0], projector.project_update(by_alias), rtol=1e-4, atol=1e-5)
    # both uses matter: the gradient through the output head alone is not the feature
    untied_part = {
        n: (g[0] if n != "model.embed_tokens.weight" else torch.zeros_like(g[0])) for n, g in grads.items()
    }
    assert not torch.allclose(features[0], projector.project_update(untied_part), rtol=1e-3, atol=1e-3)


def test_fn_with_several_forwards_accumulates_per_sample():
    """DPO-like fn: log pi(chosen) - log pi(rejected), two forwards of the model inside fn."""
    model = tiny_llama()
    chosen = token_batch(seed=1)
    rejected = token_batch(seed=2, lengths=(5, 7, 3))

    def margin(model, batch):
        return lm_logprob(model, batch[0]) - lm_logprob(model, batch[1])

    projector = GradientProjector(model, ProjectionConfig(kind="exact"))
    params = projector.tracked_parameters()
    rows = []
    for b in range(3):
        value = margin(
            model,
            ((chosen[0][b : b + 1], chosen[1][b : b + 1]), (rejected[0][b : b + 1], rejected[1][b : b + 1])),
        )
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value[0], list(params.values()))]))
    torch.testing.assert_close(
        projector.per_sample(margin, (chosen, rejected)).double(), torch.stack(rows), rtol=1e-5, atol=1e-6
    )


def test_fn_running_the_model_once_per_sample_is_exact():
    """Each forward inside fn has 1 row: its tensors belong to one sample each (read from autograd), so
    the features equal those of the batched forward."""
    model = tiny_llama()
    batch = token_batch()
    projector = GradientProjector(model, ProjectionConfig(kind="exact"))

    def one_at_a_time(m, b):
        return torch.cat([lm_logprob(m, (b[0][i : i + 1], b[1][i : i + 1])) for i in range(b[0].shape[0])])

    torch.testing.assert_close(
        projector.per_sample(one_at_a_time, batch),
        projector.per_sample(lm_logprob, batch),
        rtol=1e-9,
        atol=1e-12,
    )


def test_per_sample_leaves_grads_alone_and_works_under_no_grad():
    """The tracker calls per_sample between a trainer's backward and its optimizer step."""
    model = tiny_llama()
    batch = token_batch()
    fn_value = lm_logprob(model, batch).sum()
    fn_value.backward()
    saved = {n: p.grad.clone() for n, p in model.named_parameters()}
    projector = GradientProjector(model, ProjectionConfig(k=8))
    features = projector.per_sample(lm_logprob, batch)
    with torch.no_grad():
        torch.testing.assert_close(projector.per_sample(lm_logprob, batch), features)
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, saved[name]), name


# ---------------------------------------------------------------- selection, determinism
def test_parameter_selection_by_pattern_and_module_type():
    model = tiny_llama()
    all_names = [n for n, p in model.named_parameters()]
    mlp = GradientProjector(model, ProjectionConfig(include=("*mlp*",), exclude=("*down_proj*",)))
    assert list(mlp.tracked_parameters()) == [n for n in all_names if "mlp" in n and "down_proj" not in n]
    embeddings = GradientProjector(model, ProjectionConfig(module_types=(nn.Embedding,)))
    assert list(embeddings.tracked_parameters()) == ["model.embed_tokens.weight"]
    norms = GradientProjector(model, ProjectionConfig(module_types=("LlamaRMSNorm",)))
    assert list(norms.tracked_parameters()) == [n for n in all_names if "norm" in n]
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    default = GradientProjector(model, ProjectionConfig())
    assert list(default.tracked_parameters()) == [n for n in all_names if "up_proj" not in n]


def test_same_seed_same_features_in_another_process():
    code = (
        "import torch; from torch import nn; from ntkdyn import GradientProjector, ProjectionConfig\n"
        "torch.manual_seed(0); layer = nn.Linear(40, 30); x = torch.randn(3, 5, 40)\n"
        "projector = GradientProjector(layer, ProjectionConfig(k=8, seed=7))\n"
        "f = projector.per_sample(lambda m, b: m(b).sum((1, 2)), x)\n"
        "print(repr(f.flatten().tolist()))"
    )
    repo = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    ).stdout
    other_process = torch.tensor(eval(out))
    torch.manual_seed(0)
    layer, x = nn.Linear(40, 30), torch.randn(3, 5, 40)
    here = GradientProjector(layer, ProjectionConfig(k=8, seed=7)).per_sample(
        lambda m, b: m(b).sum((1, 2)), x
    )
    assert torch.equal(here.flatten(), other_process)
    other_seed = GradientProjector(layer, ProjectionConfig(k=8, seed=8)).per_sample(
        lambda m, b: m(b).sum((1, 2)), x
    )
    assert not torch.allclose(here, other_seed)


# ---------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_problem():
    model = tiny_llama()
    batch = token_batch()
    projector = GradientProjector(model, ProjectionConfig(k=8))
    with pytest.raises(ValueError, match=r"Tensor\[B\]"):
        projector.per_sample(lambda m, b: lm_logprob(m, b)[:, None], batch)
    # fn's values 0 and 2 come from the same row of the batch
    with pytest.raises(UnsupportedModuleError, match="several of fn's 3 samples"):
        projector.per_sample(lambda m, b: lm_logprob(m, (b[0][:2], b[1][:2])).repeat(2)[:3], batch)
    with pytest.raises(ValueError, match="no tracked parameters"):
        GradientProjector(model, ProjectionConfig(exclude=("*",)))
    model.model.norm.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        GradientProjector(model, ProjectionConfig(include=("model.norm.weight",)))
    with pytest.raises(ValueError, match="lacks"):
        GradientProjector(model, ProjectionConfig(include=("model.no_such.weight",)))
    with pytest.raises(ValueError, match="ProjectionConfig.kind"):
        ProjectionConfig(kind="sketch")
    with pytest.raises(ValueError, match="ProjectionConfig.k"):
        ProjectionConfig(k=0)
    with pytest.raises(ValueError, match="ProjectionConfig.second_stage_k"):
        ProjectionConfig(kind="dense", second_stage_k=8)
    with pytest.raises(ValueError, match="delta lacks"):
        projector.project_update({})


def test_triton_on_cpu_model_without_interpreter_fails_at_construction(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        GradientProjector(nn.Linear(3, 2), ProjectionConfig(implementation="triton"))


def test_non_finite_features_name_the_layer():
    model = tiny_llama().float()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="mlp.up_proj"):
        GradientProjector(model, ProjectionConfig(k=8)).per_sample(lm_logprob, token_batch())


def test_incompatible_projectors_are_detected():
    model = tiny_llama()
    small = GradientProjector(model, ProjectionConfig(k=8))
    large = GradientProjector(model, ProjectionConfig(k=16))
    with pytest.raises(ValueError, match="k: 8 vs 16"):
        small.check_compatible(large)
    small.check_compatible(GradientProjector(model, ProjectionConfig(k=8)))
    with pytest.raises(ValueError, match="incompatible feature dimensions"):
        feature_kernel(torch.zeros(2, small.feature_dim), torch.zeros(3, large.feature_dim))
