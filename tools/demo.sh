#!/usr/bin/env bash
# Set everything up and run the main job: a real ComfyUI with this pack runs the shipped workflows (tiny embedded
# model unless --models points at a ComfyUI models folder with the real files). See tools/demo.py --help.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/tools/setup_env.sh"
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$ROOT/.venv/bin/python" "$ROOT/tools/demo.py" "$@"
