"""What the transformers-backed adapters (Janus, Emu3) share: option checks, the yes/no judge
and caption log-prob over the understanding branch, guided sampling of one code, freezing of
the non-shared parameters. Each subclass supplies its token layouts and
``_understanding_logits``."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from ntkdyn.models._hf_tiny import (
    check_images,
    check_prompts,
    single_token,
    suffix_logprob,
    unnormalize_to_uint8,
)
from ntkdyn.models.base import Judgement, UnifiedAdapter


class HFUnifiedAdapter(UnifiedAdapter):
    """A transformers model and its processor seen through generation and understanding.

    Subclasses call ``super().__init__`` first, set their own fields, then :meth:`_finish`.
    """

    def __init__(
        self,
        model: nn.Module,
        processor,
        guidance_scale: float,
        question: str,
        caption_question: str,
    ):
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
        if "{prompt}" not in question:
            raise ValueError(f"question must contain '{{prompt}}', got {question!r}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.guidance_scale = guidance_scale
        self.question = question
        self.caption_question = caption_question
        self.bos_id = self.tokenizer.bos_token_id
        self.pad_id = self.tokenizer.pad_token_id

    def _finish(self, answers: tuple[str, str]) -> None:
        """Answer token ids (each answer one token) and requires_grad only on shared_parameter_names()."""
        self.yes_id = single_token(self.tokenizer, answers[0])
        self.no_id = single_token(self.tokenizer, answers[1])
        shared = set(self.shared_parameter_names())
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in shared)

    def _to_uint8(self, decoded: torch.Tensor) -> torch.Tensor:
        """VQ decoder output, float [B, 3, H, W] in the processor's normalised range -> uint8 [B, H, W, 3]."""
        ip = self.processor.image_processor
        return unnormalize_to_uint8(decoded, ip.image_mean, ip.image_std)

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_batch(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        """Raise unless images are valid codes [B, L] and prompts one non-empty string per image."""
        check_images(images, self.image_tokens, self.codebook_size)
        check_prompts(prompts, images.shape[0])

    @staticmethod
    def _check_sampling(prompts: Sequence[str], n: int, temperature: float) -> None:
        check_prompts(prompts)
        if n < 1 or temperature <= 0:
            raise ValueError(f"need n >= 1 and temperature > 0, got n={n}, temperature={temperature}")

    def _sample_code(
        self, logits: torch.Tensor, guided: bool, temperature: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """One code per row from softmax(l / temperature): LongTensor[R]. guided: logits [2R, K] are the
        conditional rows then the unconditional ones, l = l_u + s (l_c - l_u) (s = guidance_scale)."""
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + self.guidance_scale * (cond - uncond)
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @abstractmethod
    def _understanding_logits(
        self,
        images: torch.Tensor,
        questions: Sequence[str],
        answers: Sequence[Sequence[int]],
        keep: int,
        model: nn.Module,
    ) -> torch.Tensor:
        """lm_head logits of ``model`` at the last ``keep`` positions of the left-padded
        understanding rows."""

    def judge(
        self, images: torch.Tensor, prompts: Sequence[str], model: nn.Module | None = None
    ) -> Judgement:
        """log-odds = logit(yes) - logit(no) at the answer position of "Does this image describe y?"."""
        self._check_batch(images, prompts)
        questions = [self.question.format(prompt=p) for p in prompts]
        model = self.model if model is None else model
        logits = self._understanding_logits(images, questions, [()] * len(prompts), 1, model)[:, -1].float()
        log_odds = logits[:, self.yes_id] - logits[:, self.no_id]
        return Judgement(p_yes=torch.sigmoid(log_odds), log_odds=log_odds)

    def caption_logprob(
        self, images: torch.Tensor, prompts: Sequence[str], model: nn.Module | None = None
    ) -> torch.Tensor:
        """log pi(y|x): the prompt's tokens (" {prompt}") answering caption_question about the image: [B]."""
        self._check_batch(images, prompts)
        captions = [self._text(" " + p) for p in prompts]
        keep = max(len(c) for c in captions) + 1
        model = self.model if model is None else model
        questions = [self.caption_question] * len(prompts)
        logits = self._understanding_logits(images, questions, captions, keep, model)
        return suffix_logprob(logits, captions)
