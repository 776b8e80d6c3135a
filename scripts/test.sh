#!/usr/bin/env bash
# Creates .venv on first use, then runs the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"
# Two worker processes, a test file each at a time (its module fixtures made once), one thread each
# (Testing/conftest.py): much of the suite is one-threaded (engine processes' imports, tiny recipes), so
# this takes less than half the time of one process. Pass -n 0 to run in this process (a debugger).
exec python -m pytest -n 2 --dist loadfile "$@"
