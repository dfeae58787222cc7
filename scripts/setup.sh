#!/usr/bin/env bash
# Set up spvit-search on a fresh machine:
#  1. Debian packages: openssh-server (sshd), adb (the official client) and postgresql (the shared
#     study's server), which the tests use as real peers, and dataset-fashion-mnist (Fashion-MNIST for --data fashion), installed when
#     missing and this user is root or has sudo (skip: SPVIT_NO_APT=1);
#  2. .venv with spvit-search, its test tools and the TFLite extra, pinned by constraints.txt.
# torch==2.13.0 resolves to the CPU build where one is offered (this project's machines);
# elsewhere add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v adb >/dev/null || missing+=(adb)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || missing+=(dataset-fashion-mnist)
if [ -z "${SPVIT_NO_APT:-}" ] && [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test,tflite]'
.venv/bin/python -c "import torch, timm, spvit_search; print('spvit-search', spvit_search.__version__, '| torch', torch.__version__, '| timm', timm.__version__)"
