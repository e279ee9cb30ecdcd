# Shared by the run_*.sh scripts: parse --dry-run / --trials / launcher flags, then print or launch
# the commands of one sweep (scripts/commands.py SWEEP).   Usage: sweep SWEEP "$@"
sweep() {
  local kind=$1; shift
  local dry=0 trials="" extra=() launch=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) dry=1 ;;
      --trials) trials=$2; shift ;;
      --gpus|--jobs_per_gpu|--jobs|--log_dir|--gpus_per_job|--backend|--partition|--timeout_min|--cpus_per_job|\
      --array_parallelism|--slurm|--submitit_dir|--mem_gb|--max_num_timeout) launch+=("$1" "$2"); shift ;;
      -h|--help) echo "usage: $0 [--dry-run] [--trials N] [--gpus 0,1] [--jobs_per_gpu N] [--jobs N] [--gpus_per_job N] [--backend local|slurm|submitit-local] [--partition P] [--timeout_min M] [--mem_gb G] [--max_num_timeout N] [--protocol published|repdistiller|letkd] [commands.py flags]"; return 0 ;;
      *) extra+=("$1") ;;
    esac
    shift
  done
  local here; here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  cd "$here/.." || return 1
  local args=("$kind"); [ -n "$trials" ] && args+=(--trials "$trials")
  local list; list=$(mktemp) || return 1
  "${PYTHON:-python}" scripts/commands.py "${args[@]}" "${extra[@]}" > "$list" || { rm -f "$list"; return 1; }
  if [ "$dry" = 1 ]; then cat "$list"; rm -f "$list"; return 0; fi
  "${PYTHON:-python}" scripts/launch.py "$list" "${launch[@]}"; local rc=$?
  rm -f "$list"; return $rc
}
