#!/usr/bin/env bash
# Run a command with the background training run paused (timing benchmarks, JACK tests), and
# always resume it afterwards, also when the command fails or is interrupted.
#   scripts/with_training_paused.sh [-g PGID_FILE] CMD ARGS...
# PGID_FILE (default runs/train.pgid) holds the process group of the training run (start it
# with setsid so that its process id is its group). Without the file the command just runs.
set -u
pgid_file=runs/train.pgid
if [ "${1:-}" = "-g" ]; then pgid_file=$2; shift 2; fi
pgid=$(cat "$pgid_file" 2>/dev/null || true)
if [ -n "$pgid" ] && kill -0 -- "-$pgid" 2>/dev/null; then
    trap 'kill -CONT -- "-$pgid" 2>/dev/null' EXIT INT TERM
    kill -STOP -- "-$pgid"
    echo "training (process group $pgid) paused" >&2
else
    echo "no training run to pause" >&2
fi
"$@"
