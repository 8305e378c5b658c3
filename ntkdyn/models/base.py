"""The unified-model adapter: the few methods ntkdyn needs from a model that both
understands and generates images (in the spirit of kronfluence's Task).

An *image* is a LongTensor[L] of the model's image-token ids (codebook indices in
[0, codebook_size)); a batch of images is LongTensor[B, L]. A *prompt* is its text.
Every per-sample scalar below is differentiable with respect to ``self.model``'s
parameters and is exactly the ``fn(model, batch) -> Tensor[B]`` the projector and
tracker take (see :meth:`UnifiedAdapter.measurement`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn


class Judgement(NamedTuple):
    """The understanding branch's answer to q(y) = "Does this image describe y?"."""

    p_yes: torch.Tensor  # [B] P(yes) renormalised over {yes, no}
    log_odds: torch.Tensor  # [B] logit(yes) - logit(no) at the answer position


class UnifiedAdapter(ABC):
    """A unified multimodal model seen through generation and understanding.

    ``model`` is the ``nn.Module`` whose parameters are trained and tracked. The differentiable
    measurements (gen_logprob, judge, caption_logprob) run the module they are given as ``model``
    (default ``self.model``): the trainer passes its DistributedDataParallel wrapper, the tracker
    the module whose parameters it swaps. Sampling, decoding and encoding run ``self.model``.
    """

    model: nn.Module
    image_tokens: int  # L, image tokens per image
    codebook_size: int  # number of distinct image tokens

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample n images per prompt: LongTensor[len(prompts), n, L]. No gradients."""

    @abstractmethod
    def gen_logprob(
        self, prompts: Sequence[str], images: torch.Tensor, model: nn.Module | None = None
    ) -> torch.Tensor:
        """log pi(x | y) summed over image tokens: Tensor[B] (prompts[b] with images[b])."""

    @abstractmethod
    def judge(
        self, images: torch.Tensor, prompts: Sequence[str], model: nn.Module | None = None
    ) -> Judgement:
        """Ask the model whether images[b] describes prompts[b]: Judgement of [B] tensors."""

    @abstractmethod
    def caption_logprob(
        self, images: torch.Tensor, prompts: Sequence[str], model: nn.Module | None = None
    ) -> torch.Tensor:
        """log pi(y | x) summed over the prompt's text tokens: Tensor[B]."""

    @abstractmethod
    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels of images: uint8 Tensor[B, H, W, 3]."""

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tokens of pixels: uint8 Tensor[B, H, W, 3] -> LongTensor[B, L] (the inverse of
        :meth:`decode` up to the tokenizer's loss; for the toy model, ShapesWorld's pixel parser)."""

    @abstractmethod
    def shared_parameter_names(self) -> list[str]:
        """Names (in ``model.named_parameters()``) of the shared language model: what the
        paper trains by default (vision tower, VQ and heads frozen)."""

    def measurement(self, name: str) -> Callable[[nn.Module, dict], torch.Tensor]:
        """``fn(model, batch) -> Tensor[B]`` for a batch ``{"prompts": [...], "images": LongTensor[B, L]}``.

        name: "gen" (log pi(x|y)), "und" (yes log-odds) or "caption" (log pi(y|x)); fn runs ``model``.
        """
        if name == "gen":
            return lambda model, batch: self.gen_logprob(batch["prompts"], batch["images"], model=model)
        if name == "und":
            return lambda model, batch: self.judge(batch["images"], batch["prompts"], model=model).log_odds
        if name == "caption":
            return lambda model, batch: self.caption_logprob(batch["images"], batch["prompts"], model=model)
        raise ValueError(f"unknown measurement {name!r}: expected 'gen', 'und' or 'caption'")
