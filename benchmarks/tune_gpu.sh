#!/usr/bin/env bash
# Tune the shipped cuda tables on the device machine (issue 4 item 4).
# usage: benchmarks/tune_gpu.sh DEADLINE_S DTYPE[:BLOCK] MODEL...   (results resume from .tune_out/)
# Stops starting new models after DEADLINE_S seconds; tars .tune_out into $OUT/tuned<GPU>.tgz at
# the end. Several copies may run at once, one per GPU (CUDA_VISIBLE_DEVICES): each model is
# claimed by the first copy to reach it (a directory under $CLAIMS, default /tmp/moe_tune_claims,
# which lives only as long as the machine), so one list serves every GPU.
set -u
deadline=$1; shift
dtype=$1; shift
start=$(date +%s)
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
gpu=${CUDA_VISIBLE_DEVICES:-all}
gpu=${gpu//,/_}
claims=${CLAIMS:-/tmp/moe_tune_claims}
mkdir -p "$out" .tune_out "$claims"
python3 -c "import moe_core" 2>/dev/null ||   # installed already (by another copy or gpu_check.sh)?
  python3 -m pip install --no-build-isolation --no-deps --no-index -q -e . >"$out/pip$gpu.log" 2>&1 ||
  { echo "pip install failed"; tail -5 "$out/pip$gpu.log"; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
block=()
case $dtype in *:*) block=(--block-shape "${dtype#*:}"); dtype=${dtype%%:*};; esac
for model in "$@"; do
  now=$(( $(date +%s) - start ))
  left=$(( deadline - now ))
  if [ "$left" -lt 30 ]; then echo "SKIP $model: ${now}s used"; continue; fi
  mkdir "$claims/$model-$dtype" 2>/dev/null || { echo "== $model: taken by another GPU"; continue; }
  echo "== gpu $gpu: $model $dtype ${block[*]} (t=${now}s, ${left}s left)"
  timeout "$left" python3 -m moe_core tune --model "$model" --dtype "$dtype" "${block[@]}" --fast --out .tune_out \
      2>&1 | grep -v $'\r' | tee -a "$out/tune$gpu.log" | grep -E "^(up |down |gemm|device|==|Traceback)|Error|precompiled|WARNING"
  echo "== gpu $gpu: $model rc=${PIPESTATUS[0]} t=$(( $(date +%s) - start ))s"
done
tar czf "$out/tuned$gpu.tgz" .tune_out
