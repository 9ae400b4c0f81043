#!/usr/bin/env bash
# A separate venv for the TRL baselines of bench/ (TRL pins accelerate/datasets we do not use).
# Same torch and transformers as .venv, so the comparison is of trainers, not of kernels.
# Usage: bench/setup_trl.sh   -> .venv-trl (idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TRL_VENV:-.venv-trl}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
# trl 1.12 is the last release that ships PRMTrainer (trl.experimental.prm); DPOTrainer is in every release.
PKGS="torch==2.13.0 transformers==5.19.0 trl==1.12.0 accelerate datasets safetensors pyarrow gguf"
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PKGS" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2> >(grep -v "is ignored" >&2)
"$VENV/bin/python" -m pip install -q "torch==2.13.0" 2> >(grep -v "is ignored" >&2)
"$VENV/bin/python" -m pip install -q -c <(echo "torch==2.13.0") $PKGS 2> >(grep -v "is ignored" >&2)
echo "$PKGS" > "$STAMP"
echo "[setup_trl] $VENV ready"
