#!/usr/bin/env bash
# Sets up everything lightning_brn needs on a fresh Debian machine (idempotent, safe to rerun):
#   - the Fashion-MNIST data from the Debian package dataset-fashion-mnist (the embedded default's data),
#   - a virtual environment in .venv with torch 2.14.1 / torchvision 0.29.1 and this package (editable, with dev tools),
#   - the C++ CPU kernels, compiled once for this machine (~20 s; cached in ~/.cache/torch_extensions; without a
#     compiler the package falls back to its Python path and this step only warns).
# Override the interpreter with PYTHON=..., the venv folder with VENV=...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
DATA=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

if [ ! -f "$DATA" ]; then
    echo "[setup] installing Debian package dataset-fashion-mnist"
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null; then
    echo "[setup] installing torch 2.14.1 and torchvision 0.29.1 (~90 s)"
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] installing lightning-brn (editable, with the dev extra)"
"$PY" -m pip install -q -e ".[dev]"
echo "[setup] building the C++ CPU kernels (once per machine, ~20 s)"
"$PY" -c "from lightning_brn import cpu_kernels; ok = cpu_kernels.available(); print('[setup] C++ CPU kernels:', 'ready' if ok else 'unavailable (' + str(cpu_kernels.build_error()) + '), using the Python path')" || true
echo "[setup] done: $("$PY" -c 'import torch, lightning, timm, lightning_brn; print("torch", torch.__version__, "| lightning", lightning.__version__, "| timm", timm.__version__, "| lightning_brn", lightning_brn.__version__)')"
