#!/usr/bin/env bash
# The large evaluation runs (scripts/eval/run_large.sh's tasks and sizes) on the GPU machine,
# with the CUDA build of the CLI from the bundle (`cargo xtask gpu`). A real model is larger
# than one call's 64 MiB, so it travels in parts over several back-to-back calls while the
# machine stays warm (files outside the repository survive between calls only then):
#   here:   bash scripts/gpu/eval.sh pack [MODEL_DIR]      # .gpu/xfer/part-NN + data.tar.xz
#   device: bash scripts/gpu/eval.sh receive               # one call per part (carry the part;
#           the first call also carries .gpu/bundle.tar.xz and .gpu/xfer/data.tar.xz)
#   device: bash scripts/gpu/eval.sh run [SECONDS]         # all tasks in parallel, resumable;
#           results come back as $OUT/eval.tar.gz (unpack into bench/eval/<model>-h200/)
# TASKS (default: needle kv-retrieval squad multi-query gsm8k) and RATIOS as in run_large.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
stage=/tmp/kvzip-xfer
results=/tmp/kvzip-eval-results
mode="${1:-run}"

case "$mode" in
  pack)
    model="${2:-$HOME/.cache/kvzip/models/qwen2.5-coder-0.5b-instruct}"
    data="${KVZIP_DATA:-../shared/data}"
    rm -rf .gpu/xfer && mkdir -p .gpu/xfer
    # xz saves ~8 % (one call); the first part is smaller so it travels with the bundle.
    tar -C "$(dirname "$model")" -cf - "$(basename "$model")" | xz -T2 -3 > .gpu/xfer/model.tar.xz
    head -c 48M .gpu/xfer/model.tar.xz > .gpu/xfer/part-00
    tail -c +$((48 * 1024 * 1024 + 1)) .gpu/xfer/model.tar.xz | split -b 60M -d -a 2 --numeric-suffixes=1 - .gpu/xfer/part-
    rm .gpu/xfer/model.tar.xz
    tar -C "$data" -cJf .gpu/xfer/data.tar.xz squad-v1.1 gsm8k pg-essays
    (cd .gpu/xfer && sha256sum part-* > parts.sha256)
    ls -la .gpu/xfer
    ;;
  receive)
    mkdir -p "$stage"
    if [ -f .gpu/bundle.tar.xz ] && [ ! -x "$stage/bundle/kvzip" ]; then
      tar -C "$stage" -xJf .gpu/bundle.tar.xz
    fi
    if [ -f .gpu/xfer/data.tar.xz ] && [ ! -d "$stage/data" ]; then
      mkdir -p "$stage/data" && tar -C "$stage/data" -xJf .gpu/xfer/data.tar.xz
    fi
    cp .gpu/xfer/parts.sha256 "$stage/" 2>/dev/null
    for p in .gpu/xfer/part-*; do [ -f "$p" ] && cp "$p" "$stage/"; done
    (cd "$stage" && ls -la && sha256sum -c --quiet parts.sha256 2>&1 | tail -3)
    ;;
  run)
    limit="${2:-540}"
    source scripts/gpu/env.sh
    OUT="${OUT:-/tmp/kvzip-gpu-out}"
    mkdir -p "$OUT" "$results"
    if [ ! -d "$stage/model" ]; then
      (cd "$stage" && sha256sum -c --quiet parts.sha256) || { echo "model parts missing or corrupt"; exit 1; }
      mkdir -p "$stage/model" && cat "$stage"/part-* | tar -C "$stage/model" -xJf - && rm -f "$stage"/part-*
    fi
    model="$(ls -d "$stage"/model/*)"
    name="$(basename "$model")"
    bin="$stage/bundle/kvzip"
    ratios="${RATIOS:-0.1,0.2,0.3,0.5,0.7,1.0}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
    task_args() {
      case "$1" in
        squad)        echo "--data squad --num 60 --max-questions 5" ;;
        needle)       echo "--data needle --num 60 --context-tokens 1000,2000,4000 --depths 0,25,50,75,100" ;;
        kv-retrieval) echo "--data kv-retrieval --num 60 --keys 1 --context-tokens 1000,2000,4000" ;;
        multi-query)  echo "--data needle-multikey --num 40 --keys 5 --context-tokens 2000" ;;
        gsm8k)        echo "--data gsm8k --num 100" ;;
      esac
    }
    for task in ${TASKS:-needle kv-retrieval squad multi-query gsm8k}; do
      # shellcheck disable=SC2046
      echo "=== $(date -u +%FT%TZ) $task: kvzip eval --device cuda --model $name --ratios $ratios $(task_args "$task")" >> "$results/commands.log"
      timeout "$limit" "$bin" eval --device cuda --model "$model" --data-dir "$stage/data" \
        --ratios "$ratios" --out "$results/$task" $(task_args "$task") \
        > /dev/null 2>> "$results/$task.log" &
    done
    wait
    for task in ${TASKS:-needle kv-retrieval squad multi-query gsm8k}; do
      echo "$task: $(ls "$results/$task/examples" 2>/dev/null | wc -l) examples" >> "$results/commands.log"
    done
    tail -n 20 "$results/commands.log"
    tar -C "$results" -czf "$OUT/eval.tar.gz" .
    ;;
  *) echo "usage: eval.sh pack [MODEL_DIR] | receive | run [SECONDS]"; exit 2 ;;
esac
