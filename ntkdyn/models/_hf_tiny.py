"""Offline pieces shared by the tiny random Janus and Emu3 builds: a byte-level BPE
tokenizer trained in memory, and left-padding of token sequences.

Byte-level BPE encodes any text (unknown words fall back to bytes), so prompts from
ShapesWorld or a user's file always tokenize; the corpus only decides which words
become single tokens (" yes" and " no" must, to be answer tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

_WORDS = (
    "a an the one two three four five six zero no yes and of in on is are there "
    "red green blue yellow purple orange white black gray cyan pink brown "
    "circle square triangle star cross diamond heart ring circles squares triangles stars crosses "
    "left right above below top bottom next to of the image picture photo scene object objects "
    "Does this image describe Describe the image. Yes No"
)


def train_byte_bpe(
    texts: Sequence[str],
    special_tokens: Sequence[str],
    vocab_size: int,
    prepend_bos: bool = False,
    **named_tokens: str,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` plus a small English/ShapesWorld word
    list, with ``special_tokens`` as atomic added tokens (ids 0.. in the given order).

    named_tokens: roles for PreTrainedTokenizerFast (bos_token=..., pad_token=..., eos_token=...)
    and any other name (image_token=..., boi_token=...), which become extra special tokens
    readable as ``tokenizer.<name>`` and ``tokenizer.<name>_id``. prepend_bos: encoding with
    add_special_tokens=True puts bos_token first (as Llama tokenizers do).
    """
    standard = {"bos_token", "eos_token", "pad_token", "unk_token"}
    for role, token in named_tokens.items():
        if token not in special_tokens:
            raise ValueError(f"{role}={token!r} is not one of special_tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [*texts, _WORDS, " " + _WORDS.replace(" ", "  ")]
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    if prepend_bos:
        bos = named_tokens["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **{k: v for k, v in named_tokens.items() if k in standard},
        extra_special_tokens={k: v for k, v in named_tokens.items() if k not in standard},
    )


def seeded_model(model_class, config, seed: int) -> torch.nn.Module:
    """model_class(config) with eager attention and weights drawn under torch.manual_seed(seed),
    leaving the global RNG state as it was."""
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_class(config)


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token sequences: (ids [B, T], attention_mask [B, T], position_ids [B, T]).

    Left padding aligns every sequence's end at column T-1, so the answer position and
    the scored suffix are the same columns for every row; position_ids restart at 0 on
    each row's first real token (= mask.cumsum - 1), so a padded row computes exactly
    what the unpadded sequence computes alone.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad needs a non-empty list of non-empty sequences")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, length - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def pixels_to_numpy_list(pixels: torch.Tensor, image_size: int) -> list:
    """Check uint8 pixels [B, H, W, 3] have H = W = image_size; return them as a list of HWC arrays."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(
            f"pixels must be a uint8 tensor [B, H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}"
        )
    if pixels.shape[1] != image_size or pixels.shape[2] != image_size:
        raise ValueError(
            f"pixels are {pixels.shape[1]}x{pixels.shape[2]}, but this model's images are "
            f"{image_size}x{image_size} (adapter.image_size)"
        )
    return [p.numpy() for p in pixels.cpu()]


def unnormalize_to_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Invert an image processor's normalisation: float [B, 3, H, W] -> uint8 [B, H, W, 3],
    pixel = round(clamp((x * std + mean) * 255, 0, 255))."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    pixels = ((images.float() * std_t + mean_t) * 255).clamp(0, 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


def check_images(images: torch.Tensor, image_tokens: int, codebook_size: int) -> None:
    """Raise unless images is a LongTensor [B, image_tokens] of codebook indices in [0, codebook_size)."""
    if images.dtype != torch.long or images.ndim != 2 or images.shape[1] != image_tokens:
        raise ValueError(
            f"images must be a LongTensor [B, {image_tokens}] of codebook indices, "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if images.numel() and (images.min() < 0 or images.max() >= codebook_size):
        raise ValueError(
            f"image tokens must lie in [0, {codebook_size}), got [{images.min()}, {images.max()}]"
        )


def check_prompts(prompts: Sequence[str], batch: int | None = None) -> None:
    """Raise unless prompts is a non-empty list of non-empty strings (of length batch, if given)."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if batch is not None and len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images: one prompt per image is needed")


def suffix_logprob(logits: torch.Tensor, suffixes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sum of log-softmax(logits) over each row's right-aligned suffix tokens: Tensor[B].

    logits: [B, K+1, V], the last K+1 positions of left-padded rows whose last len(suffixes[b])
    tokens are suffixes[b] (K = max suffix length); position j predicts token j+1.
    """
    k = max(len(s) for s in suffixes)
    if logits.shape[1] != k + 1:
        raise ValueError(f"expected logits over the last {k + 1} positions, got {logits.shape[1]}")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = torch.zeros(logits.shape[0], k, dtype=torch.long, device=logits.device)
    scored = torch.zeros(logits.shape[0], k, dtype=torch.bool, device=logits.device)
    for row, suffix in enumerate(suffixes):
        targets[row, k - len(suffix) :] = torch.as_tensor(list(suffix), dtype=torch.long)
        scored[row, k - len(suffix) :] = True
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros_like(picked)).sum(-1)


def single_token(tokenizer, text: str) -> int:
    """The id of text, which must tokenize to exactly one token (answer words yes/no)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"answer word {text!r} must be one token for this tokenizer, got {len(ids)}: {ids}")
    return ids[0]
