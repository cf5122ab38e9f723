"""gpu_check's environment and test stages: the card and versions, ``trustrepair.kernels`` importable
without the editable install, and pytest runs whose output goes to ``$OUT/pytest.log``."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_check.runner import REPO

def environment() -> dict:
    import triton
    import transformers

    props = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "card": torch.cuda.get_device_name(0),
           "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
           "nvidia_smi": smi, "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "transformers": transformers.__version__}
    try:
        import kronfluence
        env["kronfluence"] = kronfluence.__version__
    except ImportError as exc:
        env["kronfluence"] = f"not importable: {exc}"
    print(json.dumps(env, indent=1), flush=True)
    return env


def kernels_importable() -> None:
    """``trustrepair.kernels`` comes from the editable install (package_dir maps kernels/ to it); when that
    install failed, map it here and, for the pytest subprocesses, through a sitecustomize on PYTHONPATH."""
    try:
        import trustrepair.kernels  # noqa: F401
        return
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp()) / "sitecustomize.py"
    shim.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport trustrepair\n"
                    f"trustrepair.__path__.append({str(REPO)!r})\n")
    os.environ["PYTHONPATH"] = f"{shim.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    import trustrepair  # from the repository root, where ``python -m benchmarks.gpu_check`` runs

    trustrepair.__path__.append(str(REPO))
    import trustrepair.kernels  # noqa: F401

    print("trustrepair.kernels mapped from the checkout (the editable install was not there)", flush=True)


OTHER_GPU_TESTS_S = 120
"""About what the other files' ``gpu`` tests need (collection, then three processes that each compile and
autotune the kernels); the stage is skipped below it and otherwise gets every second left."""


def pytest_run(out: Path, label: str, args: list[str], timeout_s: float) -> str:
    """Runs pytest with ``args`` in the repository, appends its output to ``$OUT/pytest.log``; returns a
    one-line summary (its last line, or the time-out)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout_s)
        text = proc.stdout
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        summary = f"exit {proc.returncode}: {last[0]}"
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        summary = f"timed out after {exc.timeout:.0f} s"
    with open(out / "pytest.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n{text}\n({time.perf_counter() - t0:.0f} s)\n\n")
    print(f"tests, {label}: {summary}", flush=True)
    return summary
