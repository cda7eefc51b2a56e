#!/usr/bin/env bash
# Prepares .whl/ for a GPU machine without network: the xFormers wheel (and the CUDA 12
# runtime its compiled extension links against), allpairspy, and .whl/activate.sh.
#   usage, from the project root on a machine with network:   tools/gpu_wheels.sh [NAME==VER ...]
#   then on the GPU machine (its python3 has torch, Triton, pandas, pytest):  . .whl/activate.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
py=${GPU_PYTHON_VERSION:-3.12}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
for pkg in "xformers==0.0.35" "nvidia-cuda-runtime-cu12==12.8.90" "allpairspy==2.5.1" "$@"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp "${platforms[@]}" -d .whl "$pkg"
done
cat > .whl/activate.sh <<'ACT'
# Sourced on the GPU machine from the project root: installs the carried wheels into
# /tmp/site (no network there) and lets xFormers' extension find libcudart.so.12.
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  .whl/*.whl || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=/tmp/site/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1
python3 -c "import torch, xformers.ops.fmha.common as c; print('gpu:', torch.cuda.get_device_name(0), '| xformers extension:', c._built_with_cuda)"
ACT
ls -la .whl
