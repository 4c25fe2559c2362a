#!/usr/bin/env bash
# The beta grid of issue 10 (session 7): 3,000-step cooldown branches of the constant-lr run
# from one state, differing in beta only, each evaluated on the test split with the paper's
# argmax (against the VAE at gamma 0.4, scored by the LM) and with the daemon's decoding
# (sampling at temperature 1.0), beside the shipped model. The JSON files land in
# docs/eval/beta-grid; print one with
#   python -m training.evaluate --from docs/eval/beta-grid/t1-beta0.004.json --markdown
#   [STATE=runs/clsm-cpu-20710.pt] scripts/beta_grid.sh [BRANCH ...]
# BRANCH: cooldown (the run's own annealed beta, 0.0083 -> 0.0095 over the branch), beta0.002,
# beta0.004, beta0.016 (configs/sweep/<branch>-cooldown.toml); default all four. STATE must be
# the step-20,710 state the configs start their cooldown at: checkpoints/clsm-cpu.pt of commit
# 6ac0c70, taken from git when runs/clsm-cpu-20710.pt is missing (the committed run has moved
# on since). A branch whose runs/<branch>-23710.pt exists is evaluated, not trained again.
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=docs/eval/beta-grid
EVAL="--data cache/windows.npz --split test --n 128 --batch 8 --seed 0 --threads 1"
mkdir -p "$OUT" runs
if [ -z "${STATE:-}" ]; then
    STATE=runs/clsm-cpu-20710.pt
    [ -f "$STATE" ] || git show 6ac0c70:checkpoints/clsm-cpu.pt > "$STATE"
fi

train_branch() {  # $1 = branch name
    local config=configs/sweep/$1-cooldown.toml
    if [ "$1" = cooldown ]; then  # the generic cooldown config, started at the state's step
        config=runs/cooldown-20710.toml
        sed 's/^lr_cooldown_start = .*/lr_cooldown_start = 20710/' configs/sweep/cooldown.toml > "$config"
    fi
    .venv/bin/torchrun --standalone --nproc-per-node 2 -m training.train --config "$config" \
        --data cache/windows.npz --out "runs/$1-23710" --threads 1 --resume "$STATE" \
        --max-steps 23710 --quiet
    cp "runs/$1-23710/ckpt.pt" "runs/$1-23710.pt"
}

evaluate_branch() {  # $1 = branch name
    scripts/evaluate_branch.sh "runs/$1-23710.pt" "$OUT/argmax-$1.json" "$OUT/t1-$1.json"
}

for branch in "${@:-cooldown beta0.002 beta0.004 beta0.016}"; do
    for b in $branch; do
        [ -f "runs/$b-23710.pt" ] || train_branch "$b"
        evaluate_branch "$b"
    done
done
[ -f "$OUT/t1-clsm-default.json" ] || $PY -m training.evaluate --checkpoint models/clsm-default \
    $EVAL --decoding temperature=1.0 --out "$OUT/t1-clsm-default.json" > /dev/null
$PY -m training.choose_decoding "$OUT"/t1-*.json
