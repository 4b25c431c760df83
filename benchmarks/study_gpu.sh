#!/usr/bin/env bash
# Issue 25's study benchmark on the lent GPU machine: the mini grid
# (benchmarks/configs/gpu_2b_shape.yaml over config/config.yaml) through
# Snakemake, as a user runs it, with this checkout (jobs grouped, the default)
# and with the version before it (a checkout in --old DIR, e.g. `git archive
# 1ca91ac | tar -x -C .old`), each from an empty compilation cache and again
# warm; benchmarks/job_overhead.py records each job's split and GPU busy.
# The sequence runs longer than one device call: `start` launches it in a
# session of its own and `wait` follows it over later calls (the scratch
# directory stays while the machine is warm). Options: launcher_options.sh.
#   [STEPS="new_cold new_warm old_cold old_warm new_cold_paper9 old_cold_paper3"] [OUT=DIR] \
#       bash benchmarks/study_gpu.sh start|wait [--scratch DIR] [--wheels DIR] [--old DIR]
set -euo pipefail
step=$1; shift
. benchmarks/launcher_options.sh
out=${OUT:-$scratch/study_out}
results=$scratch/study_results
mkdir -p "$out" "$results"
case $step in
  # A sequence left from an earlier call would end the next `wait` at once.
  start) rm -f $scratch/study.done; setsid nohup bash "$0" sequence "${options[@]}" > $scratch/study.out 2>&1 < /dev/null & sleep 5 ;;
  sequence)
    . benchmarks/device_setup.sh
    old=$(realpath "$old")
    # A step is VERSION_CACHE (mini grid) or VERSION_CACHE_paper9 / _paper6 / _paper3: the paper's
    # 1k cell with three seeds (9 runs), two (6 runs) or one (3 runs); _paper5k / _paper15k: the
    # 5k or 15k cell with three seeds; _paper5k1: the 5k cell with one seed; _paper2b: the whole
    # Gemma 2B half (all three cells, three seeds) in one run; each over config/paper.yaml and
    # paper_2b_shape.yaml.
    for one in ${STEPS:-new_cold new_warm old_cold old_warm}; do
      IFS=_ read -r version warmth grid <<< "$one"
      cache=$scratch/jax_cache_$version
      checkout=$PWD; [ "$version" = old ] && checkout=$old
      [ "$warmth" = cold ] && rm -rf "$cache"
      printf 'compilation_cache: {dir: %s}\n' "$cache" > $scratch/cache_$version.yaml
      case $grid in
        "") configs=("$checkout/benchmarks/configs/gpu_2b_shape.yaml") ;;
        paper9|paper6|paper3|paper5k|paper5k1|paper15k|paper2b) layer=$PWD/benchmarks/configs/paper_1k_three_seeds.yaml
          [ "$grid" = paper6 ] && layer=$PWD/benchmarks/configs/paper_1k_two_seeds.yaml
          [ "$grid" = paper3 ] && layer=$PWD/benchmarks/configs/paper_1k_one_seed.yaml
          [ "$grid" = paper5k ] && layer=$PWD/benchmarks/configs/paper_5k_three_seeds.yaml
          [ "$grid" = paper5k1 ] && layer=$PWD/benchmarks/configs/paper_5k_one_seed.yaml
          [ "$grid" = paper15k ] && layer=$PWD/benchmarks/configs/paper_15k_three_seeds.yaml
          [ "$grid" = paper2b ] && layer=$PWD/benchmarks/configs/paper_2b_three_seeds.yaml
          configs=("$checkout/config/paper.yaml" "$checkout/benchmarks/configs/paper_2b_shape.yaml" "$layer") ;;
      esac
      rm -rf $scratch/wf_$one
      PYTHONPATH=$site:$checkout/src python3 -m benchmarks.job_overhead workflow --checkout "$checkout" \
        --workdir $scratch/wf_$one --label "$one" --out $results -- --cores all --resources gpu=1 \
        --configfile "${configs[@]}" $scratch/cache_$version.yaml
      tail -n 1 $results/results.jsonl | cut -c1-300
    done
    touch $scratch/study.done ;;
  wait) for _ in $(seq "${WAIT_ROUNDS:-100}"); do [ -f $scratch/study.done ] && break; sleep 5; done
    # Should the lease end first, the finished jobs' own records still come back.
    [ -f $scratch/study.done ] || (cd $scratch && find wf_* \( -path '*/logs/benchmarks/*' -o -name train.json \
      -o -name generate.json \) -print0 2>/dev/null | tar -czf "$out/partial.tgz" --null -T - 2>/dev/null) || true ;;
esac
tail -n 8 $scratch/study.out 2>/dev/null | cut -c1-400 || true
cp -r $results/* "$out"/ 2>/dev/null || true
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
