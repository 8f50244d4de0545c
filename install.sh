#!/usr/bin/env bash
# Install relu-opt and everything it needs into a virtual environment (default .venv).
#
# Why a script and not one `pip install`:
# - torch is pinned to 2.13.0 first, so pip takes the CPU build instead of a multi-GB CUDA one;
# - crypten 0.4.1 cannot be installed with its own requirements (it asks for the deprecated `sklearn`
#   placeholder package and a torchvision that would replace torch), so it is installed with --no-deps
#   after the `crypten` extra has installed what it really imports;
# - SecretFlow SPU 0.9.5 (--backend spu) likewise: it declares numpy<2 (which would downgrade the numpy
#   torch and onnx use; SPU's SEMI2K and CHEETAH were measured to run on numpy 2), so the `spu` extra
#   installs what it imports (jax and jaxlib pinned to 0.4.34, spu's cap) and spu goes in with --no-deps.
#   Its wheels are for Python 3.10-3.11 only: on another Python it is skipped and --backend spu says so.
# - Fashion-MNIST, the default data, comes from Debian's dataset-fashion-mnist package.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"

# - as root, ethtool too: the delayed-link test and benchmark turn offloads off on their virtual links.
data=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
missing=""
[ -f "$data" ] || missing="dataset-fashion-mnist"
command -v ethtool >/dev/null || [ "$(id -u)" != 0 ] || missing="$missing ethtool"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # shellcheck disable=SC2086
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  elif [ ! -f "$data" ]; then
    echo "note: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist' or pass --data-dir" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"  # PYTHON=python3.11 picks another
py="$VENV/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0
if "$py" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 10), (3, 11)))'; then
  "$py" -m pip install -q -e ".[dev,crypten,spu]"
  "$py" -m pip install -q --no-deps spu==0.9.5
else
  "$py" -m pip install -q -e ".[dev,crypten]"
  echo "note: SecretFlow SPU has no wheel for this Python; --backend spu needs Python 3.10-3.11" >&2
fi
"$py" -m pip install -q --no-deps crypten==0.4.1
"$py" -c "import relu_opt; print('relu-opt', relu_opt.__version__, 'installed in $VENV')"
