# Sourced by demo.sh and test.sh: creates .venv in the repo root on first use
# and (re)installs when requirements-dev.txt or pyproject.toml change.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.installed"
want="$(cat "$REPO_ROOT/requirements-dev.txt" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "installing pinned requirements into $VENV" >&2
  # No wheel cache: a CI machine may be short of disk, and the stamp avoids reinstalls anyway.
  export PIP_NO_CACHE_DIR=1
  # torch first and alone, pinned, so nothing else can pull a CUDA build.
  pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" "$(grep '^torch==' "$REPO_ROOT/requirements-dev.txt")"
  "${pip[@]}" -r "$REPO_ROOT/requirements-dev.txt"
  "${pip[@]}" --no-deps --no-build-isolation -e "$REPO_ROOT"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
