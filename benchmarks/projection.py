"""Per-sample gradient projection on CPU: ntkdyn against what TRAK does on a CPU, and a per-sample loop.

    python benchmarks/projection.py                 # the run recorded in BENCHMARKS.md
    python benchmarks/projection.py --sizes base    # one model size only

For each model size (a 4-layer LlamaForCausalLM, hidden 256, sequence 64, batch 16; a second size with
4x the MLP width and vocabulary) and each method, in a fresh subprocess:
  ntkdyn      GradientProjector(kind="kronecker", k) per_sample: one forward + one backward, hooks
  vmap_jl     torch.func vmap(grad) of the same fn (materialises [B, P]), then a dense seeded Rademacher
              JL to k_dense generated block by block from per-block seeds (TRAK's BasicProjector on CPU)
  loop_jl     an explicit per-sample backward loop (B backwards), then the same dense JL
  fwd_bwd     context, not a method: one plain forward + backward of fn(...).sum() (a training step's
              gradient, into .grad), the floor for any per-sample method's time and memory
Reported: wall time and process CPU time (all threads; less sensitive than wall time to other jobs on
a shared machine) of the method (first call, factors included; for ntkdyn also a second call), peak
memory = peak RSS above the RSS right before the method, sampled every 2 ms by a thread (reads
/proc/self/statm; Linux), and the relative Frobenius error of the eNTK K = Phi Phi^T against exact_ntk
(float64 model, per-sample autograd loop). Times are ratios within one run on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from ntkdyn import GradientProjector, ProjectionConfig, exact_ntk
from ntkdyn.analysis.projector import random_matrix

SIZES = {
    "base": dict(hidden_size=256, intermediate_size=688, vocab_size=2048),
    "wide": dict(hidden_size=256, intermediate_size=2752, vocab_size=8192),
}
METHODS = ("ntkdyn", "vmap_jl", "loop_jl", "fwd_bwd")


@dataclass
class Setup:
    size: str
    batch: int = 16
    seq: int = 64
    layers: int = 4
    k: int = 64  # ntkdyn factor size (default config)
    k_dense: int = 1024  # dense JL size of the baselines
    seed: int = 0


def build(setup: Setup):
    """The model (float32, eager attention) and a right-padded batch (ids, mask) [B, T]."""
    torch.manual_seed(setup.seed)
    config = LlamaConfig(
        num_hidden_layers=setup.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=setup.seq,
        attn_implementation="eager",
        **SIZES[setup.size],
    )
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(setup.seed + 1)
    ids = torch.randint(0, config.vocab_size, (setup.batch, setup.seq), generator=gen)
    lengths = torch.randint(setup.seq // 2, setup.seq + 1, (setup.batch,), generator=gen)
    mask = (torch.arange(setup.seq)[None, :] < lengths[:, None]).long()
    return model, (ids, mask)


def masked_logprob(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t mask * log pi(ids_t | ids_<t): [B]. Right padding + causal attention: no attention mask."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * mask[:, 1:]).sum(dim=1)


def fn(model, batch):
    ids, mask = batch
    return masked_logprob(model(input_ids=ids).logits, ids, mask)


def dense_jl(flat_grads: dict[str, torch.Tensor], k: int, seed: int) -> torch.Tensor:
    """sum over parameters of G [B, n] @ P [n, k] / sqrt(k), P Rademacher regenerated in blocks of rows."""
    rows = max(1, (1 << 22) // k)
    out = None
    for p_index, grads in enumerate(flat_grads.values()):
        for block, start in enumerate(range(0, grads.shape[1], rows)):
            part = grads[:, start : start + rows]
            projected = part @ random_matrix(
                seed * 1_000_003 + p_index * 10_007 + block, part.shape[1], k, "rademacher"
            )
            out = projected if out is None else out + projected
    return out / math.sqrt(k)


def per_sample_vmap(model, batch) -> dict[str, torch.Tensor]:
    """torch.func: vmap over samples of grad of the single-sample fn: {name: [B, numel]}."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def single(theta, ids, mask):
        logits = torch.func.functional_call(model, theta, (), {"input_ids": ids[None]}).logits
        return masked_logprob(logits, ids[None], mask[None])[0]

    grads = torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))(params, *batch)
    return {n: g.reshape(g.shape[0], -1) for n, g in grads.items()}


def per_sample_loop(model, batch) -> dict[str, torch.Tensor]:
    """One backward per sample: {name: [B, numel]}."""
    ids, mask = batch
    params = dict(model.named_parameters())
    rows = []
    for b in range(ids.shape[0]):
        value = fn(model, (ids[b : b + 1], mask[b : b + 1]))[0]
        rows.append(torch.autograd.grad(value, list(params.values())))
    return {n: torch.stack([r[i].reshape(-1) for r in rows]) for i, n in enumerate(params)}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread every 2 ms."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self._rss()
        self.peak = self.start
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.delta_mib = (self.peak - self.start) / 2**20


def run_method(setup: Setup, method: str, out_path: str) -> None:
    """Runs in a subprocess: times one method, writes {time, peak, features-kernel} to out_path."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, batch = build(setup)
    result = {"method": method, "size": setup.size, "params": sum(p.numel() for p in model.parameters())}
    with PeakRSS() as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        if method == "ntkdyn":
            projector = GradientProjector(model, ProjectionConfig(k=setup.k, seed=setup.seed))
            features = projector.per_sample(fn, batch)
        elif method == "fwd_bwd":
            fn(model, batch).sum().backward()
            features = None
        elif method == "vmap_jl":
            features = dense_jl(per_sample_vmap(model, batch), setup.k_dense, setup.seed)
        else:
            features = dense_jl(per_sample_loop(model, batch), setup.k_dense, setup.seed)
        result["time_s"] = time.perf_counter() - start
        result["cpu_s"] = time.process_time() - cpu_start
    result["peak_mib"] = memory.delta_mib
    result["feature_dim"] = None if features is None else features.shape[1]
    if method == "ntkdyn":
        start = time.perf_counter()
        projector.per_sample(fn, batch)
        result["second_call_s"] = time.perf_counter() - start
    kernel = None if features is None else (features @ features.T).double()
    torch.save({"result": result, "kernel": kernel}, out_path)


def exact_kernel(setup: Setup) -> torch.Tensor:
    model, batch = build(setup)
    return exact_ntk(model.double(), fn, batch)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--k", type=int, default=64, help="ntkdyn factor size")
    parser.add_argument("--k-dense", type=int, default=1024, help="dense JL size of the baselines")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        size, method, out = args.worker
        run_method(Setup(size, k=args.k, k_dense=args.k_dense), method, out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(size, method) for size in args.sizes for method in args.methods]
        exact = {}
        for size, method in tqdm(jobs, desc="methods"):
            setup = Setup(size, k=args.k, k_dense=args.k_dense)
            if size not in exact:
                exact[size] = exact_kernel(setup)
            out = os.path.join(tmp, f"{size}_{method}.pt")
            worker = [sys.executable, __file__, "--k", str(args.k), "--k-dense", str(args.k_dense)]
            subprocess.run([*worker, "--worker", size, method, out], check=True)
            saved = torch.load(out)
            row = saved["result"]
            if saved["kernel"] is not None:
                row["ntk_rel_error"] = ((saved["kernel"] - exact[size]).norm() / exact[size].norm()).item()
            rows.append(row)
    print(
        "| size | params | method | feature dim | wall (s) | CPU (s) | peak RSS delta (MiB) "
        "| eNTK rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        second = f" (2nd call {row['second_call_s']:.3f})" if "second_call_s" in row else ""
        error = f"{row['ntk_rel_error']:.4f}" if "ntk_rel_error" in row else "-"
        print(
            f"| {row['size']} | {row['params'] / 1e6:.2f}M | {row['method']} | {row['feature_dim'] or '-'} | "
            f"{row['time_s']:.3f}{second} | {row['cpu_s']:.2f} | {row['peak_mib']:.0f} | {error} |"
        )
    for size in args.sizes:
        by_method = {r["method"]: r for r in rows if r["size"] == size}
        if "ntkdyn" in by_method:
            for base in ("vmap_jl", "loop_jl", "fwd_bwd"):
                if base in by_method:
                    wall = by_method[base]["time_s"] / by_method["ntkdyn"]["time_s"]
                    cpu = by_method[base]["cpu_s"] / by_method["ntkdyn"]["cpu_s"]
                    print(f"{size}: {base} / ntkdyn (first calls): wall {wall:.1f}x, CPU {cpu:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
