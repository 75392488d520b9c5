"""tools/transformers_tests_shim.py and tools/compare_transformers_tests.py, the two halves of
tools/run_transformers_tests.sh (docs/drop_in_check.md): the shim puts our classes, with pruning
off, wherever a test module names a stock class; the comparison finds the tests that fail for ours only."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel

from configuration_mfpruner import MFPrunerLlavaConfig
from modeling_mfpruner_llava import MFPrunerLlavaForConditionalGeneration
from tools import compare_transformers_tests, transformers_tests_shim

ROOT = Path(__file__).resolve().parents[1]


def a_test_module():
    """A module shaped like transformers' model test files: a tester that builds the stock config
    by its module-global name, a test class listing model classes, a tester that names them as
    class attributes and inherits get_config."""
    module = types.ModuleType("test_modeling_fake")
    module.LlavaConfig = LlavaConfig
    module.LlavaForConditionalGeneration = LlavaForConditionalGeneration

    class Tester:
        def get_config(self):
            return module.LlavaConfig(text_config={"model_type": "llama", "num_hidden_layers": 1}, image_token_id=3)

    class InheritingTester(Tester):
        config_class = LlavaConfig
        conditional_generation_class = LlavaForConditionalGeneration

    class ModelTest:
        all_model_classes = (LlavaModel, LlavaForConditionalGeneration)
        all_generative_model_classes = (LlavaForConditionalGeneration,)
        pipeline_model_mapping = {"image-text-to-text": LlavaForConditionalGeneration}

    module.Tester, module.InheritingTester, module.ModelTest = Tester, InheritingTester, ModelTest
    return module


def test_shim_puts_our_classes_with_pruning_off_in_place_of_the_stock_ones():
    module = a_test_module()
    transformers_tests_shim.swap_module(module, transformers_tests_shim.stock_to_ours())

    assert module.LlavaForConditionalGeneration is MFPrunerLlavaForConditionalGeneration
    assert module.ModelTest.all_model_classes == (LlavaModel, MFPrunerLlavaForConditionalGeneration)
    assert module.ModelTest.all_generative_model_classes == (MFPrunerLlavaForConditionalGeneration,)
    assert module.ModelTest.pipeline_model_mapping == {"image-text-to-text": MFPrunerLlavaForConditionalGeneration}
    assert module.InheritingTester.config_class is MFPrunerLlavaConfig
    assert module.InheritingTester.conditional_generation_class is MFPrunerLlavaForConditionalGeneration
    for tester in (module.Tester(), module.InheritingTester()):
        config = tester.get_config()
        assert type(config) is MFPrunerLlavaConfig
        assert config.prune_visual_tokens is False
        assert config.image_token_id == 3


def test_shim_leaves_the_stock_run_alone(monkeypatch):
    module = a_test_module()
    monkeypatch.setenv("MFPRUNER_CLASSES", "stock")
    item = types.SimpleNamespace(module=module)
    transformers_tests_shim.pytest_collection_modifyitems(None, None, [item])
    assert module.ModelTest.all_generative_model_classes == (LlavaForConditionalGeneration,)
    assert type(module.Tester().get_config()) is LlavaConfig

    monkeypatch.setenv("MFPRUNER_CLASSES", "mine")
    with pytest.raises(ValueError, match="MFPRUNER_CLASSES must be 'stock' or 'ours'"):
        transformers_tests_shim.pytest_collection_modifyitems(None, None, [item])


def test_shim_registers_up_front_what_loading_our_repos_with_trust_remote_code_registers():
    """The tests load the folders they save without trust_remote_code: in the "ours" run every family's
    config is registered for its model_type and each class of its repos' auto_map for that Auto class
    (AutoModel stays the stock base model the testers look up). In a child process: the registration
    is global."""
    code = """
import transformers
from transformers.models.auto import configuration_auto, modeling_auto
from configuration_mfpruner import MFPrunerLlavaConfig, MFPrunerQwen3_5Config, MFPrunerQwen3_5MoeConfig
import modeling_mfpruner_llava as llava, modeling_mfpruner_qwen3_5 as qwen3_5
from tools import transformers_tests_shim

transformers_tests_shim.register_our_auto_classes()
assert configuration_auto.CONFIG_MAPPING["mfpruner_qwen3_5"] is MFPrunerQwen3_5Config
image_text = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
assert image_text[MFPrunerLlavaConfig] is llava.MFPrunerLlavaForConditionalGeneration
assert image_text[MFPrunerQwen3_5Config] is qwen3_5.MFPrunerQwen3_5ForConditionalGeneration
assert modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[MFPrunerQwen3_5Config] is qwen3_5.MFPrunerQwen3_5ForCausalLM
assert modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[MFPrunerQwen3_5MoeConfig] is qwen3_5.MFPrunerQwen3_5MoeForCausalLM
assert modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING[MFPrunerQwen3_5Config] is qwen3_5.MFPrunerQwen3_5ForTokenClassification
assert MFPrunerLlavaConfig not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


def junit(path, cases: dict[str, str]):
    """cases: test name -> passed / failed / error / skipped."""
    body = {"passed": "", "failed": "<failure/>", "error": "<error/>", "skipped": "<skipped/>"}
    path.write_text(
        "<testsuites><testsuite>"
        + "".join(f'<testcase classname="tests.m.ModelTest" name="{name}">{body[outcome]}</testcase>' for name, outcome in cases.items())
        + "</testsuite></testsuites>"
    )


def test_comparison_reports_only_the_failures_the_stock_classes_do_not_have(tmp_path, capsys):
    junit(tmp_path / "llava-stock.xml", {"a": "passed", "b": "failed", "c": "passed", "d": "skipped", "e": "passed"})
    junit(tmp_path / "llava-ours.xml", {"a": "passed", "b": "failed", "c": "error", "d": "skipped", "e": "skipped"})
    assert compare_transformers_tests.main(tmp_path, ["llava"]) == 1
    out = capsys.readouterr().out
    assert "| llava | 4 | 1 | 2 | 2 |" in out  # run: a b c e; ours only: c (error), e (skipped where stock passed)
    assert "- llava: ModelTest::c" in out and "- llava: ModelTest::e" in out and "ModelTest::b" not in out

    junit(tmp_path / "llava-ours.xml", {"a": "passed", "b": "failed", "c": "passed", "d": "skipped", "e": "passed"})
    assert compare_transformers_tests.main(tmp_path, ["llava", "qwen2_5_vl"]) == 0
    out = capsys.readouterr().out
    assert "| llava | 4 | 1 | 1 | 0 |" in out and "| qwen2_5_vl | not run |" in out
