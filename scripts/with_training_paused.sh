#!/usr/bin/env bash
# Run a command with the background training run paused (timing benchmarks, JACK tests), and
# always resume it afterwards, also when the command fails or is interrupted.
#   scripts/with_training_paused.sh [-g PGID_FILE] CMD ARGS...
# PGID_FILE (default runs/train.pgid) holds the process id of the training run's leader (start
# it with setsid). torchrun puts each worker in a session of its own, so the leader's process
# group is not enough: every descendant of the leader is stopped, then the leader.
# Several of these may overlap (two engineers' test runs): the process ids of the commands
# holding the pause are kept in PGID_FILE's .pauses, and under one lock each of them updates
# that list and stops or resumes the training, so the last holder to finish resumes it. A holder
# that was killed (SIGKILL) is dropped from the list by the next update.
set -u
pgid_file=runs/train.pgid
if [ "${1:-}" = "-g" ]; then pgid_file=$2; shift 2; fi
leader=$(cat "$pgid_file" 2>/dev/null || true)
holders="${pgid_file%.pgid}.pauses"

descendants() {  # the process and all its children, recursively
    echo "$1"
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do descendants "$child"; done
}

update() {  # $1 = hold | release: under the lock, the live holders decide STOP or CONT
    ( flock 9
      live=""
      for p in $(cat "$holders" 2>/dev/null); do
          case "$p" in ''|*[!0-9]*|0|1) continue ;; esac  # a pid, not a stray word or group
          if [ "$p" != "$$" ] && kill -0 "$p" 2>/dev/null; then live="$live $p"; fi
      done
      [ "$1" = hold ] && live="$live $$"
      printf '%s\n' $live > "$holders"
      if [ -n "$live" ]; then
          kill -STOP $pids 2>/dev/null
          [ "$1" = release ] && echo "training stays paused: held by$live" >&2
      else
          kill -CONT $pids 2>/dev/null
      fi
    ) 9>"$holders.lock"
}

if [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null; then
    pids=$(descendants "$leader" | tr '\n' ' ')
    trap 'update release' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    update hold
    echo "training paused (processes $pids)" >&2
else
    echo "no training run to pause" >&2
fi
"$@"
