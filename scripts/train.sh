#!/usr/bin/env bash
# Set everything up (idempotent), then run the main job: `python train.py` with any
# Hydra overrides given here, e.g.  bash scripts/train.sh dropout=gyro model=resnet18
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${REGDROP_VENV:-.venv}/bin/python" train.py "$@"
