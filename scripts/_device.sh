# Sourced by the device_* scripts on a lent GPU machine (the `device` tool): there is no venv there, so
# the engine runs from the checkout and MONAI from its wheel in .whl; outputs go to $OUT.
OUT=${OUT:-runs/device-out}; mkdir -p "$OUT"
# once a machine: a second install (device_methods.sh's study, started beside running jobs) would replace the
# packages under those jobs while they import them
[ -e /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && touch /tmp/site/.installed; } || exit 1
export PYTHONPATH=/tmp/site:$PWD/HybridMIMSegment PYTHONUNBUFFERED=1 HYBRIDMIM_NO_VENV=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU visible"

# Waits while a process matching the pattern $1 runs, until $2 seconds of the call have passed (the last
# 20 kept for collecting what there is).
wait_for_runs() {
  while pgrep -f "$1" > /dev/null && [ $SECONDS -lt $(($2 - 20)) ]; do sleep 10; done
}

# Where each run of the JSON-lines logs named stands: its last progress and metric events, its time-limit
# and error messages; then the GPU's load.
report_runs() {
  local log
  for log in "$@"; do
    [ -f "$log" ] || continue
    echo "$(basename "$log"): $(grep '"progress"' "$log" | tail -1 | cut -c1-80)" \
      "$(grep '"metric"' "$log" | tail -1 | cut -c1-160)"
  done
  grep -h '"message"' "$@" 2>/dev/null | grep -i "fit in\|error" | cut -c1-200
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
}
