#!/usr/bin/env bash
# Builds the `cuda` feature of the crates that have one. Needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo check -p kvzip-kernels -p kvzip-models -p kvzip-cli --features cuda
