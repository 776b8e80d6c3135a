#!/usr/bin/env bash
# The inference benchmark (scripts/bench_inference.py) on a lent GPU machine (the `device` tool), which has
# neither SimpleITK nor nibabel nor the scans: they travel in .devdata/bench (47.5 MB: SimpleITK's files
# re-compressed with xz, 53 → 28 MB, and ct_a, ct_b, CRLM-CT-1006) and nibabel's wheel in .whl (3.3 MB).
#   here, once:  scripts/device_bench.sh pack
#   the call:    scripts/device_bench.sh run   (carry .devdata/bench and .whl; the checkout travels too,
#                64 MiB in all: move every model but the catalog's default out of it for the call)
# $OUT gets inference-gpu.json and the log; then commit it beside docs/benchmarks/inference-cpu.json.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench=.devdata/bench
case ${1:-} in
  pack)
    source scripts/_venv.sh
    download=$(mktemp -d); unpacked=$(mktemp -d)
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$download" \
      "SimpleITK==$(python -c 'import SimpleITK; print(SimpleITK.__version__)')" || exit 1
    unzip -q "$download"/*.whl -d "$unpacked" && mkdir -p $bench/data/abdomen_ct $bench/data/unlabeled_ct .whl
    tar -C "$unpacked" -cf - . | xz -T0 -9 > $bench/simpleitk.tar.xz
    python -m pip download -q --no-deps --only-binary=:all: -d .whl nibabel==5.4.2 || exit 1
    cp ../shared/data/abdomen_ct/ct_[ab].nii.gz $bench/data/abdomen_ct/
    cp ../shared/data/unlabeled_ct/CRLM-CT-1006.nii.gz $bench/data/unlabeled_ct/
    rm -rf "$download" "$unpacked"; du -sh $bench .whl ;;
  run)
    source scripts/_device.sh  # MONAI and nibabel from .whl into /tmp/site
    python3 -c "import tarfile; tarfile.open('$bench/simpleitk.tar.xz').extractall('/tmp/site', filter='data')" \
      || exit 1
    [ -e ../shared/data ] || { mkdir -p ../shared && cp -r $bench/data ../shared/data; }  # where the benchmark looks
    python3 scripts/bench_inference.py --device cuda -o "$OUT/inference-gpu.json" 2>&1 | tee "$OUT/bench.log" ;;
  *) echo "error: pack or run" >&2; exit 2 ;;
esac
