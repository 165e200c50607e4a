#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (offline; slow end-to-end tests included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
"$VENV/bin/ruff" check src tests scripts
"$VENV/bin/ruff" format --check src tests scripts
"$VENV/bin/python" -m pytest "$@"
