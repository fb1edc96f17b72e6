#!/usr/bin/env bash
# Decode GEMV fusions one by one (KVZIP_DECODE_FUSION), on the GPU machine over the bundle of
# `cargo xtask gpu` (with KVZIP_OLD_BENCH for .gpu/bundle/old/): the CUDA-vs-CPU flow test per
# setting, then kvzip-bench (Llama-3.1-8B shape, no scoring) per setting in a symmetric order
# (old, settings..., settings reversed, old) so drift over the call cancels. Writes under $OUT:
# flow-<setting>.log, bench-<n>-<setting>.json, sweep.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
OUT="${OUT:-/tmp/kvzip-fusion-sweep}"
mkdir -p "$OUT"
bundle=.gpu/bundle
if [ ! -d "$bundle" ] && [ -f .gpu/bundle.tar.xz ]; then tar -C .gpu -xJf .gpu/bundle.tar.xz; fi
export KVZIP_FIXTURES_DIR="$PWD/tests/fixtures"
settings="${KVZIP_SWEEP_SETTINGS:-none glu glu,add glu,norm,add}"
for s in $settings; do
  KVZIP_DECODE_FUSION="$s" timeout 120 "$bundle/tests/kvzip_flow" --test-threads=1 > "$OUT/flow-$s.log" 2>&1
  echo "flow $s rc=$?" >> "$OUT/sweep.log"
done
order="old $settings $(echo $settings | tr ' ' '\n' | tac | tr '\n' ' ') old"
i=0
for s in $order; do
  i=$((i + 1))
  bin="$bundle/kvzip-bench"; [ "$s" = old ] && bin="$bundle/old/kvzip-bench"
  KVZIP_DECODE_FUSION="$s" timeout 300 "$bin" --shapes "${KVZIP_SWEEP_SHAPE:-llama-3.1-8b}" --skip-scoring \
    --out "$OUT/bench-$i-$s.json" > /dev/null 2>> "$OUT/sweep.log"
  echo "bench $i $s rc=$?" >> "$OUT/sweep.log"
done
grep -h "ms/token\|^bench\|^flow" "$OUT/sweep.log"
