#!/usr/bin/env bash
# Run every @pytest.mark.gpu test on a CUDA machine. Uses the python that holds a CUDA torch
# (PYTHON=... to choose), with vlmforge installed in it (pip install --no-deps .); installs nothing itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -P -c "import torch, vlmforge; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
# -P: the repo root must not shadow the installed vlmforge (its subpackages live outside vlmforge/)
"$PYTHON" -P -m pytest -q -m gpu -p no:cacheprovider tests "$@"
