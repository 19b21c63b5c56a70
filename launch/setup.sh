#!/usr/bin/env bash
# Set-up shared by launch/demo.sh and tests/run.sh: a venv with the package, and
# Fashion-MNIST from Debian's package where apt exists. Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  ($sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq dataset-fashion-mnist) \
    || echo "setup: warning: dataset-fashion-mnist not installed; tests fall back to generated data"
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
echo "setup: installing jocor_ddp and its dependencies into .venv (torch is large: a few minutes the first time)"
.venv/bin/pip install -q -e '.[test]'
