#!/usr/bin/env bash
# A cooldown branch of the constant-lr run from any saved state, evaluated like the beta grid
# (issue 10): the lr falls from 5e-4 to 2.5e-5 over STEPS steps from the state's own step, with
# the config the run goes on with (configs/cpu-beta0.0005.toml: beta held at 0.0005 since step
# 25,500), then the branch is evaluated on the test split with the paper's argmax (against the
# VAE at gamma 0.4, scored by the LM) and with the daemon's decoding (temperature 1.0), one core
# each, and with training.decode_errors. Compare with the shipped model's figures:
#   python -m training.evaluate --from docs/eval/NAME/argmax.json \
#       --from models/clsm-default/eval.json --markdown
#   scripts/cooldown_eval.sh STATE NAME [STEPS=3000] [BETA] [ADAM_EPS]
# STATE: a resumable checkpoint (checkpoints/clsm-cpu.pt, or a copy of runs/clsm-cpu/ckpt.pt);
# the branch trains into runs/NAME (its final state copied to runs/NAME.pt, a branch that
# exists is evaluated, not trained again) and the JSON lands in docs/eval/NAME/. BETA replaces
# the config's beta_kl (0.0005) from the branch's first step, as the beta grid's branches did;
# ADAM_EPS the config's adam_eps (1e-8), for betas so low that the prior's gradients near it.
# CONFIG=FILE (environment) replaces the config the branch takes its settings from; TRAIN="k=v
# ..." (environment) sets [train] keys over it, e.g. TRAIN="own_guesses=0.25" (values as TOML).
set -eu
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
STATE=$1 NAME=$2 STEPS=${3:-3000} BETA=${4:-} ADAM_EPS=${5:-}
CONFIG=${CONFIG:-configs/cpu-beta0.0005.toml}
PY=.venv/bin/python
OUT=docs/eval/$NAME
mkdir -p "$OUT" runs

if [ ! -f "runs/$NAME.pt" ]; then
    START=$($PY -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', \
weights_only=False)['step'])" "$STATE")
    BRANCH_CONFIG=runs/$NAME.toml
    # the run's config with a cooldown that starts at the state's step
    $PY - "$CONFIG" "$START" "$STEPS" "$BETA" "$ADAM_EPS" "${TRAIN:-}" > "$BRANCH_CONFIG" <<'EOF'
import json
import sys
import tomllib

config, start, steps, beta, eps, extra = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                          *sys.argv[4:7])
with open(config, "rb") as f:
    cfg = tomllib.load(f)
cfg["train"].update(tomllib.loads("\n".join(extra.split())))
cfg["train"].update(lr_cooldown_steps=steps, lr_cooldown_start=start, lr_final=2.5e-5)
if beta:  # held from the branch's first step
    cfg["train"].update(beta_kl=float(beta), beta_anneal_steps=1)
if eps:
    cfg["train"].update(adam_eps=float(eps))
for section, values in cfg.items():
    print(f"[{section}]")
    for key, value in values.items():
        print(f"{key} = {json.dumps(value)}")  # JSON scalars are TOML
EOF
    .venv/bin/torchrun --standalone --nproc-per-node 2 -m training.train --config "$BRANCH_CONFIG" \
        --data cache/windows.npz --out "runs/$NAME" --threads 1 --resume "$STATE" \
        --max-steps $((START + STEPS)) --quiet
    cp "runs/$NAME/ckpt.pt" "runs/$NAME.pt"
fi

scripts/evaluate_branch.sh "runs/$NAME.pt" "$OUT/argmax.json" "$OUT/t1.json"
# where its argmax reconstruction goes wrong (teacher-forced vs free-running, per target length)
$PY -m training.decode_errors --checkpoint "runs/$NAME.pt" --data cache/windows.npz --split test \
    --n 128 --out "$OUT/decode_errors.json"
$PY -m training.evaluate --from "$OUT/argmax.json" --markdown
$PY -m training.choose_decoding "$OUT/t1.json" "models/clsm-default/decoding-temperature=1.0.json"
