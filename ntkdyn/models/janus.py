"""Janus / Janus-Pro (transformers' JanusForConditionalGeneration) as a UnifiedAdapter.

Two separate image paths share one Llama body:
  understanding: pixels -> SigLIP vision tower -> aligner -> embeddings at the
      <image_placeholder> positions of  [bos] "<|User|>: " <begin_of_image> <image_placeholder>*Lv
      <end_of_image> "\\n{question}\\n\\n<|Assistant|>:"  -> lm_head over the text vocabulary;
  generation: [bos] "<|User|>: {prompt}\\n\\n<|Assistant|>:" <begin_of_image>, then VQ codes x_1..x_L fed
      through generation_embeddings + generation_aligner, predicted by generation_head (a
      codebook-sized head, not lm_head).
An *image* is its VQ codes, LongTensor[L]; understanding sees the pixels the VQ decoder makes
of them. generate uses classifier-free guidance (the unconditional row keeps only <bos> and
<begin_of_image>, the prompt replaced by <pad>, as in Janus and transformers);
gen_logprob is the model's own conditional log pi(x|y), without guidance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import (
    DynamicCache,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
)

from ntkdyn.models._hf_common import HFUnifiedAdapter
from ntkdyn.models._hf_tiny import (
    check_images,
    left_pad,
    pixels_to_numpy_list,
    seeded_model,
    train_byte_bpe,
)

USER = "<|User|>: "
ASSISTANT = "\n\n<|Assistant|>:"


class JanusAdapter(HFUnifiedAdapter):
    """JanusForConditionalGeneration seen through generation and understanding.

    Parameters outside :meth:`shared_parameter_names` (vision tower, aligners, VQ model,
    generation embeddings and head) get ``requires_grad=False``: the paper trains the
    language model only.
    """

    def __init__(
        self,
        model: JanusForConditionalGeneration,
        processor: JanusProcessor,
        guidance_scale: float = 5.0,
        question: str = "Does this image describe {prompt}?",
        caption_question: str = "Describe the image.",
        answers: tuple[str, str] = (" yes", " no"),
    ):
        super().__init__(model, processor, guidance_scale, question, caption_question)
        config = model.config
        grid = config.vq_config.num_patches
        self.image_tokens = grid * grid
        if config.vision_config.num_image_tokens != self.image_tokens:
            raise ValueError(
                f"vision_config.num_image_tokens={config.vision_config.num_image_tokens} must equal the "
                f"VQ grid {grid}x{grid}: Janus generates num_image_tokens codes"
            )
        self.codebook_size = config.vq_config.num_embeddings
        self.image_size = grid * 2 ** (len(config.vq_config.channel_multiplier) - 1)  # VQ decoder's pixels
        self.vision_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        self.boi_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.boi_token)
        self.eoi_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.eoi_token)
        self.image_token_id = config.image_token_id
        self._finish(answers)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path_or_id: str, **kwargs) -> JanusAdapter:
        """Load weights and processor from a local directory or a hub id (e.g.
        "deepseek-community/Janus-Pro-1B"); kwargs go to the adapter (guidance_scale, ...)."""
        model = JanusForConditionalGeneration.from_pretrained(path_or_id, attn_implementation="eager")
        processor = JanusProcessor.from_pretrained(path_or_id)
        return cls(model.eval(), processor, **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, **kwargs) -> JanusAdapter:
        """A tiny random Janus (32x32 pixels, 4x4 = 16 image tokens, codebook 64, a 2-layer
        Llama of width 64) and its processor, built offline: the tokenizer is a byte-level BPE
        trained in memory. Same seed, same weights."""
        tokenizer = train_byte_bpe(
            [USER + "a red circle" + ASSISTANT, "Does this image describe two blue squares? yes no"],
            special_tokens=[
                "<｜begin▁of▁sentence｜>",
                "<｜end▁of▁sentence｜>",
                "<｜▁pad▁｜>",
                "<image_placeholder>",
                "<begin_of_image>",
                "<end_of_image>",
                "<|User|>",
                "<|Assistant|>",
            ],
            vocab_size=512,
            prepend_bos=True,
            bos_token="<｜begin▁of▁sentence｜>",
            eos_token="<｜end▁of▁sentence｜>",
            pad_token="<｜▁pad▁｜>",
            image_token="<image_placeholder>",
            boi_token="<begin_of_image>",
            eoi_token="<end_of_image>",
        )
        image_size, patch_size, width = 32, 8, 64
        grid = image_size // patch_size
        config = JanusConfig(
            text_config=LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=JanusVisionConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=image_size,
                patch_size=patch_size,
                mlp_ratio=2.0,
                projection_dim=width,
                depth=2,
                num_image_tokens=grid * grid,
            ),
            vq_config=JanusVQVAEConfig(
                embed_dim=8,
                num_embeddings=64,
                latent_channels=8,
                base_channels=32,
                channel_multiplier=[1, 1, 1, 1],  # 3 downsamplings: 32 px -> 4x4 codes
                num_res_blocks=1,
                projection_dim=width,
                image_token_embed_dim=width,
                num_hidden_layers=2,
            ),
            image_token_id=tokenizer.image_token_id,
        )
        model = seeded_model(JanusForConditionalGeneration, config, seed)
        image_processor = JanusImageProcessorPil(
            size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
        processor = JanusProcessor(image_processor, tokenizer, num_image_tokens=grid * grid)
        # as in the released checkpoints, so that transformers' own generate(generation_mode="image") runs
        model.generation_config.generation_kwargs = {"boi_token_id": tokenizer.boi_token_id}
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        return cls(model.eval(), processor, **kwargs)

    # ----------------------------------------------------------------- token layouts
    def _generation_prefix(self, prompt: str) -> list[int]:
        """[bos] "<|User|>: {prompt}\\n\\n<|Assistant|>:" [begin_of_image]."""
        return [self.bos_id, *self._text(USER + prompt + ASSISTANT), self.boi_id]

    def _understanding_ids(self, question: str, answer: Sequence[int] = ()) -> list[int]:
        """[bos] "<|User|>: " [boi] [image]*Lv [eoi] "\\n{question}\\n\\n<|Assistant|>:" answer."""
        image = [self.boi_id, *[self.image_token_id] * self.vision_tokens, self.eoi_id]
        return [self.bos_id, *self._text(USER), *image, *self._text("\n" + question + ASSISTANT), *answer]

    def _core(self, model: nn.Module | None = None) -> nn.Module:
        """The JanusModel inside ``model`` (default self.model; a DDP wrapper is looked through)."""
        model = self.model if model is None else model
        return (model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model).model

    # ----------------------------------------------------------------- generation branch
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample n images per prompt with classifier-free guidance: LongTensor[P, n, L].

        Each code is drawn from softmax(l / temperature), l = l_u + s (l_c - l_u) (s =
        guidance_scale; l_c, l_u = generation_head logits of the prompted and unconditional
        rows), with a KV cache over the left-padded batch; generator lives on the model's device.
        """
        self._check_sampling(prompts, n, temperature)
        core = self._core()
        rows = [self._generation_prefix(p) for p in prompts for _ in range(n)]
        guided = self.guidance_scale != 1.0
        if guided:  # unconditional rows: same length, everything but <bos> and <begin_of_image> -> <pad>
            rows += [[r[0], *[self.pad_id] * (len(r) - 2), r[-1]] for r in rows]
        device = next(core.parameters()).device
        ids, mask, positions = (t.to(device) for t in left_pad(rows, self.pad_id))
        cache = DynamicCache(config=core.language_model.config)
        embeds = core.get_input_embeddings()(ids)
        codes = torch.empty(len(prompts) * n, self.image_tokens, dtype=torch.long, device=device)
        for step in range(self.image_tokens):
            hidden = core.language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
            ).last_hidden_state[:, -1]
            logits = core.generation_head(hidden).float()
            codes[:, step] = self._sample_code(logits, guided, temperature, generator)
            feed = codes[:, step : step + 1].repeat(2 if guided else 1, 1)
            embeds = self.model.prepare_embeddings_for_image_generation(feed)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
        return codes.view(len(prompts), n, self.image_tokens)

    def gen_logprob(
        self, prompts: Sequence[str], images: torch.Tensor, model: nn.Module | None = None
    ) -> torch.Tensor:
        """log pi(x|y) = sum_i log softmax(generation_head(h_i))[x_i], teacher-forced, no guidance: [B]."""
        self._check_batch(images, prompts)
        model = self.model if model is None else model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "JanusAdapter.gen_logprob runs the model's language model and generation head, not its "
                "forward, so it cannot run through DistributedDataParallel: train Janus in one process"
            )
        core = self._core(model)
        device = images.device
        prefixes = [self._generation_prefix(p) for p in prompts]
        ids, mask, positions = (t.to(device) for t in left_pad(prefixes, self.pad_id))
        tail = torch.arange(1, self.image_tokens, device=device)
        embeds = torch.cat(
            [
                core.get_input_embeddings()(ids),
                model.prepare_embeddings_for_image_generation(images[:, :-1]),
            ],
            dim=1,
        )
        mask = torch.cat([mask, mask.new_ones(images.shape[0], self.image_tokens - 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + tail], dim=1)
        hidden = core(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        logits = core.generation_head(hidden.last_hidden_state[:, -self.image_tokens :]).float()
        return torch.log_softmax(logits, dim=-1).gather(-1, images.unsqueeze(-1)).squeeze(-1).sum(-1)

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
        pixel_values = self._pixel_values(self._decode(images, model)).to(images.device)
        rows = [self._understanding_ids(q, a) for q, a in zip(questions, answers, strict=True)]
        ids, mask, positions = (t.to(images.device) for t in left_pad(rows, self.pad_id))
        out = model(
            input_ids=ids,
            pixel_values=pixel_values.to(next(model.parameters()).dtype),
            attention_mask=mask,
            position_ids=positions,
            logits_to_keep=keep,
            use_cache=False,
        )
        return out.logits

    # ----------------------------------------------------------------- pixels
    def _pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower's input: the image processor applied to uint8 [B, H, W, 3]."""
        arrays = pixels_to_numpy_list(pixels, self.image_size)
        return self.processor.image_processor(images=arrays, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """VQ decoder: codes [B, L] -> uint8 pixels [B, image_size, image_size, 3]."""
        return self._decode(images, self.model)

    @torch.no_grad()
    def _decode(self, images: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """decode with the VQ decoder of ``model`` (the understanding branch reads its own model's pixels)."""
        check_images(images, self.image_tokens, self.codebook_size)
        return self._to_uint8(self._core(model).vqmodel.decode(images))  # [B, 3, H, W], normalised

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """VQ encoder: uint8 pixels [B, image_size, image_size, 3] -> codes [B, L], row-major.

        Each latent z is matched to the codebook entry e_j of largest cosine <z, e_j>/(|z||e_j|),
        the l2-normalised lookup that decode uses (transformers' JanusVQVAE.encode compares
        unnormalised distances, which disagrees with its own decode).
        """
        vq = self._core().vqmodel
        pixel_values = self._pixel_values(pixels).to(device=vq.quant_conv.weight.device)
        latents = vq.quant_conv(vq.encoder(pixel_values.to(vq.quant_conv.weight.dtype)))  # [B, D, h, w]
        z = nn.functional.normalize(latents.permute(0, 2, 3, 1).flatten(1, 2), dim=-1)  # [B, L, D]
        codebook = nn.functional.normalize(vq.quantize.embedding.weight, dim=-1)  # [K, D]
        return (z @ codebook.T).argmax(-1)

    def shared_parameter_names(self) -> list[str]:
        """The Llama body (its embeddings are tied to lm_head): model.language_model.*."""
        return [n for n, _ in self.model.named_parameters() if n.startswith("model.language_model.")]
