#!/usr/bin/env bash
# Builds and lints the `cuda` feature of every crate that has one. Needs no GPU: nvcc and
# libclang come from PyPI wheels (scripts/install-cuda-toolchain.sh), the cubins are compiled
# and embedded, bindgen generates the kernel parameter structs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-toolchain.sh
cargo clippy -p kvzip-kernels -p kvzip-cache -p kvzip-models -p kvzip-serve -p kvzip-cli -p kvzip-bench -p kvzip-tests \
  --features kvzip-kernels/cuda,kvzip-cache/cuda,kvzip-models/cuda,kvzip-serve/cuda,kvzip-cli/cuda,kvzip-bench/cuda,kvzip-tests/cuda \
  --all-targets -- -D warnings
