#!/usr/bin/env bash
# Export a trained CLSM into models/<name> and measure it: the paper's evaluation against the
# previously shipped model and the VAE baselines (scored by the LM), the decoding choice, the
# engine benchmark and the live timing benchmark (the last two with the training paused). The
# JSON files it writes next to the model are where MODEL.md's numbers come from.
#   scripts/ship_model.sh CKPT [OUT=models/clsm-default] [PREVIOUS=runs/clsm-default-previous]
set -eu
cd "$(dirname "$0")/.."
CKPT=$1
OUT=${2:-models/clsm-default}
PREV=${3:-runs/clsm-default-previous}
PY=.venv/bin/python
BASE="--baseline models/baselines/vae-g0.4.pt --baseline models/baselines/vae-g0.1.pt --lm models/baselines/lm.pt"
EVAL="--data cache/windows.npz --split test --n 128 --batch 8 --seed 0"
$PY -m engine.export --checkpoint "$CKPT" --out "$OUT" --fp16
# The evaluations run side by side (one thread each): the machine's cores, not a queue.
$PY -m training.evaluate --checkpoint "$OUT" --checkpoint "$PREV" $BASE $EVAL --decoding argmax \
    --out "$OUT/eval.json" --plot docs/eval/"$(basename "$OUT")" > /dev/null 2>&1 &
for d in temperature=1.0 top_p=0.9 top_p=0.95,temperature=0.9; do
    $PY -m training.evaluate --checkpoint "$OUT" $EVAL --decoding "$d" --out "$OUT/decoding-$d.json" \
        > /dev/null 2>&1 &
done
wait
# argmax's player figures are in eval.json already: one file per decoding for the choice
$PY -c "import json,sys; r=json.load(open(sys.argv[1])); r['models']={k: v for k, v in r['models'].items() if k == sys.argv[2]}; json.dump(r, open(sys.argv[3], 'w'))" \
    "$OUT/eval.json" "$(basename "$OUT")" "$OUT/decoding-argmax.json"
$PY -m training.choose_decoding "$OUT"/decoding-*.json > "$OUT/decoding.txt"
scripts/with_training_paused.sh $PY -m engine.bench --model "$OUT" --threads 1 --json > "$OUT/bench.json"
scripts/with_training_paused.sh $PY -m daemon.bench_timing --json --seconds 60 --engine real \
    --model "$OUT" --workers thread > "$OUT/timing.json"
echo "wrote $OUT (eval.json, decoding-*.json, decoding.txt, bench.json, timing.json)"
