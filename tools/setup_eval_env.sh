#!/usr/bin/env bash
# Builds .venv-eval: lmms-eval 0.7.3 and this project (for its `lmms_eval.models` entry point)
# in a virtual environment layered over the main environment (tools/layered_venv.py: the
# environment of $PYTHON, be it a venv, conda or the system Python), so it reuses the main
# environment's torch instead of downloading lmms-eval's CUDA torch and torchvision, and leaves
# the main environment untouched. Fails (exit 1) when torch or transformers do not import there.
#
# lmms-eval goes in without its dependency list (dozens of packages for other models, API
# judges and video); the packages below are what its CLI, evaluator and the image tasks
# (POPE, MME, GQA, ...) import, found by running them. filelock<4: lmms-eval imports
# filelock._api. decord: its built-in HF model modules import it (py3-none manylinux wheel).
# On a GPU machine use `pip install -e ".[eval]"` instead (docs/evaluation.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-eval}
PYTHON=${PYTHON:-python}

"$PYTHON" -m tools.layered_venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# lmms-eval after its needed dependencies: an install with dependencies checks the whole
# environment and would print an ERROR block for the dozens of lmms-eval dependencies left out
"${PIP[@]}" "datasets>=2.19" "evaluate>=0.4" "sacrebleu>=1.5" loguru "tenacity>=8.3" pytablewriter \
    "filelock>=3.16,<4" "decord>=0.6"
"${PIP[@]}" --no-deps "lmms-eval==0.7.3"
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "from lmms_eval.models import get_model_manifest; get_model_manifest('mfpruner')"
# the installs above must not have replaced or hidden the main environment's torch / transformers
"$VENV/bin/python" -c "import torch, transformers" || { echo "error: $VENV cannot import torch / transformers after the installs" >&2; exit 1; }
echo "eval environment ready: $VENV"
