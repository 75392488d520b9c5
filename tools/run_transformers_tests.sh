#!/usr/bin/env bash
# Runs transformers' own model tests (and the GenerationTesterMixin they include) twice per family:
# on the stock classes and on the MFPruner classes with pruning off, then prints the table of
# docs/drop_in_check.md. transformers' test code is assembled in a scratch folder outside this
# repository and never copied into it.
#
#   tools/run_transformers_tests.sh SCRATCH TRANSFORMERS_GIT COMMIT SDIST [FAMILY...]
#
# SCRATCH: a folder outside this repository (created). TRANSFORMERS_GIT: a git directory holding
# transformers' history (a clone or a mirror); COMMIT: the commit whose tests/ are used (the
# model test files, tests/generation, tests/exporters, the testers). SDIST: the installed
# release's sdist (`pip download --no-deps --no-binary :all: transformers==X`): its tests/*.py
# (the common testers of that release) replace the commit's. FAMILY: test folder names under
# tests/models (default: every family we ship). Environment: PYTHON (default: the repository's .venv),
# TEST_TIMEOUT (seconds per test, default 300).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=$1 transformers_git=$2 commit=$3 sdist=$4
shift 4
families=("${@:-llava llava_next qwen2_5_vl qwen3_vl qwen3_vl_moe qwen3_5 qwen3_5_moe}")
families=(${families[@]})
python=${PYTHON:-$repo/.venv/bin/python}
case "$(realpath -m "$scratch")/" in "$repo"/*) echo "SCRATCH must be outside $repo" >&2; exit 2 ;; esac

# ---- assemble the scratch tree: the commit's tests/ (our families only), the sdist's common testers on top
mkdir -p "$scratch/src" "$scratch/extra" "$scratch/results"
tree=$scratch/tree
if [ ! -d "$tree/tests" ]; then
    mkdir -p "$tree"
    git --git-dir="$transformers_git" archive "$commit" tests utils/test_module utils/fetch_hub_objects_for_ci.py \
        | tar x -C "$tree" --exclude='tests/models/*'
    git --git-dir="$transformers_git" archive "$commit" tests/models/__init__.py \
        $(printf 'tests/models/%s ' llava llava_next qwen2_5_vl qwen3_vl qwen3_vl_moe qwen3_5 qwen3_5_moe) | tar x -C "$tree"
    tar xzf "$sdist" -C "$scratch/src"
    release=$(ls -d "$scratch"/src/transformers-*/ | head -n 1)
    cp "$release"/tests/*.py "$tree/tests/"
    mkdir -p "$tree/src" && ln -sfn "$release/src/transformers" "$tree/src/transformers"  # test_pipeline_mixin reads it
    # Gaps between the commit's files and the release: the release's sdist has no
    # tests/distributed_testing_utils.py (only multi-accelerator tests use it: they skip), and the
    # commit's multimodal / causal-LM testers import two tables from transformers.testing_utils
    # that the release keeps elsewhere (copied from the commit's source into the scratch tree).
    printf '%s\n' 'import unittest' '' 'def _skip(*args, **kwargs):' \
        '    raise unittest.SkipTest("tests/distributed_testing_utils.py is not in the sdist")' '' \
        'run_distributed = _get_distributed_backend = _get_distributed_device_type = _skip' \
        '_get_rank_device = _set_rank_device = _start_rank_processes = _skip' > "$tree/tests/distributed_testing_utils.py"
    git --git-dir="$transformers_git" show "$commit:src/transformers/testing_utils.py" \
        | sed -n '/^_VLM_COMMON_MODEL_NAMES_MAP = {/,/^}/p;/^_TEXT_MODEL_TESTER_DEFAULTS = {/,/^}/p' > "$tree/compat_testing_utils.py"
    printf '%s\n' 'import transformers.testing_utils as testing_utils' '' 'import compat_testing_utils' '' \
        'for name in ("_VLM_COMMON_MODEL_NAMES_MAP", "_TEXT_MODEL_TESTER_DEFAULTS"):' \
        '    if not hasattr(testing_utils, name):' '        setattr(testing_utils, name, getattr(compat_testing_utils, name))' \
        > "$tree/conftest.py"
    printf '%s\n' '[pytest]' 'markers =' '    generate' '    torch_compile_test' '    torch_export_test' \
        '    flash_attn_test' '    all_flash_attn_test' '    flash_attn_3_test' '    flash_attn_4_test' \
        '    is_training_test' '    is_tensor_parallel_test' '    is_fsdp_test' '    bitsandbytes' > "$tree/pytest.ini"
    # The test files' own dependencies, into the scratch folder (never into a shared interpreter).
    "$python" -m pip install -q --no-deps --target "$scratch/extra" parameterized pytest-timeout requests urllib3 idna certifi charset-normalizer
fi

# ---- run: per family, stock then ours (pruning off); one JUnit file each
cd "$tree"
export HF_HUB_OFFLINE=1 PYTHONPATH="$tree:$tree/utils:$scratch/extra:$repo:$repo/tools"
for family in "${families[@]}"; do
    for classes in stock ours; do
        echo "== $family: $classes classes" >&2
        MFPRUNER_CLASSES=$classes "$python" -m pytest -p no:cacheprovider -p transformers_tests_shim -q -W ignore \
            --timeout "${TEST_TIMEOUT:-300}" -k "ModelTest and not TextModelTest and not Integration" \
            --junitxml "$scratch/results/$family-$classes.xml" "tests/models/$family/test_modeling_$family.py" \
            > "$scratch/results/$family-$classes.log" 2>&1 || true
        tail -n 1 "$scratch/results/$family-$classes.log" >&2
    done
done
"$python" "$repo/tools/compare_transformers_tests.py" "$scratch/results" "${families[@]}"
