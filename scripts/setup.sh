#!/usr/bin/env bash
# Create .venv and install spvit-search with its test tools, pinned by constraints.txt.
# torch==2.13.0 resolves to the CPU build where one is offered (this project's machines);
# elsewhere add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test,tflite]'
.venv/bin/python -c "import torch, timm, spvit_search; print('spvit-search', spvit_search.__version__, '| torch', torch.__version__, '| timm', timm.__version__)"
