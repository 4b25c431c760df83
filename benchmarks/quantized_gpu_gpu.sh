#!/usr/bin/env bash
# LoRA on a quantized base on the lent GPU machine (benchmarks/quantized_gpu.py).
# Longer than one device call: `start` launches it in a session of its own and
# `wait` follows it over later calls (the scratch directory stays while the
# machine is warm); the results land in $OUT. Options: launcher_options.sh.
#   [OUT=DIR] bash benchmarks/quantized_gpu_gpu.sh start|wait [--scratch DIR] [--wheels DIR]
set -euo pipefail
step=$1; shift
. benchmarks/launcher_options.sh
out=${OUT:-$scratch/quantized_gpu_out}
mkdir -p "$out"
case $step in
  # A sequence left from an earlier call would end the next `wait` at once.
  start) rm -f $scratch/quantized_gpu.done; setsid nohup bash "$0" sequence "${options[@]}" > $scratch/quantized_gpu.out 2>&1 < /dev/null & sleep 20 ;;
  sequence)
    . benchmarks/device_setup.sh
    export PYTHONPATH=$site:$PWD/src:$PWD
    python3 -m benchmarks.quantized_gpu run --out "$out"
    touch $scratch/quantized_gpu.done ;;
  wait) for _ in $(seq "${WAIT_ROUNDS:-100}"); do [ -f $scratch/quantized_gpu.done ] && break; sleep 5; done ;;
esac
