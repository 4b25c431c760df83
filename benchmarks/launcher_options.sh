# Sourced first by every *_gpu.sh launcher, with the options after its step:
#   --scratch DIR      the installed wheels, data, workdirs and results (default /tmp: on the
#                      lent machine it stays between calls while the machine is warm)
#   --wheels DIR       wheels of what the machine's Python lacks (default .whl)
#   --trl-wheels DIR   trl and liger-kernel, for finetune_job_gpu.sh (default .whl18)
#   --old DIR          a checkout of an earlier version, for the steps that run one (default .old)
# It leaves `options` holding them, to pass on when a launcher starts itself again.
scratch=/tmp wheels=.whl trl_wheels=.whl18 old=.old
options=()
while [ $# -gt 0 ]; do
  case $1 in
    --scratch|--wheels|--trl-wheels|--old)
      [ $# -ge 2 ] || { echo "$1 needs a directory" >&2; exit 2; }
      options+=("$1" "$2")
      case $1 in --scratch) scratch=$2 ;; --wheels) wheels=$2 ;; --trl-wheels) trl_wheels=$2 ;; --old) old=$2 ;; esac
      shift 2 ;;
    *) echo "unknown option: $1 (--scratch DIR, --wheels DIR, --trl-wheels DIR, --old DIR)" >&2; exit 2 ;;
  esac
done
mkdir -p "$scratch"
