#!/usr/bin/env bash
# benchmarks/gpu_lora.py's phases on the lent GPU machine, for runs longer than one device call:
# `start` launches them in a session of its own, `wait` follows over later calls (the scratch
# directory stays while the machine is warm) and copies the results so far to $OUT, so a lease
# that ends first still brings back the rows that finished. Options: launcher_options.sh.
#   PHASES="gemma4" [MODEL=gemma4_e4b] [OUT=DIR] bash benchmarks/gpu_lora_gpu.sh start|wait [--scratch DIR] [--wheels DIR]
set -euo pipefail
step=$1; shift
. benchmarks/launcher_options.sh
run=$scratch/gpu_lora_out
case $step in
  # A sequence left from an earlier call would end the next `wait` at once.
  start) rm -f $scratch/gpu_lora.done; setsid nohup bash "$0" sequence "${options[@]}" > $scratch/gpu_lora.out 2>&1 < /dev/null & sleep 20 ;;
  sequence)
    . benchmarks/device_setup.sh
    export PYTHONPATH=$site:$PWD/src:$PWD
    python3 -m benchmarks.gpu_lora run --phases ${PHASES:?name the phases of benchmarks/gpu_lora.py} ${MODEL:+--model $MODEL} --out $run
    touch $scratch/gpu_lora.done ;;
  wait)
    for _ in $(seq "${WAIT_ROUNDS:-100}"); do [ -f $scratch/gpu_lora.done ] && break; sleep 5; done
    tail -3 $scratch/gpu_lora.out
    [ -z "${OUT:-}" ] || cp -r $run/. $scratch/gpu_lora.out "$OUT"/ ;;
esac
