#!/usr/bin/env bash
# A training branch's test-split evaluation, as issue 10's branches are compared: the paper's
# argmax (against the VAE at gamma 0.4, scored by the LM) and the daemon's decoding
# (temperature 1.0), side by side on one core each. Used by scripts/beta_grid.sh and
# scripts/cooldown_eval.sh.
#   scripts/evaluate_branch.sh CKPT ARGMAX.json T1.json
set -eu
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { sed -n '2,6p' "$0" >&2; exit 2; }
PY=.venv/bin/python
EVAL="--data cache/windows.npz --split test --n 128 --batch 8 --seed 0 --threads 1"
$PY -m training.evaluate --checkpoint "$1" --baseline models/baselines/vae-g0.4.pt \
    --lm models/baselines/lm.pt $EVAL --decoding argmax --out "$2" > /dev/null &
argmax=$!
$PY -m training.evaluate --checkpoint "$1" $EVAL --decoding temperature=1.0 --out "$3" > /dev/null &
t1=$!
wait $argmax  # each one's failure fails the script (a bare `wait` would not)
wait $t1
