#!/usr/bin/env bash
# Install moe-core offline on a GPU machine and run the GPU suite (pytest -m "gpu and not sanitizer";
# pass `-m sanitizer` as an extra argument for the compute-sanitizer cases instead).
#
# usage: tools/gpu_check.sh [LOG_DIR] [extra pytest args...]
#   LOG_DIR defaults to $OUT when set, else ./gpu_logs. Writes LOG_DIR/gpu_check.log
#   (environment, install, pytest output) and LOG_DIR/junit.xml. Exit status: pytest's.
# The machine needs torch, triton, pytest, pluggy, attrs, hypothesis already installed.
# Parallel workers (pytest-xdist) share the GPU's memory: `-n 4` fits an 80 GB H100; at `-n 8` the
# largest cases (int32-overflow shapes, big LoRA grids) ran out of memory there (a 141 GB H200 held it).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${1:-${OUT:-./gpu_logs}}"
shift || true
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
PY="${PYTHON:-python3}"
{
  echo "== $(date -u +%FT%TZ) moe-core GPU check in $(pwd)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  echo "== install (offline, no deps)"
} 2>&1 | tee "$LOG"
if ! "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >>"$LOG" 2>&1; then
  echo "pip install failed; see $LOG" | tee -a "$LOG"
  exit 2
fi
echo "== pytest -m 'gpu and not sanitizer' $*" | tee -a "$LOG"
start=$(date +%s)
PYTHONUNBUFFERED=1 "$PY" -m pytest -m "gpu and not sanitizer" -p no:cacheprovider -q -rs --durations=15 \
  --junitxml="$LOG_DIR/junit.xml" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "== pytest exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
exit "$rc"
