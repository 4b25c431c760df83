#!/usr/bin/env bash
# Issue 18's job-level comparison on the lent GPU machine (benchmarks/finetune_job.py).
# The whole sequence runs longer than one device call, so `start` launches it
# in a session of its own and `wait` follows it over later calls (/tmp stays
# while the machine is warm). Wheels of what the image lacks: .whl/ (the study's)
# and .whl18/ (trl, liger-kernel).
#   [JOBS="ours ours trl:packing+compile"] [JOB_TIMEOUT=s] [LOADS=2] bash benchmarks/finetune_job_gpu.sh start|wait
set -euo pipefail
out=${OUT:-/tmp/finetune_job_out}
results=/tmp/finetune_job_results
work=/tmp/finetune_job
mkdir -p "$out" "$results"
case $1 in
  start) setsid nohup bash "$0" sequence > /tmp/finetune_job.out 2>&1 < /dev/null & sleep 20 ;;
  sequence)
    . benchmarks/device_setup.sh
    [ -d /tmp/site18 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site18 .whl18/*.whl
    export PYTHONPATH=/tmp/site18:$site:$PWD/src
    [ -f $work/preset/config.json ] || { /usr/bin/time -v python3 -m benchmarks.finetune_job prepare --work $work 2>&1 | tail -30; }
    # Each of our batchings twice (empty, then warm compilation cache), then TRL's, eager and compiled.
    jobs=${JOBS:-ours+packing ours+packing ours ours trl:packing trl:packing+nockpt trl:packing+nockpt+liger trl:packing+compile trl:padded trl:padding_free trl:padding_free+compile}
    python3 -m benchmarks.finetune_job run --work $work --out $results --jobs $jobs ${JOB_TIMEOUT:+--job-timeout $JOB_TIMEOUT}
    # Then the preset's load alone, KerasHub's against ours, each in a fresh process.
    [ "${LOADS:-2}" = 0 ] || python3 -m benchmarks.finetune_job load --preset $work/preset --out $results/load --repeats "${LOADS:-2}"
    touch /tmp/finetune_job.done ;;
  wait) for _ in $(seq "${2:-100}"); do [ -f /tmp/finetune_job.done ] && break; sleep 5; done ;;
esac
tail -n 20 /tmp/finetune_job.out | cut -c1-700
cp -r $results/* "$out"/ 2>/dev/null || true
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
