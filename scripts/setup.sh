#!/usr/bin/env bash
# Creates .venv and installs everything mscn needs, on a fresh machine too.
# Order matters: the pinned CPU torch wheel first, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages (only when apt is there and we are root). tcmalloc: `mscn` runs under
# it when present (mscn_core/allocator.py: up to ~3x faster meta-training steps on CPU).
# open3d-cpu needs libusb-1.0-0 to import, and the Vulkan software driver (llvmpipe) to
# render offscreen; without them the 3D viewer falls back to matplotlib (it says why).
APT_PACKAGES="${APT_PACKAGES:-libtcmalloc-minimal4 libusb-1.0-0 libgomp1 libegl1 libgl1 libvulkan1 mesa-vulkan-drivers}"
if [ -n "$APT_PACKAGES" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    # a failed install is reported; the import check at the end says what is missing
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } \
      || echo "setup: could not install$missing with apt; continuing without" >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[all]"
python -c "import torch, mscn_core, mscn_plugins.sphere, mscn_viewers.globe, trimesh, open3d; print('mscn ready, torch', torch.__version__)"
