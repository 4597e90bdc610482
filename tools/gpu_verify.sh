#!/usr/bin/env bash
# One GPU session's whole verification in one call, each step under its own time limit:
# the GPU suite (tools/gpu_check.sh), `moe-core run` for every preset on the cuda backend,
# `moe-core configs`, the side-by-side benchmark (bf16 with tuned-vs-default, then fp8) and
# the transformers patch benchmark.
#
# usage: tools/gpu_verify.sh [LOG_DIR] [PYTEST_WORKERS]
#   LOG_DIR defaults to $OUT, else ./gpu_logs. At most 8 files land there (the device tool's
#   limit): gpu_check.log, junit.xml, cli.log, bench.tgz, hf_bench.log.
# SKIP_HF=1 / SKIP_FP8=1 leave out the transformers patch benchmark / the fp8 benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${1:-${OUT:-./gpu_logs}}"
WORKERS="${2:-8}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
step() {  # step SECONDS LOGFILE CMD...: run CMD under a time limit, appending to LOGFILE
  local limit=$1 log=$2; shift 2
  echo "== $(date -u +%T) [$limit s] $*" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "== exit $? ($*)" | tee -a "$log"
}

# 1. correctness: the GPU suite (installs the package offline first)
timeout "${GPU_SUITE_S:-260}" bash tools/gpu_check.sh "$LOG_DIR" -n "$WORKERS" >/dev/null 2>&1
echo "== gpu suite exit $?"; grep -E "passed|failed|error" "$LOG_DIR/gpu_check.log" | tail -3

# 2. the main job on every preset, and which config files an H100/H200 uses
CLI="$LOG_DIR/cli.log"
for model in mixtral-8x7b qwen3-30b-a3b deepseek-v2-lite deepseek-v3 gpt-oss-20b; do
  step 45 "$CLI" python3 -m moe_core run --model "$model" --backend cuda --dtype bfloat16 --tokens 64
done
step 30 "$CLI" python3 -m moe_core configs --model qwen3-30b-a3b --dtype bfloat16
grep -E "^(model|backend|normalised|PASS|FAIL)" "$CLI"

# 3. speed: bf16 with tuned-vs-default and fused activation, the HF patch benchmark, then fp8 block [128,128]
BENCH=bench_out
keep() { tar czf "$LOG_DIR/bench.tgz" "$BENCH" 2>/dev/null; }   # after each step: a later kill keeps it
step "${BENCH_BF16_S:-170}" "$CLI" python3 -m moe_core bench --compare-default --compare-fused --out "$BENCH"; keep
[ -n "${SKIP_HF:-}" ] || step 60 "$LOG_DIR/hf_bench.log" python3 benchmarks/hf_patch_bench.py --json "$BENCH/hf_bench.json"; keep
[ -n "${SKIP_FP8:-}" ] || step "${BENCH_FP8_S:-90}" "$CLI" python3 -m moe_core bench --dtype fp8 --compare-default --out "$BENCH"; keep
cat "$BENCH"/bench_*.md 2>/dev/null
