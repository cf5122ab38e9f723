#!/usr/bin/env bash
# GPU check of the Triton kernels (issue 5), for a session with a lent GPU: ONE device-tool call,
#   run(kind="nvidia-h100-x1", timeout_s=590, carry=[".whl"], command="bash benchmarks/gpu_check.sh")
# about 8 minutes. .whl/ (git-ignored) holds kronfluence 1.0.1 and einconv 0.1.0, fetched here once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl kronfluence==1.0.1 einconv==0.1.0
# Everything it writes lands in $OUT (gpu_check.log, pytest.log, gpu_check.json, scores.pt,
# RESULTS_section.md, install.log); the table of results is printed last. Arguments go to
# python -m benchmarks.gpu_check (e.g. --only pipeline,kronfluence for a shorter rerun after a fix). See
# benchmarks/gpu_check/__init__.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1

# kronfluence and einconv from the carried wheels (the device has no package index).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed: is .whl/ carried?"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

# trustrepair itself (maps kernels/ to trustrepair.kernels); gpu_check maps it by hand if this fails.
python3 -m pip install --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || echo "editable install failed (see install.log); gpu_check maps trustrepair.kernels itself"

python3 -m benchmarks.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
