#!/usr/bin/env bash
# The GPU check (make gpu-check): the GPU tests, then the GPU benchmark, on one GPU, well inside
# 8 minutes. For a GPU machine with torch built for CUDA and no internet: Python packages it
# lacks travel as wheels in .whl/ (see the README's GPU section); they are installed to a
# private target first. Results: gpu-check/ (gpu.json, the test log).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fgc-bank-site .whl/*.whl
    export PYTHONPATH="/tmp/fgc-bank-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.__version__, torch.cuda.get_device_name(0))"
"$PY" -m pytest -q -p no:cacheprovider tests/test_torch_store_gpu.py tests/test_gpu_bank.py tests/test_faiss_gpu.py 2>&1 | tee "$OUT/tests.log"
"$PY" -m benchmarks.gpu --out "$OUT" "$@"
