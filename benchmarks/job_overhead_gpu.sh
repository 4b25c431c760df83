#!/usr/bin/env bash
# Issue 13's measurements on the lent GPU machine, one step per device call
# (each under its 10-minute limit; $scratch stays between calls while the machine
# is warm). Wheels of what the image lacks are carried in .whl/, the workflow
# as it was before the change in .old/ (git archive of the earlier commit).
#   bash benchmarks/job_overhead_gpu.sh old|new_cold|new_warm|logits [--scratch DIR] [--wheels DIR] [--old DIR]
# (options: launcher_options.sh; --old is the earlier checkout, .old by default)
# The paper grid's 2B half runs longer than one call: `paper_a` (or `paper_b`)
# starts it in a session of its own, `wait` follows it over later calls.
set -euo pipefail
step=$1; shift
. benchmarks/launcher_options.sh
out=${OUT:-$scratch/job_overhead}
mkdir -p "$out" $scratch/results
. benchmarks/device_setup.sh
config=$PWD/benchmarks/configs/gpu_2b_shape.yaml
printf 'compilation_cache: {dir: %s}\n' "$scratch/jax_cache" > $scratch/cache.yaml

workflow() {  # label checkout [snakemake args...]
  local label=$1 checkout=$2; shift 2
  PYTHONPATH=$site:$checkout/src python3 -m benchmarks.job_overhead workflow --checkout "$checkout" \
    --workdir $scratch/wf_$label --label "$label" --out $scratch/results -- --cores all --resources gpu=1 --configfile "$@"
}
paper=(config/paper.yaml benchmarks/configs/paper_2b_shape.yaml)
case $step in
  old) rm -rf $scratch/wf_before $scratch/results/workflow_before.log; workflow before "$(realpath "$old")" "$config" ;;
  new_cold) rm -rf $scratch/jax_cache; workflow after_cold_cache "$PWD" "$config" $scratch/cache.yaml ;;
  new_warm) workflow after_warm_cache "$PWD" "$config" $scratch/cache.yaml ;;
  paper_a|paper_b) setsid nohup bash "$0" "run_$step" "${options[@]}" > $scratch/$step.out 2>&1 < /dev/null & sleep 5 ;;
  run_paper_?) part=${step#run_paper_}
    workflow paper_2b_part_$part "$PWD" "${paper[@]}" benchmarks/configs/paper_part_$part.yaml $scratch/cache.yaml
    touch $scratch/paper_$part.done ;;
  wait) for _ in $(seq ${WAIT_ROUNDS:-100}); do ls $scratch/paper_?.done >/dev/null 2>&1 && break; sleep 5; done
    tail -n 4 $scratch/wf_paper_2b_part_?/.snakemake/log/*.log || true
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader ;;
  logits) PYTHONPATH=$site:$PWD/src python3 -m benchmarks.job_overhead logits --model gemma_2b --batches 4 8 --out $scratch/results ;;
esac
cp $scratch/results/* "$out"/ 2>/dev/null || true
tail -n 3 $scratch/results/results.jsonl 2>/dev/null | cut -c1-600 || true
