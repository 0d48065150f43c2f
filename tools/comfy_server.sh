#!/usr/bin/env bash
# Run the real ComfyUI (the pinned 0.3.75 of tools/setup_env.sh, or COMFYUI_DIR=/path/to/ComfyUI) with this pack,
# headless on 127.0.0.1.
# Usage: tools/comfy_server.sh [BASE_DIR] [PORT] [extra main.py args...]
#   BASE_DIR  ComfyUI --base-directory (default: .cache/comfy-base); the pack is symlinked into BASE_DIR/custom_nodes,
#             put models into BASE_DIR/models/{diffusion_models,loras,vae,text_encoders}
#   PORT      default 8188
# Add --cpu for machines without a GPU (the lite test venv's torch is CPU-only). Same layout as tools/comfy_host.py.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${ZIMAGE_VENV:-$ROOT/.venv}"
COMFY="${COMFYUI_DIR:-$VENV/ComfyUI}"
BASE="${1:-$ROOT/.cache/comfy-base}"
PORT="${2:-8188}"
shift $(( $# > 2 ? 2 : $# ))
[ -f "$COMFY/main.py" ] || { echo "ComfyUI not found at $COMFY: run tools/setup_env.sh" >&2; exit 1; }
mkdir -p "$BASE"/{custom_nodes,input,output,temp,user} "$BASE"/models/{diffusion_models,loras,vae,text_encoders}
[ -e "$BASE/custom_nodes/ComfyUI-ZImage-Turbo" ] || ln -s "$ROOT" "$BASE/custom_nodes/ComfyUI-ZImage-Turbo"
# the torchvision stand-in of the CPU test host goes on the path of ComfyUI processes only
# (only where no real torchvision is installed: PYTHONPATH would shadow it)
if [ -d "$VENV/comfy-stubs" ] && ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('torchvision')" \
    2>/dev/null; then export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$VENV/comfy-stubs"; fi
cd "$COMFY"
exec "$VENV/bin/python" main.py --listen 127.0.0.1 --port "$PORT" --base-directory "$BASE" \
  --database-url sqlite:///:memory: --disable-api-nodes --preview-method latent2rgb "$@"
