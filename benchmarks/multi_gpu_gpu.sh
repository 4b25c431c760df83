#!/usr/bin/env bash
# Issue 15's measurements on the lent two-GPU machine (nvidia-h200-x2), one
# step per device call (each under its 10-minute limit; /tmp stays between
# calls while the machine is warm). Wheels of what the image lacks are
# carried in .whl/.
#   bash benchmarks/multi_gpu_gpu.sh steps   # b and c: one job over two GPUs
#   bash benchmarks/multi_gpu_gpu.sh jobs    # a: two jobs side by side against one after the other
#   SUBSET=5k bash benchmarks/multi_gpu_gpu.sh jobs   # the same with longer jobs (subset 1k by default)
# Each step takes the options of launcher_options.sh after it (--scratch DIR, --wheels DIR).
set -uo pipefail
step=$1; shift
. benchmarks/launcher_options.sh
out=${OUT:-$scratch/multi_gpu}
results=$scratch/results_multi_gpu
mkdir -p "$out" $results
trap 'cp -r $results/. "$out"/ 2>/dev/null || true' EXIT
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 KERAS_BACKEND=jax
site=$scratch/site
[ -d $site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site "$wheels"/*.whl
export PYTHONPATH=$site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $results/gpus.txt

worker() {  # log-label [worker args...]
  local label=$1; shift
  echo "+ $label: $*"
  timeout 280 python3 -m benchmarks.multi_gpu worker --out $results "$@" > $results/worker_$label.log 2>&1
  echo "  exit $? $(grep -c RESULT $results/worker_$label.log) result(s)"; tail -n 2 $results/worker_$label.log | cut -c1-400
}
case $step in
  steps)
    # b: data parallelism, Gemma 2B shape, batch 16 x 512, against one GPU.
    worker dp1 --model gemma_2b --shape 512x16 --devices 1 --steps 30
    worker dp2 --model gemma_2b --shape 512x16 --devices 2 --steps 30
    # c: Gemma 7B shape, weights split over two GPUs capped at 24 GB each,
    # against the same run unsharded on one (uncapped) GPU; 50 losses each.
    total_gb=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{print $1/1024}')
    fraction=$(python3 -c "print(round(24 / $total_gb, 4))")
    worker mp7b_1 --model gemma_7b --shape 256x4 --devices 1 --steps 47
    XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction worker mp7b_2 --model gemma_7b --shape 256x4 --devices 2 --model-parallel 2 --steps 47
    ;;
  jobs)
    data=$scratch/dolly_full.jsonl
    [ -f $data ] || PYTHONPATH=$site:src python3 -m lorastudy.cli control made-up $data > /dev/null
    export LORASTUDY_DOLLY_JSONL=$data
    configs=(benchmarks/configs/gpu_2b_shape.yaml benchmarks/configs/two_jobs.yaml)
    subset=${SUBSET:-1k}
    targets=(results/finetune/gemma_2b_shape/${subset}_r4_s0/train.json results/finetune/gemma_2b_shape/${subset}_r4_s1/train.json)
    run() {  # label workdir gpus
      printf 'compilation_cache: {dir: %s}\n' "$scratch/jax_cache_$1" > $scratch/cache_$1.yaml
      # Targets first: --resources, --configfile and --forcerun each take every word after them.
      python3 -m benchmarks.job_overhead workflow --checkout "$PWD" --workdir "$2" --label "$1" --out $results -- \
        "${targets[@]}" --cores all --resources gpu=$3 --configfile "${configs[@]}" $scratch/cache_$1.yaml --forcerun finetune
      tail -n 1 $results/results.jsonl | cut -c1-300
    }
    if [ ! -d $scratch/wf_prep/results/models ]; then
      python3 -m snakemake --snakefile workflow/Snakefile --directory $scratch/wf_prep --cores all \
        --configfile "${configs[@]}" --omit-from finetune > $results/prep.log 2>&1 || { tail -n 30 $results/prep.log; exit 1; }
    fi
    for label in one_after_the_other side_by_side; do rm -rf $scratch/wf_$label $scratch/jax_cache_${label}_$subset; cp -al $scratch/wf_prep $scratch/wf_$label; done
    run one_after_the_other_$subset $scratch/wf_one_after_the_other 1
    run side_by_side_$subset $scratch/wf_side_by_side 2
    grep -H "claimed GPU" $scratch/wf_*/logs/finetune/*/*.log | tee $results/claims.txt
    rm -f $results/workflow_*.log
    ;;
esac
