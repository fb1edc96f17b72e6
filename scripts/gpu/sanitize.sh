#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck, synccheck and initcheck over every CUDA test binary of
# the bundle (cargo xtask gpu), 12 at a time, each capped at KVZIP_SANITIZE_TIMEOUT seconds.
# Writes $OUT/sanitize.log (tool output) and $OUT/sanitize_summary.txt
# ("tool binary rc=N errors=M" per run; rc 124 = stopped by the time cap).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/kvzip-gpu-out}"
mkdir -p "$OUT"
bundle=.gpu/bundle
if [ ! -d "$bundle" ] && [ -f .gpu/bundle.tar.xz ]; then tar -C .gpu -xJf .gpu/bundle.tar.xz; fi
export KVZIP_FIXTURES_DIR="$PWD/tests/fixtures"
cap="${KVZIP_SANITIZE_TIMEOUT:-400}"
logs=$(mktemp -d)
jobs=""
# KVZIP_SANITIZE_ONLY="tool:binary ..." restricts the runs (e.g. "initcheck:gpu_engine").
for t in "$bundle"/tests/*; do
  for tool in memcheck racecheck synccheck initcheck; do
    if [ -n "${KVZIP_SANITIZE_ONLY:-}" ] && [[ " $KVZIP_SANITIZE_ONLY " != *" $tool:$(basename "$t") "* ]]; then continue; fi
    jobs="$jobs $tool:$t"
  done
done
echo $jobs | tr ' ' '\n' | xargs -P 12 -I{} bash -c '
  tool=${1%%:*}; t=${1#*:}; name=$(basename "$t")
  log='"$logs"'/$tool-$name.log
  extra=""; [ "$tool" = memcheck ] && extra="--leak-check no"
  timeout '"$cap"' compute-sanitizer --tool $tool $extra "$t" --test-threads=1 > "$log" 2>&1
  rc=$?
  errs=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$log" | tail -1 | grep -Eo "[0-9]+" || echo "?")
  echo "$tool $name rc=$rc errors=$errs"
' _ {} > "$OUT/sanitize_summary.txt"
sort -o "$OUT/sanitize_summary.txt" "$OUT/sanitize_summary.txt"
# Per run: the summary lines; for a run that is not clean (rc != 0 or errors != 0), also the
# distinct report lines and the last 40 lines, so the cause comes back with the figures.
for f in "$logs"/*.log; do
  echo "=== $(basename "$f")"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$f" | head -20
  name=$(basename "$f" .log)
  if ! grep -qE "^${name%%-*} ${name#*-} rc=0 errors=0$" "$OUT/sanitize_summary.txt"; then
    grep -E "^=========" "$f" | sort | uniq -c | sort -rn | head -25
    echo "--- last 40 lines"; tail -40 "$f"
  fi
done > "$OUT/sanitize.log"
cat "$OUT/sanitize_summary.txt"
