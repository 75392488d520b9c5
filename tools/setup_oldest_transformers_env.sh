#!/usr/bin/env bash
# Builds a virtual environment with the OLDEST transformers that requirements.txt allows (the
# `transformers>=X` lower bound), layered over the main environment (tools/layered_venv.py), so
# it reuses the main torch and everything else; only transformers differs. CI runs the model
# tests there, so both ends of the supported range are tested. Fails (exit 1) when the installed
# transformers is not that version.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-transformers-oldest}
PYTHON=${PYTHON:-python}

OLDEST=$(sed -n 's/^transformers>=\([0-9.]*\).*/\1/p' requirements.txt)
[ -n "$OLDEST" ] || { echo "error: no 'transformers>=X' line in requirements.txt" >&2; exit 1; }
case "$OLDEST" in *.*.*) ;; *) OLDEST="$OLDEST.0" ;; esac
"$PYTHON" -m tools.layered_venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "transformers==$OLDEST"
"$VENV/bin/python" -c "import sys, transformers; sys.exit(transformers.__version__ != '$OLDEST')" \
    || { echo "error: $VENV does not hold transformers $OLDEST" >&2; exit 1; }
echo "oldest-transformers environment ready: $VENV (transformers $OLDEST)"
