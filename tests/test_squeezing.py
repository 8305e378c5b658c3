"""The squeezing log against direct measurements of log pi before and after a hand-made update."""

import copy

import pytest
import torch

from ntkdyn.models.toy import ToyAdapter
from ntkdyn.rundir import RunDir, read_jsonl
from ntkdyn.shapes_probes import Probe
from ntkdyn.squeezing import SqueezingLog, squeezing_summary

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(seed: int = 0):
    adapter = ToyAdapter.tiny(seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [p.text for p in adapter.world.prompts("train")[:6]]
    batch = {
        "prompts": prompts,
        "images": torch.randint(1, adapter.codebook_size, (6, adapter.image_tokens), generator=g),
        "rejected": torch.randint(1, adapter.codebook_size, (6, adapter.image_tokens), generator=g),
    }
    images = torch.randint(1, adapter.codebook_size, (4, adapter.image_tokens), generator=g)
    probes = [
        Probe(prompts[i], tuple(images[i].tolist()), ("aligned", "false_positive")[i % 2], i % 2 == 0, True)
        for i in range(4)
    ]
    return adapter, batch, probes


def _step(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _logp(adapter, model, prompts, images):
    model.eval()
    with torch.no_grad():
        return adapter.gen_logprob(prompts, images, model=model).double()


def test_rows_match_direct_measurements(tmp_path):
    adapter, batch, probes = _setup()
    hook = SqueezingLog(adapter, tmp_path, probes, every=2)
    before_model = copy.deepcopy(adapter.model)
    greedy_pairs = adapter.generate(batch["prompts"], 1, temperature=0.0)[:, 0]
    adapter.model.train()
    hook.before_step(2, adapter.model, None, batch)
    _step(adapter.model, seed=1)
    hook.after_step(2, adapter.model, 0.1)
    hook.before_step(3, adapter.model, None, batch)  # not a logged step
    _step(adapter.model, seed=2)
    hook.after_step(3, adapter.model, 0.1)

    rows = read_jsonl(RunDir(tmp_path).squeezing)
    assert [(r["step"], r["group"]) for r in rows] == [
        (2, "pairs"),
        (2, "probes/aligned"),
        (2, "probes/false_positive"),
    ]
    after_model = copy.deepcopy(before_model)  # the model right after step 2
    _step(after_model, seed=1)
    pairs = rows[0]
    deltas = {}
    for kind, images in (
        ("chosen", batch["images"]),
        ("rejected", batch["rejected"]),
        ("greedy", greedy_pairs),
    ):
        before = _logp(adapter, before_model, batch["prompts"], images)
        after = _logp(adapter, after_model, batch["prompts"], images)
        deltas[kind] = after - before
        assert pairs[f"logp/{kind}"] == pytest.approx(before.mean().item(), abs=1e-4)
        assert pairs[f"delta/{kind}"] == pytest.approx(deltas[kind].mean().item(), abs=1e-4)
    squeezed = sum(
        deltas["chosen"][i] < 0 and deltas["rejected"][i] < 0 and deltas["greedy"][i] > 0 for i in range(6)
    )
    assert pairs["squeezed"] == pytest.approx(squeezed / 6)
    aligned = [p for p in probes if p.category == "aligned"]
    images = torch.tensor([p.image for p in aligned])
    texts = [p.prompt for p in aligned]
    before = _logp(adapter, before_model, texts, images)
    assert rows[1]["n"] == 2 and rows[1]["logp/image"] == pytest.approx(before.mean().item(), abs=1e-4)
    delta = _logp(adapter, after_model, texts, images) - before
    assert rows[1]["delta/image"] == pytest.approx(delta.mean().item(), abs=1e-4)
    summary = squeezing_summary(rows)
    assert summary["pairs"]["total_delta/chosen"] == pytest.approx(pairs["delta/chosen"])
    assert summary["pairs"]["steps"] == 1


class NoGreedyToy(ToyAdapter):
    """A toy that, like the Hugging Face adapters, refuses temperature 0."""

    def generate(self, prompts, n, temperature=1.0, generator=None):
        if temperature <= 0:
            raise ValueError("need temperature > 0")
        return super().generate(prompts, n, temperature, generator)


def test_an_adapter_without_greedy_decoding_logs_no_greedy_column(tmp_path):
    adapter, batch, _ = _setup()
    adapter.__class__ = NoGreedyToy
    hook = SqueezingLog(adapter, tmp_path, every=1)
    hook.before_step(1, adapter.model, None, batch)
    _step(adapter.model, seed=1)
    hook.after_step(1, adapter.model, 0.1)
    (row,) = read_jsonl(RunDir(tmp_path).squeezing)
    assert row["logp/greedy"] is None and row["squeezed"] is None and row["logp/chosen"] is not None
    with pytest.raises(ValueError, match="every"):
        SqueezingLog(adapter, tmp_path, every=0)
