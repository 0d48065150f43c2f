#!/usr/bin/env bash
# Run the test suite. Extra arguments go to pytest, e.g. `tools/test.sh -k lora -x`.
#
# Default: set everything up (venv, CPU torch, reference implementations, the pinned ComfyUI 0.3.75 test host in
# .venv/ComfyUI) and run with .venv's Python.
#
# Against your own ComfyUI: `tools/test.sh --comfy /path/to/ComfyUI -m comfy` (or COMFYUI_DIR=/path/to/ComfyUI
# tools/test.sh -m comfy). That tree is imported, with the packages of the Python you run it in: $PYTHON, else the
# active virtual environment's python, else python3 (it needs the test requirements, tools/requirements-dev.txt).
# Nothing is installed then. pytest's header names the host it uses ("ComfyUI host: ...").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ "${1:-}" = "--comfy" ]; then
  [ $# -ge 2 ] || { echo "usage: tools/test.sh --comfy /path/to/ComfyUI [pytest args]" >&2; exit 2; }
  COMFYUI_DIR="$2"; export COMFYUI_DIR; shift 2
fi
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${COMFYUI_DIR:-}" ]; then
  [ -f "$COMFYUI_DIR/main.py" ] || { echo "COMFYUI_DIR=$COMFYUI_DIR is not a ComfyUI checkout (no main.py)" >&2; exit 2; }
  PY="${PYTHON:-}"
  [ -n "$PY" ] || { [ -n "${VIRTUAL_ENV:-}" ] && PY="$VIRTUAL_ENV/bin/python"; } || true
  [ -n "$PY" ] || PY="$(command -v python3)"
  exec "$PY" -m pytest "$@"
fi
"$ROOT/tools/setup_env.sh"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
