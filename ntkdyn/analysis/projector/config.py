"""ProjectionConfig (what is projected, and how) and the selection of the tracked parameters."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from ntkdyn.kernels.kron_projection import IMPLEMENTATIONS

KINDS = ("kronecker", "dense", "exact")
DISTRIBUTIONS = ("rademacher", "gaussian")
DEFAULT_K = {"kronecker": 64, "dense": 4096}


@dataclass
class ProjectionConfig:
    """How per-sample gradients are projected (see :mod:`ntkdyn.analysis.projector` for the math)."""

    kind: str = field(default="kronecker", metadata={"help": "kronecker | dense | exact"})
    k: int | None = field(
        default=None,
        metadata={
            "help": "kronecker: size of each factor (a matrix parameter gives a k x k block; axes of size "
            "<= k stay exact), default 64; dense: total feature size, default 4096; exact: must be unset"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the projection factors"})
    implementation: str = field(
        default="auto", metadata={"help": "auto (Triton on CUDA, torch on CPU) | torch | triton"}
    )
    distribution: str = field(default="rademacher", metadata={"help": "rademacher | gaussian factors"})
    include: tuple[str, ...] = field(
        default=("*",),
        metadata={
            "help": "fnmatch patterns of parameter names to track; a pattern without wildcards asks "
            "for that parameter by name (error if absent or frozen)"
        },
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "fnmatch patterns of names to skip"})
    module_types: tuple[type | str, ...] | None = field(
        default=None,
        metadata={"help": "track only parameters owned by modules of these types (classes or class names)"},
    )
    second_stage_k: int | None = field(
        default=None,
        metadata={"help": "kronecker only: compress each selected k0*k1 block to this size (SRHT)"},
    )
    second_stage_include: tuple[str, ...] = field(
        default=("*",), metadata={"help": "fnmatch patterns of parameters the second stage applies to"}
    )
    self_check: bool = field(
        default=True,
        metadata={
            "help": "check a projector's first per_sample call against one extra full-batch backward "
            "(GradientProjector.check) and raise SelfCheckError on a disagreement"
        },
    )

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ProjectionConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "exact":
            if self.k is not None:
                raise ValueError("ProjectionConfig.k must be unset for kind='exact' (nothing is projected)")
        elif self.k is None:
            self.k = DEFAULT_K[self.kind]
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"ProjectionConfig.k must be a positive int, got {self.k!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"ProjectionConfig.seed must be an int, got {self.seed!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"ProjectionConfig.implementation must be one of {IMPLEMENTATIONS}, "
                f"got {self.implementation!r}"
            )
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"ProjectionConfig.distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}"
            )
        for name in ("include", "exclude", "second_stage_include"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"ProjectionConfig.{name} must be a tuple of name patterns, got {value!r}")
            setattr(self, name, tuple(value))
        if self.module_types is not None:
            if isinstance(self.module_types, (str, type)) or not all(
                isinstance(t, (str, type)) for t in self.module_types
            ):
                raise ValueError(
                    f"ProjectionConfig.module_types must be a tuple of classes or class names, got "
                    f"{self.module_types!r}"
                )
            self.module_types = tuple(self.module_types)
        if self.second_stage_k is not None:
            if self.kind != "kronecker":
                raise ValueError("ProjectionConfig.second_stage_k applies only to kind='kronecker'")
            if not isinstance(self.second_stage_k, int) or self.second_stage_k < 1:
                raise ValueError(
                    f"ProjectionConfig.second_stage_k must be a positive int, got {self.second_stage_k!r}"
                )
        if not isinstance(self.self_check, bool):
            raise ValueError(f"ProjectionConfig.self_check must be a bool, got {self.self_check!r}")


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(parameter) -> [(module name, module, attribute)] for every module holding it directly."""
    found: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                found.setdefault(id(param), []).append((module_name, module, attr))
    return found


def select_parameters(model: nn.Module, config: ProjectionConfig) -> dict[str, nn.Parameter]:
    """The tracked parameters: trainable, matching include, not exclude, owned by module_types.

    Each parameter appears once, under its first name in ``model.named_parameters()`` (tied weights).
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    for pattern in config.include:
        if any(ch in pattern for ch in "*?["):
            continue
        if pattern not in named:
            raise ValueError(
                f"ProjectionConfig.include asks for parameter {pattern!r}, which the model lacks"
            )
        if not named[pattern].requires_grad:
            raise ValueError(
                f"ProjectionConfig.include asks for parameter {pattern!r}, which has requires_grad=False"
            )
    holders = owners(model)
    selected: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        if not matches(name, config.include) or matches(name, config.exclude):
            continue
        if config.module_types is not None and not any(
            isinstance(m, t) if isinstance(t, type) else type(m).__name__ == t
            for _, m, _ in holders.get(id(param), [])
            for t in config.module_types
        ):
            continue
        seen.add(id(param))
        selected[name] = param
    if not selected:
        raise ValueError(
            "no tracked parameters: the model has no trainable parameter matching ProjectionConfig "
            f"include={config.include}, exclude={config.exclude}, module_types={config.module_types}"
        )
    return selected
