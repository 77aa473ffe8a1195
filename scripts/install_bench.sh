#!/usr/bin/env bash
# Install the benchmark's optional peers (Composer) into regdrop's virtual environment.
#
# mosaicml 0.32.1 (Composer) pins torch < 2.7.1 and torchvision < 0.22.1, and mosaicml-cli
# pins rich < 14: installed normally they would replace regdrop's torch. So the `bench`
# extra installs what Composer's algorithms import, and Composer and its CLI package go on
# top without their dependencies. pip then reports those pins as conflicts; Composer's
# GyroDropoutLayer and stochastic-depth blocks work with the newer torch all the same.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${REGDROP_VENV:-.venv}
bash scripts/setup.sh
"$VENV/bin/python" -m pip install --quiet -e ".[bench]"
"$VENV/bin/python" -m pip install --quiet --no-deps "mosaicml==0.32.1" "mosaicml-cli==0.8.3"
"$VENV/bin/python" -c "
import composer
from composer.algorithms.gyro_dropout import GyroDropoutLayer
from composer.algorithms.stochastic_depth import apply_stochastic_depth
print(f'install_bench: composer {composer.__version__} imports; run python -m regdrop.bench')
"
