"""Emu3 (transformers' Emu3ForConditionalGeneration) as a UnifiedAdapter: early fusion.

Image codes live in the text vocabulary: code c is the token "<|visual token {c:06d}|>"
(Emu3's vocabulary map), and an image of h x w codes is written row by row, each row
closed by the end-of-line token <|extra_200|>:
    <|image start|> "{h}*{w}" <|image token|> row_1 eol ... row_h eol <|extra_201|> <|image end|>
  generation:    [bos] "{prompt}" <|image start|> "{h}*{w}" <|image token|> then the rows;
  understanding: [bos] "You are a helpful assistant. USER: " <image block> "{question} ASSISTANT:".
One lm_head predicts text and image tokens alike. generate samples only codebook tokens
(the distribution renormalised over the visual tokens, end-of-line tokens inserted, as
transformers' prefix_allowed_tokens_fn does) with classifier-free guidance against the
empty prompt; gen_logprob is the model's own full-vocabulary log pi(x|y) of the h*w codes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import (
    DynamicCache,
    Emu3Config,
    Emu3ForConditionalGeneration,
    Emu3ImageProcessor,
    Emu3Processor,
    Emu3TextConfig,
    Emu3VQVAEConfig,
)

from ntkdyn.models._hf_common import HFUnifiedAdapter
from ntkdyn.models._hf_tiny import (
    check_images,
    left_pad,
    pixels_to_numpy_list,
    seeded_model,
    train_byte_bpe,
)

SYSTEM = "You are a helpful assistant. USER: "
ASSISTANT = " ASSISTANT:"


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run a frozen module in eval mode (Emu3's VQ has BatchNorm3d) and restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class Emu3Adapter(HFUnifiedAdapter):
    """Emu3ForConditionalGeneration seen through generation and understanding.

    image_size: pixels per side of the images (a multiple of the VQ's spatial factor, 8 in
    Emu3); an image is (image_size/8)^2 codes. Parameters outside shared_parameter_names()
    (the VQ model) get requires_grad=False.
    """

    def __init__(
        self,
        model: Emu3ForConditionalGeneration,
        processor: Emu3Processor,
        image_size: int,
        guidance_scale: float = 4.0,
        question: str = "Does this image describe {prompt}?",
        caption_question: str = "Describe the image.",
        answers: tuple[str, str] = (" yes", " no"),
    ):
        super().__init__(model, processor, guidance_scale, question, caption_question)
        factor = model.model.vqmodel.vision_spatial_factor
        if image_size <= 0 or image_size % factor:
            raise ValueError(
                f"image_size must be a positive multiple of the VQ factor {factor}, got {image_size}"
            )
        self.image_size = image_size
        self.grid = image_size // factor
        self.image_tokens = self.grid * self.grid
        self.codebook_size = model.config.vq_config.codebook_size
        mapping = model.vocabulary_mapping
        img2bpe = mapping.img2bpe
        missing = [c for c in range(self.codebook_size) if c not in img2bpe]
        if missing:
            raise ValueError(f"vocabulary map lacks visual tokens for codes {missing[:5]}...")
        self.code_to_token = torch.tensor([img2bpe[c] for c in range(self.codebook_size)], dtype=torch.long)
        self.eol_id = mapping.eol_token_id
        tok = self.tokenizer
        self.boi_id = tok.convert_tokens_to_ids(processor.image_start_token)
        self.eoi_id = tok.convert_tokens_to_ids(processor.image_end_token)
        self.wrapper_id = tok.convert_tokens_to_ids(processor.fake_token_around_image)
        self.eof_id = tok.convert_tokens_to_ids(processor.eof_token)
        self._finish(answers)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path_or_id: str, image_size: int = 512, **kwargs) -> Emu3Adapter:
        """Load weights and processor from a local directory or a hub id (e.g. "BAAI/Emu3-Gen-hf")."""
        model = Emu3ForConditionalGeneration.from_pretrained(path_or_id, attn_implementation="eager")
        processor = Emu3Processor.from_pretrained(path_or_id)
        return cls(model.eval(), processor, image_size=image_size, **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> Emu3Adapter:
        """A tiny random Emu3 (32x32 pixels, 4x4 = 16 image codes, codebook 64, a 2-layer text
        model of width 64) and its processor, built offline: byte-level BPE trained in memory,
        visual tokens <|visual token 000000|>.. added to the vocabulary. Same seed, same weights."""
        codebook, image_size = 64, 32
        named = {
            "bos_token": "<|extra_203|>",
            "eos_token": "<|extra_204|>",
            "pad_token": "<|endoftext|>",
            "image_token": "<image>",
            "boi_token": "<|image start|>",
            "eoi_token": "<|image end|>",
            "image_wrapper_token": "<|image token|>",
            "eof_token": "<|extra_201|>",
        }
        visual = [f"<|visual token {c:06d}|>" for c in range(codebook)]
        tokenizer = train_byte_bpe(
            [SYSTEM + "Does this image describe a red circle?" + ASSISTANT + " yes no", "4*4"],
            special_tokens=[*named.values(), "<|extra_200|>", *visual],
            vocab_size=512,
            **named,
        )
        config = Emu3Config(
            vq_config=Emu3VQVAEConfig(
                codebook_size=codebook,
                embed_dim=4,
                latent_channels=4,
                base_channels=32,
                channel_multiplier=[1, 1, 1, 1],  # spatial factor 8: 32 px -> 4x4 codes
                num_res_blocks=1,
                attn_resolutions=[],
                hidden_size=32,  # the middle block's attention width = base_channels * channel_multiplier[-1]
                num_attention_heads=1,
            ),
            text_config=Emu3TextConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                attention_dropout=0.0,
            ),
            vocabulary_map=tokenizer.get_vocab(),
        )
        model = seeded_model(Emu3ForConditionalGeneration, config, seed)
        image_processor = Emu3ImageProcessor(
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            min_pixels=image_size * image_size,
            max_pixels=image_size * image_size,
        )
        processor = Emu3Processor(image_processor, tokenizer)
        return cls(model.eval(), processor, image_size=image_size, **kwargs)

    # ----------------------------------------------------------------- token layouts
    def _image_header(self) -> list[int]:
        return [self.boi_id, *self._text(f"{self.grid}*{self.grid}"), self.wrapper_id]

    def _image_rows(self, images: torch.Tensor) -> torch.Tensor:
        """Codes [B, h*w] -> vocabulary ids with a closing eol per row: [B, h*(w+1)]."""
        tokens = self.code_to_token.to(images.device)[images].view(-1, self.grid, self.grid)
        eol = torch.full_like(tokens[:, :, :1], self.eol_id)
        return torch.cat([tokens, eol], dim=-1).flatten(1)

    def _generation_prefix(self, prompt: str) -> list[int]:
        """[bos] "{prompt}" <|image start|> "{h}*{w}" <|image token|>."""
        return [self.bos_id, *self._text(prompt), *self._image_header()]

    def _understanding_ids(self, rows: torch.Tensor, question: str, answer: Sequence[int] = ()) -> list[int]:
        """[bos] system <image block of rows> "{question} ASSISTANT:" answer."""
        image = [*self._image_header(), *rows.tolist(), self.eof_id, self.eoi_id]
        return [self.bos_id, *self._text(SYSTEM), *image, *self._text(question + ASSISTANT), *answer]

    # ----------------------------------------------------------------- generation branch
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample n images per prompt: LongTensor[P, n, L] of codes.

        Code logits l = lm_head logits at the visual tokens (codebook order); guided
        l = l_u + s (l_c - l_u) against the empty prompt (s = guidance_scale); each code
        is drawn from softmax(l / temperature); eol is fed after every row. KV cache over
        the left-padded batch. generator must live on the model's device.
        """
        self._check_sampling(prompts, n, temperature)
        rows = [self._generation_prefix(p) for p in prompts for _ in range(n)]
        guided = self.guidance_scale != 1.0
        if guided:
            rows += [self._generation_prefix("")] * len(rows)
        device = next(self.model.parameters()).device
        ids, mask, positions = (t.to(device) for t in left_pad(rows, self.pad_id))
        code_to_token = self.code_to_token.to(device)
        cache = DynamicCache(config=self.model.config.text_config)
        codes = torch.empty(len(prompts) * n, self.image_tokens, dtype=torch.long, device=device)
        for step in range(self.image_tokens):
            logits = (
                self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                .logits[:, -1, code_to_token]
                .float()
            )
            codes[:, step] = self._sample_code(logits, guided, temperature, generator)
            ids = code_to_token[codes[:, step : step + 1]]
            if (step + 1) % self.grid == 0:  # row complete: its end-of-line token follows
                ids = torch.cat([ids, torch.full_like(ids, self.eol_id)], dim=1)
            ids = ids.repeat(2 if guided else 1, 1)
            mask = torch.cat([mask, mask.new_ones(ids.shape)], dim=1)
            positions = positions[:, -1:] + torch.arange(1, ids.shape[1] + 1, device=device)
        return codes.view(len(prompts), n, self.image_tokens)

    def gen_logprob(
        self, prompts: Sequence[str], images: torch.Tensor, model: nn.Module | None = None
    ) -> torch.Tensor:
        """log pi(x|y) = sum over the h*w codes of log softmax(lm_head)[visual token of x_i],
        teacher-forced with the eol tokens in place, no guidance: [B]."""
        self._check_batch(images, prompts)
        model = self.model if model is None else model
        rows = self._image_rows(images)  # [B, h*(w+1)]
        sequences = [[*self._generation_prefix(p), *r.tolist()] for p, r in zip(prompts, rows, strict=True)]
        # the last eol is a target only, never an input
        ids, mask, positions = (
            t.to(images.device) for t in left_pad([s[:-1] for s in sequences], self.pad_id)
        )
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=rows.shape[1],
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, rows.unsqueeze(-1)).squeeze(-1)
        return logp.view(-1, self.grid, self.grid + 1)[:, :, : self.grid].sum((1, 2))

    # ----------------------------------------------------------------- understanding branch
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
        rows = self._image_rows(images)
        sequences = [
            self._understanding_ids(r, q, a) for r, q, a in zip(rows, questions, answers, strict=True)
        ]
        ids, mask, positions = (t.to(images.device) for t in left_pad(sequences, self.pad_id))
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep
        )
        return out.logits

    # ----------------------------------------------------------------- pixels
    @torch.no_grad()
    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """VQ decoder: codes [B, L] -> uint8 pixels [B, image_size, image_size, 3]."""
        check_images(images, self.image_tokens, self.codebook_size)
        vq = self.model.model.vqmodel
        with _eval_mode(vq):
            decoded = vq.decode(images.view(-1, self.grid, self.grid))  # [B, 3, H, W], normalised range
        return self._to_uint8(decoded)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """VQ encoder: uint8 pixels [B, image_size, image_size, 3] -> codes [B, L], row-major."""
        arrays = pixels_to_numpy_list(pixels, self.image_size)
        inputs = self.processor.image_processor(images=arrays, return_tensors="pt")
        vq = self.model.model.vqmodel
        device = next(vq.parameters()).device
        with _eval_mode(vq):
            out = vq.encode(
                inputs["pixel_values"].to(device), inputs["image_sizes"].to(device), return_dict=True
            )
        return torch.stack([codes.flatten() for codes in out.image_tokens])

    def shared_parameter_names(self) -> list[str]:
        """The language model, text and image tokens alike: model.text_model.* and lm_head.*."""
        return [
            n
            for n, _ in self.model.named_parameters()
            if n.startswith("model.text_model.") or n.startswith("lm_head.")
        ]
