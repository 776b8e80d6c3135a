#!/usr/bin/env bash
# Creates .venv on first use, then runs the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"
# Two worker processes, a test file each at a time (its module fixtures made once), sharing torch's
# threads (one each on 2 cores; Testing/conftest.py): much of the suite is one-threaded (engine processes'
# imports, tiny recipes), so this takes 70 % of one process's time (295 s against 417 s on 2 cores,
# 375 tests, 2026-12-07).
# -n 0 runs the tests in this process.
exec python -m pytest -n 2 --dist loadfile "$@"
