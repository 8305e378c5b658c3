"""The layers import downwards only (ARCHITECTURE.md): every module's imports, read with ast, stay inside
what its layer may use. The analysis core in particular knows nothing of ShapesWorld, adapters, the
oracle, the trainer or the application. And reading a run (plot) loads no projector kernel or Triton."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ntkdyn"
BASE = ("ntkdyn.rundir", "ntkdyn.state_file", "ntkdyn.batch")
APPLICATION = (
    "ntkdyn.track",
    "ntkdyn.evaluate",
    "ntkdyn.pretrain",
    "ntkdyn.plot",
    "ntkdyn.config",
    "ntkdyn.cli",
    "ntkdyn.shapes_probes",
    "ntkdyn.co_improvement",
    "ntkdyn.squeezing",
    "ntkdyn.bayes_step",
    "ntkdyn.run_report",
    "ntkdyn.oracle_change",
)
# layer (a subpackage) -> the ntkdyn modules it may import besides its own
ALLOWED = {
    "kernels": (),
    "world": (),
    "models": ("ntkdyn.world",),
    "analysis": ("ntkdyn.kernels", *BASE),
    "trainer": ("ntkdyn.world", "ntkdyn.models", *BASE),
}


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of the ntkdyn modules that the source of ``module`` imports: ``import X``,
    ``from X import ...`` (X), ``from ntkdyn import X`` (ntkdyn.X), relative imports resolved."""
    package = module if is_package else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base == "ntkdyn":
                names.update(f"ntkdyn.{alias.name}" for alias in node.names)
            else:
                names.add(base)
    return {n for n in names if n == "ntkdyn" or n.startswith("ntkdyn.")}


def imported_modules(path: Path) -> set[str]:
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return imports_of(path.read_text(), module.removesuffix(".__init__"), path.name == "__init__.py")


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_downwards_only(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    for path in files:
        for name in imported_modules(path):
            assert within(name, (f"ntkdyn.{layer}", *ALLOWED[layer])), (
                f"{path.relative_to(PACKAGE.parent)} ({layer} layer) imports {name}"
            )


def test_analysis_knows_nothing_of_world_models_trainer_or_application():
    """The issue's check, by name: no module under ntkdyn/analysis imports these."""
    forbidden = ("ntkdyn.world", "ntkdyn.models", "ntkdyn.evaluate", "ntkdyn.trainer", *APPLICATION)
    modules = sorted((PACKAGE / "analysis").rglob("*.py"))
    assert len(modules) > 5
    for path in modules:
        bad = sorted(n for n in imported_modules(path) if within(n, forbidden))
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_base_modules_import_only_base_modules():
    for name in BASE:
        path = PACKAGE / f"{name.split('.')[-1]}.py"
        assert imported_modules(path) <= set(BASE), path


def test_the_import_walk_sees_every_form_of_import():
    """The checker itself: absolute, from-, relative and package-level imports are all found."""
    source = (
        "import ntkdyn.world\nfrom ntkdyn.models import scenes\nfrom ..trainer import loop\n"
        "from . import tracker\nfrom ntkdyn import plot\nimport torch\n"
    )
    names = imports_of(source, "ntkdyn.analysis.probe")
    assert names == {"ntkdyn.world", "ntkdyn.models", "ntkdyn.trainer", "ntkdyn.analysis", "ntkdyn.plot"}


def test_reading_a_run_loads_no_projector_kernels_or_triton():
    code = (
        "import sys, ntkdyn, ntkdyn.plot, ntkdyn.rundir\n"
        "print(sorted(m for m in sys.modules if m.startswith(('triton', 'ntkdyn.kernels', "
        "'ntkdyn.analysis.projector', 'ntkdyn.analysis.tracker', 'transformers'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
