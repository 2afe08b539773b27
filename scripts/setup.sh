#!/usr/bin/env bash
# Installs everything volunteer needs on a fresh Debian/Ubuntu machine, idempotently.
#
#   scripts/setup.sh [EXTRAS]      EXTRAS: demo (default) or dev
#
# - system packages (as root, via apt): libgmp-dev + gcc to build py-libp2p's fastecdsa,
#   iproute2 + iptables for the NAT lab tests;
# - a virtual environment in $VOLUNTEER_VENV (default: .venv in the repository);
# - torch from $VOLUNTEER_TORCH_SPEC (default torch==2.13.0, a CPU build here) *before*
#   anything else, and only when no torch is importable, so a bare `torch` requirement never
#   pulls several GB of CUDA wheels; set VOLUNTEER_TORCH_SPEC to pick another build;
# - volunteer itself, editable, with the requested extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-demo}"
VENV="${VOLUNTEER_VENV:-$ROOT/.venv}"
TORCH_SPEC="${VOLUNTEER_TORCH_SPEC:-torch==2.13.0}"
PY="${PYTHON:-python3}"

say() { printf '[setup] %s\n' "$*" >&2; }

missing=()
dpkg -s libgmp-dev >/dev/null 2>&1 || missing+=(libgmp-dev)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "missing system packages: ${missing[*]} (install them with your package manager;"
    say "libgmp-dev is needed to build py-libp2p, iptables/iproute2 only for the NAT lab tests)"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  say "installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -W ignore -c "import torch" 2>/dev/null || { say "torch failed to install"; exit 1; }
fi
stamp="$VENV/.volunteer-$EXTRAS-$(cat "$ROOT/pyproject.toml" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  say "installing volunteer[$EXTRAS] (editable)"
  "${PIP[@]}" install -e "$ROOT[$EXTRAS]" 2>&1 | grep -vE "is ignored|BuildBackendWarning|^\s*$|!!|\*\*\*|^  " || true
  "$VENV/bin/python" -c "import volunteer, libp2p, zmq" || { say "install failed"; exit 1; }
  touch "$stamp"
fi
say "ready: $VENV"
