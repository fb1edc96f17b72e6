#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, over the bundle that `cargo xtask gpu`
# builds into .gpu/bundle: every CUDA test binary (kernels vs CPU references, GPU engine vs CPU
# engine), compute-sanitizer memcheck on the kernel tests, the end-to-end benchmark and the HF
# transformers peer, all in one call. Results go to $OUT (at most 8 files come back):
#   device.txt, tests.log, summary.txt, memcheck.log, kvzip_bench.json, hf_peer.json, bench.log
#   (+ kvzip_bench_old.json when the bundle holds an earlier build in old/: both run per shape,
#   old then new, in the same call)
# Usage: bash scripts/gpu/run-all.sh [tests|memcheck|bench|serve|peer ...]   (default: all but serve).
# KVZIP_BENCH_SHAPES limits the bench to some shapes (comma-separated).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
OUT="${OUT:-/tmp/kvzip-gpu-out}"
mkdir -p "$OUT"
export KVZIP_FIXTURES_DIR="$PWD/tests/fixtures"
parts="${*:-tests memcheck bench peer}"
bundle=.gpu/bundle
if [ ! -d "$bundle" ] && [ -f .gpu/bundle.tar.xz ]; then tar -C .gpu -xJf .gpu/bundle.tar.xz; fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/device.txt" 2>&1
: > "$OUT/summary.txt"

if [[ " $parts " == *" tests "* ]]; then
  for t in "$bundle"/tests/*; do
    name=$(basename "$t")
    echo "=== $name" >> "$OUT/tests.log"
    timeout 300 "$t" --test-threads=1 >> "$OUT/tests.log" 2>&1
    echo "$name rc=$?" >> "$OUT/summary.txt"
  done
fi
if [[ " $parts " == *" memcheck "* ]]; then
  if command -v compute-sanitizer >/dev/null; then
    for t in "$bundle"/tests/cuda_*; do
      echo "=== memcheck $(basename "$t")" >> "$OUT/memcheck.log"
      timeout "${KVZIP_MEMCHECK_TIMEOUT:-90}" compute-sanitizer --tool memcheck --leak-check no "$t" --test-threads=1 >> "$OUT/memcheck.log" 2>&1
      echo "memcheck $(basename "$t") rc=$?" >> "$OUT/summary.txt"
    done
  else
    echo "compute-sanitizer not found" >> "$OUT/summary.txt"
  fi
fi
if [[ " $parts " == *" bench "* ]]; then
  shapes="${KVZIP_BENCH_SHAPES:-llama-3.1-8b,qwen2.5-7b-1m}"
  tmp=$(mktemp -d)
  # KVZIP_BENCH_ORDER repeats builds per shape (e.g. "new old old new": ABBA, so drift over
  # the call cancels out); every repetition is kept in the JSON with its `rep` index.
  order="${KVZIP_BENCH_ORDER:-old new}"
  for shape in ${shapes//,/ }; do
    rep=0
    for build in $order; do
      rep=$((rep + 1))
      bin="$bundle/kvzip-bench"; [ "$build" = old ] && bin="$bundle/old/kvzip-bench"
      [ -x "$bin" ] || continue
      echo "=== $build $shape (rep $rep)" >> "$OUT/bench.log"
      timeout "${KVZIP_BENCH_TIMEOUT:-400}" "$bin" --shapes "$shape" --out "$tmp/$build-$shape-$rep.json" ${KVZIP_BENCH_ARGS:-} > /dev/null 2>> "$OUT/bench.log"
      echo "kvzip-bench $build $shape rep $rep rc=$?" >> "$OUT/summary.txt"
    done
  done
  python3 - "$tmp" "$OUT" <<'PY'
import glob, json, os, sys
tmp, out = sys.argv[1], sys.argv[2]
for build, name in [("new", "kvzip_bench.json"), ("old", "kvzip_bench_old.json")]:
    parts = sorted(glob.glob(os.path.join(tmp, f"{build}-*.json")))
    if not parts:
        continue
    docs = []
    for p in parts:
        d = json.load(open(p))
        rep = int(os.path.basename(p).rsplit("-", 1)[1].split(".")[0])
        for s in d["shapes"]:
            s["rep"] = rep
        docs.append(d)
    merged = {"ceilings": docs[0]["ceilings"], "ceilings_per_run": [d["ceilings"] for d in docs],
              "shapes": [s for d in docs for s in d["shapes"]]}
    json.dump(merged, open(os.path.join(out, name), "w"), indent=1)
PY
fi
if [[ " $parts " == *" serve "* ]]; then
  # Batched decode at one KV budget (ratio 1.0 vs 0.3), then kvzip serve on CUDA vs kvzip run.
  # With an earlier build in old/: old, new, new, old (ABBA) in the same call.
  builds="new"; [ -x "$bundle/old/kvzip-bench" ] && builds="old new new old"
  rep=0
  for build in $builds; do
    rep=$((rep + 1))
    bin="$bundle/kvzip-bench"; [ "$build" = old ] && bin="$bundle/old/kvzip-bench"
    name=serve_batch; [ "$builds" != new ] && name="serve_batch_${build}_$rep"
    timeout "${KVZIP_SERVE_BENCH_TIMEOUT:-300}" "$bin" --serve-batch --shapes llama-3.1-8b \
      --contexts 32768 --out "$OUT/$name.json" ${KVZIP_SERVE_BENCH_ARGS:-} > /dev/null 2>> "$OUT/bench.log"
    echo "serve-batch $build rep $rep rc=$?" >> "$OUT/summary.txt"
  done
  if [ -d .gpu/smollm2-config ]; then
    python3 scripts/gpu/make_shape_model.py .gpu/smollm2-config /tmp/smollm2-shape --dtype bfloat16 >> "$OUT/bench.log" 2>&1
    timeout 300 python3 scripts/gpu/serve_check.py "$bundle/kvzip" /tmp/smollm2-shape "$OUT/serve_check.json" >> "$OUT/bench.log" 2>&1
    echo "serve_check rc=$?" >> "$OUT/summary.txt"
  fi
fi
if [[ " $parts " == *" peer "* ]]; then
  PYTHONUNBUFFERED=1 timeout "${KVZIP_PEER_TIMEOUT:-240}" python3 scripts/gpu/hf_peer.py --out "$OUT/hf_peer.json" ${KVZIP_PEER_ARGS:-} >> "$OUT/bench.log" 2>&1
  echo "hf_peer rc=$?" >> "$OUT/summary.txt"
fi
cat "$OUT/summary.txt"
tail -n 30 "$OUT/bench.log" 2>/dev/null
