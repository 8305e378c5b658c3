"""JanusAdapter (janus-tiny) against independent references: transformers' JanusProcessor
layouts run unpadded one sample at a time, incremental decoding with a KV cache, and
transformers' own JanusForConditionalGeneration.generate."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    PROMPTS,
    TOL,
    AdapterContract,
    processor_logits,
    random_codes,
)
from torch import nn
from transformers import DynamicCache

from ntkdyn.models.janus import JanusAdapter


@pytest.fixture(scope="module")
def adapter() -> JanusAdapter:
    return JanusAdapter.tiny(seed=0)


@pytest.fixture(scope="module")
def images(adapter) -> torch.Tensor:
    return random_codes(adapter)


@pytest.fixture(scope="module")
def pixels(adapter, images) -> torch.Tensor:
    return adapter.decode(images)


def test_gen_logprob_matches_incremental_decoding(adapter, images):
    got = adapter.gen_logprob(PROMPTS, images)
    model = adapter.model
    lm = model.model.language_model
    for prompt, codes, value in zip(PROMPTS, images, got, strict=True):
        ids = adapter.processor(
            text=[f"<|User|>: {prompt}\n\n<|Assistant|>:"], generation_mode="image", return_tensors="pt"
        )["input_ids"]
        cache = DynamicCache(config=lm.config)
        embeds = model.get_input_embeddings()(ids)
        expected = torch.zeros(())
        with torch.no_grad():
            for code in codes:
                hidden = lm(inputs_embeds=embeds, cache=cache, use_cache=True).last_hidden_state[0, -1]
                expected += torch.log_softmax(model.model.generation_head(hidden), -1)[code]
                embeds = model.prepare_embeddings_for_image_generation(code.view(1, 1))
        torch.testing.assert_close(value.detach(), expected, **TOL)


def test_judge_log_odds_match_unpadded_forward(adapter, images, pixels):
    got = adapter.judge(images, PROMPTS)
    yes = adapter.tokenizer.encode(" yes", add_special_tokens=False)[0]
    no = adapter.tokenizer.encode(" no", add_special_tokens=False)[0]
    for b, prompt in enumerate(PROMPTS):
        text = f"<|User|>: <image_placeholder>\nDoes this image describe {prompt}?\n\n<|Assistant|>:"
        _, logits = processor_logits(adapter, pixels[b], text)
        expected = logits[-1, yes] - logits[-1, no]
        torch.testing.assert_close(got.log_odds[b].detach(), expected, **TOL)
        torch.testing.assert_close(got.p_yes[b].detach(), torch.softmax(logits[-1, [yes, no]], -1)[0], **TOL)


def test_caption_logprob_matches_token_by_token(adapter, images, pixels):
    got = adapter.caption_logprob(images, PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        text = f"<|User|>: <image_placeholder>\nDescribe the image.\n\n<|Assistant|>: {prompt}"
        ids, logits = processor_logits(adapter, pixels[b], text)
        n = len(adapter.tokenizer.encode(" " + prompt, add_special_tokens=False))
        expected = sum(torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(len(ids) - n, len(ids)))
        torch.testing.assert_close(got[b].detach(), expected, **TOL)


def test_greedy_guided_generate_matches_transformers(adapter):
    """Near-zero temperature makes sampling argmax: the batched, left-padded, guided loop must
    reproduce transformers' own CFG image generation run on each prompt alone."""
    got = adapter.generate(PROMPTS, n=1, temperature=1e-6, generator=torch.Generator().manual_seed(0))[:, 0]
    for prompt, codes in zip(PROMPTS, got, strict=True):
        inputs = adapter.processor(
            text=[f"<|User|>: {prompt}\n\n<|Assistant|>:"], generation_mode="image", return_tensors="pt"
        )
        expected = adapter.model.generate(
            **inputs, generation_mode="image", do_sample=False, guidance_scale=adapter.guidance_scale
        )
        assert torch.equal(codes, expected[0])


def test_decode_and_encode(adapter, images, pixels):
    assert pixels.shape == (len(PROMPTS), adapter.image_size, adapter.image_size, 3)
    assert pixels.dtype == torch.uint8 and pixels.float().std() > 0
    codes = adapter.encode(pixels)
    assert codes.shape == images.shape and codes.dtype == torch.long
    # reference in float64: nearest codebook entry in cosine, latent grid read row-major
    vq = copy.deepcopy(adapter.model.model.vqmodel).double()
    x = torch.as_tensor(pixels, dtype=torch.float64).permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(len(PROMPTS), adapter.image_tokens, -1)
        cos = (
            nn.functional.normalize(z, dim=-1)
            @ nn.functional.normalize(vq.quantize.embedding.weight, dim=-1).T
        )
    assert torch.equal(codes, cos.argmax(-1))


class TestJanusContract(AdapterContract):
    load_name = "janus-tiny"
    judge_encoded_pixels = False


def test_bad_inputs_get_clear_errors(adapter, images):
    with pytest.raises(ValueError, match="image_size"):
        adapter.encode(torch.zeros(1, adapter.image_size + 8, adapter.image_size + 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one prompt per image"):
        adapter.judge(images, PROMPTS[:1])
    with pytest.raises(ValueError, match="lie in"):
        adapter.gen_logprob(PROMPTS, images + adapter.codebook_size)
    with pytest.raises(ValueError, match="LongTensor"):
        adapter.decode(images[:, :-1])
