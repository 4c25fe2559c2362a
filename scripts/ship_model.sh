#!/usr/bin/env bash
# Export a trained CLSM into models/<name> and measure it: the paper's evaluation against the
# VAE baseline (scored by the LM), the engine benchmark and the live timing benchmark. The JSON
# files it writes next to the model are where MODEL.md's numbers come from.
#   scripts/ship_model.sh [runs/clsm/ckpt.pt] [models/clsm-default] [runs/vae/ckpt.pt] [runs/lm/ckpt.pt]
set -eu
cd "$(dirname "$0")/.."
CKPT=${1:-runs/clsm/ckpt.pt}
OUT=${2:-models/clsm-default}
VAE=${3:-runs/vae/ckpt.pt}
LM=${4:-runs/lm/ckpt.pt}
PY=.venv/bin/python
$PY -m engine.export --checkpoint "$CKPT" --out "$OUT" --fp16
$PY -m training.evaluate --checkpoint "$CKPT" --baseline "$VAE" --lm "$LM" \
    --data cache/windows.npz --split test --n 256 --seed 0 --json > "$OUT/eval.json"
$PY -m engine.bench --model "$OUT" --threads 1 --json > "$OUT/bench.json"
$PY -m daemon.bench_timing --json --seconds 20 --engine real --model "$OUT" \
    --workers thread --busy-ms 0 > "$OUT/timing.json"
echo "wrote $OUT (eval.json, bench.json, timing.json)"
