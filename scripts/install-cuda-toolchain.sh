#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler (nvcc, from NVIDIA's PyPI wheels) and libclang (for bindgen)
# into a venv at ${KVZIP_CUDA_VENV:-${KVZIP_HOME:-$HOME/.cache/kvzip}/cuda-venv}, where the
# `cuda` feature's build script finds them. Needs no GPU; idempotent.
set -euo pipefail
venv="${KVZIP_CUDA_VENV:-${KVZIP_HOME:-$HOME/.cache/kvzip}/cuda-venv}"
if ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1 \
   && ls "$venv"/lib/python3*/site-packages/clang/native/libclang.so >/dev/null 2>&1; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
  "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "libclang==18.*"
echo "CUDA toolchain installed in $venv"
