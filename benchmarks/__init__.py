"""trustrepair's benchmarks, run as a package from the repository root (``python -m benchmarks.<name>``).

From the repository root, this checkout's ``kernels/`` folder (installed as ``trustrepair.kernels``) is
importable as a top-level ``kernels`` and would shadow the Hugging Face ``kernels`` package, which
transformers (5.25 and later) imports when it loads a model. Importing this package moves the
repository root behind the installed packages on ``sys.path``, so ``benchmarks`` still imports from
here and ``kernels`` resolves to the installed one; ``tests/conftest.py`` imports it first for the same
reason.
"""
import sys
from pathlib import Path


def _repository_root_last() -> None:
    root = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root] + [str(root)]
    loaded = sys.modules.get("kernels")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent == root / "kernels":
        del sys.modules["kernels"]


_repository_root_last()
