#!/usr/bin/env bash
# One-command GPU check (about 5-6 minutes on one H200; every step has its own time limit and the
# whole run a budget of GPU_CHECK_BUDGET seconds, 450 by default):
#
#   bash tools/gpu_check.sh               # on the GPU machine; results in $OUT (default ./gpu_check_out)
#   bash tools/gpu_check.sh --cpu-smoke   # dry run of every step on the CPU at tiny sizes
#
# Steps (one failing step does not stop the others; each prints progress, PYTHONUNBUFFERED=1):
#   wheels      installs the carried wheels in .whl/ (tools/gpu_wheels.sh) when the machine's
#               transformers is older than 5.23 (the H200 image has 5.17; nothing can be downloaded there)
#   env         GPU, driver, python / torch / transformers versions
#   kernels     attention_with_received (chunked / fused / auto x float32 / bfloat16 / float16) on the
#               GPU against the float64 materialised map: the fused path calls torch's attention kernels directly
#   prefill-*   tools.benchmark_prefill --size real --device cuda --dtype bfloat16 for LLaVA-1.5,
#               LLaVA-NeXT, Qwen2.5-VL (random-initialised 7B geometry), Qwen3-VL (8B geometry) and Qwen3.5
#               (27B geometry; the Gated DeltaNet layers on transformers' PyTorch path), SDPA
#   cues        tools.benchmark_cues: cue A of Qwen2.5-VL at the 7B vision width (1024x1024 and
#               2048x2048 images: stock attention vs two-pass vs attention_with_received vs one
#               block forward), and the LLaVA cues at ViT-L width
#   device-map  vision tower on the CPU, LLM on the GPU (tiny models of each family, float32, no TF32):
#               same kept tokens, logits and generated tokens as all-GPU and all-CPU
#   summary     prefill.md / prefill.json (+ FLOPs-ideal and the paper's 3.42x at 32 tokens), plot
#
# $OUT gets at most 8 files, flat: gpu_check.log, summary.md, prefill.md, prefill.json,
# prefill_speedup.png, cues.md, cues.json, device_map.json. Commit them under
# benchmarks/gpu-<GPU name>/. Carry: `.whl` (run `bash tools/gpu_wheels.sh` here first).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=gpu
[ "${1:-}" = "--cpu-smoke" ] && MODE=cpu-smoke
OUT=${OUT:-$ROOT/gpu_check_out}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.md"
BUDGET=${GPU_CHECK_BUDGET:-450}
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
exec > >(tee -a "$LOG") 2>&1

if [ "$MODE" = gpu ]; then
  DEVICE=cuda; SIZE=real; DTYPE=bfloat16; ROUNDS="--repeats 5 --warmup 2"; DM_SIZE=smoke
  CUE_ARGS="--repeats 5 --warmup 2 --big-rounds 3 1"
  # A GPU benchmark barely depends on CPU load, and this run is the lead's one try: write the files
  # even if a background process was busy, marked FORCED with the figures (see bench_utils).
  LOAD_ARGS="--force --max-other-cores 2"
else
  DEVICE=cpu; SIZE=smoke; DTYPE=float32; ROUNDS="--repeats 1 --warmup 0"; DM_SIZE=smoke
  CUE_ARGS="--smoke"; LOAD_ARGS="--force"
fi

{
  echo "# GPU check ($MODE), $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "| step | exit | seconds |"
  echo "|---|---|---|"
} > "$SUMMARY"

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under `timeout`, never more than what is left
# of the budget; records the exit status (124: timed out) in the summary.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "=== [$name] skipped: the ${BUDGET}s budget is spent"
    echo "| $name | skipped (budget) | 0 |" >> "$SUMMARY"
    return
  fi
  echo "=== [$name] start $(date -u +%T), limit ${limit}s: $*"
  local t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@"
  local rc=$?
  echo "=== [$name] exit $rc after $(( $(date +%s) - t0 ))s"
  echo "| $name | $rc$([ $rc = 124 ] && echo ' (timed out)') | $(( $(date +%s) - t0 )) |" >> "$SUMMARY"
}

install_wheels() {
  if $PY -c 'import sys, transformers; v = tuple(int(x) for x in transformers.__version__.split(".")[:2]); sys.exit(v < (5, 23))'; then
    echo "transformers $($PY -c 'import transformers; print(transformers.__version__)') is new enough: no wheels needed"
    return 0
  fi
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "transformers is older than 5.23 and no wheels are in .whl/: run 'bash tools/gpu_wheels.sh' and carry .whl"
    return 1
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  echo "installed: $(ls .whl)"
}

show_env() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY - <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "from", transformers.__file__)
print("cuda available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
EOF
}

step wheels 90 bash -c "$(declare -f install_wheels); PY=$PY install_wheels"
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PYTHONPATH"
step env 30 bash -c "$(declare -f show_env); PY=$PY show_env"
step kernels 60 $PY -m tools.gpu_check kernels --device $DEVICE --append "$SUMMARY.kernels"
for family in llava-1.5 llava-next qwen2.5-vl qwen3-vl qwen3.5; do
  limit=100; [ "$family" = qwen3.5 ] && limit=150  # 27B, and transformers' PyTorch Gated DeltaNet path
  step "prefill-$family" $limit $PY -m tools.benchmark_prefill --family "$family" --size $SIZE --device $DEVICE \
    --dtype $DTYPE $ROUNDS --decode-steps 8 --output-dir "$WORK" $LOAD_ARGS
done
CUE_DTYPE=$DTYPE
step cues 100 $PY -m tools.benchmark_cues --device $DEVICE --dtype $CUE_DTYPE $CUE_ARGS --query-chunk 1024 \
  --output "$OUT/cues.md" --json "$OUT/cues.json" $LOAD_ARGS
step device-map 90 $PY -m tools.gpu_check device-map --out "$OUT" --size $DM_SIZE --device $DEVICE
step summary 40 $PY -m tools.gpu_check summary --work "$WORK" --out "$OUT"

[ -f "$SUMMARY.kernels" ] && cat "$SUMMARY.kernels" >> "$SUMMARY" && rm -f "$SUMMARY.kernels"
echo >> "$SUMMARY"
echo "Total: $(( $(date +%s) - START ))s. Files: $(cd "$OUT" && ls | tr '\n' ' ')" >> "$SUMMARY"
cat "$SUMMARY"
rm -rf "$WORK"
sleep 1  # let tee flush the log
