"""Tiny models of the families users bring to GradientProjector, each with a measurement and a batch,
and the independent reference its exact features are held to.

Every builder returns a :class:`Built`: a float64 model in eval mode (transformers models from configs,
offline, ``attn_implementation="eager"``), ``fn(model, batch) -> Tensor[B]``, a batch of B = 3 samples
and ``alone(b)``, the batch of sample b on its own (unpadded). Batches are built so that a sample's
value does not depend on the rest of the batch: token batches are right-padded (causal models never
attend to later pads, encoders mask pad keys, positions count from the left), so that
``fn(model, alone(b))[0] == fn(model, batch)[b]`` up to rounding. Left padding is avoided on purpose:
transformers' eager attention takes its softmax in float32, so a fully masked float64 row (a left pad
query) becomes NaN and the NaN reaches every token through ``0 * NaN`` in attention @ V.

The reference :func:`per_sample_gradients_float64` uses no hooks and no torch.func: for each b, a
forward of the full batch and ``torch.autograd.grad(values[b], params)``, an explicit loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers as tf
from torch import nn
from torch.utils.checkpoint import checkpoint

B, T = 3, 8  # samples per batch, tokens per sample
LENGTHS = (8, 5, 7)  # real tokens per sample of the right-padded token batches
PAD = 0


@dataclass(frozen=True)
class Size:
    """Widths of the built models: transformers' hidden/intermediate sizes (4 heads), the vocabulary,
    the width of the torch.nn models. TINY is what the tests use; benchmarks build larger ones."""

    hidden: int = 32
    intermediate: int = 48
    vocab: int = 64
    width: int = 16


TINY = Size()


@dataclass
class Built:
    """A model, its measurement and a batch; ``alone(b)`` is the batch of the sample that value b
    measures, by itself (None when values mix samples)."""

    model: nn.Module
    fn: Callable[[nn.Module, Any], torch.Tensor]
    batch: Any
    alone: Callable[[int], Any] | None


@dataclass(frozen=True)
class Family:
    """A case of the matrix. exact_required: the projector must give exact features (False: exact or
    a clear refusal). refusal_pattern: a refusal's message must match it (default: name a module)."""

    build: Callable[[Size], Built]
    exact_required: bool
    source: str  # "transformers" | "ntkdyn" | "torch"
    refusal_pattern: str | None = None


# ---------------------------------------------------------------- the reference
MeasurementFn = Callable[[nn.Module, Any], torch.Tensor]


def per_sample_gradients_float64(
    model: nn.Module, fn: MeasurementFn, batch: Any, params: dict[str, nn.Parameter]
) -> torch.Tensor:
    """[B, P] float64: row b = grad_theta fn(model, batch)[b], flattened over ``params`` in their order
    (P = sum of numels; a parameter fn does not reach gives zeros). For each b, one forward of the full
    batch and one torch.autograd.grad of its value b (no retained graph: a compiled model's backward
    may donate its buffers); no hooks, no torch.func."""
    if any(p.dtype != torch.float64 for p in params.values()):
        raise ValueError("the reference needs a float64 model")
    tensors = list(params.values())
    with torch.no_grad():
        count = fn(model, batch).shape[0]
    rows = []
    with torch.enable_grad():
        for b in range(count):
            grads = torch.autograd.grad(fn(model, batch)[b], tensors, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for p, g in zip(tensors, grads, strict=True)
                    ]
                )
            )
    reference = torch.stack(rows)
    if not torch.isfinite(reference).all():
        raise FloatingPointError("the reference per-sample gradients are not finite")
    return reference


def block_errors(
    features: torch.Tensor, reference: torch.Tensor, params: dict[str, nn.Parameter]
) -> dict[str, float]:
    """Per tracked parameter p: ||F_p - R_p|| / max(||R_p||, 1e-3 ||R||) (Frobenius over all samples).
    The floor covers blocks that are zero, or zero up to cancellation (e.g. a key bias: softmax is
    invariant to it), whose float64 rounding noise differs between any two exact computations."""
    errors, offset = {}, 0
    floor = reference.norm() * 1e-3
    for name, param in params.items():
        f, r = features[:, offset : offset + param.numel()], reference[:, offset : offset + param.numel()]
        errors[name] = float((f.double() - r).norm() / torch.maximum(r.norm(), floor))
        offset += param.numel()
    return errors


# ---------------------------------------------------------------- batches and measurements
def token_batch(
    vocab: int, pad: int = PAD, lengths: tuple[int, ...] = LENGTHS, low: int = 3, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Right-padded {"input_ids", "attention_mask"} [B, T] with ``lengths`` real tokens per sample;
    real ids in [low, vocab), never ``pad``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (B, T), generator=g)
    ids[ids == pad] = low + (pad == low)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.where(mask.bool(), ids, pad), "attention_mask": mask}


def truncate_alone(batch: dict[str, torch.Tensor], b: int, keys=("input_ids", "attention_mask")) -> dict:
    """Sample b of a right-padded token batch, without its pads; other entries sliced to row b."""
    n = int(batch["attention_mask"][b].sum())
    return {k: v[b : b + 1, :n] if k in keys else v[b : b + 1] for k, v in batch.items()}


def causal_lm_logprob(model: nn.Module, batch: dict) -> torch.Tensor:
    """sum_t log p(x_{t+1} | x_<=t) over the real next tokens: Tensor[B]."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.where(mask[:, 1:].bool(), logp, 0.0).sum(-1)


def classifier_logprob(model: nn.Module, batch: dict) -> torch.Tensor:
    """log p(label_b | sample b) of a sequence/image classifier: Tensor[B]."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return torch.log_softmax(logits, -1).gather(-1, batch["labels"][:, None])[:, 0]


def seq2seq_logprob(model: nn.Module, batch: dict) -> torch.Tensor:
    """sum_t log p(y_t | y_<t, x) of an encoder-decoder over the (unpadded) decoder tokens: Tensor[B]."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return torch.log_softmax(logits, -1).gather(-1, batch["labels"][..., None])[..., 0].sum(-1)


def pooled_logsumexp(model: nn.Module, batch: dict) -> torch.Tensor:
    """logsumexp over the hidden units of a vision encoder's pooled output: Tensor[B]."""
    return model(pixel_values=batch["pixel_values"]).pooler_output.logsumexp(-1)


def seeded(cls, config, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls(config).double().eval()


def text_case(
    model: nn.Module, vocab: int, fn=causal_lm_logprob, pad: int = PAD, padded: bool = True, **extra
) -> Built:
    """A token batch (right-padded, or all T tokens real when not ``padded``) plus ``extra`` entries."""
    batch = token_batch(vocab, pad, lengths=LENGTHS if padded else (T,) * B)
    batch.update(extra)
    return Built(model, fn, batch, functools.partial(truncate_alone, batch))


def labelled(classes: int = 3) -> torch.Tensor:
    """Class labels [B] of the classifier batches."""
    return torch.arange(B) % classes


def pixel_case(model: nn.Module, fn, **extra) -> Built:
    """A batch of float64 images [B, 3, 16, 16] plus ``extra`` entries."""
    pixels = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batch = {"pixel_values": pixels, **extra}
    return Built(model, fn, batch, lambda b: {k: v[b : b + 1] for k, v in batch.items()})


# ---------------------------------------------------------------- transformers families
def decoder_config(cls, size: Size, **kw):
    """A 2-layer decoder config: 4 heads, 2 KV heads (grouped-query attention)."""
    base = dict(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    return cls(**{**base, **kw})


def llama(size: Size = TINY) -> Built:
    config = decoder_config(tf.LlamaConfig, size, tie_word_embeddings=True)
    return text_case(seeded(tf.LlamaForCausalLM, config), size.vocab)


def llama_frozen_embeddings(size: Size = TINY) -> Built:
    model = seeded(tf.LlamaForCausalLM, decoder_config(tf.LlamaConfig, size, tie_word_embeddings=False))
    model.model.embed_tokens.requires_grad_(False)
    return text_case(model, size.vocab)


def preference_margin(model: nn.Module, batch: dict) -> torch.Tensor:
    """DPO-like: log p(chosen) - log p(rejected), two forwards of the model: Tensor[B]."""
    return causal_lm_logprob(model, batch["chosen"]) - causal_lm_logprob(model, batch["rejected"])


def concatenated_preference_margin(model: nn.Module, batch: dict) -> torch.Tensor:
    """preference_margin from ONE forward of the 2B rows [chosen; rejected] (TRL's concatenated forward):
    the model's calls have 2B rows for fn's B values."""
    both = {k: torch.cat([batch["chosen"][k], batch["rejected"][k]]) for k in batch["chosen"]}
    values = causal_lm_logprob(model, both)
    n = values.shape[0] // 2
    return values[:n] - values[n:]


def llama_preference(fn: MeasurementFn, size: Size = TINY) -> Built:
    """A Llama measured by fn on {"chosen", "rejected"} right-padded token batches of equal width T."""
    model = seeded(tf.LlamaForCausalLM, decoder_config(tf.LlamaConfig, size, tie_word_embeddings=True))
    batch = {
        "chosen": token_batch(size.vocab),
        "rejected": token_batch(size.vocab, lengths=(6, 8, 4), seed=2),
    }
    return Built(
        model, fn, batch, lambda b: {k: {n: v[b : b + 1] for n, v in x.items()} for k, x in batch.items()}
    )


def permuted_logprob(model: nn.Module, batch: dict) -> torch.Tensor:
    """causal_lm_logprob in reversed order: value b belongs to sample B-1-b."""
    return causal_lm_logprob(model, batch).flip(0)


def neighbour_logprob(model: nn.Module, batch: dict) -> torch.Tensor:
    """f_b = logp(sample b) + logp(sample b-1 mod B): every value depends on two samples."""
    values = causal_lm_logprob(model, batch)
    return values + values.roll(1)


def llama_reversed(size: Size = TINY) -> Built:
    """The tied Llama of :func:`llama` measured by permuted_logprob: value b is sample B-1-b alone."""
    built = llama(size)
    return Built(built.model, permuted_logprob, built.batch, lambda b: built.alone(B - 1 - b))


def llama_mixed(size: Size = TINY) -> Built:
    """The tied Llama of :func:`llama` measured by neighbour_logprob (no value is one sample's alone)."""
    built = llama(size)
    return Built(built.model, neighbour_logprob, built.batch, None)


def qwen2_sliding_window(size: Size = TINY) -> Built:
    config = decoder_config(
        tf.Qwen2Config, size, use_sliding_window=True, sliding_window=4, max_window_layers=1
    )  # layer 0 full attention, layer 1 a sliding window of 4
    return text_case(seeded(tf.Qwen2ForCausalLM, config), size.vocab)


def mistral_sliding_window(size: Size = TINY) -> Built:
    config = decoder_config(tf.MistralConfig, size, sliding_window=4)
    return text_case(seeded(tf.MistralForCausalLM, config), size.vocab)


def gemma(size: Size = TINY) -> Built:
    config = decoder_config(
        tf.GemmaConfig, size, head_dim=size.hidden // 4, hidden_activation="gelu_pytorch_tanh"
    )
    return text_case(seeded(tf.GemmaForCausalLM, config), size.vocab)


def gemma3(size: Size = TINY) -> Built:
    config = decoder_config(
        tf.Gemma3TextConfig,
        size,
        head_dim=size.hidden // 4,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    return text_case(seeded(tf.Gemma3ForCausalLM, config), size.vocab)


def gpt_neox(size: Size = TINY) -> Built:
    config = tf.GPTNeoXConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        rotary_pct=0.5,
        attn_implementation="eager",
    )
    return text_case(seeded(tf.GPTNeoXForCausalLM, config), size.vocab)


def gpt2_config(size: Size, **kw) -> tf.GPT2Config:
    base = dict(
        vocab_size=size.vocab,
        n_embd=size.hidden,
        n_layer=2,
        n_head=4,
        n_positions=32,
        attn_implementation="eager",
    )
    return tf.GPT2Config(**{**base, **kw})


def gpt2(size: Size = TINY) -> Built:
    """Conv1D layers, wte tied to lm_head, learned positions on position_ids [1, T]."""
    return text_case(seeded(tf.GPT2LMHeadModel, gpt2_config(size)), size.vocab)


def gpt2_train_mode_dropout(size: Size = TINY) -> Built:
    """A GPT-2 left in train mode (as built from a config) with dropout: must be refused."""
    model = seeded(
        tf.GPT2LMHeadModel, gpt2_config(size, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    ).train()
    return text_case(model, size.vocab)


def opt(size: Size = TINY) -> Built:
    """MLP on a flattened [B*T, H] tensor; positions from the attention mask (a positional nn.Embedding
    subclass with its own forward)."""
    config = tf.OPTConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        ffn_dim=size.intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        word_embed_proj_dim=size.hidden,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    return text_case(seeded(tf.OPTForCausalLM, config), size.vocab)


def mamba(use_cache: bool, size: Size = TINY) -> Built:
    """A selective state-space model (slow path: no CUDA kernels); with use_cache (its config's
    default) every mixer call also writes its state into a cache."""
    config = tf.MambaConfig(
        vocab_size=size.vocab,
        hidden_size=size.width,
        state_size=4,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=3,
    )
    fn = functools.partial(causal_lm_logprob_no_mask, use_cache=use_cache)
    return text_case(seeded(tf.MambaForCausalLM, config), size.vocab, fn)


def causal_lm_logprob_no_mask(model: nn.Module, batch: dict, use_cache: bool) -> torch.Tensor:
    """causal_lm_logprob for a model without attention_mask: the mask only selects the scored tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, use_cache=use_cache).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.where(mask[:, 1:].bool(), logp, 0.0).sum(-1)


def encoder_config(cls, size: Size, **kw):
    """A 2-layer encoder config with 4 heads and a 3-class head."""
    base = dict(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        num_labels=3,
        attn_implementation="eager",
    )
    return cls(**{**base, **kw})


def bert_classifier(size: Size = TINY) -> Built:
    model = seeded(tf.BertForSequenceClassification, encoder_config(tf.BertConfig, size, pad_token_id=PAD))
    return text_case(model, size.vocab, classifier_logprob, labels=labelled())


def roberta_classifier(size: Size = TINY) -> Built:
    """Positions computed from input_ids past padding_idx (= pad id 1)."""
    config = encoder_config(tf.RobertaConfig, size, pad_token_id=1, max_position_embeddings=T + 2)
    model = seeded(tf.RobertaForSequenceClassification, config)
    return text_case(model, size.vocab, classifier_logprob, pad=1, labels=labelled())


def vit_classifier(size: Size = TINY) -> Built:
    """Conv2d patch embedding, cls token and position embeddings as bare parameters."""
    config = tf.ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=3,
        attn_implementation="eager",
    )
    return pixel_case(seeded(tf.ViTForImageClassification, config), classifier_logprob, labels=labelled())


def siglip_vision(size: Size = TINY) -> Built:
    """Attention-pooling head built on nn.MultiheadAttention with a learned probe."""
    config = tf.SiglipVisionConfig(
        image_size=16,
        patch_size=8,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        vision_use_head=True,
        attn_implementation="eager",
    )
    return pixel_case(seeded(tf.SiglipVisionModel, config), pooled_logsumexp)


def clip_vision(size: Size = TINY) -> Built:
    """class_embedding is a bare parameter of CLIPVisionEmbeddings."""
    config = tf.CLIPVisionConfig(
        image_size=16,
        patch_size=8,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        attn_implementation="eager",
    )
    return pixel_case(seeded(tf.CLIPVisionModel, config), pooled_logsumexp)


def seq2seq_case(model: nn.Module, vocab: int, decoder_start: int) -> Built:
    """Right-padded encoder input, an unpadded 4-token decoder input (teacher forcing)."""
    labels = torch.randint(3, vocab, (B, 4), generator=torch.Generator().manual_seed(3))
    decoder_input_ids = torch.cat([torch.full((B, 1), decoder_start), labels[:, :-1]], dim=1)
    return text_case(model, vocab, seq2seq_logprob, decoder_input_ids=decoder_input_ids, labels=labels)


def bart(size: Size = TINY) -> Built:
    config = tf.BartConfig(
        vocab_size=size.vocab,
        d_model=size.hidden,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=size.intermediate,
        decoder_ffn_dim=size.intermediate,
        max_position_embeddings=32,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        scale_embedding=True,
        attn_implementation="eager",
    )
    return seq2seq_case(seeded(tf.BartForConditionalGeneration, config), size.vocab, decoder_start=2)


def t5(size: Size = TINY) -> Built:
    """Relative attention bias: an nn.Embedding looked up with [T, T] bucket ids, shared over the batch."""
    config = tf.T5Config(
        vocab_size=size.vocab,
        d_model=size.hidden,
        d_kv=size.hidden // 4,
        d_ff=size.intermediate,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=PAD,
        decoder_start_token_id=PAD,
        attn_implementation="eager",
    )
    return seq2seq_case(seeded(tf.T5ForConditionalGeneration, config), size.vocab, decoder_start=PAD)


def whisper(size: Size = TINY) -> Built:
    """Conv1d front end over log-mel features, encoder positions read as embed_positions.weight."""
    config = tf.WhisperConfig(
        vocab_size=size.vocab,
        num_mel_bins=8,
        d_model=size.hidden,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=size.intermediate,
        decoder_ffn_dim=size.intermediate,
        max_source_positions=8,
        max_target_positions=16,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        attn_implementation="eager",
    )
    model = seeded(tf.WhisperForConditionalGeneration, config)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(3, size.vocab, (B, 4), generator=g)
    batch = {
        "input_features": torch.randn(B, 8, 16, generator=g, dtype=torch.float64),
        "decoder_input_ids": torch.cat([torch.ones(B, 1, dtype=torch.long), labels[:, :-1]], dim=1),
        "labels": labels,
    }
    return Built(model, seq2seq_logprob, batch, lambda b: {k: v[b : b + 1] for k, v in batch.items()})


# ---------------------------------------------------------------- ntkdyn's unified models
UNIFIED_PROMPTS = ["a red circle", "a blue square", "a yellow star"]  # same token count in both tokenizers


@functools.cache
def unified_adapter(name: str):
    """ntkdyn's tiny Janus / Emu3 (load_adapter(name), seed 0) in float64; only the shared language
    model requires grad."""
    from ntkdyn.models import load_adapter

    adapter = load_adapter(name, seed=0)
    adapter.model.double()
    return adapter


def unified(name: str, measurement: str, size: Size = TINY) -> Built:
    """The adapter's measurement ("gen" or "und") on 3 prompts that tokenize to the same length, so
    the batch has no padding. The models are ntkdyn's tiny ones whatever ``size``."""
    adapter = unified_adapter(name)
    images = torch.randint(
        0, adapter.codebook_size, (B, adapter.image_tokens), generator=torch.Generator().manual_seed(5)
    )
    batch = {"prompts": UNIFIED_PROMPTS, "images": images}
    return Built(
        adapter.model,
        adapter.measurement(measurement),
        batch,
        lambda b: {"prompts": UNIFIED_PROMPTS[b : b + 1], "images": images[b : b + 1]},
    )


# ---------------------------------------------------------------- torch.nn models
def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B]: sum over the real tokens (where, so nothing at a pad can leak)."""
    return torch.where(mask.bool(), values, 0.0).sum(-1)


class AttentionModel(nn.Module):
    """Embedding -> nn.MultiheadAttention with a key padding mask -> Linear readout per token."""

    def __init__(self, size: Size, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(size.vocab, size.width)
        self.attn = nn.MultiheadAttention(size.width, 4, batch_first=batch_first)
        self.readout = nn.Linear(size.width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # [B, T, E]
        if not self.batch_first:
            x = x.transpose(0, 1)  # [T, B, E]
        y, _ = self.attn(x, x, x, key_padding_mask=~attention_mask.bool())
        if not self.batch_first:
            y = y.transpose(0, 1)
        return masked_sum(torch.tanh(self.readout(y))[..., 0], attention_mask)


class TransformerEncoderModel(nn.Module):
    """Embedding -> nn.TransformerEncoderLayer (batch first, key padding mask) -> Linear readout."""

    def __init__(self, size: Size):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.width)
        self.layer = nn.TransformerEncoderLayer(
            size.width, 4, dim_feedforward=2 * size.width, batch_first=True
        )
        self.readout = nn.Linear(size.width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        y = self.layer(self.embed(input_ids), src_key_padding_mask=~attention_mask.bool())
        return masked_sum(self.readout(y)[..., 0], attention_mask)


class RecurrentModel(nn.Module):
    """Embedding -> 2-layer GRU or LSTM (tuple outputs) -> Linear readout of each step and the last state."""

    def __init__(self, size: Size, cell: type[nn.RNNBase], batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(size.vocab, size.width)
        self.rnn = cell(size.width, size.width, num_layers=2, batch_first=batch_first)
        self.readout = nn.Linear(size.width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state  # [layers, B, E]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.readout(out)[..., 0].sum(-1) + self.readout(h[-1])[:, 0]


class RecurrentCellLoop(nn.Module):
    """h_{t+1} = tanh(W_x x_t + W_h h_t): the same nn.Linear modules called once per time step."""

    def __init__(self, size: Size):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.width)
        self.input_proj = nn.Linear(size.width, size.width)
        self.hidden_proj = nn.Linear(size.width, size.width, bias=False)
        self.readout = nn.Linear(size.width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        h = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            h = torch.tanh(self.input_proj(x[:, t]) + self.hidden_proj(h))
        return self.readout(h)[:, 0]


class ConvNet1d(nn.Module):
    """[B, 4, 12] -> Conv1d (padded) -> tanh -> Conv1d (stride 2, 2 groups) -> mean -> Linear."""

    def __init__(self, size: Size):
        super().__init__()
        self.conv1 = nn.Conv1d(4, size.width, 3, padding=1)
        self.conv2 = nn.Conv1d(size.width, 6, 3, stride=2, groups=2)
        self.readout = nn.Linear(6, 1)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.readout(self.conv2(torch.tanh(self.conv1(signal))).mean(-1))[:, 0]


class ConvNet2d(nn.Module):
    """[B, 3, 8, 8] -> Conv2d -> [BatchNorm2d] -> tanh -> Conv2d (stride 2) -> [BatchNorm1d] -> Linear."""

    def __init__(self, size: Size, batch_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, size.width, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(size.width) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(size.width, 4, 3, stride=2)
        self.norm2 = nn.BatchNorm1d(36) if batch_norm else nn.Identity()
        self.readout = nn.Linear(36, 1)
        for norm in (self.norm1, self.norm2):  # non-trivial running statistics and affine parameters
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(norm.weight, 0.5, 1.5)
                nn.init.uniform_(norm.bias, -0.5, 0.5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.tanh(self.norm1(self.conv1(pixel_values))))
        return self.readout(torch.tanh(self.norm2(h.flatten(1))))[:, 0]


class MaskedGate(nn.Module):
    """gate(h, mask=m) = sigmoid(h W + b) * m[..., None]: its own parameters, a batched keyword tensor."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.bias = nn.Parameter(torch.randn(width) * 0.1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(h @ self.weight + self.bias) * mask[..., None]


class KeywordCallModel(nn.Module):
    """Embedding -> gate(h, mask=weights) -> nn.Linear, called as proj(h), or as proj(input=h) when
    ``linear_by_keyword`` -> sum over tokens."""

    def __init__(self, size: Size, linear_by_keyword: bool):
        super().__init__()
        self.linear_by_keyword = linear_by_keyword
        self.embed = nn.Embedding(size.vocab, size.width)
        self.gate = MaskedGate(size.width)
        self.proj = nn.Linear(size.width, 1)

    def forward(self, input_ids: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
        h = self.gate(self.embed(input_ids), mask=token_weights)
        out = self.proj(input=h) if self.linear_by_keyword else self.proj(h)
        return out[..., 0].sum(-1)


class SequenceFirstModel(nn.Module):
    """Tokens laid out [T, B, E] (T == B here) through nn.Linear layers; reduced over T (dim 0)."""

    def __init__(self, size: Size):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.width)
        self.hidden = nn.Linear(size.width, size.width)
        self.readout = nn.Linear(size.width, 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids.T)  # [T, B, E]
        return self.readout(torch.tanh(self.hidden(x)))[..., 0].pow(2).sum(0)


class TiedFunctionalLM(nn.Module):
    """Logits by F.linear on the embedding's weight, outside nn.Embedding's call; LayerNorm in between."""

    def __init__(self, size: Size):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.width)
        self.norm = nn.LayerNorm(size.width)
        self.mix = nn.Linear(size.width, size.width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.mix(self.embed(input_ids))))
        logits = nn.functional.linear(h, self.embed.weight)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        return masked_sum(logp, attention_mask[:, 1:])


class MiscLayersModel(nn.Module):
    """EmbeddingBag (mean) -> LayerNorm -> PReLU -> GroupNorm over features -> Bilinear with itself."""

    def __init__(self, size: Size):
        super().__init__()
        self.bag = nn.EmbeddingBag(size.vocab, size.width, mode="mean")
        self.norm = nn.LayerNorm(size.width)
        self.act = nn.PReLU(size.width)
        self.group = nn.GroupNorm(4, size.width)
        self.bilinear = nn.Bilinear(size.width, size.width, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.group(self.act(self.norm(self.bag(input_ids))))
        return self.bilinear(h, torch.tanh(h)).logsumexp(-1)


class CheckpointedModel(nn.Module):
    """Embedding -> a block (Linear, tanh, LayerNorm, Linear) under non-reentrant torch.utils.checkpoint
    (re-runs the block in the backward) -> readout. (Reentrant checkpointing refuses torch.autograd.grad,
    so neither the projector nor the reference can use it.)"""

    def __init__(self, size: Size):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.width)
        self.block = nn.Sequential(
            nn.Linear(size.width, size.width),
            nn.Tanh(),
            nn.LayerNorm(size.width),
            nn.Linear(size.width, size.width),
        )
        self.readout = nn.Linear(size.width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.block, self.embed(input_ids), use_reentrant=False)
        return masked_sum(torch.tanh(self.readout(h))[..., 0], attention_mask)


class WeightNormModel(nn.Module):
    """Embedding -> nn.Linear with a weight_norm parametrization (weight = g v / ||v||) -> readout."""

    def __init__(self, size: Size):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.width)
        self.hidden = nn.utils.parametrizations.weight_norm(nn.Linear(size.width, size.width))
        self.readout = nn.Linear(size.width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.embed(input_ids)))
        return masked_sum(self.readout(h)[..., 0], attention_mask)


class BatchCenteredModel(nn.Module):
    """Embedding -> Linear -> minus its mean over the batch (samples interact) -> readout."""

    def __init__(self, size: Size):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.width)
        self.hidden = nn.Linear(size.width, size.width)
        self.readout = nn.Linear(size.width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.hidden(self.embed(input_ids))
        return masked_sum(self.readout(torch.tanh(h - h.mean(0)))[..., 0], attention_mask)


class TimeMajorFlatModel(nn.Module):
    """nn.Linear on the time-major flattened [T*B, E] rows (row t*B + b is sample b), reshaped back."""

    def __init__(self, size: Size):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.width)
        self.hidden = nn.Linear(size.width, size.width)
        self.readout = nn.Linear(size.width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids).transpose(0, 1)  # [T, B, E]
        h = self.hidden(x.reshape(-1, x.shape[-1])).reshape(x.shape).transpose(0, 1)
        return masked_sum(self.readout(torch.tanh(h))[..., 0], attention_mask)


class SmallLM(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear head: the model that is torch.compile'd."""

    def __init__(self, size: Size):
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.width)
        self.mix = nn.Linear(size.width, size.width)
        self.norm = nn.LayerNorm(size.width)
        self.head = nn.Linear(size.width, size.vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(torch.tanh(self.mix(self.embed(input_ids)))))
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        return masked_sum(logp, attention_mask[:, 1:])


def call_model(model: nn.Module, batch: dict) -> torch.Tensor:
    """The torch.nn models return Tensor[B] themselves: fn = model(**batch)."""
    return model(**batch)


def seeded_module(cls: type[nn.Module], size: Size, *args) -> nn.Module:
    """cls(size, *args), weights drawn after torch.manual_seed(0), float64, eval mode."""
    torch.manual_seed(0)
    return cls(size, *args).double().eval()


def batch_case(model: nn.Module, batch: dict[str, torch.Tensor]) -> Built:
    """A model on a batch of per-sample tensors (row b is sample b, no padding)."""
    return Built(model, call_model, batch, lambda b: {k: v[b : b + 1] for k, v in batch.items()})


def torch_case(cls: type[nn.Module], *args, padded: bool = True, size: Size = TINY) -> Built:
    """cls(size, *args) on a token batch, right-padded unless not ``padded`` (models that read every
    token get B full-length samples)."""
    return text_case(seeded_module(cls, size, *args), size.vocab, call_model, padded=padded)


def float_case(cls: type[nn.Module], *args, shape: tuple[int, ...], size: Size = TINY) -> Built:
    """cls(size, *args) on {name: float64 Tensor[B, *shape]} (name = the forward's argument)."""
    name = "signal" if len(shape) == 2 else "pixel_values"
    batch = {name: torch.randn(B, *shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)}
    return batch_case(seeded_module(cls, size, *args), batch)


def batch_centering(size: Size = TINY) -> Built:
    """BatchCenteredModel: each value depends on every sample (alone(b) is None)."""
    built = torch_case(BatchCenteredModel, size=size)
    return Built(built.model, built.fn, built.batch, None)


def keyword_call(linear_by_keyword: bool, size: Size = TINY) -> Built:
    g = torch.Generator().manual_seed(7)
    batch = {
        "input_ids": torch.randint(0, size.vocab, (B, T), generator=g),
        "token_weights": torch.rand(B, T, generator=g, dtype=torch.float64),
    }
    return batch_case(seeded_module(KeywordCallModel, size, linear_by_keyword), batch)


def sequence_first_linear(size: Size = TINY) -> Built:
    ids = torch.randint(0, size.vocab, (B, B), generator=torch.Generator().manual_seed(8))  # T == B
    return batch_case(seeded_module(SequenceFirstModel, size), {"input_ids": ids})


def compiled_lm(size: Size = TINY) -> Built:
    """torch.compile (aot_eager backend: AOTAutograd graphs without inductor's C++ build)."""
    model = torch.compile(seeded_module(SmallLM, size), backend="aot_eager")
    return text_case(model, size.vocab, call_model)


def misc_layers(size: Size = TINY) -> Built:
    ids = torch.randint(0, size.vocab, (B, 4), generator=torch.Generator().manual_seed(9))
    return batch_case(seeded_module(MiscLayersModel, size), {"input_ids": ids})


# ---------------------------------------------------------------- the matrix
def case(build: Callable[..., Built], *args, **kwargs) -> Callable[[Size], Built]:
    """A Family's builder: size -> build(*args, size=size, **kwargs)."""
    return lambda size=TINY: build(*args, size=size, **kwargs)


def must_be_exact(build: Callable[[Size], Built], source: str) -> Family:
    """A case the projector must compute exactly (a refusal fails)."""
    return Family(build, True, source)


def exact_or_refused(
    build: Callable[[Size], Built], source: str, refusal_pattern: str | None = None
) -> Family:
    """A case the projector must compute exactly or refuse clearly (UnsupportedModuleError)."""
    return Family(build, False, source, refusal_pattern)


FAMILIES: dict[str, Family] = {
    # transformers: the families must be exact
    "llama": must_be_exact(llama, "transformers"),
    "llama-frozen-embeddings": must_be_exact(llama_frozen_embeddings, "transformers"),
    "llama-two-forwards": must_be_exact(case(llama_preference, preference_margin), "transformers"),
    "llama-concatenated-forward": exact_or_refused(
        case(llama_preference, concatenated_preference_margin), "transformers"
    ),
    "llama-values-reversed": exact_or_refused(llama_reversed, "transformers"),
    "llama-values-mix-samples": exact_or_refused(llama_mixed, "transformers"),
    "qwen2-sliding-window": must_be_exact(qwen2_sliding_window, "transformers"),
    "mistral-sliding-window": must_be_exact(mistral_sliding_window, "transformers"),
    "gpt2": must_be_exact(gpt2, "transformers"),
    "bert-classifier": must_be_exact(bert_classifier, "transformers"),
    "vit-classifier": must_be_exact(vit_classifier, "transformers"),
    "gemma": must_be_exact(gemma, "transformers"),
    "opt": must_be_exact(opt, "transformers"),
    "siglip-vision-attention-pool": must_be_exact(siglip_vision, "transformers"),
    "bart": exact_or_refused(bart, "transformers"),
    "t5": exact_or_refused(t5, "transformers"),
    "gemma3": exact_or_refused(gemma3, "transformers"),
    "gpt-neox": exact_or_refused(gpt_neox, "transformers"),
    "roberta-classifier": exact_or_refused(roberta_classifier, "transformers"),
    "clip-vision": exact_or_refused(clip_vision, "transformers"),
    "whisper": exact_or_refused(whisper, "transformers"),
    "mamba": exact_or_refused(case(mamba, False), "transformers"),
    "mamba-use-cache": exact_or_refused(case(mamba, True), "transformers"),
    # ntkdyn's unified models, through their adapters' measurements
    "janus-gen": must_be_exact(case(unified, "janus-tiny", "gen"), "ntkdyn"),
    "janus-und": must_be_exact(case(unified, "janus-tiny", "und"), "ntkdyn"),
    "emu3-gen": must_be_exact(case(unified, "emu3-tiny", "gen"), "ntkdyn"),
    "emu3-und": must_be_exact(case(unified, "emu3-tiny", "und"), "ntkdyn"),
    # torch.nn
    "mha-batch-first": must_be_exact(case(torch_case, AttentionModel, True), "torch"),
    "mha-sequence-first": must_be_exact(case(torch_case, AttentionModel, False), "torch"),
    "gru-batch-first": must_be_exact(case(torch_case, RecurrentModel, nn.GRU, True, padded=False), "torch"),
    "lstm-sequence-first": must_be_exact(
        case(torch_case, RecurrentModel, nn.LSTM, False, padded=False), "torch"
    ),
    "conv1d": must_be_exact(case(float_case, ConvNet1d, shape=(4, 12)), "torch"),
    "conv2d": must_be_exact(case(float_case, ConvNet2d, False, shape=(3, 8, 8)), "torch"),
    "batchnorm-eval": must_be_exact(case(float_case, ConvNet2d, True, shape=(3, 8, 8)), "torch"),
    "keyword-tensor-call": must_be_exact(case(keyword_call, False), "torch"),
    "sequence-first-linear-T-eq-B": must_be_exact(sequence_first_linear, "torch"),
    "linear-reused-over-time": must_be_exact(case(torch_case, RecurrentCellLoop, padded=False), "torch"),
    "checkpoint-non-reentrant": must_be_exact(case(torch_case, CheckpointedModel), "torch"),
    "time-major-flattened-linear": exact_or_refused(case(torch_case, TimeMajorFlatModel), "torch"),
    "batch-centering-interaction": exact_or_refused(batch_centering, "torch"),
    "weight-norm-parametrization": exact_or_refused(case(torch_case, WeightNormModel), "torch"),
    "linear-called-by-keyword": exact_or_refused(case(keyword_call, True), "torch"),
    "transformer-encoder-layer": exact_or_refused(case(torch_case, TransformerEncoderModel), "torch"),
    "tied-weight-in-functional-linear": exact_or_refused(case(torch_case, TiedFunctionalLM), "torch"),
    "embeddingbag-prelu-groupnorm-bilinear": exact_or_refused(misc_layers, "torch"),
    "torch-compile": exact_or_refused(compiled_lm, "torch", refusal_pattern=r"(?i)compile"),
}

# must be refused with a message matching the pattern (a clear error, not a wrong answer)
MUST_REFUSE: dict[str, tuple[Callable[[], Built], str]] = {
    "gpt2-train-mode-dropout": (gpt2_train_mode_dropout, r"eval"),
}
