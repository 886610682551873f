#!/usr/bin/env bash
# Every GPU check of issue #23 in one run, under eight minutes on an H100 or H200: the GPU tests (tests/test_gpu.py on
# the CPU and the GPU, the device guard), which likelihoods take vmap's second derivatives there
# (benchmarks/gpu_diagnose.py), then the GPU benchmark (python -m benchmarks.gpu). Run from the repository's
# root on the GPU machine, with the carried wheels in .whl/ (benchmarks/gpu_wheels.sh makes them); results and logs
# go to $OUT (default /tmp/osds-gpu). With the device tool of this project's workplace:
#   run(command="OSDS_COMMIT=<commit> bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
export PYTHONUNBUFFERED=1 CI=1
OUT=${OUT:-/tmp/osds-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, pyro, arviz; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pyro', pyro.__version__, 'arviz', arviz.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
timeout 130 python3 -m pytest -q -p no:cacheprovider -o addopts="" --durations=12 tests/test_gpu.py tests/test_devices.py \
    2>&1 | tee "$OUT/tests.log"
timeout 100 python3 -m benchmarks.gpu_diagnose 2>&1 | tee "$OUT/diagnose.log"
timeout 270 python3 -m benchmarks.gpu --out "$OUT" --deadline 255 --warm-up --targets logreg256 logreg1024 hier1000 \
    lgcp1600 --threads logreg256 --profile logreg256 2>&1 | tee "$OUT/benchmark.log"
ls -l "$OUT"
