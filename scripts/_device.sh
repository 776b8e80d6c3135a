# Sourced by the device_* scripts on a lent GPU machine (the `device` tool): there is no venv there, so
# the engine runs from the checkout and MONAI from its wheel in .whl; outputs go to $OUT.
OUT=${OUT:-runs/device-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/HybridMIMSegment PYTHONUNBUFFERED=1 HYBRIDMIM_NO_VENV=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU visible"
