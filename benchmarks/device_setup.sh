# Sourced by the GPU launchers: what the device image lacks, from the wheels
# carried in .whl/ (installed once per machine into /tmp/site), and the
# made-up full-size Dolly (lorastudy control made-up) as the offline copy.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
site=/tmp/site
[ -d $site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site .whl/*.whl
data=/tmp/dolly_full.jsonl
[ -f $data ] || PYTHONPATH=$site:src python3 -m lorastudy.cli control made-up $data > /dev/null
export LORASTUDY_DOLLY_JSONL=$data
