#!/usr/bin/env bash
# Calibration speed of SmolLM2-135M (float32, CPU) on 100k tokens of the bundled text: the issue's
# target is at most 3 minutes on a 2-core CPU. Writes docs/results/calibrate-speed-cpu.json; run it
# with nothing else on the CPU.
set -euo pipefail
out=${OUT_DIR:-docs/results}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
aqua calibrate --tokens 100000 --seq-len 512 --batch-size 4 --out "$tmp/art" --json "$out/calibrate-speed-cpu.json"
