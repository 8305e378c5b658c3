"""The registry of per-function rules: closed-form per-sample gradients from a call's inputs and its
output-gradient, for the torch functions whose semantics are fixed.

A rule applies to a call of one of its functions in which a tracked parameter is passed, as the
parameter object itself, in one of the rule's parameter roles (the weight and bias of F.linear, ...).
It applies whatever module makes the call: nn.Linear's forward, a subclass's own forward (Gemma's
scaled embedding, OPT's positional embedding, which compute ids from the attention mask), or a bare
F.linear in a user's forward. Everything else goes to the generic path (generic.py).

With g_t the gradient of the call's output at token t and a_t its input there (tokens of sample b: the
positions the output's layout assigns to b, see layout.py; tokens with g_t = 0 are dropped):
  F.linear(a, W, bias)                 grad W = sum_t g_t a_t^T          grad bias = sum_t g_t
  torch.addmm(bias, a, W, beta, alpha) grad W = alpha sum_t a_t g_t^T    grad bias = beta sum_t g_t
                                       (transformers' Conv1D: W stored [d_in, d_out])
  F.embedding(ids, W, padding_idx)     grad W = sum_t e_{id_t} g_t^T, padding_idx tokens dropped
  conv1d / conv2d (groups = 1)         grad W = sum_p g_p unfold(a)_p^T over output positions p
  x * w, w a 1-D parameter scaling     grad w = sum_t g_t ∘ x_t          (RMSNorm's weight: Llama, Qwen,
  x's last axis (torch.mul, Tensor.mul, __mul__)                         Mistral)
Register another rule with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from ntkdyn.analysis.projector.errors import UnsupportedModuleError
from ntkdyn.analysis.projector.layout import Layout
from ntkdyn.analysis.projector.sketches import Sketch

if TYPE_CHECKING:
    from ntkdyn.analysis.projector.capture import FunctionUse

Blocks = Iterator[tuple[str, torch.Tensor, torch.Tensor]]  # (tracked name, samples [S], block [S, k0, k1])


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return kwargs[name] if name in kwargs else args[index] if len(args) > index else default


def _tokens(x: torch.Tensor, layout: Layout, B: int, use: FunctionUse, what: str = "output") -> torch.Tensor:
    """[S, n, D]: the tokens (all axes but the last) of each sample's part of x."""
    token_axes = x.dim() - 1
    if (layout.kind == "axis" and layout.axis >= token_axes) or (layout.kind != "one" and token_axes < 1):
        raise UnsupportedModuleError(
            f"{use.where}: the samples of its {what} of shape {tuple(x.shape)} lie along its feature axis "
            f"({layout}), not along its token axes"
        )
    parts = layout.split(x, B)
    return parts.reshape(parts.shape[0], -1, x.shape[-1])


def nonzero_tokens(g3: torch.Tensor, sketch: Sketch) -> torch.Tensor | None:
    """bool [S, n]: the tokens whose output-gradient g3 [S, n, D] is not all zero (NaN counts as nonzero;
    max and min over D, two reductions, cost far less than comparing every entry); None (every token)
    where the sketch keeps zero-gradient tokens (Sketch.drop_zero_tokens)."""
    if not sketch.drop_zero_tokens:
        return None
    return (g3.amax(-1) != 0) | (g3.amin(-1) != 0)


def _weight_and_bias(
    use: FunctionUse,
    sketch: Sketch,
    samples: torch.Tensor,
    weight_factors: tuple,
    g3: torch.Tensor,
    scales: tuple[float, float] = (1.0, 1.0),
) -> Blocks:
    """The blocks of a weight (sum_t left_t right_t^T, (left, right) = weight_factors, times scales[0]) and
    of a bias (sum_t g_t, times scales[1]) over the tokens with a nonzero output-gradient (g3, which is
    zero at the others: a left factor g3 is not masked again)."""
    mask = nonzero_tokens(g3, sketch)
    if "weight" in use.params:
        name = use.params["weight"]
        block = sketch.tokens(name, *weight_factors, mask, weight_factors[0] is g3)
        yield name, samples, _scaled(block, scales[0])
    if "bias" in use.params:
        name = use.params["bias"]
        block = sketch.tokens(name, g3, torch.ones_like(g3[..., :1]), mask, True)
        yield name, samples, _scaled(block, scales[1])


def _scaled(block: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """block * scale, without a copy for the usual scale 1 (None: a name the sketch skips)."""
    return block if scale == 1 or block is None else block * scale


class Rule:
    """A function (or several aliases of one) with closed-form per-sample parameter gradients."""

    name: str = ""
    functions: tuple[Callable, ...] = ()

    def bind(self, args: tuple, kwargs: dict) -> tuple[dict[str, Any], dict[str, torch.Tensor | None]] | None:
        """(the call's other arguments by role, the tensors in parameter roles), or None when the call is
        not of the form the rule handles."""
        raise NotImplementedError

    def blocks(self, use: FunctionUse, g: torch.Tensor, layout: Layout, B: int, sketch: Sketch) -> Blocks:
        """Per-sample projected gradient blocks of use.params from the output-gradient g."""
        raise NotImplementedError


class LinearRule(Rule):
    name = "F.linear"
    functions = (F.linear,)

    def bind(self, args, kwargs):
        return {"input": _arg(args, kwargs, 0, "input")}, {
            "weight": _arg(args, kwargs, 1, "weight"),
            "bias": _arg(args, kwargs, 2, "bias"),
        }

    def blocks(self, use, g, layout, B, sketch):
        g3 = _tokens(g, layout, B, use)
        a3 = _tokens(use.bound["input"], layout, B, use, "input")
        yield from _weight_and_bias(use, sketch, layout.samples(B, g.device), (g3, a3), g3)


class AddmmRule(Rule):
    """transformers' Conv1D: torch.addmm(bias, a.view(-1, d_in), W) with W stored [d_in, d_out]."""

    name = "torch.addmm"
    functions = (torch.addmm,)

    def bind(self, args, kwargs):
        bias, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 2, "mat2")
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        if not (isinstance(beta, (int, float)) and isinstance(alpha, (int, float))):
            return None
        if not (isinstance(bias, torch.Tensor) and bias.dim() == 1):
            bias = None  # a matrix added to the product is an input, not a broadcast bias
        inputs = {"input": _arg(args, kwargs, 1, "mat1"), "alpha": alpha, "beta": beta}
        return inputs, {"weight": weight, "bias": bias}

    def blocks(self, use, g, layout, B, sketch):
        g3 = _tokens(g, layout, B, use)
        a3 = _tokens(use.bound["input"], layout, B, use, "input")
        scales = (use.bound["alpha"], use.bound["beta"])
        yield from _weight_and_bias(use, sketch, layout.samples(B, g.device), (a3, g3), g3, scales)


class EmbeddingRule(Rule):
    name = "F.embedding"
    functions = (F.embedding,)

    def bind(self, args, kwargs):
        weight = _arg(args, kwargs, 1, "weight")
        if _arg(args, kwargs, 5, "scale_grad_by_freq", False):
            return None  # the gradient depends on the whole batch's token counts: generic path
        padding_idx = _arg(args, kwargs, 2, "padding_idx")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        return {"ids": _arg(args, kwargs, 0, "input"), "padding_idx": padding_idx}, {"weight": weight}

    def blocks(self, use, g, layout, B, sketch):
        g3 = _tokens(g, layout, B, use)
        ids = layout.split(use.bound["ids"], B).reshape(g3.shape[0], -1)
        mask = nonzero_tokens(g3, sketch)
        if use.bound["padding_idx"] is not None:
            padding = ids != use.bound["padding_idx"]
            mask = padding if mask is None else mask & padding
        name = use.params["weight"]
        yield name, layout.samples(B, g.device), sketch.embedding(name, ids, g3, mask)


class ConvRule(Rule):
    """conv1d / conv2d with groups = 1, by unfolding the input into one column per output position."""

    name = "convolution"
    functions = (torch.conv1d, torch.conv2d)

    def bind(self, args, kwargs):
        weight = _arg(args, kwargs, 1, "weight")
        if _arg(args, kwargs, 6, "groups", 1) != 1 or not isinstance(weight, torch.Tensor):
            return None
        inputs = {
            "input": _arg(args, kwargs, 0, "input"),
            "stride": _arg(args, kwargs, 3, "stride", 1),
            "padding": _arg(args, kwargs, 4, "padding", 0),
            "dilation": _arg(args, kwargs, 5, "dilation", 1),
            "kernel": tuple(weight.shape[2:]),
        }
        return inputs, {"weight": weight, "bias": _arg(args, kwargs, 2, "bias")}

    def blocks(self, use, g, layout, B, sketch):
        x, kernel = use.bound["input"], use.bound["kernel"]
        spatial = len(kernel)
        if x.dim() == spatial + 1:  # unbatched: one image
            x, g = x.unsqueeze(0), g.unsqueeze(0)
            if layout.kind != "one":
                raise UnsupportedModuleError(
                    f"{use.where}: an unbatched convolution whose output is not from one sample ({layout})"
                )
        elif layout.kind == "axis" and layout.axis != 0:
            raise UnsupportedModuleError(
                f"{use.where}: the samples of the convolution's output lie along "
                f"axis {layout.axis}, not along its batch axis 0"
            )
        cols = self._unfold(x, use.bound, spatial)  # [N, C_in * prod(kernel), L]
        N, C_out = g.shape[:2]
        g_cols = g.reshape(N, C_out, -1)
        g3 = layout.split(g_cols.transpose(1, 2), B)
        a3 = layout.split(cols.transpose(1, 2), B)
        S = g3.shape[0]
        g3, a3 = g3.reshape(S, -1, C_out), a3.reshape(S, -1, cols.shape[1])
        yield from _weight_and_bias(use, sketch, layout.samples(B, g.device), (g3, a3), g3)

    @staticmethod
    def _unfold(x: torch.Tensor, bound: dict, spatial: int) -> torch.Tensor:
        """[N, C, *L] -> [N, C * prod(kernel), positions], with the call's stride, padding, dilation."""

        def per_axis(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * spatial

        kernel, stride, dilation = bound["kernel"], per_axis(bound["stride"]), per_axis(bound["dilation"])
        padding = bound["padding"]
        if padding == "valid":
            padding = (0,) * spatial
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            pads = [p for t in reversed(total) for p in (t // 2, t - t // 2)]  # F.pad order: last axis first
            x, padding = F.pad(x, pads), (0,) * spatial
        padding = per_axis(padding)
        if spatial == 1:
            x, kernel, stride, padding, dilation = (
                x.unsqueeze(2),
                (1, *kernel),
                (1, *stride),
                (0, *padding),
                (1, *dilation),
            )
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


class ScaleRule(Rule):
    """x * w with w a 1-D parameter along x's last axis (x has a token axis; the product has x's shape)."""

    name = "elementwise scale"
    functions = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)

    def bind(self, args, kwargs):
        if kwargs or len(args) != 2 or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        first, second = args
        if isinstance(first, nn.Parameter) == isinstance(second, nn.Parameter):
            return None
        weight, x = (first, second) if isinstance(first, nn.Parameter) else (second, first)
        if weight.dim() != 1 or x.dim() < 2 or x.shape[-1] != weight.shape[0]:
            return None
        return {"input": x}, {"weight": weight}

    def blocks(self, use, g, layout, B, sketch):
        g3 = _tokens(g, layout, B, use)
        x3 = _tokens(use.bound["input"], layout, B, use, "input")
        dtype = torch.float64 if torch.float64 in (g3.dtype, x3.dtype) else torch.float32
        products = g3.to(dtype) * x3.to(dtype)
        mask = nonzero_tokens(g3, sketch)
        per_sample = (products if mask is None else torch.where(mask.unsqueeze(-1), products, 0.0)).sum(1)
        name = use.params["weight"]
        yield name, layout.samples(B, g.device), sketch.project(name, per_sample.unsqueeze(-1))


RULES: dict[Callable, Rule] = {}


def register(rule: Rule) -> None:
    """Add a rule for its functions (replacing any earlier rule for them)."""
    for function in rule.functions:
        RULES[function] = rule


for _rule in (LinearRule(), AddmmRule(), EmbeddingRule(), ConvRule(), ScaleRule()):
    register(_rule)
