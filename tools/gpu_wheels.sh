#!/usr/bin/env bash
# Downloads the wheels that tools/gpu_check.sh installs on the GPU machine (no network there).
#
# The GPU image has python3 3.12, torch 2.11+cu130, transformers 5.17, huggingface_hub 1.33,
# tokenizers 0.23.2, safetensors 0.8, accelerate 1.15, numpy, packaging, pyyaml, tqdm, typer.
# Our code needs transformers >= 5.23; transformers 5.24.0's Requires-Dist beyond that image:
# only `regex>=2025.10.22` (the image's regex version is unknown, so it travels too).
#   huggingface-hub>=1.31 (1.33 there), tokenizers>=0.23.1,<0.24 (0.23.2 there),
#   safetensors>=0.8 (0.8 there), numpy, packaging, pyyaml, tqdm, typer: already there.
# Run from the repository root:  bash tools/gpu_wheels.sh   (writes .whl/, git-ignored, ~13 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl transformers==5.24.0 regex==2026.5.9
# Exactly one version of each package: two would stop the install there.
ls .whl
du -sh .whl
