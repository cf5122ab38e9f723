"""The package's shape: three layers imported only downward, a kernel folder that is a leaf, submodules
that are modules (no public function shadows one), and docstrings free of measurement diaries."""
import ast
import importlib
import pkgutil
import re
import types
from pathlib import Path

import pytest

import trustrepair

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "trustrepair"
KERNELS = REPO / "kernels"

# layer -> the trustrepair subpackages it must not import (imports go downward only)
FORBIDDEN = {
    "engine": ("trustrepair.methods", "trustrepair.app", "trustrepair.data"),
    "methods": ("trustrepair.app",),
    "data": ("trustrepair.engine", "trustrepair.methods", "trustrepair.app"),
}
KERNEL_ALLOWED = ("trustrepair.kernels", "trustrepair.engine.ops.checks")
KERNEL_PARENTS = {"trustrepair", "trustrepair.engine", "trustrepair.engine.ops"}  # import-free __init__s


def _submodule_names() -> list[str]:
    """Every submodule but ``__main__`` (which runs the CLI); ``trustrepair.kernels`` lives in ``kernels/``
    (a package_dir mapping that pkgutil does not follow), so it is walked on its own."""
    import trustrepair.kernels

    names = ["trustrepair.kernels"]
    for path, prefix in ((trustrepair.__path__, "trustrepair."),
                         (trustrepair.kernels.__path__, "trustrepair.kernels.")):
        names += [info.name for info in pkgutil.walk_packages(path, prefix) if not info.name.endswith("__main__")]
    return sorted(set(names))


def _module_name(path: Path) -> str:
    """Dotted name of a source file under trustrepair/ or kernels/ (installed as trustrepair.kernels)."""
    if path.is_relative_to(KERNELS):
        parts = ["trustrepair", "kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    else:
        parts = ["trustrepair", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` statement of ``path`` names, relative ones resolved,
    plus ``pkg.name`` for each name taken from a package (it may be a submodule)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_submodule_imports_as_a_module_under_its_dotted_name():
    names = _submodule_names()
    assert {"trustrepair.methods.scoring", "trustrepair.methods.repair_step", "trustrepair.methods.metrics",
            "trustrepair.engine.ekfac", "trustrepair.app.cli", "trustrepair.kernels"} <= set(names)
    for name in names:
        module = importlib.import_module(name)
        assert isinstance(module, types.ModuleType), name
        attribute = trustrepair
        for part in name.split(".")[1:]:
            attribute = getattr(attribute, part)
        assert attribute is module, f"trustrepair.{name.partition('.')[2]} is {attribute!r}, not the module"


def test_readme_path_to_normalize_scores_works_after_importing_the_module():
    import trustrepair.methods.scoring

    assert callable(trustrepair.methods.scoring.normalize_scores)
    assert callable(trustrepair.influence) and not isinstance(trustrepair.influence, types.ModuleType)


def test_no_public_name_shares_a_submodules_name():
    leaves = {name.rpartition(".")[2] for name in _submodule_names()}
    assert not leaves & set(trustrepair.__all__), leaves & set(trustrepair.__all__)
    for name in trustrepair.__all__:
        assert getattr(trustrepair, name) is not None


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downward(layer):
    offending = []
    for path in _sources(PACKAGE / layer):
        for imported in _imported_modules(path):
            if imported.startswith(FORBIDDEN[layer]):
                offending.append(f"{path.relative_to(REPO)} imports {imported}")
    assert not offending, "\n".join(offending)


def test_nothing_outside_app_imports_app():
    """``trustrepair/__main__.py`` is the application's own entry point (``python -m trustrepair``, as
    torchrun launches it), and the package's lazy ``run_demo`` export names the module as a string."""
    offending = []
    for path in _sources(PACKAGE) + _sources(KERNELS):
        if path.is_relative_to(PACKAGE / "app") or path == PACKAGE / "__main__.py":
            continue
        offending += [f"{path.relative_to(REPO)} imports {m}" for m in _imported_modules(path)
                      if m == "trustrepair.app" or m.startswith("trustrepair.app.")]
    assert not offending, "\n".join(offending)


def test_kernels_import_nothing_from_the_library_but_the_checks_module():
    offending = []
    for path in _sources(KERNELS):
        for imported in _imported_modules(path):
            if imported.startswith("trustrepair.") and imported not in KERNEL_PARENTS and \
                    not imported.startswith(KERNEL_ALLOWED):
                offending.append(f"{path.relative_to(REPO)} imports {imported}")
    assert not offending, "\n".join(offending)


def test_importing_the_kernels_loads_no_other_library_module():
    """At run time too: the kernel modules and the checks module, with their import-free parents."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, trustrepair.kernels as k\n"
            "for info in pkgutil.iter_modules(k.__path__, 'trustrepair.kernels.'):\n"
            "    importlib.import_module(info.name)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('trustrepair'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**__import__("os").environ, "TRITON_INTERPRET": "1"}).stdout.split()
    extra = [m for m in loaded if m not in KERNEL_PARENTS and not m.startswith(KERNEL_ALLOWED)]
    assert not extra, extra


def test_library_sources_carry_no_measurement_diary():
    pattern = re.compile(r"H100|H200|first run|second run", re.IGNORECASE)
    hits = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            for path in _sources(PACKAGE) + _sources(KERNELS)
            for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)
