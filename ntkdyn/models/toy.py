"""The toy early-fusion unified model for ShapesWorld (Emu3/Chameleon style, at toy scale).

One LlamaForCausalLM (ToyUnifiedLM: eager attention, tied input/output embeddings, plus a
learned embedding of each image token's grid cell) over one vocabulary holding special
tokens, the world's words and one token per cell code. Sequences
(left-padded in batches; position ids count only real tokens, so padding changes nothing):

    generation     <bos> y_1..y_m <img> x_1..x_L                  log pi(x|y): softmax over image tokens
    understanding  <bos> <img> x_1..x_L </img> does this image describe y_1..y_m ?  -> yes | no
    captioning     <bos> <img> x_1..x_L </img> <cap> y_1..y_m      log pi(y|x): softmax over the vocabulary

x are cell codes (a toy image is a ShapesWorld image) and y the prompt's words. The cell
embedding makes rows, columns and hence relations readable from each image token (with RoPE
alone, attention values carry no position and a 4-layer model did not learn relations in
the pre-training budget).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ntkdyn.models._hf_tiny import left_pad
from ntkdyn.models.base import Judgement, UnifiedAdapter
from ntkdyn.world import ShapesWorld
from ntkdyn.world.shapes import COLORS

SPECIALS = ("<pad>", "<bos>", "<eos>", "<img>", "</img>", "<cap>")
QUESTION = ("does", "this", "image", "describe")
ANSWERS = ("?", "yes", "no")
META_FILE = "ntkdyn_toy.json"


@dataclass
class ToyConfig:
    """Size of the toy model and the world it lives in."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    initializer_range: float = 0.02  # std of the initial weights (LlamaConfig.initializer_range)
    world_seed: int = 0
    grid_size: int = 3
    cell_pixels: int = 16

    def __post_init__(self):
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "grid_size",
            "cell_pixels",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ToyConfig.{name} must be >= 1 (got {getattr(self, name)})")
        if self.initializer_range <= 0:
            raise ValueError(f"ToyConfig.initializer_range must be > 0 (got {self.initializer_range})")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"ToyConfig.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads}) with an even head size"
            )


class ToyUnifiedLM(LlamaForCausalLM):
    """LlamaForCausalLM whose image tokens also get learned embeddings of their grid row and
    column and of their object's shape and color (the structure of the toy codebook).

    inputs_embeds = embed_tokens(id) + row_embed(row) + col_embed(col) + shape_embed(shape)
    + color_embed(color): for the k-th image token of the sequence (k = 0, 1, ...), row = 1 + k // grid
    and col = 1 + k % grid; shape/color = 1 + the object's shape/color index; 0 (a zero row) for
    every other token and for empty cells' shape/color. Positions (hence relations) and attributes
    are then readable from each image token's own residual stream. Image tokens are counted over
    the whole input_ids: call it on full sequences.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.row_embed = nn.Embedding(config.grid_size + 1, config.hidden_size, padding_idx=0)
        self.col_embed = nn.Embedding(config.grid_size + 1, config.hidden_size, padding_idx=0)
        self.shape_embed = nn.Embedding(config.num_shapes + 1, config.hidden_size, padding_idx=0)
        self.color_embed = nn.Embedding(config.num_colors + 1, config.hidden_size, padding_idx=0)
        self.post_init()
        with torch.no_grad():
            for table in (self.row_embed, self.col_embed, self.shape_embed, self.color_embed):
                table.weight[0].zero_()

    def position_ids_2d(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] -> (1 + row, 1 + col) of each image token's grid cell, 0 for every other token."""
        start, grid = self.config.image_token_offset, self.config.grid_size
        is_image = (input_ids >= start) & (input_ids < start + self.config.codebook_size)
        rank = (is_image.long().cumsum(1) - 1).clamp(min=0, max=grid * grid - 1)
        return torch.where(is_image, 1 + rank // grid, 0), torch.where(is_image, 1 + rank % grid, 0)

    def attribute_ids(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] -> (1 + shape, 1 + color) of each object token, code c >= 1 holding shape
        (c - 1) // n_colors and color (c - 1) % n_colors; 0 for every other token."""
        code = input_ids - self.config.image_token_offset
        is_object = (code >= 1) & (code < self.config.codebook_size)
        n_colors = self.config.num_colors
        return torch.where(is_object, 1 + (code - 1) // n_colors, 0), torch.where(
            is_object, 1 + (code - 1) % n_colors, 0
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """inputs_embeds of full sequences [B, T] -> [B, T, hidden]."""
        row_ids, col_ids = self.position_ids_2d(input_ids)
        shape_ids, color_ids = self.attribute_ids(input_ids)
        embeds = self.model.embed_tokens(input_ids) + self.row_embed(row_ids) + self.col_embed(col_ids)
        return embeds + self.shape_embed(shape_ids) + self.color_embed(color_ids)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return super().forward(inputs_embeds=self.embed(input_ids), **kwargs)


def toy_vocabulary(world: ShapesWorld) -> list[str]:
    """Token strings in id order: specials, words, question words, then "img:<code>" per cell code."""
    return [*SPECIALS, *world.words, *QUESTION, *ANSWERS, *(f"img:{c}" for c in range(world.codebook_size))]


class ToyAdapter(UnifiedAdapter):
    """UnifiedAdapter of the toy model. ``world`` is the ShapesWorld its images live in."""

    def __init__(self, model: ToyUnifiedLM, world: ShapesWorld, config: ToyConfig):
        self.model = model
        self.world = world
        self.config = config
        self.vocab = toy_vocabulary(world)
        if model.config.vocab_size != len(self.vocab):
            raise ValueError(
                f"model vocab_size {model.config.vocab_size} != toy vocabulary {len(self.vocab)}"
            )
        self.token_id = {t: i for i, t in enumerate(self.vocab)}
        self.image_tokens = world.image_tokens
        self.codebook_size = world.codebook_size
        self.image_offset = self.token_id["img:0"]

    # ---------------------------------------------------------------- building
    @classmethod
    def build(cls, world: ShapesWorld, seed: int = 0, **size) -> ToyAdapter:
        """A randomly initialised toy model (seeded) for ``world``; size: ToyConfig fields."""
        config = ToyConfig(
            world_seed=world.seed, grid_size=world.grid_size, cell_pixels=world.cell_pixels, **size
        )
        vocab = toy_vocabulary(world)
        llama = LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=128,
            initializer_range=config.initializer_range,
            tie_word_embeddings=True,
            pad_token_id=vocab.index("<pad>"),
            bos_token_id=vocab.index("<bos>"),
            eos_token_id=vocab.index("<eos>"),
            grid_size=world.grid_size,
            image_token_offset=vocab.index("img:0"),
            codebook_size=world.codebook_size,
            num_shapes=(world.codebook_size - 1) // len(COLORS),
            num_colors=len(COLORS),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ToyUnifiedLM._from_config(llama, attn_implementation="eager")
        return cls(model, world, config)

    @classmethod
    def tiny(cls, seed: int = 0) -> ToyAdapter:
        """A random tiny toy model (hidden 32, 2 layers) for tests."""
        return cls.build(
            ShapesWorld(seed=0), seed=seed, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the weights (safetensors), the LlamaConfig, the ToyConfig and the vocabulary."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        meta = {"toy_config": asdict(self.config), "vocab": self.vocab}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ToyAdapter:
        """Load what save_pretrained wrote (the world is rebuilt from its seed and size)."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} holds no toy model ({META_FILE} missing)")
        meta = json.loads(meta_path.read_text())
        config = ToyConfig(**meta["toy_config"])
        world = ShapesWorld(
            seed=config.world_seed, grid_size=config.grid_size, cell_pixels=config.cell_pixels
        )
        if meta["vocab"] != toy_vocabulary(world):
            raise ValueError(f"the vocabulary saved in {meta_path} differs from this ShapesWorld's")
        model = ToyUnifiedLM.from_pretrained(directory, attn_implementation="eager")
        return cls(model, world, config)

    # -------------------------------------------------------------- sequences
    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt's words; an unknown word -> ValueError."""
        words = text.lower().split()
        if not words:
            raise ValueError("empty prompt")
        unknown = [w for w in words if w not in self.token_id or w in SPECIALS]
        if unknown:
            raise ValueError(
                f"words {unknown} of {text!r} are not in the toy vocabulary ({self.world.words})"
            )
        return [self.token_id[w] for w in words]

    def _image_ids(self, images: torch.Tensor) -> list[list[int]]:
        if images.ndim != 2 or images.shape[1] != self.image_tokens:
            raise ValueError(
                f"images must be LongTensor[B, {self.image_tokens}], got shape {tuple(images.shape)}"
            )
        if images.numel() and (images.min() < 0 or images.max() >= self.codebook_size):
            raise ValueError(f"image tokens must lie in [0, {self.codebook_size})")
        return (images.detach().cpu().long() + self.image_offset).tolist()

    def gen_sequences(self, prompts: Sequence[str], images: torch.Tensor | None = None) -> list[list[int]]:
        """<bos> y <img> [x]: generation inputs (with their image when given)."""
        t = self.token_id
        heads = [[t["<bos>"], *self.tokenize(p), t["<img>"]] for p in prompts]
        if images is None:
            return heads
        return [h + x for h, x in zip(heads, self._image_ids(images), strict=True)]

    def und_sequences(self, images: torch.Tensor, prompts: Sequence[str]) -> list[list[int]]:
        """<bos> <img> x </img> does this image describe y ?: understanding inputs (answer comes next)."""
        t = self.token_id
        question = [t[w] for w in QUESTION]
        return [
            [t["<bos>"], t["<img>"], *x, t["</img>"], *question, *self.tokenize(p), t["?"]]
            for x, p in zip(self._image_ids(images), prompts, strict=True)
        ]

    def caption_sequences(self, images: torch.Tensor, prompts: Sequence[str]) -> list[list[int]]:
        """<bos> <img> x </img> <cap> y: captioning inputs with their caption."""
        t = self.token_id
        return [
            [t["<bos>"], t["<img>"], *x, t["</img>"], t["<cap>"], *self.tokenize(p)]
            for x, p in zip(self._image_ids(images), prompts, strict=True)
        ]

    def forward(self, sequences: list[list[int]], model: nn.Module | None = None) -> torch.Tensor:
        """Logits [B, T, V] of left-padded sequences (T = longest) through ``model`` (default
        self.model); position ids skip the padding."""
        model = self.model if model is None else model
        device = next(model.parameters()).device
        ids, mask, positions = (t.to(device) for t in left_pad(sequences, self.token_id["<pad>"]))
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    # ----------------------------------------------------------- measurements
    def image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits restricted to image tokens: [..., V] -> [..., codebook_size]."""
        return logits[..., self.image_offset : self.image_offset + self.codebook_size]

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample n images per prompt, one cell at a time from softmax(image logits / temperature)
        (temperature 0: argmax), with a key-value cache over the left-padded batch (each new cell is
        one cached step, not a recomputation of the prefix): LongTensor[len(prompts), n, L]."""
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {temperature})")
        model = self.model
        device = next(model.parameters()).device
        sequences = [s for s in self.gen_sequences(prompts) for _ in range(n)]
        ids, mask, positions = (t.to(device) for t in left_pad(sequences, self.token_id["<pad>"]))
        inputs, cache = model.embed(ids), DynamicCache(config=model.config)
        cells = torch.empty((len(sequences), self.image_tokens), dtype=torch.long)
        for i in range(self.image_tokens):
            out = LlamaForCausalLM.forward(
                model,
                inputs_embeds=inputs,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = self.image_logits(out.logits[:, -1]).float().cpu()
            if temperature == 0:
                step = logits.argmax(-1)
            else:
                step = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[
                    :, 0
                ]
            cells[:, i] = step
            ids = torch.cat([ids, (step + self.image_offset)[:, None].to(device)], 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            positions = positions[:, -1:] + 1
            inputs = model.embed(ids)[:, -1:]  # the new cell's grid position counts the earlier cells
        return cells.view(len(prompts), n, self.image_tokens)

    def gen_logprob(
        self, prompts: Sequence[str], images: torch.Tensor, model: nn.Module | None = None
    ) -> torch.Tensor:
        """log pi(x|y) = sum_i log softmax(image logits at i-1)[x_i]: Tensor[B]."""
        logits = self.forward(self.gen_sequences(prompts, images), model)
        logp = torch.log_softmax(self.image_logits(logits[:, -self.image_tokens - 1 : -1]).float(), -1)
        return logp.gather(-1, images.to(logp.device).long()[..., None])[..., 0].sum(-1)

    def judge(
        self, images: torch.Tensor, prompts: Sequence[str], model: nn.Module | None = None
    ) -> Judgement:
        """log_odds = logit(yes) - logit(no) after "?"; p_yes = sigmoid(log_odds): Judgement of [B]."""
        last = self.forward(self.und_sequences(images, prompts), model)[:, -1].float()
        log_odds = last[:, self.token_id["yes"]] - last[:, self.token_id["no"]]
        return Judgement(torch.sigmoid(log_odds), log_odds)

    def caption_logprob(
        self, images: torch.Tensor, prompts: Sequence[str], model: nn.Module | None = None
    ) -> torch.Tensor:
        """log pi(y|x) = sum over the prompt's words of log softmax(logits)[word]: Tensor[B]."""
        sequences = self.caption_sequences(images, prompts)
        logits = self.forward(sequences, model)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        targets = torch.tensor([[0] * (logits.shape[1] - len(s)) + s for s in sequences], device=logp.device)
        token_logp = logp.gather(-1, targets[:, 1:, None])[..., 0]
        width = logits.shape[1] - 1
        lengths = torch.tensor([len(self.tokenize(p)) for p in prompts], device=logp.device)
        is_caption = torch.arange(width, device=logp.device)[None] >= width - lengths[:, None]
        return torch.where(is_caption, token_logp, 0.0).sum(-1)

    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (ShapesWorld.render): uint8 Tensor[B, H, W, 3]."""
        self._image_ids(images)
        return torch.from_numpy(np.stack([self.world.render(x) for x in images]))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tokens (ShapesWorld.parse, exact on rendered images): LongTensor[B, L]."""
        if pixels.ndim != 4:
            raise ValueError(f"pixels must be uint8 [B, H, W, 3], got shape {tuple(pixels.shape)}")
        return torch.stack([self.world.parse(p) for p in pixels])

    def shared_parameter_names(self) -> list[str]:
        """Every parameter: the transformer body and the tied embedding/head. In an early-fusion
        model the image codebook's embeddings are rows of the language model's own vocabulary
        (there is no separate vision tower or head to freeze), so all of it is shared."""
        return [name for name, _ in self.model.named_parameters()]
