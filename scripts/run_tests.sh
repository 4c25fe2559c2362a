#!/usr/bin/env bash
# Runs the test suite; pytest's exit 5 ("no tests collected") is a failure, not a pass.
set -u
cd "$(dirname "$0")/.."
PATH="/usr/sbin:$PATH" .venv/bin/python -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit $rc
