#!/usr/bin/env bash
# Runs the daemon. On Linux without an ALSA sequencer (containers, CI machines) the daemon uses
# JACK; if no JACK server is up and jackd is installed, start a dummy-backend one for this run.
set -u
cd "$(dirname "$0")/.."
jack_pid=""
if [ "$(uname)" = "Linux" ] && [ ! -e /dev/snd/seq ] && ! command -v jackd >/dev/null; then
  bash scripts/install_system_deps.sh
fi
if [ "$(uname)" = "Linux" ] && [ ! -e /dev/snd/seq ] && command -v jackd >/dev/null \
   && ! jack_lsp >/dev/null 2>&1; then
  echo "no ALSA sequencer: starting a JACK server (dummy backend) for this run" >&2
  JACK_NO_AUDIO_RESERVATION=1 jackd -d dummy -r 48000 -p 256 >/tmp/clsm-jackd.log 2>&1 &
  jack_pid=$!
  for _ in $(seq 50); do jack_lsp >/dev/null 2>&1 && break; sleep 0.1; done
fi
.venv/bin/python run_daemon.py "$@"
rc=$?
[ -n "$jack_pid" ] && kill "$jack_pid" 2>/dev/null
exit $rc
