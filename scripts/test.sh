#!/usr/bin/env bash
# Creates .venv on first use, then runs the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"
# Two worker processes, a test file each at a time (its module fixtures made once): much of the suite is
# one-threaded (imports of engine processes, tiny recipes with one thread), so two cores take 2/3 of the
# time of one process. Pass -n 0 to run in this process (a debugger, a single test).
exec python -m pytest -n 2 --dist loadfile "$@"
