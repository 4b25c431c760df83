# Sourced by the GPU launchers after launcher_options.sh: what the device image lacks,
# from the wheels in $wheels (installed once per machine into $scratch/site), and the
# made-up full-size Dolly (lorastudy control made-up) as the offline copy.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
site=$scratch/site
[ -d $site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site "$wheels"/*.whl
data=$scratch/dolly_full.jsonl
[ -f $data ] || PYTHONPATH=$site:src python3 -m lorastudy.cli control made-up $data > /dev/null
export LORASTUDY_DOLLY_JSONL=$data
