"""Emu3Adapter (emu3-tiny) against independent references: transformers' Emu3Processor
layouts (pixels through the official VQ path) run unpadded one sample at a time, and
token-by-token decoding with a KV cache through Emu3's vocabulary map."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    PROMPTS,
    TOL,
    AdapterContract,
    processor_logits,
    random_codes,
)
from transformers import DynamicCache

from ntkdyn.models.emu3 import Emu3Adapter

UND = "You are a helpful assistant. USER: <image>{question} ASSISTANT:"


@pytest.fixture(scope="module")
def adapter() -> Emu3Adapter:
    return Emu3Adapter.tiny(seed=0)


@pytest.fixture(scope="module")
def pixels(adapter) -> torch.Tensor:
    return adapter.decode(random_codes(adapter))


@pytest.fixture(scope="module")
def images(adapter, pixels) -> torch.Tensor:
    return adapter.encode(pixels)


def generation_ids(adapter: Emu3Adapter, prompt: str) -> torch.Tensor:
    area = adapter.image_size * adapter.image_size
    return adapter.processor(
        text=[prompt], return_for_image_generation=True, image_area=area, return_tensors="pt"
    )["input_ids"]


class Decoder:
    """Token-by-token decoding of one unpadded sequence with a KV cache."""

    def __init__(self, adapter: Emu3Adapter, ids: torch.Tensor):
        self.model = adapter.model
        self.cache = DynamicCache(config=adapter.model.config.text_config)
        self.logits = self.step(ids)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.logits = self.model(input_ids=ids.view(1, -1), cache=self.cache, use_cache=True).logits[0, -1]
        return self.logits


def test_gen_logprob_matches_incremental_decoding(adapter, images):
    got = adapter.gen_logprob(PROMPTS, images)
    img2bpe = adapter.model.vocabulary_mapping.img2bpe
    eol = adapter.model.vocabulary_mapping.eol_token_id
    grid = adapter.image_size // 8
    for prompt, codes, value in zip(PROMPTS, images, got, strict=True):
        decoder = Decoder(adapter, generation_ids(adapter, prompt))
        expected = torch.zeros(())
        for i, code in enumerate(codes.tolist()):
            expected += torch.log_softmax(decoder.logits, -1)[img2bpe[code]]
            decoder.step(torch.tensor([img2bpe[code]]))
            if (i + 1) % grid == 0:
                decoder.step(torch.tensor([eol]))
        torch.testing.assert_close(value.detach(), expected, **TOL)


def test_judge_on_encoded_pixels_matches_official_pixel_path(adapter, pixels, images):
    got = adapter.judge(images, PROMPTS)
    yes = adapter.tokenizer.encode(" yes", add_special_tokens=False)[0]
    no = adapter.tokenizer.encode(" no", add_special_tokens=False)[0]
    for b, prompt in enumerate(PROMPTS):
        _, logits = processor_logits(
            adapter, pixels[b], UND.format(question=f"Does this image describe {prompt}?")
        )
        torch.testing.assert_close(got.log_odds[b].detach(), logits[-1, yes] - logits[-1, no], **TOL)
        torch.testing.assert_close(got.p_yes[b].detach(), torch.softmax(logits[-1, [yes, no]], -1)[0], **TOL)


def test_caption_logprob_matches_token_by_token(adapter, pixels, images):
    got = adapter.caption_logprob(images, PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        ids, logits = processor_logits(
            adapter, pixels[b], UND.format(question="Describe the image.") + f" {prompt}"
        )
        n = len(adapter.tokenizer.encode(" " + prompt, add_special_tokens=False))
        expected = sum(torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(len(ids) - n, len(ids)))
        torch.testing.assert_close(got[b].detach(), expected, **TOL)


def test_greedy_guided_generate_matches_per_prompt_decoding(adapter):
    """Near-zero temperature makes sampling argmax: the batched, left-padded, guided loop must
    equal greedy decoding of each prompt alone, l = l_u + s (l_c - l_u) over the visual tokens."""
    got = adapter.generate(PROMPTS, n=1, temperature=1e-6, generator=torch.Generator().manual_seed(0))[:, 0]
    img2bpe = adapter.model.vocabulary_mapping.img2bpe
    visual = torch.tensor([img2bpe[c] for c in range(adapter.codebook_size)])
    eol = adapter.model.vocabulary_mapping.eol_token_id
    grid = adapter.image_size // 8
    for prompt, codes in zip(PROMPTS, got, strict=True):
        cond, uncond = (
            Decoder(adapter, generation_ids(adapter, prompt)),
            Decoder(adapter, generation_ids(adapter, "")),
        )
        expected = []
        for i in range(adapter.image_tokens):
            guided = uncond.logits[visual] + adapter.guidance_scale * (
                cond.logits[visual] - uncond.logits[visual]
            )
            expected.append(int(guided.argmax()))
            tokens = [img2bpe[expected[-1]], *([eol] if (i + 1) % grid == 0 else [])]
            for decoder in (cond, uncond):
                for token in tokens:
                    decoder.step(torch.tensor([token]))
        assert codes.tolist() == expected


def test_decode_and_encode_shapes(adapter, pixels, images):
    assert pixels.shape == (len(PROMPTS), adapter.image_size, adapter.image_size, 3)
    assert pixels.dtype == torch.uint8 and pixels.float().std() > 0
    assert images.shape == (len(PROMPTS), adapter.image_tokens) and images.dtype == torch.long
    assert images.min() >= 0 and images.max() < adapter.codebook_size


class TestEmu3Contract(AdapterContract):
    load_name = "emu3-tiny"
    judge_encoded_pixels = True


def test_bad_inputs_get_clear_errors(adapter, images):
    with pytest.raises(ValueError, match="image_size"):
        adapter.encode(torch.zeros(1, adapter.image_size + 8, adapter.image_size + 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one prompt per image"):
        adapter.caption_logprob(images, PROMPTS[:1])
    with pytest.raises(ValueError, match="lie in"):
        adapter.gen_logprob(PROMPTS, images - adapter.codebook_size)
    with pytest.raises(ValueError, match="non-empty"):
        adapter.generate([""], n=1)
