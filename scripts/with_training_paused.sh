#!/usr/bin/env bash
# Run a command with the background training run paused (timing benchmarks, JACK tests), and
# always resume it afterwards, also when the command fails or is interrupted.
#   scripts/with_training_paused.sh [-g PGID_FILE] CMD ARGS...
# PGID_FILE (default runs/train.pgid) holds the process id of the training run's leader (start
# it with setsid). torchrun puts each worker in a session of its own, so the leader's process
# group is not enough: every descendant of the leader is stopped, then the leader.
# Several of these may overlap (two engineers' test runs): a count of the commands holding the
# pause (PGID_FILE's .pauses, under flock) makes the last one to finish resume the training, not
# the first.
set -u
pgid_file=runs/train.pgid
if [ "${1:-}" = "-g" ]; then pgid_file=$2; shift 2; fi
leader=$(cat "$pgid_file" 2>/dev/null || true)
holders="${pgid_file%.pgid}.pauses"

descendants() {  # the process and all its children, recursively
    echo "$1"
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do descendants "$child"; done
}

hold() {  # add $1 to the number of commands holding the pause; prints the new number
    ( flock 9
      n=$(( $(cat "$holders" 2>/dev/null || echo 0) + $1 ))
      [ "$n" -lt 0 ] && n=0
      echo "$n" > "$holders"
      echo "$n" ) 9>"$holders.lock"
}

release() {
    if [ "$(hold -1)" -eq 0 ]; then
        kill -CONT $pids 2>/dev/null
    else
        echo "training stays paused: another command still holds the pause" >&2
    fi
}

if [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null; then
    pids=$(descendants "$leader" | tr '\n' ' ')
    hold 1 > /dev/null
    trap release EXIT
    trap 'exit 130' INT TERM
    kill -STOP $pids
    echo "training paused (processes $pids)" >&2
else
    echo "no training run to pause" >&2
fi
"$@"
