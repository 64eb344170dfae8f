#!/usr/bin/env bash
# The main job on a fresh machine: install, then export -> register -> calibrate -> inspect the
# embedded textile images (PyPI conformal-clip-data). Extra arguments go to `winclip-edge demo`,
# e.g. `bash demo.sh --pretrained none` when the pretrained weights cannot be downloaded.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q --disable-pip-version-check -e ".[export,eval]"
winclip-edge demo "$@"
