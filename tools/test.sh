#!/usr/bin/env bash
# Set everything up (venv, CPU torch, reference implementations, a real ComfyUI 0.3.75 host) and run the test suite.
# Extra arguments go to pytest, e.g. `tools/test.sh -k lora -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/tools/setup_env.sh"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
