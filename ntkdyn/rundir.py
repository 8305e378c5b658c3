"""The run directory: its file names, row types, one JSONL writer and reader, one atomic write, the
keys of kernel tensors and scalars (built and parsed here only), and the truncation that ``--resume``
applies. Base layer: imports only the standard library, torch and safetensors, so that every other
layer (the analysis included) and ``plot`` read and write runs through it.

Layout of a run directory (``RunDir``; ARCHITECTURE.md describes each file)::

    config.json                   the run's whole config tree (ntkdyn.config.RunConfig)
    pretrained/before.json        the pre-trained model's evaluation (step 0)
    pretrained/records.jsonl      its judged generations (the probe pool)
    pretrained/und_records.jsonl  its answers to the understanding questions
    probes.json                   the fixed probe set of the tracker
    data/round_R.safetensors      round R's candidates, selection and training set (+ .jsonl, readable)
    metrics.jsonl                 MetricsRow per optimizer step          } logs: appended row by row,
    eval.jsonl                    EvalRow per evaluation                 } cut back to the checkpoint's
    data.jsonl                    DataRow per data round                 } byte lengths on --resume
    dynamics.jsonl                ProbeRow per probe and tracked step    }
    ntk.jsonl                     KernelRow of kernel scalars per tracked step }
    selection.jsonl               SelectionRow per label-free selection point }
    kernels/step_SSSSSS.safetensors   eNTK blocks of a tracked step (kernel_key names)
    gradients/step_SSSSSS.safetensors every training sample's projected gradient at a step (--store-k)
    selection/step_SSSSSS.safetensors trained weights of a selection point, while it can be selected
    checkpoint.safetensors        model, optimizer, RNGs, position (ntkdyn.state_file: no pickle)
    summary.json                  before/after/delta, dynamics statistics, mean kernel scalars
    figures/                      PNG and PDF of ntkdyn.plot

Every file that is not a log is replaced atomically (:func:`atomic_write`: written beside, flushed and
fsynced, then renamed), so a killed process leaves the previous version or the new one, never half.
A log row is appended and flushed at once; a kill can tear only the last line, which
:func:`read_jsonl` drops.

(Over 400 lines: every name, row type and key of a run directory lives here, in one place.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

LOG_SUFFIX = ".jsonl"
KERNEL_FILE = "step_{step:06d}.safetensors"


class RunDir:
    """The paths of one run directory (naming them creates nothing)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def probes(self) -> Path:
        return self.root / "probes.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def data_log(self) -> Path:
        return self.root / "data.jsonl"

    @property
    def dynamics(self) -> Path:
        return self.root / "dynamics.jsonl"

    @property
    def ntk(self) -> Path:
        return self.root / "ntk.jsonl"

    @property
    def squeezing(self) -> Path:
        return self.root / "squeezing.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.safetensors"

    @property
    def pickle_checkpoint(self) -> Path:
        """checkpoint.pt, the pickle format of earlier ntkdyn versions: refused, never loaded."""
        return self.root / "checkpoint.pt"

    @property
    def selection_log(self) -> Path:
        return self.root / "selection.jsonl"

    @property
    def kernels(self) -> Path:
        return self.root / "kernels"

    @property
    def selection(self) -> Path:
        return self.root / "selection"

    @property
    def gradients(self) -> Path:
        return self.root / "gradients"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def pretrained_before(self) -> Path:
        return self.root / "pretrained" / "before.json"

    @property
    def pretrained_records(self) -> Path:
        return self.root / "pretrained" / "records.jsonl"

    @property
    def pretrained_und_records(self) -> Path:
        return self.root / "pretrained" / "und_records.jsonl"

    def kernel_file(self, step: int) -> Path:
        """kernels/step_SSSSSS.safetensors of a tracked step."""
        return self.kernels / KERNEL_FILE.format(step=step)

    def kernel_files(self) -> list[Path]:
        """Every kernel file, in step order."""
        return sorted(self.kernels.glob("step_*.safetensors"), key=kernel_file_step)

    def gradient_file(self, step: int) -> Path:
        """gradients/step_SSSSSS.safetensors: the training samples' projected gradients at a step."""
        return self.gradients / KERNEL_FILE.format(step=step)

    def gradient_files(self) -> list[Path]:
        """Every gradient store file, in step order."""
        return sorted(self.gradients.glob("step_*.safetensors"), key=kernel_file_step)

    def selection_file(self, step: int) -> Path:
        """selection/step_SSSSSS.safetensors: the trained weights of a selection point."""
        return self.selection / KERNEL_FILE.format(step=step)

    def selection_files(self) -> list[Path]:
        """Every selection weights file, in step order."""
        return sorted(self.selection.glob("step_*.safetensors"), key=kernel_file_step)

    def round_file(self, round_index: int, suffix: str = ".safetensors") -> Path:
        """data/round_R.safetensors (tensors) or data/round_R.jsonl (one readable row per prompt)."""
        return self.root / "data" / f"round_{round_index}{suffix}"

    def logs(self) -> list[Path]:
        """The logs: every top-level *.jsonl (pretrained/records.jsonl is a record, not a log)."""
        return sorted(self.root.glob(f"*{LOG_SUFFIX}"))


def kernel_file_step(path: str | os.PathLike) -> int:
    """The step of a kernels/, gradients/ or selection/ step_SSSSSS.safetensors path."""
    stem = Path(path).stem
    prefix, _, digits = stem.partition("_")
    if prefix != "step" or not digits.isdigit():
        raise ValueError(f"{path}: not a step file name (expected {KERNEL_FILE})")
    return int(digits)


# --------------------------------------------------------------------------- row types
# Rows are JSON objects; these TypedDicts name their keys. Keys with a "/" cannot be attributes, so the
# functional form is used where a row has them.

MetricsRow = TypedDict(
    "MetricsRow",
    {
        "step": int,  # optimizer steps done (1, 2, ...)
        "round": int,  # data round
        "epoch": float,  # epochs over the round's data so far
        "lr": float,
        "grad_norm": float,  # global gradient norm before clipping
        "loss": float,  # mean per-sample training loss (ntkdyn.trainer.losses)
        "sft/nll": float,
        "dpo/loss": float,
        "dpo/nll": float,
        "rewards/chosen": float,
        "rewards/rejected": float,
        "rewards/margin": float,
        "replay/loss": float,
    },
    total=False,
)


class EvalRow(TypedDict, total=False):
    """One evaluation: ``step`` (of the model evaluated) and the evaluation's metrics
    (ntkdyn.evaluate.METRIC_KEYS, their ``per_category`` and the co-improvement keys ``co/...``). The final
    row of a run with label-free selection evaluates the selected point's model and adds
    ``selected_step`` (= step) and ``last_step`` (the steps trained)."""

    step: int
    selected_step: int
    last_step: int


DataRow = TypedDict(
    "DataRow",
    {
        "step": int,  # optimizer steps before the round
        "round": int,
        "kind": str,  # "collect" (Algorithm 1) or "curriculum" (Algorithm 2, the discard pool revisited)
        "prompts": int,
        "added_prompts": int,
        "added_items": int,
        "pool": int,  # discard pool after the round
        "candidate_precision": float,
        "accept_rate": float,
        "data/size": int,
        "data/precision": float,
        "data/pair_accuracy": float,
    },
    total=False,
)


class SelectionRow(TypedDict):
    """One label-free selection point (ntkdyn.trainer.selection): the frozen pre-trained judge's mean
    P(yes) of the model's generations on held-out prompts after ``step`` steps, its standard error over
    prompts, the step the rule selects among the points so far, and whether training stops here."""

    step: int
    score: float
    stderr: float
    selected_step: int
    stop: bool


class ProbeRow(TypedDict):
    """One probe at one tracked step (ntkdyn.analysis.tracker, which defines each predictor).
    ``predicted_by_source``: {"<source>/current" | "<source>/momentum" | "weight_decay" | "rounding":
    first-order change along that part of the split update; "rounding" is the real update minus the sum
    of the others, its rounding into the parameters' dtype}, summing to ``predicted``; it,
    ``predicted_current``, ``predicted_kernel`` and ``predicted_kernel_by_source`` ({source:
    Σ_u c_s(o, u)}) are None when the step was not split by source; the kernel forms are None without
    training features. ``top_train``: [[source, training sample index, its contribution c_s(o, u)], ...]
    (the SGD form's when not split)."""

    step: int
    measurement: str
    branch: str
    category: str
    group: str
    probe: str
    before: float
    observed: float
    predicted: float
    predicted_features: float
    predicted_by_source: dict[str, float] | None
    predicted_current: float | None
    predicted_kernel: float | None
    predicted_kernel_by_source: dict[str, float] | None
    predicted_sgd: float | None
    predicted_frozen: float | None  # <φ at the window's start, P Δθ>; None without a window (or its start)
    window_start: int
    top_train: list[list]
    lr: float


class KernelRow(TypedDict):
    """The kernel scalars of one tracked step: ``step``, ``lr`` and one float per :func:`ntk_key`."""

    step: int
    lr: float


# --------------------------------------------------------------------------- keys
# Measurement and category names go into keys between "/" and ","; key_part refuses names holding them.
# raw eNTK block, cosine-normalised block, Adam-aware contributions c_s(o, u) (ntkdyn.analysis.tracker),
# per tracked parameter: Σ_u K(o, u) and Σ_u c_s(o, u)
KERNEL_KINDS = ("K", "Kcos", "C", "Klayers", "Clayers")
NTK_STATS = (
    "norm",
    "alignment",
    "alignment_centred",
    "alignment_null_q95",
    "alignment_p",
    "cross_cos",
    "cross_cos_lo",
    "cross_cos_hi",
    "train_cos",
    "drift",
)


def key_part(name: str) -> str:
    """A measurement or category name checked for use inside a key (no "/" or ",", not empty)."""
    if not name or "/" in name or "," in name:
        raise ValueError(f"name {name!r} cannot be part of a key: it must be non-empty, without '/' or ','")
    return name


def kernel_key(kind: str, a: str, b: str) -> str:
    """Name of the eNTK block K_{a,b} [B_a, B_b] in a kernel file: "K/a,b" or "Kcos/a,b"."""
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kernel kind must be one of {KERNEL_KINDS}, got {kind!r}")
    return f"{kind}/{key_part(a)},{key_part(b)}"


class KernelKey(NamedTuple):
    kind: str
    a: str
    b: str


def parse_kernel_key(key: str) -> KernelKey:
    """The inverse of :func:`kernel_key`."""
    kind, _, pair = key.partition("/")
    a, _, b = pair.partition(",")
    if kind not in KERNEL_KINDS or not a or not b or kernel_key(kind, a, b) != key:
        raise ValueError(f"{key!r} is not a kernel key (expected e.g. 'K/und,gen')")
    return KernelKey(kind, a, b)


def ntk_key(stat: str, a: str, b: str | None = None, category: str | None = None) -> str:
    """Name of a kernel scalar of a KernelRow: "ntk/{stat}/{a}[,{b}][/{category}]".

    norm/a: mean feature norm of measurement a; alignment/a,b: kernel alignment of K_aa and K_bb;
    cross_cos/a,b[/category]: mean same-pair cosine; train_cos/a: mean cosine to the training samples;
    drift/a,b: ||K_ab - K_ab at the window's first step|| / ||K_ab there|| (tracking windows);
    alignment_centred, alignment_null_q95, alignment_p /a,b: centred alignment and its permutation null;
    cross_cos_lo, cross_cos_hi /a,b: the 95% bootstrap interval of cross_cos over the probes."""
    if stat not in NTK_STATS:
        raise ValueError(f"kernel scalar must be one of {NTK_STATS}, got {stat!r}")
    key = f"ntk/{stat}/{key_part(a)}" + ("" if b is None else f",{key_part(b)}")
    return key if category is None else f"{key}/{key_part(category)}"


class NtkKey(NamedTuple):
    stat: str
    a: str
    b: str | None
    category: str | None


def parse_ntk_key(key: str) -> NtkKey:
    """The inverse of :func:`ntk_key`."""
    parts = key.split("/")
    if len(parts) not in (3, 4) or parts[0] != "ntk" or parts[1] not in NTK_STATS:
        raise ValueError(f"{key!r} is not a kernel scalar key (expected e.g. 'ntk/cross_cos/und,gen')")
    a, _, b = parts[2].partition(",")
    return NtkKey(parts[1], a, b or None, parts[3] if len(parts) == 4 else None)


# --------------------------------------------------------------------------- writing and reading
def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> None:
    """Replace ``path`` atomically: write PATH.tmp (``data``, or ``data(tmp_path)`` writes it), flush
    and fsync it, then rename it over PATH."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if callable(data):
        data(tmp)
    else:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """``obj`` as JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=indent))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """A whole JSONL file (a record such as pretrained/records.jsonl, not a log), atomically."""
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


class JsonlLog:
    """Appends rows to a log, one JSON line each, flushed after every row; a no-op when not ``enabled``
    (every process but rank 0)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, *rows: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file ([] when it does not exist). A torn last line (a writer killed mid-row, so
    no newline after it) is dropped; any other unreadable line raises ValueError naming it."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if line.endswith("\n"):
                    raise ValueError(f"{path}:{number}: not a JSON row ({err.msg})") from None
    return rows


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file with string metadata, atomically. Tensors sharing memory (tied weights) are
    stored as separate copies."""
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (only its header is read); ValueError naming the file if it
    is not safetensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err}); nothing was loaded") from None


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file. Nothing is unpickled: a file that is not safetensors
    raises ValueError naming it."""
    metadata = load_metadata(path)
    return load_file(str(path)), metadata


# --------------------------------------------------------------------------- resume
def log_lengths(run: RunDir) -> dict[str, int]:
    """Byte length of every log (what a checkpoint records)."""
    return {p.name: p.stat().st_size for p in run.logs()}


def truncate_logs(run: RunDir, lengths: dict[str, int], step: int) -> None:
    """Cut the run back to a checkpoint: every log to ``lengths[name]`` bytes (0 for a log the checkpoint
    does not know), and the kernel and selection files of steps after ``step`` deleted. Rows written
    after the checkpoint, a torn last row included, are dropped and written again by the resumed run."""
    for path in run.logs():
        with open(path, "r+b") as f:
            f.truncate(min(lengths.get(path.name, 0), path.stat().st_size))
    delete_step_files([*run.kernel_files(), *run.selection_files()], step)


def truncate_tracking(run: RunDir, step: int) -> None:
    """Cut the tracker's outputs back to ``step`` for a trainer that resumes from its own checkpoint
    (the Hugging Face callback): rows of later steps dropped from dynamics.jsonl and ntk.jsonl (and a
    torn last row), kernel files of later steps deleted."""
    for path in (run.dynamics, run.ntk):
        if path.exists():
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] <= step))
    delete_step_files(run.kernel_files(), step)


def delete_step_files(paths: Iterable[Path], step: int) -> None:
    """Delete the step_SSSSSS files among ``paths`` of steps after ``step``."""
    for path in paths:
        if kernel_file_step(path) > step:
            path.unlink()
