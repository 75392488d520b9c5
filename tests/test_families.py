"""mfpruner_lib.families: every registry entry is complete, and every per-family consumer (export,
FLOPs, benchmarks, GPU check, demo, tiny builders, packaging) covers every family."""

from __future__ import annotations

import dataclasses
import importlib
import tomllib
from pathlib import Path

import pytest
import transformers
from transformers import AutoConfig

from mfpruner_lib import flops
from mfpruner_lib.families import FAMILIES, Architecture, Family, by_model_type

from conftest import refused

ROOT = Path(__file__).resolve().parents[1]


def import_object(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("key", FAMILIES)
def test_entry_is_complete(key):
    family = FAMILIES[key]
    assert family.key == key
    for field in dataclasses.fields(Family):
        value = getattr(family, field.name)
        assert value is not None and value != () and value != "", field.name
    for name in ("build_tiny", "geometry", "token_boxes", "demo_tiny"):
        assert callable(getattr(family, name)), name
    assert isinstance(family.export, Architecture)
    config_class, model_class = import_object(family.config_class), import_object(family.model_class)
    assert config_class.model_type == f"mfpruner_{family.model_type}"
    assert model_class.config_class is config_class
    stock_class = getattr(transformers, family.stock_model_class)
    assert issubclass(model_class, stock_class)  # a drop-in subclass of the stock class
    if family.export.processor_class:
        import_object(family.export.processor_class)
    assert by_model_type(family.model_type) is family is by_model_type(config_class.model_type)


def test_unknown_model_type_has_no_family():
    assert by_model_type("bert") is None


@pytest.mark.parametrize("key", FAMILIES)
def test_tiny_builders_write_the_family(tiny_repo, key):
    """The registry's tiny builder writes an MFPruner repo and a stock checkpoint of its model_type."""
    family = FAMILIES[key]
    assert AutoConfig.from_pretrained(tiny_repo(key), trust_remote_code=True).model_type == f"mfpruner_{family.model_type}"
    assert AutoConfig.from_pretrained(tiny_repo(key, stock=True)).model_type == family.model_type


@pytest.mark.parametrize("key", FAMILIES)
def test_flops_geometry_reads_the_registry(key):
    family = FAMILIES[key]
    for real in family.real_models:
        config = real.config()
        assert flops.geometry(config, real.image_hw) == family.geometry(config, real.image_hw)
        assert flops.geometry(config, real.image_hw).visual_tokens > 0


def test_every_consumer_covers_every_family():
    from tools import benchmark_prefill, export
    from tools import flops as flops_cli

    model_types = {family.model_type for family in FAMILIES.values()}
    assert set(export.ARCHITECTURES) == model_types
    assert all(export.ARCHITECTURES[f.model_type] is f.export for f in FAMILIES.values())
    assert set(benchmark_prefill.FAMILIES) == set(FAMILIES)
    assert all(benchmark_prefill.FAMILIES[key].name == FAMILIES[key].name for key in FAMILIES)
    assert {family.key for family, _ in flops_cli.real_models()} == set(FAMILIES)


def test_the_vllm_plugin_serves_every_family():
    """mfpruner_vllm registers every family's architecture name (what exported repos carry in
    config.json), each with a class of the plugin's own files (tests/test_vllm.py serves them)."""
    import mfpruner_vllm

    assert set(mfpruner_vllm.ARCHITECTURES) == {family.model_class.rsplit(".", 1)[1] for family in FAMILIES.values()}
    for name, target in mfpruner_vllm.ARCHITECTURES.items():
        module, class_name = target.split(":")
        assert class_name == name and (ROOT / f"{module.replace('.', '/')}.py").exists(), target


def test_the_demo_covers_every_family():
    """`--tiny` offers every family; each family's demo tiny model and token boxes come from the registry."""
    from mfpruner_demo import loading

    assert set(loading.TINY_FAMILIES) == {family.model_type for family in FAMILIES.values()}
    assert all(loading.TINY_FAMILIES[f.model_type] is f for f in FAMILIES.values())


def test_shipped_files_of_every_family_are_packaged():
    """pyproject's py-modules list each family's config and modeling files (the shipped flat modules)."""
    modules = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"])
    for family in FAMILIES.values():
        for dotted in (family.config_class, family.model_class, family.export.processor_class):
            if dotted:
                assert dotted.rsplit(".", 1)[0] in modules, dotted


def test_build_tiny_cli_writes_any_family(tmp_path, capsys):
    from tools import build_tiny

    build_tiny.main([str(tmp_path / "next"), "--family", "llava-next", "--stock"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "next")
    assert AutoConfig.from_pretrained(tmp_path / "next").model_type == "llava_next"
    assert "invalid choice: 'llava-2'" in refused(build_tiny.main, [str(tmp_path / "x"), "--family", "llava-2"], capsys)
