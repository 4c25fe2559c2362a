#!/usr/bin/env bash
# Installs the real JACK server and mosquitto broker the integration tests talk to.
set -u
need=()
command -v jackd >/dev/null || need+=(jackd2)
command -v jack_midi_dump >/dev/null || need+=(jackd2)
command -v mosquitto >/dev/null && [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
# headless Chromium for the web page's browser tests (driven by the playwright Python package
# with executable_path=/usr/bin/chromium: no browser download)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "note: cannot install ${need[*]} (not root, no sudo); jack/mqtt tests will skip" >&2; exit 0
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "note: no apt-get; install ${need[*]} yourself or jack/mqtt tests will skip" >&2; exit 0
fi
$SUDO apt-get update -qq || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  $(printf '%s\n' "${need[@]}" | sort -u) \
  || echo "note: apt-get install failed; jack/mqtt/browser tests will skip" >&2
