"""pytest plugin for tools/run_transformers_tests.sh: runs transformers' own model tests on the
MFPruner classes with pruning off (MFPRUNER_CLASSES=ours) or leaves them on the stock classes
(MFPRUNER_CLASSES=stock, the reference run).

With "ours", each collected test module's stock model and config classes are replaced by ours
(module globals, the test classes' `all_model_classes` / `all_generative_model_classes` /
`pipeline_model_mapping`, the model testers' `config_class` / `conditional_generation_class`), and
every model tester's `get_config()` returns its config with `prune_visual_tokens=False`. Nothing
outside the collected test modules is touched. transformers' test code is never part of this
repository: the script assembles it in a scratch folder.
"""

import os
import sys

import transformers
from transformers import MODEL_MAPPING

from configuration_mfpruner import MFPrunerSettings, stock_class
from mfpruner_lib.families import FAMILIES
from mfpruner_pipeline import auto_classes
from tools.export import import_object


def stock_to_ours() -> dict[type, type]:
    mapping = {}
    for family in FAMILIES.values():
        ours_config = import_object(family.config_class)
        mapping[getattr(transformers, family.stock_model_class)] = import_object(family.model_class)
        mapping[stock_class(ours_config)] = ours_config
    return mapping


def with_pruning_off(get_config):
    def get_config_pruning_off(self, *args, **kwargs):
        config = get_config(self, *args, **kwargs)
        if isinstance(config, MFPrunerSettings):
            config.prune_visual_tokens = False
        return config

    get_config_pruning_off.pruning_off = True
    return get_config_pruning_off


def swap_module(module, mapping: dict[type, type]) -> None:
    for name, value in list(vars(module).items()):
        if isinstance(value, type) and value in mapping:
            setattr(module, name, mapping[value])
    for value in list(vars(module).values()):
        if not isinstance(value, type):
            continue
        for attribute in ("all_model_classes", "all_generative_model_classes"):
            classes = vars(value).get(attribute)
            if isinstance(classes, tuple):
                setattr(value, attribute, tuple(mapping.get(cls, cls) for cls in classes))
        pipelines = vars(value).get("pipeline_model_mapping")
        if isinstance(pipelines, dict):
            value.pipeline_model_mapping = {task: mapping.get(cls, cls) for task, cls in pipelines.items()}
        for attribute in ("config_class", "conditional_generation_class"):
            cls = vars(value).get(attribute)
            if isinstance(cls, type) and cls in mapping:
                setattr(value, attribute, mapping[cls])
        get_config = getattr(value, "get_config", None)  # a tester's own or its base class's
        if callable(get_config) and not getattr(get_config, "pruning_off", False):
            value.get_config = with_pruning_off(get_config)


def with_our_class_names(names: dict, mapping: dict[type, type]) -> dict:
    """A copy of a MODEL_*_MAPPING_NAMES table (model_type -> class name(s)) where each stock
    class name also has our class's name: the testers pick labels and heads by these names."""
    ours_by_name = {stock.__name__: ours.__name__ for stock, ours in mapping.items()}
    extended = type(names)(names)
    for model_type, class_names in names.items():
        for name in class_names if isinstance(class_names, (tuple, list)) else (class_names,):
            if name in ours_by_name:
                extended[f"mfpruner_{model_type}"] = ours_by_name[name]
    return extended


def use_our_class_names(module, mapping: dict[type, type]) -> None:
    for name, value in list(vars(module).items()):
        if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES") and isinstance(value, dict):
            setattr(module, name, with_our_class_names(value, mapping))


def register_our_auto_classes() -> None:
    """What loading an MFPruner repo with trust_remote_code=True registers in-process (the config for
    its model_type, each class of its auto_map for that Auto class), done up front: the tests load the
    folders they save without trust_remote_code, as they may for the stock classes. (AutoModel is left
    to the stock base model, above.)"""
    for family in FAMILIES.values():
        config_class, model_class = import_object(family.config_class), import_object(family.model_class)
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class, cls in auto_classes(model_class).items():
            if auto_class != "AutoModel":
                getattr(transformers, auto_class).register(config_class, cls, exist_ok=True)


def pytest_collection_modifyitems(session, config, items):
    classes = os.environ.get("MFPRUNER_CLASSES", "stock")
    if classes not in ("stock", "ours"):
        raise ValueError(f"MFPRUNER_CLASSES must be 'stock' or 'ours', got {classes!r}")
    if classes == "stock":
        return
    mapping = stock_to_ours()
    for stock, ours in mapping.items():
        # Ours are not in the auto mappings unless loaded through the hub's auto_map: the testers
        # look a config's base model up there (test_torch_save_load).
        if stock in MODEL_MAPPING:
            MODEL_MAPPING.register(ours, MODEL_MAPPING[stock], exist_ok=True)
    register_our_auto_classes()
    for module in {item.module for item in items if getattr(item, "module", None) is not None}:
        swap_module(module, mapping)
    for test_class in {item.cls for item in items if getattr(item, "cls", None) is not None}:
        # The common tester skips this check for models whose config file has no "# Copyright
        # 2023" (or later) line; ours has none, the stock families all are from 2023 on.
        test_class.test_can_init_all_missing_weights_before_2023 = True
    # The testers (test_modeling_common, generation/test_utils) choose by class name.
    for name, module in list(sys.modules.items()):
        if name.startswith("tests.") and module is not None:
            use_our_class_names(module, mapping)
