"""ToyAdapter: padded batch measurements against an explicit one-token-at-a-time computation."""

import numpy as np
import pytest
import torch
from helpers import check_measurements_run_the_given_model
from transformers import LlamaForCausalLM

from ntkdyn.models import load_adapter
from ntkdyn.models.toy import ToyAdapter
from ntkdyn.world import ShapesWorld
from ntkdyn.world.shapes import COLORS, SHAPES


@pytest.fixture(scope="module")
def toy():
    return ToyAdapter.tiny(seed=0)


@pytest.fixture(scope="module")
def batch(toy):
    """Prompts of very different lengths (so the batch is padded) with true scenes."""
    world = toy.world
    prompts = [world.prompts("train", c)[0] for c in world.categories]
    rng = np.random.default_rng(0)
    images = torch.stack([world.sample_image(p, rng) for p in prompts])
    return [p.text for p in prompts], images


def next_token_logits(toy, sequence: list[int]) -> torch.Tensor:
    """Logits [T, V] computed one token at a time with a KV cache, no padding, float64. An image
    token's input is its token embedding plus the embeddings of its cell's row and column (1 + index)
    and, for an object, of its shape and color (1 + their index in the world's lists)."""
    model = toy.model.double()
    cache, rows, cell = None, [], 0
    with torch.no_grad():
        for t, token in enumerate(sequence):
            embed = model.model.embed_tokens.weight[token]
            code = token - toy.image_offset
            if 0 <= code < toy.codebook_size:
                row, col = divmod(cell, toy.world.grid_size)
                embed = embed + model.row_embed.weight[1 + row] + model.col_embed.weight[1 + col]
                cell += 1
                if code:
                    shape, color = toy.world.describe_code(code)
                    embed = embed + model.shape_embed.weight[1 + SHAPES.index(shape)]
                    embed = embed + model.color_embed.weight[1 + COLORS.index(color)]
            out = LlamaForCausalLM.forward(
                model,
                inputs_embeds=embed[None, None],
                position_ids=torch.tensor([[t]]),
                cache=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            rows.append(out.logits[0, -1])
    toy.model.float()
    return torch.stack(rows)


def test_gen_logprob_matches_incremental(toy, batch):
    texts, images = batch
    got = toy.gen_logprob(texts, images)
    for b, sequence in enumerate(toy.gen_sequences(texts, images)):
        logits = next_token_logits(toy, sequence)
        image_logp = torch.log_softmax(toy.image_logits(logits), -1)
        L = toy.image_tokens
        want = sum(image_logp[len(sequence) - L - 1 + i, images[b, i]] for i in range(L))
        torch.testing.assert_close(got[b].double(), want, rtol=1e-4, atol=1e-4)


def test_judge_matches_incremental(toy, batch):
    texts, images = batch
    got = toy.judge(images, texts)
    for b, sequence in enumerate(toy.und_sequences(images, texts)):
        last = next_token_logits(toy, sequence)[-1]
        odds = last[toy.token_id["yes"]] - last[toy.token_id["no"]]
        torch.testing.assert_close(got.log_odds[b].double(), odds, rtol=1e-4, atol=1e-4)
        p_yes = torch.softmax(last[[toy.token_id["yes"], toy.token_id["no"]]], 0)[0]
        torch.testing.assert_close(got.p_yes[b].double(), p_yes, rtol=1e-4, atol=1e-5)


def test_caption_logprob_matches_incremental(toy, batch):
    texts, images = batch
    got = toy.caption_logprob(images, texts)
    for b, sequence in enumerate(toy.caption_sequences(images, texts)):
        logp = torch.log_softmax(next_token_logits(toy, sequence), -1)
        words = toy.tokenize(texts[b])
        start = len(sequence) - len(words)
        want = sum(logp[start - 1 + i, w] for i, w in enumerate(words))
        torch.testing.assert_close(got[b].double(), want, rtol=1e-4, atol=1e-4)


def test_measurements_are_differentiable(toy, batch):
    texts, images = batch
    for name in ("gen", "und", "caption"):
        toy.model.zero_grad()
        toy.measurement(name)(toy.model, {"prompts": texts, "images": images}).sum().backward()
        grads = [p.grad for p in toy.model.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    toy.model.zero_grad()


def test_measurements_run_the_model_they_are_given(toy, batch):
    prompts, images = batch
    check_measurements_run_the_given_model(toy, {"prompts": prompts, "images": images})


def test_generate_samples_image_tokens_with_its_own_distribution(toy):
    """Greedy generation equals the argmax of the incremental image-token distribution, and
    sampled images are seeded and inside the codebook."""
    texts = ["a red circle", "a red circle above a blue cross"]
    greedy = toy.generate(texts, n=1, temperature=0.0)
    for b, text in enumerate(texts):
        sequence = toy.gen_sequences([text])[0]
        for i in range(toy.image_tokens):
            step = toy.image_logits(next_token_logits(toy, sequence)[-1]).argmax()
            assert step == greedy[b, 0, i]
            sequence = sequence + [int(step) + toy.image_offset]
    a = toy.generate(texts, n=3, generator=torch.Generator().manual_seed(5))
    b = toy.generate(texts, n=3, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, 3, toy.image_tokens) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() < toy.codebook_size


def test_decode_encode_and_save_load_roundtrip(toy, batch, tmp_path):
    texts, images = batch
    pixels = toy.decode(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(texts), *toy.world.image_size, 3)
    assert torch.equal(toy.encode(pixels), images)
    toy.save_pretrained(tmp_path)
    loaded = load_adapter("toy", path=str(tmp_path))
    torch.testing.assert_close(loaded.gen_logprob(texts, images), toy.gen_logprob(texts, images))
    assert loaded.shared_parameter_names() == [n for n, _ in toy.model.named_parameters()]


def test_bad_inputs_give_clear_errors(toy):
    with pytest.raises(ValueError, match="not in the toy vocabulary"):
        toy.gen_logprob(["a pink circle"], torch.zeros(1, toy.image_tokens, dtype=torch.long))
    with pytest.raises(ValueError, match="images must be"):
        toy.judge(torch.zeros(1, 5, dtype=torch.long), ["a red circle"])
    with pytest.raises(ValueError, match="shape"):
        toy.encode(torch.zeros(1, 10, 10, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown model 'nope'.*toy-tiny"):
        load_adapter("nope")


def test_pretraining_is_deterministic_and_saved_with_its_manifest(tmp_path):
    """A few steps of the recipe twice give identical weights; save() writes weights, recipe, log and a
    manifest whose digest the loader checks."""
    import json

    from ntkdyn.models.toy import ToyConfig
    from ntkdyn.models.toy_recipe import PretrainConfig, verified_toy_dir, weights_digest
    from ntkdyn.pretrain import pretrain, save

    config = PretrainConfig(
        model=ToyConfig(
            hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, initializer_range=0.09
        ),
        steps=4,
        relation_warmup=2,
        gen_batch=2,
        und_batch=4,
        caption_batch=2,
        ground_batch=2,
        warmup=1,
    )
    first, log = pretrain(config, progress=False)
    second, _ = pretrain(config, progress=False)
    for (name, a), (_, b) in zip(
        first.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    assert log[-1]["step"] == 4 and np.isfinite(log[-1]["und_loss"])
    save(first, config, log, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["recipe"] == json.loads(json.dumps(config.recipe()))
    assert manifest["recipe_hash"] == config.recipe_hash() and manifest["sha256"] == weights_digest(tmp_path)
    saved = ToyAdapter.from_pretrained(verified_toy_dir(tmp_path))
    for (name, a), (_, b) in zip(first.model.named_parameters(), saved.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="und_batch must be even"):
        PretrainConfig(und_batch=3)
    with pytest.raises(ValueError, match="relation_warmup"):
        PretrainConfig(steps=10, relation_warmup=10)


def test_shipped_weights_are_the_default_recipe_and_match_their_digest(tmp_path):
    """The package's toy weights: their SHA-256 equals the manifest's (computed here from the file), the
    manifest's recipe is the default one, and a changed byte is refused by name."""
    import hashlib
    import json
    import shutil

    from ntkdyn.models.toy_recipe import SHIPPED_TOY_DIR, PretrainConfig, verified_toy_dir

    manifest = json.loads((SHIPPED_TOY_DIR / "manifest.json").read_text())
    digest = hashlib.sha256((SHIPPED_TOY_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["sha256"] == digest
    assert manifest["recipe"] == json.loads(json.dumps(PretrainConfig().recipe()))
    assert manifest["recipe_hash"] == PretrainConfig().recipe_hash()
    toy = load_adapter("toy")
    assert sum(p.numel() for p in toy.model.parameters()) > 500_000
    copy = tmp_path / "toy"
    shutil.copytree(SHIPPED_TOY_DIR, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        verified_toy_dir(copy)
    with pytest.raises(ValueError, match="SHA-256"):
        load_adapter("toy", str(copy))


def test_relation_stage_pairs_differ_only_in_the_relation():
    """Relation-stage pairs: the oracle agrees with every label and both scenes of a pair hold the
    same objects (only their cells differ)."""
    from ntkdyn.pretrain import TaskSampler

    world = ShapesWorld(seed=0)
    sampler = TaskSampler(world, np.random.default_rng(0), [1.0] * 6, [1.0] * 6)
    texts, scenes, labels = sampler.relation_pairs(40)
    assert scenes.shape == (40, world.image_tokens) and labels.tolist() == [1.0, 0.0] * 20
    for i in range(0, 40, 2):
        prompt = world.parse_prompt(texts[i])
        assert prompt.category == "spatial_relation" and texts[i + 1] == texts[i]
        assert world.oracle(prompt, scenes[i]) and not world.oracle(prompt, scenes[i + 1])
        assert sorted(scenes[i].tolist()) == sorted(scenes[i + 1].tolist())
        assert not torch.equal(scenes[i], scenes[i + 1])


def test_loading_the_toy_never_pretrains(tmp_path):
    """load_adapter("toy") loads the shipped weights without importing training code; a directory
    without a toy model is refused by name. (Subprocess: a clean module table.)"""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ntkdyn.models import load_adapter\n"
        "load_adapter('toy')\n"
        "try:\n"
        f"    load_adapter('toy', {str(tmp_path)!r})\n"
        "except FileNotFoundError as err:\n"
        "    print(err)\n"
        "print('imported:', sorted(m for m in sys.modules if m in ('ntkdyn.pretrain', 'ntkdyn.trainer')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "holds no toy model" in out.stdout and str(tmp_path) in out.stdout, out.stderr[-2000:]
    assert "imported: []" in out.stdout


def test_recipe_hash_is_the_one_of_the_flat_recipe_it_replaced():
    """The recipe composes ToyConfig; its hash stays the one of the flat recipe it replaced
    (7b87e3749d35, the shipped weights' and BENCHMARKS.md's); a change of the world's geometry, now part
    of the recipe, changes it."""
    from ntkdyn.models.toy import ToyConfig
    from ntkdyn.models.toy_recipe import PretrainConfig

    legacy = {  # the fields of the flat PretrainConfig of before
        "seed", "world_seed", "hidden_size", "num_layers", "num_heads", "intermediate_size",
        "initializer_range", "steps", "relation_warmup", "gen_batch", "und_batch", "caption_batch",
        "ground_batch", "lr", "warmup", "weight_decay", "hard_start", "hard_end", "hard_ramp",
        "und_category_weights", "negative_kind_weights", "threads",
    }  # fmt: skip
    assert set(PretrainConfig().recipe()) == legacy
    assert PretrainConfig().recipe_hash() == "7b87e3749d35"
    assert (
        PretrainConfig(model=ToyConfig(initializer_range=0.09, grid_size=4)).recipe_hash() != "7b87e3749d35"
    )
