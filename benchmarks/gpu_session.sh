#!/usr/bin/env bash
# Everything a GPU session should measure, in one device call: the GPU tests first (kernels against the
# PyTorch reference), then the benchmarks, each bounded in time. Results go to $OUT (the device tool's
# folder; default ./gpu-out) in at most 8 files. Run from the repository root on the device machine:
#
#   ../shared/hooks/device-wheels        # here, once: .whl/ with what the GPU image lacks
#   device run (carry .whl):  bash benchmarks/gpu_session.sh            # one GPU
#                             GPUS=2 bash benchmarks/gpu_session.sh     # two GPUs: adds TP=2 and the pair tests
#   STAGES="tests kernels" (any of tests kernels engine profiles tp2), VARIANTS=bf16,wint4, HF= (no HF baseline)
#   split it over calls that each fit the device tool's 10 minutes.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
GPUS=${GPUS:-1}
log="$OUT/session.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
} >"$log" 2>&1
run() {  # run NAME SECONDS COMMAND...: bounded, logged, never stops the session
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))" >>"$log"
  timeout "$secs" "$@" >>"$log" 2>&1
  echo "=== $name exit $?" >>"$log"
}
stage() { [[ " ${STAGES:-tests kernels engine profiles tp2} " == *" $1 "* ]]; }  # STAGES picks a subset
marks="gpu"; [ "$GPUS" -ge 2 ] && marks="gpu or gpu2"
stage tests && run gpu-tests 300 python3 -m pytest -q --tb=short -m "$marks" \
  tests/engine tests/models tests/transfer tests/cluster/test_disaggregated_gpu.py
stage kernels && run attention-kernels 150 python3 benchmarks/attention_kernels.py --out "$OUT/attention_kernels.json"
stage kernels && run wint-matmul 150 python3 benchmarks/wint_matmul.py --out "$OUT/wint_matmul.json"
stage engine && run engine-speed 600 python3 benchmarks/engine_speed.py --model llama3-8b \
  --variants "${VARIANTS:-bf16,bf16-eager,wint8,wint4}" ${HF---hf} --out "$OUT/engine_speed.json"
stage profiles && run profile-bf16 300 python3 -m pdlab.profile --model llama3-8b --device cuda \
  --out "$OUT/profile_llama3-8b_bf16_tp1.csv"
stage profiles && run profile-wint4 300 python3 -m pdlab.profile --model llama3-8b --device cuda --quantization wint4 \
  --out "$OUT/profile_llama3-8b_wint4_tp1.csv"
if [ "$GPUS" -ge 2 ] && stage tp2; then
  run engine-speed-tp2 600 python3 benchmarks/engine_speed.py --model llama3-8b --variants bf16,wint4 \
    --tensor-parallel-size 2 --prefill 2048 --out "$OUT/engine_speed_tp2.json"
fi
echo "done $(date +%T)" >>"$log"
tail -n 60 "$log"
