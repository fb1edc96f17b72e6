#!/usr/bin/env bash
# The large evaluation runs of bench/eval (issue: evaluation at a size that supports
# conclusions). Resumable: rerunning skips finished examples. Each task writes its results
# folder under bench/eval/<model>/<task>/ and a report beside it.
#   KVZIP_BIN   kvzip binary to use (default: target/release/kvzip)
#   MODEL       model name or directory (default: qwen2.5-coder-0.5b-instruct)
#   TASKS       which tasks, in order (default: squad needle kv-retrieval multi-query gsm8k)
set -uo pipefail
cd "$(dirname "$0")/../.."
bin="${KVZIP_BIN:-target/release/kvzip}"
model="${MODEL:-qwen2.5-coder-0.5b-instruct}"
name="$(basename "$model")"
root="bench/eval/$name"
ratios="0.1,0.2,0.3,0.5,0.7,1.0"
mkdir -p "$root"
run() {
  local task="$1"; shift
  echo "=== $(date -u +%FT%TZ) $task: $bin eval --model $model --ratios $ratios --out $root/$task $*" | tee -a "$root/commands.log"
  "$bin" eval --model "$model" --ratios "$ratios" --out "$root/$task" "$@" 2>> "$root/$task.log"
  echo "=== $(date -u +%FT%TZ) $task rc=$?" | tee -a "$root/commands.log"
}
for task in ${TASKS:-squad needle kv-retrieval multi-query gsm8k}; do
  case "$task" in
    squad)        run squad --data squad --num 60 --max-questions 5 ;;
    needle)       run needle --data needle --num 60 --context-tokens 1000,2000,4000 --depths 0,25,50,75,100 ;;
    kv-retrieval) run kv-retrieval --data kv-retrieval --num 60 --keys 1 --context-tokens 1000,2000,4000 ;;
    multi-query)  run multi-query --data needle-multikey --num 40 --keys 5 --context-tokens 2000 ;;
    gsm8k)        run gsm8k --data gsm8k --num 100 ;;
    *) echo "unknown task $task" ;;
  esac
done
"$bin" report --results "$root" --out "$root/report" >> "$root/report.log" 2>&1
