"""Checks and builders shared by several test files: the properties every transformers-backed
adapter (Janus, Emu3) must have, a tiny eager Llama, and a tolerant comparison of logged values."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ntkdyn import GradientProjector, ProjectionConfig
from ntkdyn.models.base import UnifiedAdapter

PROMPTS = ["two blue squares left of a yellow star", "one cross"]  # a padded batch: 2 lengths
TOL = dict(rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- transformers-backed adapters
def random_codes(adapter: UnifiedAdapter, seed: int = 1) -> torch.Tensor:
    """Uniform codebook indices, one image per prompt: LongTensor[len(PROMPTS), L]."""
    return torch.randint(
        0,
        adapter.codebook_size,
        (len(PROMPTS), adapter.image_tokens),
        generator=torch.Generator().manual_seed(seed),
    )


def processor_logits(adapter, pixels: torch.Tensor, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One unpadded sample laid out by the adapter's transformers processor, through the model's own
    pixel path: (input_ids [T], logits [T, V])."""
    inputs = adapter.processor(text=[text], images=[pixels.numpy()], return_tensors="pt")
    with torch.no_grad():
        return inputs["input_ids"][0], adapter.model(**inputs).logits[0]


class AdapterContract:
    """Tests every transformers-backed adapter passes. A test module subclasses it as Test<Name>Contract,
    sets ``load_name`` (the load_adapter name) and ``judge_encoded_pixels`` and provides the
    ``adapter`` and ``images`` (codes [len(PROMPTS), L]) fixtures."""

    load_name: str
    judge_encoded_pixels: bool  # the offline run judges encode(decode(codes)) rather than the codes

    def test_generate_shape_range_and_seed(self, adapter):
        def sample(seed: int) -> torch.Tensor:
            return adapter.generate(
                PROMPTS, n=2, temperature=1.0, generator=torch.Generator().manual_seed(seed)
            )

        codes = sample(0)
        assert codes.shape == (2, 2, adapter.image_tokens) and codes.dtype == torch.long
        assert codes.min() >= 0 and codes.max() < adapter.codebook_size
        assert torch.equal(codes, sample(0))
        assert not torch.equal(codes, sample(1))

    @pytest.mark.parametrize("name", ["gen", "und", "caption"])
    def test_measurement_gradients_on_shared_parameters_only(self, adapter, images, name):
        shared = set(adapter.shared_parameter_names())
        params = dict(adapter.model.named_parameters())
        assert shared and all(params[n].requires_grad for n in shared)
        assert all(not p.requires_grad for n, p in params.items() if n not in shared)
        values = adapter.measurement(name)(adapter.model, {"prompts": PROMPTS, "images": images})
        assert values.shape == (len(PROMPTS),) and torch.isfinite(values).all()
        grads = torch.autograd.grad(values.sum(), [params[n] for n in sorted(shared)])
        for n, g in zip(sorted(shared), grads, strict=True):
            assert torch.isfinite(g).all() and g.abs().sum() > 0, n

    def test_measurements_run_the_model_they_are_given(self, adapter, images):
        """fn(model, batch) measures ``model``, not the adapter's own: the same as an adapter whose own
        model it is, and not the adapter's model."""
        check_measurements_run_the_given_model(adapter, {"prompts": PROMPTS, "images": images})

    @pytest.mark.parametrize("name", ["gen", "und", "caption"])
    def test_projector_accepts_measurements(self, adapter, images, name):
        """With k above every axis size the Kronecker features are the exact per-sample gradients on
        the shared parameters: their Gram matrix must equal the one from per-sample autograd."""
        shared = adapter.shared_parameter_names()
        projector = GradientProjector(
            adapter.model, ProjectionConfig(kind="kronecker", k=1024, include=tuple(shared))
        )
        assert set(projector.tracked_parameters()) == set(shared)
        fn, batch = adapter.measurement(name), {"prompts": PROMPTS, "images": images}
        features = projector.per_sample(fn, batch)
        params = list(projector.tracked_parameters().values())
        assert features.shape == (len(PROMPTS), sum(p.numel() for p in params))
        assert torch.isfinite(features).all()
        grads = torch.stack(
            [
                torch.cat([g.flatten() for g in torch.autograd.grad(fn(adapter.model, batch)[b], params)])
                for b in range(len(PROMPTS))
            ]
        )
        torch.testing.assert_close(features @ features.T, grads @ grads.T, rtol=1e-4, atol=1e-4)

    def test_end_to_end_offline(self, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        from ntkdyn.models import load_adapter

        adapter = load_adapter(self.load_name, seed=3)
        codes = adapter.generate(PROMPTS, n=2, generator=torch.Generator().manual_seed(0))
        flat = codes.flatten(0, 1)
        pixels = adapter.decode(flat)
        assert pixels.shape == (4, adapter.image_size, adapter.image_size, 3)
        judged = adapter.encode(pixels) if self.judge_encoded_pixels else flat
        verdict = adapter.judge(judged, [p for p in PROMPTS for _ in range(2)])
        assert verdict.p_yes.shape == (4,) and ((verdict.p_yes > 0) & (verdict.p_yes < 1)).all()


def check_measurements_run_the_given_model(adapter: UnifiedAdapter, batch: dict) -> None:
    """Every measurement fn(model, batch) with a perturbed copy of the model equals that of a copy of
    the adapter that owns the perturbed model, and differs from the adapter's own measurement."""
    other = copy.deepcopy(adapter.model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    owner = copy.copy(adapter)
    owner.model = other
    for name in ("gen", "und", "caption"):
        with torch.no_grad():
            given = adapter.measurement(name)(other, batch)
            own = owner.measurement(name)(owner.model, batch)
            original = adapter.measurement(name)(adapter.model, batch)
        torch.testing.assert_close(given, own, rtol=0, atol=0)
        assert not torch.allclose(given, original), name


# ---------------------------------------------------------------- models
def tiny_llama(
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    max_position_embeddings: int,
    tied: bool = True,
    seed: int = 0,
) -> LlamaForCausalLM:
    """An eager LlamaForCausalLM (4 heads, 2 KV heads) in eval mode, weights drawn after
    torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------- logs
def assert_same_values(x: dict, y: dict) -> None:
    """Same keys; floats equal to rel 1e-4 / abs 1e-6, nested dicts compared alike, the rest exactly."""
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], float):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
        elif isinstance(x[k], dict):
            assert_same_values(x[k], y[k])
        else:
            assert x[k] == y[k], k


def assert_same_gradient_stores(a, b, steps: int) -> list:
    """Two runs' gradient stores (read_gradient_store) hold steps 1..steps, the same sources and ids, and
    the same rows to float32 rounding of another summation order (rel 1e-4 of the largest entry).
    Returns run a's steps."""
    from ntkdyn.analysis.gradient_store import read_gradient_store

    first, second = list(read_gradient_store(a)), list(read_gradient_store(b))
    assert [s.step for s in first] == [s.step for s in second] == list(range(1, steps + 1))
    for x, y in zip(first, second, strict=True):
        assert x.features.keys() == y.features.keys() and x.ids.keys() == y.ids.keys()
        for key in x.ids:
            assert x.ids[key].tolist() == y.ids[key].tolist()
        for key, rows in x.features.items():
            torch.testing.assert_close(y.features[key], rows, rtol=1e-4, atol=1e-4 * float(rows.abs().max()))
    return first


def spawn_workers(fn, args: tuple, processes: int, timeout: float = 300) -> None:
    """fn(rank, *args) in ``processes`` spawned processes (spawn, not fork: a child forked from a parent whose
    OpenMP pool is live can deadlock). A child's error is raised here; children still running after
    ``timeout`` seconds are killed and the test fails, so that a hang (a collective, a teardown) fails the
    test instead of holding the suite."""
    context = torch.multiprocessing.start_processes(
        fn, args=args, nprocs=processes, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{processes} processes of {fn.__name__} still running after {timeout} s")


def torchrun_track(args: list[str], out, processes: int = 2) -> None:
    """``python -m ntkdyn.track ARGS --out OUT`` under torchrun with ``processes`` CPU processes (gloo),
    one thread each; fails the test with the processes' stderr if the run fails."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
    ]
    command += ["-m", "ntkdyn.track", "--", *args, "--out", str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
