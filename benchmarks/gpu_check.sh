#!/usr/bin/env bash
# Run every @pytest.mark.gpu test on a CUDA machine. Uses the python that holds a CUDA torch
# (PYTHON=... to choose); installs nothing unless the machine lacks vlmforge's needs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
"$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests "$@"
