#!/usr/bin/env bash
# Builds .venv-eval: lmms-eval 0.7.3 and this project (for its `lmms_eval.models` entry point)
# in a virtual environment layered over the main environment (--system-site-packages), so it
# reuses the main environment's torch instead of downloading lmms-eval's CUDA torch and
# torchvision, and leaves the main environment untouched.
#
# lmms-eval goes in without its dependency list (dozens of packages for other models, API
# judges and video); the packages below are what its CLI, evaluator and the image tasks
# (POPE, MME, GQA, ...) import, found by running them. filelock<4: lmms-eval imports
# filelock._api. decord: its built-in HF model modules import it (py3-none manylinux wheel).
# On a GPU machine use `pip install -e ".[eval]"` instead (README: Accuracy (lmms-eval)).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-eval}
PYTHON=${PYTHON:-python}

"$PYTHON" -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --no-deps "lmms-eval==0.7.3"
"${PIP[@]}" "datasets>=2.19" "evaluate>=0.4" "sacrebleu>=1.5" loguru "tenacity>=8.3" pytablewriter \
    "filelock>=3.16,<4" "decord>=0.6"
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "from lmms_eval.models import get_model_manifest; get_model_manifest('mfpruner')"
echo "eval environment ready: $VENV"
