# Sourced by the pre-training scripts: prepare the scans once, then start or resume the run.
#   pretrain_run RECIPE RUN CACHE STEPS DATA… [--exclude NAME…]    (STEPS may be empty: the recipe's)
pretrain_run() {
  local recipe=$1 run=$2 cache=$3 steps=$4; shift 4
  python -m hybridmim pretrain --prepare-only --recipe "$recipe" --cache "$cache" --data "$@"
  mkdir -p "$(dirname "$run")"
  if [ -f "${run%.safetensors}.resume.pt" ]; then
    python -m hybridmim pretrain --data "$cache" -o "$run" --resume ${steps:+--steps "$steps"}
  else
    python -m hybridmim pretrain --data "$cache" --recipe "$recipe" -o "$run" ${steps:+--steps "$steps"}
  fi
}
