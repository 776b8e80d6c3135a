#!/usr/bin/env bash
# Creates .venv on first use, then runs the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"
exec python -m pytest "$@"
