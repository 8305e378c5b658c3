"""GPU checks of the fused Kronecker projection kernel (run by benchmarks/gpu.sh; needs CUDA).

1. correctness: the compiled kernel against the torch reference over shapes x dtypes x factor kinds x
   feature-axis splits x fused per-feature scales (a factored preconditioner), and
   GradientProjector(implementation="triton") against "torch" on a small Llama, plain and preconditioned;
2. timing (CUDA events, median of repeats) on transformer-sized layers: the kernel (fp32 and, for
   Rademacher factors, tensor-core 16-bit dots), with x's feature axis split when the grid underfills
   the SMs (the default) and without (dx_splits=1), the preconditioned projection with D's factors fused
   into the loads against scaling x and y first, the torch path, and the memory-bandwidth floor = bytes
   that must be read (x, y, mask, factors) / device-to-device copy bandwidth measured here; the target:
   >= 70% of the floor on the MLP and LM-head shapes;
3. a launch-parameter sweep on every timing shape and both dot modes.
Prints markdown tables and writes everything to OUT/gpu_projection.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics

import torch
from tqdm import tqdm

from ntkdyn import GradientProjector, ProjectionConfig
from ntkdyn.kernels.kron_projection import kron_projection_reference
from ntkdyn.kernels.kron_projection_triton import kron_projection_triton

CHECK_SHAPES = [  # (B, T, DX, DY, KX, KY)
    (2, 13, 70, 45, 24, 20),
    (3, 100, 257, 129, 64, 64),
    (4, 300, 1000, 512, 96, 64),
    (1, 1, 16, 16, 16, 16),
]
TIMING_SHAPES = {  # name: (B, T, DX = d_out, DY = d_in, K)
    "attn 4096, T=512": (16, 512, 4096, 4096, 64),
    "mlp up 11008x4096, T=2048": (16, 2048, 11008, 4096, 64),
    "lm head 32000x4096, T=1024": (8, 1024, 32000, 4096, 64),
}


def time_cuda(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of fn() over repeats, CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src))
    return 2 * src.numel() / seconds


def make(shape, dtype, sign):
    B, T, DX, DY, KX, KY = shape
    x = torch.randn(B, T, DX, device="cuda").to(dtype)
    y = torch.randn(B, T, DY, device="cuda").to(dtype)
    if sign:
        px = (torch.randint(0, 2, (DX, KX), device="cuda") * 2 - 1).float()
        py = (torch.randint(0, 2, (DY, KY), device="cuda") * 2 - 1).float()
    else:
        px, py = torch.randn(DX, KX, device="cuda"), torch.randn(DY, KY, device="cuda")
    mask = torch.rand(B, T, device="cuda") > 0.2
    return x, y, px, py, mask


def check_kernel() -> list[dict]:
    rows = []
    jobs = [
        (s, d, sign)
        for s in CHECK_SHAPES
        for d in (torch.float32, torch.bfloat16, torch.float16)
        for sign in (0, 1)
    ]
    for shape, dtype, sign in tqdm(jobs, desc="kernel vs torch"):
        x, y, px, py, mask = make(shape, dtype, sign)
        sx, sy = torch.rand(shape[2], device="cuda") + 0.5, torch.rand(shape[3], device="cuda") + 0.5
        for dx_splits in (1, 3):
            for scaled in (False, True):
                scales = (sx, sy) if scaled else (None, None)
                expected = kron_projection_reference(x, y, px, py, mask, *scales)
                out = kron_projection_triton(
                    x,
                    y,
                    px,
                    py,
                    mask,
                    sign_factors=bool(sign),
                    dx_splits=dx_splits,
                    scale_x=scales[0],
                    scale_y=scales[1],
                )
                error = ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()
                rows.append(
                    {
                        "shape": shape,
                        "dtype": str(dtype),
                        "sign_factors": bool(sign),
                        "dx_splits": dx_splits,
                        "scaled": scaled,
                        "rel_error": error,
                    }
                )
    return rows


def check_projector() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 512, (16, 64), device="cuda")

    def fn(model, batch):
        logits = model(input_ids=batch).logits.float()
        return torch.log_softmax(logits[:, :-1], -1).gather(-1, batch[:, 1:, None])[..., 0].sum(1)

    d = {n: torch.rand(p.shape, device="cuda") + 0.5 for n, p in model.named_parameters()}
    feats, conditioned, times = {}, {}, {}
    for implementation in ("torch", "triton"):
        projector = GradientProjector(model, ProjectionConfig(implementation=implementation))
        feats[implementation] = projector.per_sample(fn, ids)
        conditioned[implementation] = projector.per_sample(fn, ids, precondition=d)
        times[implementation] = time_cuda(lambda p=projector: p.per_sample(fn, ids), repeats=5, warmup=1)
    error = ((feats["triton"] - feats["torch"]).norm() / feats["torch"].norm()).item()
    error_d = ((conditioned["triton"] - conditioned["torch"]).norm() / conditioned["torch"].norm()).item()
    return {
        "rel_error_triton_vs_torch": error,
        "rel_error_preconditioned_triton_vs_torch": error_d,
        "per_sample_s": times,
    }


def time_layer(name: str, bandwidth: float) -> dict:
    B, T, DX, DY, K = TIMING_SHAPES[name]
    x, y, px, py, mask = make((B, T, DX, DY, K, K), torch.bfloat16, sign=True)
    bytes_read = x.numel() * 2 + y.numel() * 2 + mask.numel() + (px.numel() + py.numel()) * 4
    sx, sy = torch.rand(DX, device="cuda") + 0.5, torch.rand(DY, device="cuda") + 0.5
    return {
        "shape": name,
        "B,T,DX,DY,K": (B, T, DX, DY, K),
        "floor_s": bytes_read / bandwidth,
        "torch_s": time_cuda(lambda: kron_projection_reference(x, y, px, py, mask)),
        "triton_fp32_s": time_cuda(lambda: kron_projection_triton(x, y, px, py, mask)),
        "triton_bf16_s": time_cuda(lambda: kron_projection_triton(x, y, px, py, mask, sign_factors=True)),
        "triton_bf16_no_dx_split_s": time_cuda(
            lambda: kron_projection_triton(x, y, px, py, mask, sign_factors=True, dx_splits=1)
        ),
        "preconditioned_fused_s": time_cuda(
            lambda: kron_projection_triton(x, y, px, py, mask, scale_x=sx, scale_y=sy)
        ),
        "preconditioned_scaled_first_s": time_cuda(
            lambda: kron_projection_triton(
                (x.float() * sx).to(x.dtype), (y.float() * sy).to(y.dtype), px, py, mask
            )
        ),
    }


def sweep() -> list[dict]:
    """Every timing shape x both dot modes x launch parameters (block_t, block_d, num_warps)."""
    rows = []
    for name, (B, T, DX, DY, K) in tqdm(TIMING_SHAPES.items(), desc="sweep"):
        x, y, px, py, mask = make((B, T, DX, DY, K, K), torch.bfloat16, sign=True)
        for sign in (False, True):
            for block_t in (32, 64):
                for block_d in (32, 64, 128):
                    for num_warps in (4, 8):
                        launch = functools.partial(
                            kron_projection_triton,
                            *(x, y, px, py, mask),
                            sign_factors=sign,
                            block_t=block_t,
                            block_d=block_d,
                            num_warps=num_warps,
                        )
                        seconds = time_cuda(launch)
                        rows.append(
                            {
                                "shape": name,
                                "bf16_dots": sign,
                                "block_t": block_t,
                                "block_d": block_d,
                                "num_warps": num_warps,
                                "s": seconds,
                            }
                        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_projection.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_projection.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this script compiles the kernel for the GPU")
    import triton

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    report["kernel_checks"] = check_kernel()
    worst = max(r["rel_error"] for r in report["kernel_checks"])
    print(
        f"kernel vs torch reference: worst relative error {worst:.2e} "
        f"over {len(report['kernel_checks'])} cases"
    )
    report["projector_check"] = check_projector()
    print(f"GradientProjector triton vs torch on a bf16 Llama: {report['projector_check']}")
    bandwidth = copy_bandwidth()
    report["copy_bandwidth_GBps"] = bandwidth / 1e9
    report["timing"] = [time_layer(name, bandwidth) for name in tqdm(TIMING_SHAPES, desc="timing")]
    print(f"\n{report['device']}, copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write), bf16 inputs\n")
    print(
        "| layer | floor (ms) | torch (ms) | triton fp32 dots (ms) | triton bf16 dots (ms) "
        "| bf16 dots, no feature split (ms) | preconditioned, fused (ms) | preconditioned, scaled first (ms) "
        "| floor / best triton |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["timing"]:
        best = min(r["triton_fp32_s"], r["triton_bf16_s"])
        r["floor_fraction"] = r["floor_s"] / best
        print(
            f"| {r['shape']} | {r['floor_s'] * 1e3:.3f} | {r['torch_s'] * 1e3:.3f} "
            f"| {r['triton_fp32_s'] * 1e3:.3f} | {r['triton_bf16_s'] * 1e3:.3f} "
            f"| {r['triton_bf16_no_dx_split_s'] * 1e3:.3f} | {r['preconditioned_fused_s'] * 1e3:.3f} "
            f"| {r['preconditioned_scaled_first_s'] * 1e3:.3f} | {r['floor_fraction']:.2f} |"
        )
    for r in report["timing"]:
        if r["shape"].startswith(("mlp", "lm head")):
            verdict = "meets" if r["floor_fraction"] >= 0.7 else "misses"
            print(
                f"{r['shape']}: {100 * r['floor_fraction']:.0f}% of the bandwidth floor "
                f"({verdict} the 70% target)"
            )
    report["sweep"] = sweep()
    print("\nlaunch sweep: fastest (block_t, block_d, num_warps) per shape and dot mode")
    for name in TIMING_SHAPES:
        for sign in (False, True):
            rows = [r for r in report["sweep"] if r["shape"] == name and r["bf16_dots"] == sign]
            best = min(rows, key=lambda r: r["s"])
            print(
                f"{name}, {'bf16' if sign else 'fp32'} dots: best ({best['block_t']}, {best['block_d']}, "
                f"{best['num_warps']}) {best['s'] * 1e3:.3f} ms"
            )
    with open(os.path.join(args.out, "gpu_projection.json"), "w") as f:
        json.dump(report, f, indent=1)
    check = report["projector_check"]
    if (
        worst > 1e-4
        or max(check["rel_error_triton_vs_torch"], check["rel_error_preconditioned_triton_vs_torch"]) > 1e-3
    ):
        raise SystemExit("FAILED: the compiled kernel disagrees with the torch reference")


if __name__ == "__main__":
    main()
