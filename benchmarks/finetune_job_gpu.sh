#!/usr/bin/env bash
# Issue 18's job-level comparison on the lent GPU machine (benchmarks/finetune_job.py).
# The whole sequence runs longer than one device call, so `start` launches it
# in a session of its own and `wait` follows it over later calls (the scratch
# directory stays while the machine is warm). Wheels of what the image lacks:
# --wheels (the study's) and --trl-wheels (trl, liger-kernel); launcher_options.sh.
#   [JOBS="ours ours trl:packing+compile"] [JOB_TIMEOUT=s] [LOADS=2] [OUT=DIR] \
#       bash benchmarks/finetune_job_gpu.sh start|wait [--scratch DIR] [--wheels DIR] [--trl-wheels DIR]
set -euo pipefail
step=$1; shift
. benchmarks/launcher_options.sh
out=${OUT:-$scratch/finetune_job_out}
results=$scratch/finetune_job_results
work=$scratch/finetune_job
mkdir -p "$out" "$results"
case $step in
  # A sequence left from an earlier call would end the next `wait` at once.
  start) rm -f $scratch/finetune_job.done; setsid nohup bash "$0" sequence "${options[@]}" > $scratch/finetune_job.out 2>&1 < /dev/null & sleep 20 ;;
  sequence)
    . benchmarks/device_setup.sh
    [ -d $scratch/site18 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $scratch/site18 "$trl_wheels"/*.whl
    export PYTHONPATH=$scratch/site18:$site:$PWD/src
    [ -f $work/preset/config.json ] || { /usr/bin/time -v python3 -m benchmarks.finetune_job prepare --work $work 2>&1 | tail -30; }
    # Each of our batchings twice (empty, then warm compilation cache), then TRL's, eager and compiled.
    jobs=${JOBS:-ours+packing ours+packing ours ours trl:packing trl:packing+nockpt trl:packing+nockpt+liger trl:packing+compile trl:padded trl:padding_free trl:padding_free+compile}
    python3 -m benchmarks.finetune_job run --work $work --out $results --jobs $jobs ${JOB_TIMEOUT:+--job-timeout $JOB_TIMEOUT}
    # Then the preset's load alone, KerasHub's against ours, each in a fresh process.
    [ "${LOADS:-2}" = 0 ] || python3 -m benchmarks.finetune_job load --preset $work/preset --out $results/load --repeats "${LOADS:-2}"
    touch $scratch/finetune_job.done ;;
  wait) for _ in $(seq "${WAIT_ROUNDS:-100}"); do [ -f $scratch/finetune_job.done ] && break; sleep 5; done ;;
esac
tail -n 20 $scratch/finetune_job.out 2>/dev/null | cut -c1-700 || true
cp -r $results/* "$out"/ 2>/dev/null || true
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
