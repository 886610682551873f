#!/usr/bin/env bash
# The wheels a GPU machine without internet access lacks (its image has torch, numpy, scipy, pandas, xarray,
# matplotlib, h5py, tqdm, pytest and hypothesis): downloaded here into .whl/ (git-ignored through
# .git/info/exclude) for Python 3.12 on x86-64 Linux, to carry to the machine (benchmarks/gpu_check.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2 arviz==0.23.4 xarray-einstats==0.9.1 \
    h5netcdf==1.8.3 platformdirs==4.14.9 opt_einsum==3.4.0
ls -l .whl
