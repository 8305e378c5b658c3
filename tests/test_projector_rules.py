"""GradientProjector(kind="exact") on torch.nn modules and module patterns, each against an explicit float64
per-sample loop of torch.autograd.grad (relative error < 1e-6 per tracked parameter), and the refusals:
what cannot be computed exactly raises UnsupportedModuleError naming the module; a broken rule, a
non-deterministic fn are caught by the self-check (SelfCheckError)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune
from torch.utils.checkpoint import checkpoint
from transformers import MixtralConfig, MixtralForCausalLM

from ntkdyn import GradientProjector, ProjectionConfig
from ntkdyn.analysis.projector import RULES, SelfCheckError, UnsupportedModuleError
from ntkdyn.analysis.projector.layout import find_layout, sample_codes
from ntkdyn.analysis.projector.rules import LinearRule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

B, T, V, E = 3, 5, 20, 8
EXACT = ProjectionConfig(kind="exact")


# ---------------------------------------------------------------- reference and comparison
def reference(model: nn.Module, fn, batch, params: dict[str, nn.Parameter]) -> torch.Tensor:
    """[B, P]: row b = grad_theta fn(model, batch)[b]; one forward of the batch, then one
    torch.autograd.grad per sample (no hooks, no torch.func)."""
    with torch.enable_grad():
        values = fn(model, batch)
        rows = []
        for b in range(values.shape[0]):
            grads = torch.autograd.grad(
                values[b], list(params.values()), retain_graph=True, allow_unused=True
            )
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for p, g in zip(params.values(), grads, strict=True)
                    ]
                )
            )
    return torch.stack(rows)


def assert_exact(model: nn.Module, fn, batch, reference_model: nn.Module | None = None) -> GradientProjector:
    """kind="exact" features == the reference, relative error < 1e-6 per parameter block (floor: 1e-3 of the
    whole reference, for blocks that are zero up to rounding)."""
    projector = GradientProjector(model, EXACT)
    params = projector.tracked_parameters()
    features = projector.per_sample(fn, batch)
    assert features.dtype == torch.float64
    ref_model = model if reference_model is None else reference_model
    expected = reference(
        ref_model, fn, batch, dict(ref_model.named_parameters()) if reference_model else params
    )
    assert features.shape == expected.shape
    offset, floor = 0, 1e-3 * expected.norm()
    for name, param in params.items():
        got, want = features[:, offset : offset + param.numel()], expected[:, offset : offset + param.numel()]
        error = float((got - want).norm() / torch.maximum(want.norm(), floor))
        assert error < 1e-6, f"{name}: relative error {error:.2e}"
        offset += param.numel()
    return projector


def tokens(seed: int = 0, lengths=(5, 3, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and mask [B, T]."""
    ids = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def build(cls, *args) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args).double().eval()


def call(model, batch):
    return model(*batch)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), values, 0.0).sum(-1)


# ---------------------------------------------------------------- torch.nn modules
class Attention(nn.Module):
    """Embedding -> nn.MultiheadAttention (tuple output; out_proj used through the functional attention)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(V, E)
        self.attn = nn.MultiheadAttention(E, 2, batch_first=batch_first)
        self.readout = nn.Linear(E, 1)

    def forward(self, ids, mask):
        x = self.embed(ids) if self.batch_first else self.embed(ids).transpose(0, 1)
        y, weights = self.attn(x, x, x, key_padding_mask=~mask.bool())
        y = y if self.batch_first else y.transpose(0, 1)
        return masked_sum(torch.tanh(self.readout(y))[..., 0], mask) + weights[:, 0, 0]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_multihead_attention(batch_first):
    assert_exact(build(Attention, batch_first), call, tokens())


class Recurrent(nn.Module):
    """GRU (sequence first, initial state passed) and LSTM (batch first); every tuple output is used."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.gru = nn.GRU(E, E, num_layers=2)
        self.lstm = nn.LSTM(E, E, batch_first=True)
        self.h0 = nn.Linear(E, 2 * E)

    def forward(self, ids, mask):
        x = self.embed(ids)
        h0 = torch.tanh(self.h0(x.mean(1))).reshape(-1, 2, E).transpose(0, 1).contiguous()  # [2, B, E]
        out, h_n = self.gru(x.transpose(0, 1), h0)
        out2, (h, c) = self.lstm(out.transpose(0, 1))
        return out2.pow(2).sum((1, 2)) + h_n.sum((0, 2)) + (h * c).sum((0, 2))


def test_recurrent_modules_with_tuple_outputs():
    assert_exact(build(Recurrent), call, tokens(lengths=(T, T, T)))


class Convolutions(nn.Module):
    """Conv1d (padding "same", dilation 2), Conv2d (stride 2, reflect padding), Conv2d with 2 groups
    (the generic path), BatchNorm2d (eval), unbatched Conv1d on each sample inside a loop."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(3, 4, 3, padding="same", dilation=2)
        self.conv2d = nn.Conv2d(1, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.norm = nn.BatchNorm2d(4)
        self.norm.running_mean.uniform_(-0.5, 0.5)
        self.norm.running_var.uniform_(0.5, 2.0)
        self.single = nn.Conv1d(3, 2, 2)

    def forward(self, signal):  # [B, 3, 8]
        a = torch.tanh(self.conv1d(signal))  # [B, 4, 8]
        b = self.norm(self.grouped(torch.tanh(self.conv2d(a.unsqueeze(1)))))  # [B, 4, 4, 4]
        c = torch.stack([self.single(s).pow(2).sum() for s in signal])  # unbatched calls, one per sample
        return a.pow(2).sum((1, 2)) + torch.tanh(b).sum((1, 2, 3)) + c


def test_convolutions_and_batchnorm_in_eval():
    signal = torch.randn(B, 3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_exact(build(Convolutions), lambda m, x: m(x), signal)


def test_batchnorm_in_training_mode_is_refused():
    model = build(Convolutions).train()
    signal = torch.randn(B, 3, 8, dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match=r"'norm' \(BatchNorm2d\).*batch statistics.*eval\(\)"):
        GradientProjector(model, EXACT).per_sample(lambda m, x: m(x), signal)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, E) / E**0.5)

    def forward(self, h, mask=None):
        return torch.sigmoid(h @ self.weight) * mask[..., None]


class KeywordCalls(nn.Module):
    """gate(h, mask=m) with a batched keyword tensor; nn.Linear called as proj(input=h)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.gate = Gate()
        self.proj = nn.Linear(E, 1)

    def forward(self, ids, mask):
        return self.proj(input=self.gate(self.embed(ids), mask=mask.double()))[..., 0].sum(-1)


def test_keyword_tensor_inputs():
    assert_exact(build(KeywordCalls), call, tokens())


class SequenceFirst(nn.Module):
    """Tokens laid out [T, B, E] through nn.Linear layers (the sample axis is 1)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.hidden = nn.Linear(E, E)
        self.readout = nn.Linear(E, 1)

    def forward(self, ids):
        return self.readout(torch.tanh(self.hidden(self.embed(ids.T))))[..., 0].pow(2).sum(0)


@pytest.mark.parametrize("length", [B, T], ids=["T_eq_B", "T_ne_B"])
def test_sequence_first_linear(length):
    ids = torch.randint(0, V, (B, length), generator=torch.Generator().manual_seed(2))
    assert_exact(build(SequenceFirst), lambda m, x: m(x), ids)


class Flattened(nn.Module):
    """OPT's MLP on [B*T, E] rows (samples in consecutive blocks), a LayerNorm on them (the generic path),
    and a Linear on [T*B, E] rows (samples interleaved)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.fc1 = nn.Linear(E, 2 * E)
        self.fc2 = nn.Linear(2 * E, E)
        self.norm = nn.LayerNorm(E)
        self.interleaved = nn.Linear(E, E)

    def forward(self, ids, mask):
        x = self.embed(ids)  # [B, T, E]
        rows = self.norm(self.fc2(F.gelu(self.fc1(x.reshape(-1, E)))))  # [B*T, E]
        strided = self.interleaved(x.transpose(0, 1).reshape(-1, E)).reshape(T, B, E).transpose(0, 1)
        return masked_sum((rows.view(B, T, E) * strided).sum(-1), mask)


def test_flattened_rows_map_back_to_samples():
    assert_exact(build(Flattened), call, tokens())


class ScaledEmbedding(nn.Embedding):
    """Gemma's scaled word embedding: a subclass whose forward scales the output."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class MaskPositions(nn.Embedding):
    """OPT's learned positional embedding: forward takes the 0/1 attention mask and derives positions."""

    def forward(self, attention_mask):
        positions = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
        return super().forward(positions + 2)


class EmbeddingSubclasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = ScaledEmbedding(V, E, padding_idx=0)
        self.positions = MaskPositions(T + 2, E)
        self.table = nn.Embedding(T, E)  # position ids [1, T]: broadcast over the batch
        self.readout = nn.Linear(E, 1)

    def forward(self, ids, mask):
        h = self.embed(ids) + self.positions(mask) + self.table(torch.arange(ids.shape[1])[None])
        return masked_sum(torch.tanh(self.readout(h))[..., 0], mask)


def test_embedding_subclasses_with_their_own_forward():
    ids, mask = tokens()
    ids[1, 1] = 0  # a padding_idx token inside a sample
    assert_exact(build(EmbeddingSubclasses), call, (ids, mask))


class SmallLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.block = nn.Sequential(nn.Linear(E, E), nn.Tanh(), nn.LayerNorm(E))
        self.head = nn.Linear(E, V)

    def forward(self, ids, mask):
        logp = torch.log_softmax(self.head(self.block(self.embed(ids)))[:, :-1], -1)
        return masked_sum(logp.gather(-1, ids[:, 1:, None])[..., 0], mask[:, 1:])


def test_compiled_model_and_compiled_submodule():
    plain = build(SmallLM)
    compiled = torch.compile(build(SmallLM), backend="eager")
    projector = assert_exact(compiled, call, tokens(), reference_model=plain)
    assert "embed.weight" in projector.tracked_parameters()  # unwrapped: no _orig_mod prefix
    inner = build(SmallLM)
    inner.block = torch.compile(inner.block, backend="eager")
    assert_exact(inner, call, tokens())


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.embed = nn.Embedding(V, E)
        self.block = nn.Sequential(nn.Linear(E, E), nn.Tanh(), nn.LayerNorm(E))
        self.readout = nn.Linear(E, 1)

    def forward(self, ids, mask):
        h = checkpoint(self.block, self.embed(ids), use_reentrant=self.use_reentrant)
        return masked_sum(self.readout(h)[..., 0], mask)


def test_gradient_checkpointing():
    assert_exact(build(Checkpointed, False), call, tokens())
    with pytest.raises(UnsupportedModuleError, match=r"block\.0\.weight.*gradients are off.*reentrant"):
        GradientProjector(build(Checkpointed, True), EXACT).per_sample(call, tokens())


class ParentUsesChildWeight(nn.Module):
    """Logits by F.linear on the embedding's weight in the parent's forward (a tied head without a module)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.norm = nn.LayerNorm(E)

    def forward(self, ids, mask):
        logits = F.linear(self.norm(self.embed(ids)), self.embed.weight)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        return masked_sum(logp, mask[:, 1:])


def test_parameter_used_outside_its_module():
    assert_exact(build(ParentUsesChildWeight), call, tokens())


class Reparametrized(nn.Module):
    """weight_norm as a parametrization (a module call on parameters alone computes the weight), pruning
    (a forward pre-hook computes the weight), a Linear reused over time steps with a frozen weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Linear(E, E))
        self.pruned = prune.random_unstructured(nn.Linear(E, E), "weight", amount=0.3)
        self.step = nn.Linear(E, E)
        self.step.weight.requires_grad_(False)

    def forward(self, ids, mask):
        h = torch.tanh(self.pruned(torch.tanh(self.normed(self.embed(ids)))))
        state = torch.zeros_like(h[:, 0])
        for t in range(h.shape[1]):
            state = torch.tanh(self.step(state) + h[:, t])
        return state.pow(2).sum(-1)


def test_reparametrized_reused_and_frozen_layers():
    model = build(Reparametrized)
    projector = assert_exact(model, call, tokens(lengths=(T, T, T)))
    assert "step.weight" not in projector.tracked_parameters()


def test_conv_same_padding_with_an_even_kernel():
    conv = build(nn.Conv1d, 2, 3, 4, 1, "same")
    signal = torch.randn(B, 2, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_exact(conv, lambda m, x: m(x).pow(2).sum((1, 2)), signal)


class InPlace(nn.Module):
    """Recorded tensors modified in place later: a conv output by relu_ (VGG), a BatchNorm output by an
    in-place ReLU (ResNet), a Linear output by mul_."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.norm.running_mean.uniform_(-0.5, 0.5)
        self.lin = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.norm(torch.relu_(self.conv(x))), inplace=True)
        out = self.lin(h.flatten(1))
        out.mul_(0.5)
        return out.pow(2).sum(-1)


def test_outputs_modified_in_place():
    pixels = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_exact(build(InPlace), lambda m, x: m(x), pixels)


class MaskToken(nn.Module):
    """A learned mask token written into the masked positions (wav2vec2, MAE): x[mask] = parameter."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.mask_token = nn.Parameter(torch.randn(E))
        self.readout = nn.Linear(E, 1)

    def forward(self, ids, mask):
        h = self.embed(ids).clone()
        h[~mask.bool()] = self.mask_token
        return torch.tanh(self.readout(h))[..., 0].sum(-1)


def test_parameter_written_into_a_tensor():
    assert_exact(build(MaskToken), call, tokens())


def test_mixture_of_experts():
    """Mixtral's experts (3-D parameters, tokens routed by index to grouped matmuls): the generic path.
    float32, as transformers' grouped matmul has no float64: relative error < 1e-4 (~1000 eps)."""
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        attn_implementation="eager",
    )
    model = MixtralForCausalLM(config).eval()

    def logprob(m, batch):
        logits = m(input_ids=batch[0], attention_mask=batch[1]).logits
        return masked_sum(
            torch.log_softmax(logits[:, :-1], -1).gather(-1, batch[0][:, 1:, None])[..., 0], batch[1][:, 1:]
        )

    projector = GradientProjector(model, EXACT)
    features = projector.per_sample(logprob, tokens())
    expected = reference(model, logprob, tokens(), projector.tracked_parameters())
    assert float((features - expected).norm() / expected.norm()) < 1e-4


# ---------------------------------------------------------------- refusals
class SharedBias(nn.Module):
    """T5's relative position bias: an embedding of [T, T] buckets added to every sample's scores."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.bias = nn.Embedding(2 * T, 1)

    def forward(self, ids, mask):
        n = ids.shape[1]
        buckets = torch.arange(n)[:, None] - torch.arange(n)[None] + n
        scores = self.embed(ids) @ self.embed(ids).transpose(1, 2) + self.bias(buckets)[..., 0]
        return masked_sum(torch.logsumexp(scores, -1), mask)


@pytest.mark.parametrize("length", [B, T], ids=["T_eq_B", "T_ne_B"])
def test_output_shared_by_the_batch_is_refused(length):
    ids = torch.randint(1, V, (B, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with pytest.raises(
        UnsupportedModuleError, match=r"module 'bias' \(Embedding\).*several of fn's 3 samples"
    ):
        GradientProjector(build(SharedBias), EXACT).per_sample(call, (ids, mask))


class Squared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return (x @ w).pow(2)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        inner = 2 * (x @ w) * g
        return inner @ w.T, x.reshape(-1, x.shape[-1]).T @ inner.reshape(-1, inner.shape[-1])


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(E, E)

    def forward(self, x):
        return Squared.apply(x, self.lin.weight).sum(-1) + self.lin(x).sum(-1)


def test_invisible_uses_are_refused_by_name():
    x = torch.randn(B, E, dtype=torch.float64)
    with pytest.raises(
        UnsupportedModuleError, match=r"'lin\.weight' of module 'lin'.*custom torch\.autograd"
    ):
        GradientProjector(build(CustomFunction), EXACT).per_sample(lambda m, x: m(x), x)
    lin = build(nn.Linear, E, 1)
    assert_exact(lin, lambda m, x: F.linear(x, m.weight)[:, 0] + m(x)[:, 0], x)  # a rule's function: anywhere
    with pytest.raises(
        UnsupportedModuleError, match=r"outside every call.*'weight' of the model \(by torch\.Tensor\.T"
    ):
        GradientProjector(lin, EXACT).per_sample(lambda m, x: (x @ m.weight.T)[:, 0], x)


class Dropped(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.lin = nn.Linear(E, 1)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = F.dropout(x, 0.1, self.training) if self.functional else self.drop(x)
        return self.lin(x)[:, 0]


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_train_mode_dropout_is_refused_with_advice(functional):
    model = build(Dropped, functional).train()
    x = torch.randn(B, E, dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match=r"dropout \(p=0\.1\).*call model\.eval\(\)"):
        GradientProjector(model, EXACT).per_sample(lambda m, x: m(x), x)
    model.eval()
    assert GradientProjector(model, EXACT).per_sample(lambda m, x: m(x), x).shape == (B, E + 1)


def test_random_fn_is_caught_by_the_self_check():
    lin = build(nn.Linear, E, 1)
    x = torch.randn(B, E, dtype=torch.float64)
    noisy = lambda m, x: m(x)[:, 0] * (1 + torch.rand(x.shape[0], dtype=x.dtype))  # noqa: E731
    with pytest.raises(SelfCheckError, match=r"different values on two calls.*model\.eval\(\)"):
        GradientProjector(lin, EXACT).per_sample(noisy, x)
    assert GradientProjector(lin, ProjectionConfig(kind="exact", self_check=False)).per_sample(
        noisy, x
    ).shape == (B, E + 1)


class DoubledLinear(LinearRule):
    """A deliberately wrong rule: F.linear's weight block doubled."""

    def blocks(self, use, g, layout, B, sketch):
        for name, samples, block in super().blocks(use, g, layout, B, sketch):
            yield name, samples, 2 * block if name.endswith("hidden.weight") else block


@pytest.mark.parametrize("kind", ["exact", "kronecker"])
def test_broken_rule_is_caught_by_the_self_check(monkeypatch, kind):
    monkeypatch.setitem(RULES, F.linear, DoubledLinear())
    config = ProjectionConfig(kind="exact") if kind == "exact" else ProjectionConfig(k=4)
    projector = GradientProjector(build(SequenceFirst), config)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    with pytest.raises(SelfCheckError, match=r"disagree") as error:
        projector.per_sample(lambda m, x: m(x), ids)
    assert "hidden.weight" in str(error.value)
    assert "hidden.bias" not in str(error.value) and "readout" not in str(error.value)
    monkeypatch.undo()
    errors = GradientProjector(build(SequenceFirst), config).check(lambda m, x: m(x), ids)
    assert max(errors.values()) < 1e-6


# ---------------------------------------------------------------- the layout, read from autograd
def test_layout_is_read_from_autograd_not_from_shapes():
    """X [T, B, H] with T == B: only the dependency of each sample's value on X tells axis 1 from axis 0;
    rows of a flattened [B*T, H] and a tensor shared by all samples are told apart the same way."""
    x = torch.randn(B, B, 4, dtype=torch.float64, requires_grad=True)
    codes = sample_codes(B, torch.float64, x.device)

    def layout(values, tensor):
        g1 = torch.autograd.grad(values.sum(), tensor, retain_graph=True)[0]
        gr = torch.autograd.grad((values * codes).sum(), tensor)[0]
        return find_layout(g1, gr, codes)

    assert str(layout(x.pow(2).sum((0, 2)), x)) == "sample axis 1"
    assert str(layout(x.pow(2).sum((1, 2)), x)) == "sample axis 0"
    assert layout(x.pow(2).sum((1, 2)) + x[0, 0, 0], x) is None  # sample 0's entry also feeds every value
    rows = torch.randn(B * T, 4, dtype=torch.float64, requires_grad=True)
    assert layout(rows.view(B, T, 4).pow(3).sum((1, 2)), rows).kind == "rows"
    assert layout(rows.view(T, B, 4).pow(3).sum((0, 2)), rows).kind == "strided"
    one = torch.randn(1, T, dtype=torch.float64, requires_grad=True)
    values = torch.cat([torch.zeros(1, dtype=torch.float64), one.pow(2).sum()[None], torch.zeros(1)])
    assert str(layout(values, one)) == "all of it from sample 1"


# ---------------------------------------------------------------- precision and packaging
def test_bfloat16_model_passes_its_self_check():
    model = build(SmallLM)
    features64 = GradientProjector(model, ProjectionConfig(k=4)).per_sample(call, tokens())
    features16 = GradientProjector(model.to(torch.bfloat16), ProjectionConfig(k=4)).per_sample(call, tokens())
    assert features16.dtype == torch.float32
    assert float((features16.double() - features64.double()).norm() / features64.norm()) < 5e-2


def test_autocast_passes_its_self_check():
    model = build(SmallLM).float()
    plain = GradientProjector(model, ProjectionConfig(k=4)).per_sample(call, tokens())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = GradientProjector(model, ProjectionConfig(k=4)).per_sample(call, tokens())
    assert float((autocast - plain).norm() / plain.norm()) < 5e-2


def test_import_and_features_without_triton():
    """A finder that refuses triton: ntkdyn imports, features on CPU, and implementation='triton' names
    the missing package."""
    code = (
        "import sys\n"
        "class NoTriton:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton hidden')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "import torch, ntkdyn, ntkdyn.kernels\n"
        "from ntkdyn import GradientProjector, ProjectionConfig\n"
        "layer = torch.nn.Linear(6, 4)\n"
        "projector = GradientProjector(layer, ProjectionConfig(k=2))\n"
        "f = projector.per_sample(lambda m, x: m(x).sum(-1), torch.randn(3, 6))\n"
        "assert f.shape == (3, 6) and 'triton' not in sys.modules\n"
        "try:\n"
        "    GradientProjector(layer, ProjectionConfig(implementation='triton'))\n"
        "except ImportError as error:\n"
        "    assert 'triton' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('no error for a missing triton')\n"
        "print('ok')\n"
    )
    repo = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
