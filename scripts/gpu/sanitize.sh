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
# KVZIP_SANITIZE_SPLIT="tool:binary ..." runs those once per architecture (KVZIP_TEST_ARCH),
# in separate processes: racecheck's host shadow memory of all architectures in one process
# outgrew the machine's 125 GiB.
split="${KVZIP_SANITIZE_SPLIT:-racecheck:batch}"
archs="${KVZIP_SANITIZE_ARCHS:-llama qwen2 qwen3 gemma3 mistral phi3}"
for t in "$bundle"/tests/*; do
  for tool in memcheck racecheck synccheck initcheck; do
    if [ -n "${KVZIP_SANITIZE_ONLY:-}" ] && [[ " $KVZIP_SANITIZE_ONLY " != *" $tool:$(basename "$t") "* ]]; then continue; fi
    if [[ " $split " == *" $tool:$(basename "$t") "* ]]; then
      for a in $archs; do jobs="$jobs $tool:$t@$a"; done
    else
      jobs="$jobs $tool:$t"
    fi
  done
done
# Intentional API errors (the bad-device-ordinal test) are the program's to report, not the
# sanitizer's: --report-api-errors no.
echo $jobs | tr ' ' '\n' | xargs -P "${KVZIP_SANITIZE_JOBS:-12}" -I{} bash -c '
  tool=${1%%:*}; rest=${1#*:}; t=${rest%@*}; arch=""; [ "$rest" != "$t" ] && arch=${rest##*@}
  name=$(basename "$t")${arch:+@$arch}
  log='"$logs"'/$tool-$name.log
  extra="--report-api-errors no ${KVZIP_SANITIZE_EXTRA:-}"; [ "$tool" = memcheck ] && extra="$extra --leak-check no"
  KVZIP_TEST_ARCH="$arch" timeout '"$cap"' compute-sanitizer --tool $tool $extra "$t" --test-threads=1 > "$log" 2>&1
  rc=$?
  errs=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$log" | tail -1 | grep -Eo "[0-9]+")
  # racecheck reports "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)".
  [ -z "$errs" ] && errs=$(grep -Eo "\([0-9]+ errors" "$log" | grep -Eo "[0-9]+" | awk "{s+=\$1} END {if (NR) print s}")
  [ -z "$errs" ] && errs="?"
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
