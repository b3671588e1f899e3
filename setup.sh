#!/usr/bin/env bash
# Sets up pretextlab on a fresh machine: a virtual environment with PyTorch, the package with its
# test extras, and Fashion-MNIST and Chromium (the report's browser test) from Debian's packages
# where apt is available.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision, pretextlab" || { echo "setup.sh: the install failed (see above)" >&2; exit 1; }
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
    || echo "setup.sh: could not install Debian's dataset-fashion-mnist; pretextlab will look in --data-dir, \$PRETEXTLAB_DATA, or download it" >&2
fi
# The report's browser test and `pretextlab report --screenshot` drive Debian's chromium through its
# chromedriver (Selenium, a test extra); nothing is downloaded at run time.
if ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "setup.sh: could not install Debian's chromium and chromium-driver; tests/test_report_browser.py will skip (CI: fail)" >&2
fi
echo "setup.sh: ready (.venv)"
