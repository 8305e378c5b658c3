"""The kronecker kind's eNTK error on every model family of tests/projector_models.py.

    python benchmarks/projector_families.py                    # every family, 3 seeds (about 6 min)
    python benchmarks/projector_families.py --families llama gpt2 --seeds 5

For each family, built at a size where the Kronecker factors project (transformers: hidden 256,
intermediate 512, vocabulary 512; torch.nn models: width 256, vocabulary 512; ntkdyn's Janus and Emu3
are their fixed tiny models, width 64), in float64 with its measurement fn and batch (B = 3):
  exact     K = J J^T from the explicit per-sample autograd loop (tests/projector_models.py), and
            whether GradientProjector(kind="exact") reproduces J (max relative error per parameter
            block, as in tests/test_projector_families.py), refuses (UnsupportedModuleError) or fails
  k=64/128  ||Phi Phi^T - K||_F / ||K||_F for GradientProjector(kind="kronecker", k) over projection
            seeds 0..S-1: mean [min, max] (self_check off: the exact column checks the same rules)
and prints a Markdown table. An axis of size <= k is kept exact, so a family whose axes are all <= k
has no projection error (up to rounding).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from projector_models import FAMILIES, Size, block_errors, per_sample_gradients_float64  # noqa: E402

from ntkdyn import GradientProjector, ProjectionConfig  # noqa: E402
from ntkdyn.analysis.projector import DEFAULT_K, UnsupportedModuleError  # noqa: E402

BENCH_SIZE = Size(hidden=256, intermediate=512, vocab=512, width=256)


def relative_frobenius(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((estimate.double() - exact).norm() / exact.norm())


def exact_kind_status(model, fn, batch, reference: torch.Tensor, params: dict) -> str:
    """'exact (max block err)', 'WRONG (max block err)', 'refused: ...' or 'error: ...'."""
    try:
        features = GradientProjector(model, ProjectionConfig(kind="exact")).per_sample(fn, batch).double()
    except UnsupportedModuleError as error:
        return f"refused: {str(error)[:100]}..."
    except Exception as error:  # noqa: BLE001 - reported in the table
        return f"{type(error).__name__}: {str(error)[:100]}..."
    worst = max(block_errors(features, reference, params).values())
    return f"{'exact' if worst < 1e-6 else 'WRONG'} ({worst:.0e})"


def kronecker_errors(model, fn, batch, kernel: torch.Tensor, k: int, seeds: int) -> str:
    """'mean [min, max]' of the relative Frobenius eNTK error over projection seeds, or the error."""
    errors = []
    for seed in range(seeds):
        try:
            config = ProjectionConfig(kind="kronecker", k=k, seed=seed, self_check=False)  # checked: exact
            projector = GradientProjector(model, config)
            features = projector.per_sample(fn, batch).double()
        except UnsupportedModuleError:
            return "refused"
        except Exception as error:  # noqa: BLE001 - reported in the table
            return f"{type(error).__name__}: {str(error)[:80]}"
        errors.append(relative_frobenius(features @ features.T, kernel))
    return f"{sum(errors) / len(errors):.3f} [{min(errors):.3f}, {max(errors):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seeds", type=int, default=3, help="projection seeds per k")
    parser.add_argument("--ks", type=int, nargs="*", default=[DEFAULT_K["kronecker"], 128])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.families:
        built = FAMILIES[name].build(BENCH_SIZE)
        model, fn, batch = built.model, built.fn, built.batch
        params = GradientProjector(model, ProjectionConfig(kind="exact")).tracked_parameters()
        reference = per_sample_gradients_float64(model, fn, batch, params)
        kernel = reference @ reference.T
        cells = [exact_kind_status(model, fn, batch, reference, params)]
        cells += [kronecker_errors(model, fn, batch, kernel, k, args.seeds) for k in args.ks]
        rows.append((name, sum(p.numel() for p in params.values()), *cells))
        print(f"{name}: {cells}", file=sys.stderr, flush=True)
    ks = " | ".join(f"kronecker k={k}: mean [min, max]" for k in args.ks)
    print(f"| family | tracked parameters | exact kind | {ks} |")
    print("|---|---:|---|" + "---|" * len(args.ks))
    for name, count, *cells in rows:
        print(f"| {name} | {count:,} | " + " | ".join(cells) + " |")
    print(f"\n{args.seeds} projection seeds, B = 3, float64; {BENCH_SIZE}")


if __name__ == "__main__":
    main()
