"""Configurations of the MFPruner models: the stock configs plus the pruning settings.

Defaults follow the paper: keep 64 of LLaVA-1.5's 576 visual tokens, all three cues, a token
needs two votes to be a consensus token, and the fill uses the summed score.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, fields

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    CLIPTextConfig,
    LlavaConfig,
    LlavaNextConfig,
    Qwen2_5_VLConfig,
    Qwen3_5Config,
    Qwen3_5MoeConfig,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
)

if __package__:  # remote code (transformers_modules.<repo>.<file>): the repo's own sibling files
    from .mfpruner_core import CUE_NAMES, check_budget, check_min_votes, check_ratio
else:  # a top-level module of a checkout (tests, tools, app.py). By module name: transformers' remote-code
    # check would demand that an absolute `from x import y` here name an installed package.
    from importlib import import_module

    _core = import_module("mfpruner_core")
    CUE_NAMES, check_budget, check_min_votes = _core.CUE_NAMES, _core.check_budget, _core.check_min_votes
    check_ratio = _core.check_ratio

RELEVANCE_SOURCES = ("auto", "clip_text", "llm")
FILL_RULES = ("sum", "relevance")
# The keywords generate() / forward() take on top of the stock ones.
MFPRUNER_CALL_KWARGS = (
    "visual_token_budget",
    "visual_token_ratio",
    "prune_visual_tokens",
    "min_votes",
    "clip_input_ids",
    "clip_attention_mask",
)


# ----------------------------------------------------------------------------- checks


def check_cues(cues, name: str = "mfpruner_cues") -> None:
    """A non-empty list (or tuple) of distinct cue names."""
    allowed = f"`{name}` must be distinct names from {CUE_NAMES} (at least one), got {cues!r}"
    if not isinstance(cues, (list, tuple)):
        raise ValueError(f"{allowed}: a list of names, not a {type(cues).__name__}")
    if not cues:
        raise ValueError(f"{allowed}: no cue would vote")
    unknown = [cue for cue in cues if cue not in CUE_NAMES]
    if unknown:
        raise ValueError(f"{allowed}: {unknown[0]!r} is not a cue")
    if len(set(cues)) != len(cues):
        raise ValueError(f"{allowed}: a cue is named twice")


def check_choice(value, choices: tuple[str, ...], name: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


def check_clip_text_config(value, relevance_sources: tuple[str, ...], name: str = "clip_text_config") -> None:
    """None, or a CLIPTextConfig dict (the CLIP text tower of the paper's relevance cue)."""
    if value is None:
        return
    if "clip_text" not in relevance_sources:
        raise ValueError(f"`{name}` must be None for this model: it has no CLIP text tower, got {value!r}")
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be None or a CLIPTextConfig dict (`.to_dict()`), got a {type(value).__name__}")
    try:
        CLIPTextConfig(**value)
    except (TypeError, ValueError, StrictDataclassError) as error:
        raise ValueError(f"`{name}` is not a valid CLIPTextConfig dict: {error}") from error


def check_setting(name: str, value, relevance_sources: tuple[str, ...] = RELEVANCE_SOURCES) -> None:
    """One MFPruner setting on its own (a config field, or the same keyword given to a call);
    ValueError naming it and what is allowed. Rules between fields: `validate_mfpruner_settings`.
    Names that are not MFPruner settings pass. `relevance_sources` are the model's (Qwen2.5-VL
    has no CLIP text tower, so no "clip_text" there)."""
    if name == "visual_token_budget" and value is not None:
        check_budget(value, name)
    elif name == "visual_token_ratio" and value is not None:
        check_ratio(value, name)
    elif name == "prune_visual_tokens" and not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    elif name == "mfpruner_cues":
        check_cues(value, name)
    elif name == "relevance_source":
        if value == "clip_text" and value not in relevance_sources:
            raise ValueError(f"`{name}` must be one of {relevance_sources}: this model has no CLIP text tower")
        check_choice(value, relevance_sources, name)
    elif name == "min_votes":
        check_min_votes(value, name)
    elif name == "fill_by":
        check_choice(value, FILL_RULES, name)
    elif name == "clip_text_config":
        check_clip_text_config(value, relevance_sources, name)
    elif name == "attention_query_chunk" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"`{name}` must be a positive int (queries per step of the attention cue), got {value!r}")


def validate_mfpruner_settings(config) -> None:
    """Checks every MFPruner field of `config` and the rules between them; raises ValueError naming
    the field. Runs when a config is built or loaded and at every pruning call, so a config edited
    in place after loading (`config.mfpruner_cues.append(...)`) is caught before it is used."""
    sources = getattr(config, "relevance_sources", RELEVANCE_SOURCES)
    for name in MFPRUNER_CONFIG_FIELDS:
        if hasattr(config, name):
            check_setting(name, getattr(config, name), sources)
    budget, ratio = config.visual_token_budget, config.visual_token_ratio
    if (budget is None) == (ratio is None):
        problem = "only one of" if budget is not None else "one of"
        raise ValueError(
            f"set {problem} `visual_token_budget` and `visual_token_ratio`, the other to None "
            f"(got visual_token_budget={budget!r}, visual_token_ratio={ratio!r})"
        )
    if config.fill_by == "relevance" and ("relevance" not in config.mfpruner_cues or len(config.mfpruner_cues) < 2):
        raise ValueError(
            "`fill_by='relevance'` needs 'relevance' and at least one other cue in `mfpruner_cues`, "
            f"got {config.mfpruner_cues!r}"
        )


def check_call_kwargs(kwargs: dict, known: Iterable[str], names: Iterable[str] = MFPRUNER_CALL_KWARGS) -> None:
    """Refuses a misspelled MFPruner keyword: a key of `kwargs` that is neither in `known` (the
    stock keywords the call accepts) nor in `names`, but is a close match to one of `names`.
    Other unknown keys are left to the stock code (it decides what it accepts)."""
    names, known = tuple(names), set(known)
    for key in kwargs:
        if key in known or key in names:
            continue
        # 0.88: a slip or two in a name; the stock `attention_mask` (0.85 to `clip_attention_mask`) passes
        match = difflib.get_close_matches(key, names, n=1, cutoff=0.88)
        if match:
            raise ValueError(f"unknown keyword `{key}`; did you mean `{match[0]}`?")


# ----------------------------------------------------------------------------- configs


@dataclass(repr=False, eq=False)
class MFPrunerSettings:
    r"""The MFPruner fields shared by every MFPruner config (a dataclass mixin: each config below is
    `@strict class X(MFPrunerSettings, <stock config>)`). Each field is checked whenever it is set
    (`check_setting`), and the rules between fields (exactly one of budget and ratio, what
    fill_by="relevance" needs) when a config is built or loaded, saved, and at every pruning call
    (`validate_mfpruner_settings`); a bad value is a ValueError naming the field.

    visual_token_budget: visual tokens kept per image (LLaVA-1.5 paper: 192, 128, 64, 32 of 576).
    visual_token_ratio: fraction kept per image, used when visual_token_budget is None.
    prune_visual_tokens: switch pruning off (the model then equals the stock model).
    mfpruner_cues: cues that vote, any of "attention", "uniqueness", "relevance".
    relevance_source: "clip_text" (the paper: a CLIP text tower embeds the instruction), "llm"
        (mean LLM input embedding of the prompt text), or "auto" (CLIP text when the model
        carries a text tower and the call gives its inputs, else LLM-space).
    min_votes: votes a token needs to be a consensus token.
    fill_by: "sum" (paper) or "relevance" (Qwen release: relevance alone fills).
    clip_text_config: optional CLIPTextConfig dict of the CLIP text tower (the same CLIP as the
        vision tower); with it the model carries `clip_text_model` and `clip_visual_projection`.
    """

    visual_token_budget: int | None = None
    visual_token_ratio: float | None = None
    prune_visual_tokens: bool = True
    mfpruner_cues: list[str] | tuple[str, ...] = CUE_NAMES
    relevance_source: str = "auto"
    min_votes: int = 2
    fill_by: str = "sum"
    clip_text_config: dict | None = None

    relevance_sources = RELEVANCE_SOURCES  # allowed `relevance_source` values (a class attribute, not a field)

    def __post_init__(self, **kwargs):
        # Each config sets its default budget before calling this (when neither is given).
        # `kwargs` are the keys that are no field (of the constructor or a config.json): a close
        # match to an MFPruner field is a misspelling; other unknown keys pass, as for the stock config.
        check_call_kwargs(kwargs, known=(), names=MFPRUNER_CONFIG_FIELDS)
        self.mfpruner_cues = list(self.mfpruner_cues)
        super().__post_init__(**kwargs)
        validate_mfpruner_settings(self)

    def __setattr__(self, name, value):
        # Every assignment is checked: the constructor's, from_pretrained's kwargs (transformers sets
        # them on the built config) and a user's `config.min_votes = 0`. @strict runs no type check
        # on these fields (their annotations are strings here), so this is their only check.
        check_setting(name, value, self.relevance_sources)
        super().__setattr__(name, value)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' from_dict (behind every from_pretrained): builds the config, then sets each
        kwarg that names a field. Refuses a misspelled MFPruner field among the kwargs, and checks
        the rules between fields once every kwarg is applied (`visual_token_budget=None` then
        `visual_token_ratio=0.5` is a valid pair of kwargs)."""
        check_call_kwargs(kwargs, known=cls.__dataclass_fields__, names=MFPRUNER_CONFIG_FIELDS)
        loaded = super().from_dict(config_dict, **kwargs)
        validate_mfpruner_settings(loaded[0] if isinstance(loaded, tuple) else loaded)  # (config, unused kwargs)
        return loaded

    def save_pretrained(self, *args, **kwargs):
        validate_mfpruner_settings(self)  # never write a config.json that would not load
        return super().save_pretrained(*args, **kwargs)


@strict
class MFPrunerLlavaConfig(MFPrunerSettings, LlavaConfig):
    r"""LLaVA-1.5 config with MFPruner settings (fields: see `MFPrunerSettings`).

    Default budget: keep 64 of the 576 visual tokens (the paper's headline LLaVA-1.5 setting).
    """

    model_type = "mfpruner_llava"

    def __post_init__(self, **kwargs):
        if self.visual_token_budget is None and self.visual_token_ratio is None:
            self.visual_token_budget = 64  # the paper's headline LLaVA-1.5 setting
        super().__post_init__(**kwargs)


@strict
class MFPrunerLlavaNextConfig(MFPrunerSettings, LlavaNextConfig):
    r"""LLaVA-1.6 (LLaVA-NeXT, anyres) config with MFPruner settings (fields: see `MFPrunerSettings`).

    The budget is per image, over all its tiles (base tile + unpadded high-res grid). Default:
    `visual_token_ratio=0.222` of each image's patch tokens (the paper-comparable setting; an
    image's token count varies with its size, so a ratio keeps the same fraction of every image,
    e.g. 639 of the 2,880 patch tokens of a 672x672 image). The `image_newline` row separators
    are always kept and are outside the budget (see the model's docstring).
    """

    model_type = "mfpruner_llava_next"

    def __post_init__(self, **kwargs):
        if self.visual_token_budget is None and self.visual_token_ratio is None:
            self.visual_token_ratio = 0.222
        super().__post_init__(**kwargs)


@dataclass(repr=False, eq=False)
class MFPrunerQwenVLSettings(MFPrunerSettings):
    r"""The settings of the Qwen-VL configs that follow Qwen2.5-VL's (see `MFPrunerQwen2_5_VLConfig`):
    default `visual_token_ratio=0.222` (the paper's "prune 77.8%"), relevance in LLM space (no CLIP
    text tower), and `attention_query_chunk` queries per step of cue A."""

    attention_query_chunk: int = 256

    relevance_sources = ("auto", "llm")  # no CLIP text tower, so no "clip_text" (and no clip_text_config)

    def __post_init__(self, **kwargs):
        if self.visual_token_budget is None and self.visual_token_ratio is None:
            self.visual_token_ratio = 0.222  # the paper's Qwen2.5-VL setting: prune 77.8%
        super().__post_init__(**kwargs)


@strict
class MFPrunerQwen2_5_VLConfig(MFPrunerQwenVLSettings, Qwen2_5_VLConfig):
    r"""Qwen2.5-VL config with MFPruner settings (Qwen/Qwen2.5-VL-3B/7B/32B/72B-Instruct).

    visual_token_ratio: fraction of each image's (or video's) visual tokens kept; default 0.222,
        the paper's "prune 77.8%" setting (0.444 and 0.333 are the other two).
    visual_token_budget: visual tokens kept per image / video instead of a ratio.
    prune_visual_tokens, mfpruner_cues, min_votes: as for LLaVA (see `MFPrunerSettings`).
    relevance_source: "auto" or "llm" (mean LLM input embedding of the prompt text, as the
        authors' Qwen code does); Qwen2.5-VL has no CLIP text tower.
    fill_by: "sum" (the paper's rule) or "relevance" (the authors' Qwen release: attention and
        uniqueness vote, relevance alone fills the rest).
    attention_query_chunk: queries per step of the attention cue; the largest temporary is
        heads x chunk x patches-of-one-image floats (7B, 2048 x 2048 image: 16 x 256 x 21316 x 4 B
        = 0.33 GiB, where the whole map would be 27 GiB).
    """

    model_type = "mfpruner_qwen2_5_vl"


@strict
class MFPrunerQwen3VLConfig(MFPrunerQwenVLSettings, Qwen3VLConfig):
    r"""Qwen3-VL config with MFPruner settings (Qwen/Qwen3-VL-2B/4B/8B/32B-Instruct): Qwen2.5-VL's
    settings and defaults (`MFPrunerQwenVLSettings`). Cue A is read in the last vision block, which
    attends over the whole image (Qwen3-VL's tower has no windows)."""

    model_type = "mfpruner_qwen3_vl"


@strict
class MFPrunerQwen3VLMoeConfig(MFPrunerQwenVLSettings, Qwen3VLMoeConfig):
    r"""Qwen3-VL MoE config with MFPruner settings (Qwen/Qwen3-VL-30B-A3B-Instruct, 235B-A22B): the
    dense Qwen3-VL's settings and defaults; only the language model differs."""

    model_type = "mfpruner_qwen3_vl_moe"


@strict
class MFPrunerQwen3_5Config(MFPrunerQwenVLSettings, Qwen3_5Config):
    r"""Qwen3.5 config with MFPruner settings (Qwen/Qwen3.5-9B, 27B, ...): Qwen2.5-VL's settings and
    defaults. Qwen3.5's tower is Qwen3-VL's without DeepStack; cue A is read in its last block."""

    model_type = "mfpruner_qwen3_5"


@strict
class MFPrunerQwen3_5MoeConfig(MFPrunerQwenVLSettings, Qwen3_5MoeConfig):
    r"""Qwen3.5 MoE config with MFPruner settings (Qwen/Qwen3.5-35B-A3B, 122B-A10B, 397B-A17B): the
    dense Qwen3.5's settings and defaults; only the language model's MLPs differ (experts)."""

    model_type = "mfpruner_qwen3_5_moe"


# The MFPruner fields of the configs: the mixin's, and the Qwen configs' `attention_query_chunk`.
MFPRUNER_CONFIG_FIELDS = tuple(f.name for f in fields(MFPrunerSettings)) + ("attention_query_chunk",)


def stock_class(cls: type) -> type:
    """The stock transformers class an MFPruner class (config or model) extends: the first one in its MRO."""
    return next(base for base in cls.__mro__ if base.__module__.startswith("transformers."))


def stock_architecture(name: str) -> str:
    """The stock architecture name of an MFPruner class name (ours are the stock names with a prefix)."""
    return name.removeprefix("MFPruner")


def stock_config_of(config: MFPrunerSettings):
    """The stock config holding the same model as an MFPruner config, without the MFPruner fields."""
    values = config.to_dict()
    for name in (*MFPRUNER_CONFIG_FIELDS, "model_type", "auto_map"):
        values.pop(name, None)
    if values.get("architectures"):
        values["architectures"] = [stock_architecture(name) for name in values["architectures"]]
    return stock_class(type(config)).from_dict(values)


__all__ = [
    "MFPRUNER_CALL_KWARGS",
    "MFPRUNER_CONFIG_FIELDS",
    "MFPrunerLlavaConfig",
    "MFPrunerLlavaNextConfig",
    "MFPrunerQwen2_5_VLConfig",
    "MFPrunerQwen3VLConfig",
    "MFPrunerQwen3VLMoeConfig",
    "MFPrunerQwen3_5Config",
    "MFPrunerQwen3_5MoeConfig",
    "MFPrunerQwenVLSettings",
    "MFPrunerSettings",
    "check_call_kwargs",
    "check_setting",
    "stock_architecture",
    "stock_class",
    "stock_config_of",
    "validate_mfpruner_settings",
]
