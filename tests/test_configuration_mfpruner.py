"""MFPruner settings are checked wherever they enter: the constructor, from_dict, from_pretrained
kwargs (which transformers sets on the built config), a saved config.json, the remote-code Auto
classes, an assignment to `model.config`, an in-place edit (caught at the next call), and a
misspelled keyword. Each bad value is a ValueError that names the setting."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from configuration_mfpruner import (
    MFPRUNER_CALL_KWARGS,
    MFPRUNER_CONFIG_FIELDS,
    MFPrunerLlavaConfig,
    MFPrunerLlavaNextConfig,
    MFPrunerQwen2_5_VLConfig,
    check_call_kwargs,
    check_setting,
    validate_mfpruner_settings,
)
from tests.conftest import random_image
from mfpruner_lib.families import FAMILIES
from mfpruner_lib.tiny_models import qwen_inputs, tiny_clip_text_config

CONFIG_CLASSES = [MFPrunerLlavaConfig, MFPrunerLlavaNextConfig, MFPrunerQwen2_5_VLConfig]

# (field, bad value, what the message says besides the field's name)
BAD_SETTINGS = [
    ("visual_token_budget", 0, "positive int"),
    ("visual_token_budget", -3, "positive int"),
    ("visual_token_budget", 2.5, "positive int"),
    ("visual_token_budget", "64", "positive int"),
    ("visual_token_budget", True, "positive int"),
    ("visual_token_ratio", 0.0, r"\(0, 1\]"),
    ("visual_token_ratio", 1.5, r"\(0, 1\]"),
    ("visual_token_ratio", "0.5", r"\(0, 1\]"),
    ("prune_visual_tokens", "yes", "True or False"),
    ("prune_visual_tokens", 1, "True or False"),
    ("prune_visual_tokens", None, "True or False"),
    ("mfpruner_cues", ["attention", "colour"], "'colour' is not a cue"),
    ("mfpruner_cues", ["attention", "attention"], "named twice"),
    ("mfpruner_cues", [], "no cue would vote"),
    ("mfpruner_cues", "attention", "a list of names"),
    ("relevance_source", "clip", "must be one of"),
    ("relevance_source", None, "must be one of"),
    ("min_votes", 0, "positive int"),
    ("min_votes", 1.5, "positive int"),
    ("min_votes", True, "positive int"),
    ("fill_by", "max", "must be one of"),
]
LLAVA_BAD_SETTINGS = [  # the LLaVA families may carry a CLIP text tower
    ("clip_text_config", "openai/clip-vit-large-patch14", "CLIPTextConfig dict"),
    ("clip_text_config", {"hidden_size": "wide"}, "not a valid CLIPTextConfig"),
]
QWEN_BAD_SETTINGS = [  # Qwen2.5-VL has no CLIP text tower, and it has an attention cue chunk size
    ("relevance_source", "clip_text", "no CLIP text tower"),
    ("clip_text_config", tiny_clip_text_config(64), "no CLIP text tower"),
    ("clip_text_config", "openai/clip-vit-large-patch14", "no CLIP text tower"),
    ("attention_query_chunk", 0, "positive int"),
    ("attention_query_chunk", -8, "positive int"),
    ("attention_query_chunk", 2.0, "positive int"),
    ("attention_query_chunk", True, "positive int"),
]
FAMILY_BAD_SETTINGS = {
    MFPrunerLlavaConfig: LLAVA_BAD_SETTINGS,
    MFPrunerLlavaNextConfig: LLAVA_BAD_SETTINGS,
    MFPrunerQwen2_5_VLConfig: QWEN_BAD_SETTINGS,
}
BAD_CASES = [(cls, *bad) for cls in CONFIG_CLASSES for bad in BAD_SETTINGS + FAMILY_BAD_SETTINGS[cls]]


def case_id(case) -> str:
    cls, field, value, _ = case
    return f"{cls.__name__}-{field}={value!r}"[:80]


def raises_naming(field: str, message: str = ""):
    return pytest.raises(ValueError, match=rf"`{field}.*{message}")


# ----------------------------------------------------------------------------- every entry path, every config


def build(cls, field, value, tmp_path):
    return cls(**{field: value})


def from_dict_values(cls, field, value, tmp_path):
    return cls.from_dict({**cls().to_dict(), field: value})


def from_dict_kwargs(cls, field, value, tmp_path):  # kwargs are set on the config after it is built
    return cls.from_dict(cls().to_dict(), **{field: value})


def from_pretrained_kwargs(cls, field, value, tmp_path):
    cls().save_pretrained(tmp_path)
    return cls.from_pretrained(tmp_path, **{field: value})


def saved_config_json(cls, field, value, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**cls().to_dict(), field: value}))
    return cls.from_pretrained(tmp_path)


ENTRY_PATHS = [build, from_dict_values, from_dict_kwargs, from_pretrained_kwargs, saved_config_json]


@pytest.mark.parametrize("case", BAD_CASES, ids=case_id)
@pytest.mark.parametrize("entry", ENTRY_PATHS, ids=lambda entry: entry.__name__)
def test_bad_setting_is_refused_on_every_entry_path(case, entry, tmp_path):
    cls, field, value, message = case
    with raises_naming(field, message):
        entry(cls, field, value, tmp_path)


@pytest.mark.parametrize("case", BAD_CASES, ids=case_id)
def test_bad_assignment_is_refused_and_leaves_the_config_unchanged(case):
    cls, field, value, message = case
    config = cls()
    before = getattr(config, field)
    with raises_naming(field, message):
        setattr(config, field, value)
    assert getattr(config, field) == before
    validate_mfpruner_settings(config)


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_in_place_edit_is_caught_by_validate(cls, tmp_path):
    """A list edited in place never passes through __setattr__: validate_mfpruner_settings (run
    at every pruning call and before saving) catches it."""
    config = cls()
    config.mfpruner_cues.append("colour")
    with raises_naming("mfpruner_cues", "'colour' is not a cue"):
        validate_mfpruner_settings(config)
    with raises_naming("mfpruner_cues"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


# ----------------------------------------------------------------------------- rules between fields


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_budget_and_ratio_exactly_one(cls, tmp_path):
    with pytest.raises(ValueError, match="only one of `visual_token_budget` and `visual_token_ratio`"):
        cls(visual_token_budget=8, visual_token_ratio=0.5)
    cls(visual_token_budget=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only one of `visual_token_budget` and `visual_token_ratio`"):
        cls.from_pretrained(tmp_path, visual_token_ratio=0.5)  # the saved budget is still set
    with pytest.raises(ValueError, match="one of `visual_token_budget` and `visual_token_ratio`"):
        cls.from_pretrained(tmp_path, visual_token_budget=None)  # neither
    loaded = cls.from_pretrained(tmp_path, visual_token_budget=None, visual_token_ratio=0.5)
    assert (loaded.visual_token_budget, loaded.visual_token_ratio) == (None, 0.5)


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_switching_from_budget_to_ratio_by_assignment(cls):
    """One field at a time passes through a state with neither set: only a use of that state fails."""
    config = cls(visual_token_budget=8)
    config.visual_token_budget = None
    with pytest.raises(ValueError, match="one of `visual_token_budget` and `visual_token_ratio`"):
        validate_mfpruner_settings(config)
    config.visual_token_ratio = 0.5
    validate_mfpruner_settings(config)
    config.visual_token_budget = 16  # both set: refused at the next use
    with pytest.raises(ValueError, match="only one of"):
        validate_mfpruner_settings(config)


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_fill_by_relevance_needs_relevance_and_another_cue(cls, tmp_path):
    for cues in (["attention", "uniqueness"], ["relevance"]):
        with raises_naming("fill_by", "needs 'relevance' and at least one other cue"):
            cls(fill_by="relevance", mfpruner_cues=cues)
        with raises_naming("fill_by"):
            cls.from_dict(cls().to_dict(), fill_by="relevance", mfpruner_cues=cues)
    cls(fill_by="relevance", mfpruner_cues=["attention", "relevance"])


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_valid_settings_are_kept_through_save_and_load(cls, tmp_path):
    settings = dict(
        visual_token_budget=None,
        visual_token_ratio=1,
        prune_visual_tokens=False,
        mfpruner_cues=("uniqueness", "relevance"),
        relevance_source="llm",
        min_votes=5,  # above the number of cues: capped at it when voting
        fill_by="relevance",
    )
    if cls is MFPrunerQwen2_5_VLConfig:
        settings["attention_query_chunk"] = 1
    else:
        settings["clip_text_config"] = tiny_clip_text_config(64)
    config = cls(**settings)
    assert config.mfpruner_cues == ["uniqueness", "relevance"]  # a tuple is stored as a list
    config.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    for field, value in settings.items():
        expected = json.loads(json.dumps(value))  # as JSON stores it: a tuple as a list, int dict keys as str
        assert getattr(loaded, field) == expected, field


def test_relevance_source_clip_text_is_a_llava_setting():
    assert MFPrunerLlavaConfig(relevance_source="clip_text").relevance_source == "clip_text"
    assert MFPrunerLlavaNextConfig(relevance_source="clip_text").relevance_source == "clip_text"


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_misspelled_field_in_from_pretrained_kwargs(cls, tmp_path):
    cls().save_pretrained(tmp_path)
    for typo, field in [("visual_token_budjet", "visual_token_budget"), ("mfpruner_cue", "mfpruner_cues")]:
        with pytest.raises(ValueError, match=f"unknown keyword `{typo}`; did you mean `{field}`"):
            cls.from_pretrained(tmp_path, **{typo: 2})


MISSPELLED_FIELDS = [("visual_token_budjet", "visual_token_budget"), ("mfpruner_cue", "mfpruner_cues"),
                     ("prune_visual_token", "prune_visual_tokens"), ("min_vote", "min_votes")]


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
@pytest.mark.parametrize("entry", [build, from_dict_values, saved_config_json], ids=lambda entry: entry.__name__)
def test_misspelled_field_is_refused_when_built_or_loaded(cls, entry, tmp_path):
    """`MFPrunerLlavaConfig(visual_token_budjet=8)` and the same key in a config.json once kept the
    default budget silently."""
    for typo, field in MISSPELLED_FIELDS:
        with pytest.raises(ValueError, match=f"unknown keyword `{typo}`; did you mean `{field}`"):
            entry(cls, typo, 8, tmp_path)


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_unknown_keys_that_are_no_misspelling_pass_as_for_the_stock_config(cls, tmp_path):
    """Only close matches to MFPruner fields are refused: other unknown keys (a newer transformers'
    field, a user's note) are kept exactly as the stock config keeps them."""
    stock_cls = next(base for base in cls.__mro__ if base.__module__.startswith("transformers.models."))
    extra = {"my_note": "kept", "vision_token_budget_note": 3, "image_seq_length_hint": 5}
    config, stock = cls(**extra), stock_cls(**extra)
    for key, value in extra.items():
        assert getattr(config, key) == getattr(stock, key) == value
    config.save_pretrained(tmp_path)
    assert {k: getattr(cls.from_pretrained(tmp_path), k) for k in extra} == extra


# ----------------------------------------------------------------------------- the remote-code path


REMOTE_BAD_KWARGS = [  # the cases the issue found passing silently through from_pretrained
    ({"mfpruner_cues": ["attention", "colour"]}, "mfpruner_cues"),
    ({"mfpruner_cues": ["attention", "attention"]}, "mfpruner_cues"),
    ({"mfpruner_cues": []}, "mfpruner_cues"),
    ({"relevance_source": "clip"}, "relevance_source"),
    ({"min_votes": 0}, "min_votes"),
    ({"visual_token_budjet": 2}, "visual_token_budjet`; did you mean `visual_token_budget"),
]
QWEN_REMOTE_BAD_KWARGS = [
    ({"relevance_source": "clip_text"}, "relevance_source"),
    ({"attention_query_chunk": 0}, "attention_query_chunk"),
]


def remote_cases():
    for family in FAMILIES:
        extra = QWEN_REMOTE_BAD_KWARGS if family.startswith("qwen") else []
        for kwargs, field in REMOTE_BAD_KWARGS + extra:
            yield pytest.param(family, kwargs, field, id=f"{family}-{kwargs}")


@pytest.mark.parametrize("family, kwargs, field", list(remote_cases()))
def test_auto_classes_refuse_bad_kwargs(tiny_repo, family, kwargs, field):
    repo = tiny_repo(family)
    with pytest.raises(ValueError, match=f"`{field}"):
        AutoConfig.from_pretrained(repo, trust_remote_code=True, **kwargs)
    with pytest.raises(ValueError, match=f"`{field}"):
        AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_classes_apply_a_budget_to_ratio_switch(tiny_repo, family):
    repo = tiny_repo(family)
    config = AutoConfig.from_pretrained(repo, trust_remote_code=True, visual_token_budget=None, visual_token_ratio=0.5)
    assert (config.visual_token_budget, config.visual_token_ratio) == (None, 0.5)
    model = AutoModelForImageTextToText.from_pretrained(
        repo, trust_remote_code=True, visual_token_budget=3, visual_token_ratio=None, mfpruner_cues=["uniqueness"]
    )
    assert (model.config.visual_token_budget, model.config.visual_token_ratio) == (3, None)
    assert model.config.mfpruner_cues == ["uniqueness"]


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_classes_refuse_a_bad_saved_config(tiny_repo, family, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo(family), repo)
    config = json.loads((repo / "config.json").read_text())
    (repo / "config.json").write_text(json.dumps({**config, "mfpruner_cues": ["attention", "colour"]}))
    with raises_naming("mfpruner_cues", "'colour' is not a cue"):
        AutoConfig.from_pretrained(repo, trust_remote_code=True)
    with raises_naming("mfpruner_cues", "'colour' is not a cue"):
        AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
    (repo / "config.json").write_text(json.dumps({**config, "visual_token_budjet": 2}))
    with pytest.raises(ValueError, match="unknown keyword `visual_token_budjet`; did you mean `visual_token_budget`"):
        AutoConfig.from_pretrained(repo, trust_remote_code=True)


# ----------------------------------------------------------------------------- a loaded model's config, per call


def call_inputs(request, family: str) -> dict:
    """A single-image prompt for the family's tiny model."""
    if family.startswith("qwen"):  # Qwen2.5-VL: 28 px per visual token; Qwen3-VL (and MoE): 32 px
        tokenizer, image_processor = request.getfixturevalue("qwen_processing" if family == "qwen2.5-vl" else "qwen3_processing")
        text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
        size = (112, 84) if family == "qwen2.5-vl" else (128, 96)
        return qwen_inputs(tokenizer, image_processor, [text], images=[random_image(1, size)])
    processor = request.getfixturevalue(f"{FAMILIES[family].model_type}_processor")
    return processor(images=random_image(0), text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_model_refuses_a_bad_assignment(request, family):
    config = request.getfixturevalue("tiny_model")(family).config
    with raises_naming("mfpruner_cues", "'colour' is not a cue"):
        config.mfpruner_cues = ["colour"]
    with raises_naming("min_votes"):
        config.min_votes = 0
    assert config.mfpruner_cues == ["attention", "uniqueness", "relevance"] and config.min_votes == 2


def append_unknown_cue(config):
    config.mfpruner_cues.append("colour")  # in place: no assignment to check


def set_budget_and_ratio(config):  # each assignment is valid on its own
    if config.visual_token_budget is None:
        config.visual_token_budget = 4
    else:
        config.visual_token_ratio = 0.5


def fill_by_relevance_without_relevance(config):
    config.mfpruner_cues = ["attention", "uniqueness"]
    config.fill_by = "relevance"


EDITS = {  # edits that no single assignment check can catch -> the field the next call names
    "cue appended in place": (append_unknown_cue, "mfpruner_cues"),
    "budget and ratio both set": (set_budget_and_ratio, "visual_token_budget"),
    "fill_by relevance without the relevance cue": (fill_by_relevance_without_relevance, "fill_by"),
}


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_edited_config_fails_at_the_next_call(request, family, edit):
    model = request.getfixturevalue("tiny_model")(family)
    inputs = call_inputs(request, family)
    apply, field = EDITS[edit]
    saved = {name: getattr(model.config, name) for name in MFPRUNER_CONFIG_FIELDS if hasattr(model.config, name)}
    saved["mfpruner_cues"] = list(saved["mfpruner_cues"])
    apply(model.config)
    try:
        with raises_naming(field):
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        with raises_naming(field), torch.no_grad():
            model(**inputs)
    finally:
        for name, value in saved.items():
            setattr(model.config, name, value)
    validate_mfpruner_settings(model.config)


# ----------------------------------------------------------------------------- per-call keywords


def typos(name: str) -> list[str]:
    """A dropped last letter, two neighbouring letters swapped, a letter doubled."""
    middle = len(name) // 2
    return [
        name[:-1],
        name[: middle - 1] + name[middle] + name[middle - 1] + name[middle + 1 :],
        name[:middle] + name[middle] + name[middle:],
    ]


@pytest.mark.parametrize("name", MFPRUNER_CALL_KWARGS)
def test_misspelled_call_keyword_is_refused(name):
    for typo in typos(name):
        with pytest.raises(ValueError, match=rf"^unknown keyword `{typo}`; did you mean `{name}`\?$"):
            check_call_kwargs({"input_ids": None, typo: 1}, known={"input_ids"})


def test_call_keywords_that_pass():
    stock = ["attention_mask", "input_ids", "pixel_values", "position_ids", "max_new_tokens", "pixel_attention_mask"]
    check_call_kwargs(dict.fromkeys(stock + list(MFPRUNER_CALL_KWARGS)), known=["input_ids"])  # not close: stock's
    check_call_kwargs({"min_vote": 1}, known={"min_vote"})  # a keyword the stock call knows is never refused
    assert set(MFPRUNER_CALL_KWARGS) >= {"visual_token_budget", "visual_token_ratio", "prune_visual_tokens", "min_votes"}
    assert {"clip_input_ids", "clip_attention_mask"} <= set(MFPRUNER_CALL_KWARGS)


def test_check_call_kwargs_against_other_names():
    with pytest.raises(ValueError, match="did you mean `relevance_source`"):
        check_call_kwargs({"relevance_sorce": "llm"}, known=(), names=MFPRUNER_CONFIG_FIELDS)


def test_check_setting_takes_call_values():
    """The same check serves a call's keyword: None budget / ratio mean 'the config's'."""
    check_setting("visual_token_budget", None)
    check_setting("visual_token_ratio", None)
    check_setting("input_ids", object())  # not a setting: not checked
    with raises_naming("visual_token_budget"):
        check_setting("visual_token_budget", 0)
    with raises_naming("relevance_source", "no CLIP text tower"):
        check_setting("relevance_source", "clip_text", relevance_sources=("auto", "llm"))


@pytest.mark.parametrize("value", ["no", "False", 0, 1.0, torch.tensor(False)])
@pytest.mark.parametrize("family", FAMILIES)
def test_per_call_prune_visual_tokens_must_be_a_bool(request, family, value):
    """`generate(..., prune_visual_tokens="no")` once pruned (the value went through bool()), while
    the config refuses it: a call's value gets the config's check, in generate() and forward()."""
    model = request.getfixturevalue("tiny_model")(family)
    inputs = call_inputs(request, family)
    model.last_pruning = None
    with raises_naming("prune_visual_tokens", "must be True or False"):
        model.generate(**inputs, max_new_tokens=1, do_sample=False, prune_visual_tokens=value)
    with raises_naming("prune_visual_tokens", "must be True or False"), torch.no_grad():
        model(**inputs, prune_visual_tokens=value)
    assert model.last_pruning is None  # refused before anything ran
    with torch.no_grad():
        model(**inputs, prune_visual_tokens=None)  # None: the config's value (prune)
    assert model.last_pruning is not None
