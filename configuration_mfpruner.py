"""Configurations of the MFPruner models: the stock configs plus the pruning settings.

Defaults follow the paper: keep 64 of LLaVA-1.5's 576 visual tokens, all three cues, a token
needs two votes to be a consensus token, and the fill uses the summed score.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig

try:  # the mixin is shared by the configs below; `from .x import y` keeps remote code flat
    from .mfpruner_core import CUE_NAMES, check_budget, check_min_votes, check_ratio
except ImportError:  # imported as a top-level module (tests, tools)
    from mfpruner_core import CUE_NAMES, check_budget, check_min_votes, check_ratio

RELEVANCE_SOURCES = ("auto", "clip_text", "llm")
FILL_RULES = ("sum", "relevance")


def validate_mfpruner_settings(config) -> None:
    """Checks the pruning fields of an MFPruner config; raises ValueError naming the field."""
    if config.visual_token_budget is not None and config.visual_token_ratio is not None:
        raise ValueError(
            "set only one of `visual_token_budget` and `visual_token_ratio` "
            f"(got {config.visual_token_budget!r} and {config.visual_token_ratio!r}); set the other to None"
        )
    if config.visual_token_budget is not None:
        check_budget(config.visual_token_budget)
    if config.visual_token_ratio is not None:
        check_ratio(config.visual_token_ratio)
    cues = list(config.mfpruner_cues)
    if not cues or len(set(cues)) != len(cues) or any(c not in CUE_NAMES for c in cues):
        raise ValueError(f"`mfpruner_cues` must be distinct names from {CUE_NAMES}, got {config.mfpruner_cues!r}")
    check_min_votes(config.min_votes)
    if config.relevance_source not in RELEVANCE_SOURCES:
        raise ValueError(f"`relevance_source` must be one of {RELEVANCE_SOURCES}, got {config.relevance_source!r}")
    if config.fill_by not in FILL_RULES:
        raise ValueError(f"`fill_by` must be one of {FILL_RULES}, got {config.fill_by!r}")


@dataclass(repr=False, eq=False)
class MFPrunerSettings:
    r"""The MFPruner fields shared by every MFPruner config (a dataclass mixin: each config below is
    `@strict class X(MFPrunerSettings, <stock config>)`, so the fields are type-checked there).

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

    def __post_init__(self, **kwargs):
        # Each config sets its default budget before calling this (when neither is given).
        self.mfpruner_cues = list(self.mfpruner_cues)
        super().__post_init__(**kwargs)
        validate_mfpruner_settings(self)


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


@strict
class MFPrunerQwen2_5_VLConfig(MFPrunerSettings, Qwen2_5_VLConfig):
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

    attention_query_chunk: int = 256

    def __post_init__(self, **kwargs):
        if self.visual_token_budget is None and self.visual_token_ratio is None:
            self.visual_token_ratio = 0.222  # the paper's Qwen2.5-VL setting: prune 77.8%
        super().__post_init__(**kwargs)
        if self.relevance_source == "clip_text" or self.clip_text_config is not None:
            raise ValueError(
                "`relevance_source` must be 'auto' or 'llm' and `clip_text_config` None for Qwen2.5-VL "
                "(it has no CLIP text tower)"
            )
        chunk = self.attention_query_chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise ValueError(f"`attention_query_chunk` must be a positive int (queries per step), got {chunk!r}")


__all__ = ["MFPrunerLlavaConfig", "MFPrunerLlavaNextConfig", "MFPrunerQwen2_5_VLConfig", "MFPrunerSettings"]
