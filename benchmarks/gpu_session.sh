#!/usr/bin/env bash
# Everything a GPU session should measure, in one device call: the GPU tests first (kernels against the
# PyTorch reference), then the benchmarks, each bounded in time. Results go to $OUT (the device tool's
# folder; default ./gpu-out) in at most 8 files. Run from the repository root on the device machine:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform any -d .whl fastapi uvicorn pyzmq msgspec simpy redis gguf ...   # once, on a machine with
#                                        # a network: .whl/ with the wheels the GPU image lacks (if any)
#   device run (carry .whl):  bash benchmarks/gpu_session.sh            # one GPU
#                             GPUS=2 bash benchmarks/gpu_session.sh     # two GPUs: adds TP=2 and the pair tests
#   STAGES="tests kernels" (any of tests kernels engine compiled profiles experiment sharing smoke one_gpu_conversation
#   one_gpu_code tp2), VARIANTS=bf16,wint4, PROFILES=bf16 (of bf16 wint4), HF= (no HF baseline): split it over
#   calls that each fit the device tool's 10 minutes. The one-GPU experiments take ~9 minutes each: one a call.
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
stage() { [[ " ${STAGES:-tests kernels engine profiles experiment tp2} " == *" $1 "* ]]; }  # STAGES picks a subset
profile() { [[ " ${PROFILES:-bf16 wint4} " == *" $1 "* ]]; }
# Seconds each stage took on an H200 (2026-12-01): tests ~110, kernels ~150, engine ~200 (+ ~60 with the HF
# baseline), profiles ~100 each, experiment ~75 for one GPU. Keep a device call under its 10 minutes.
marks="gpu"; [ "$GPUS" -ge 2 ] && marks="gpu or gpu2"
kernel_tests="tests/models/test_fused_kernels.py tests/models/test_wint_matmul.py tests/models/test_paged_attention.py \
  tests/engine/test_cuda_graphs.py"  # these run on the GPU when there is one, whatever their marks
stage tests && run kernel-tests 200 python3 -m pytest -q --tb=short $kernel_tests
stage tests && run gpu-tests 300 python3 -m pytest -q --tb=short -m "$marks" \
  tests/models tests/transfer tests/engine/test_quantized_engine.py tests/engine/test_tensor_parallel_gpu.py \
  tests/cluster/test_disaggregated_gpu.py
stage kernels && run attention-kernels 150 python3 benchmarks/attention_kernels.py --out "$OUT/attention_kernels.json"
stage kernels && run wint-kernels 400 python3 benchmarks/wint_kernels.py --write-table --out "$OUT/wint_kernels.json"
stage kernels && run decode-breakdown 300 python3 benchmarks/decode_breakdown.py --out "$OUT/decode_breakdown.json"
stage engine && run engine-speed 600 python3 benchmarks/engine_speed.py --model llama3-8b \
  --variants "${VARIANTS:-bf16,bf16-async,bf16-eager,wint8,wint4,wint4-async}" ${HF---hf} --out "$OUT/engine_speed.json"
stage engine && run step-gaps 150 python3 benchmarks/step_gaps.py --decode 1,8,64 --mixed 16:1,256:16,960:64 \
  --out "$OUT/step_gaps.json"
# A gpt-fast-style compiled decode step of the same shape (torch.compile; its compile time not yet measured here):
# compare it with the engine stage's bf16 steps of the same call only.
stage compiled && run compiled 300 python3 benchmarks/compiled_llama.py --model llama3-8b --batches 1,64
# The grid experiments/h200_single_conversation.yaml's replay needs (save as data/profiles/llama3-8b_<q>_tp1_<card>.csv).
grid="--prefill-tokens 16,64,256,512,1024,2048,4096,8192 --decode-batches 1,4,16,32,64,128 --decode-contexts ${CONTEXTS:-128,512,1024,2048}"
stage profiles && profile bf16 && run profile-bf16 300 python3 -m pdlab.profiler --model llama3-8b --device cuda --dtype bfloat16 $grid \
  --out "$OUT/llama3-8b_bf16_tp1.csv"
stage profiles && profile wint4 && run profile-wint4 300 python3 -m pdlab.profiler --model llama3-8b --device cuda --dtype bfloat16 $grid \
  --quantization wint4 --out "$OUT/llama3-8b_wint4_tp1.csv"
if stage experiment; then  # one served run; its results folder comes back as one archive
  exp=experiments/h200_single_conversation.yaml; [ "$GPUS" -ge 2 ] && exp=experiments/h100_pair_conversation.yaml
  run experiment 500 python3 -m pdlab.run "$exp" --output-dir /tmp/pdlab-results --no-progress
  tar czf "$OUT/results.tgz" -C /tmp/pdlab-results . 2>>"$log"
fi
# Instances sharing one GPU: memory shares, mapped weights, MPS limits; the MPS modes and the KV hand-off on one GPU.
stage sharing && run sharing-tests 300 python3 -m pytest -q --tb=short -rs tests/cluster/test_one_gpu.py \
  tests/cluster/test_gpu_sharing.py tests/engine/test_memory.py
stage sharing && run mps-split 150 python3 benchmarks/mps_split.py --out "$OUT/mps_split.json"
stage sharing && run kv-transfer-one-gpu 150 python3 benchmarks/kv_transfer.py --one-gpu --skip-ttft \
  --out "$OUT/kv_transfer_one_gpu.json"
experiment() {  # experiment NAME SECONDS [ARGS...]: one experiment file; its results folder comes back as one archive
  local name=$1 secs=$2; shift 2
  run "$name" "$secs" python3 -m pdlab.run "experiments/${name%%-*}.yaml" --output-dir /tmp/pdlab-results --no-progress "$@"
  tar czf "$OUT/$name.tgz" -C /tmp/pdlab-results . 2>>"$log"
  rm -rf /tmp/pdlab-results
}
# A short run of the one-GPU file: start-up times, and every layout kind once.
stage smoke && experiment one_gpu_conversation-smoke 200 --set workload.num_requests=40 --set warmup_requests=8 \
  --set "sweep.rates_rps=[16]" --runs colocated,1p1d-time,1p1d-mps-p70-d100
stage one_gpu_conversation && experiment one_gpu_conversation "${EXPERIMENT_S:-560}"
stage one_gpu_code && experiment one_gpu_code "${EXPERIMENT_S:-560}"
if [ "$GPUS" -ge 2 ] && stage tp2; then
  run engine-speed-tp2 600 python3 benchmarks/engine_speed.py --model llama3-8b --variants bf16,wint4 \
    --tensor-parallel-size 2 --prefill 2048 --out "$OUT/engine_speed_tp2.json"
fi
echo "done $(date +%T)" >>"$log"
tail -n 60 "$log"
