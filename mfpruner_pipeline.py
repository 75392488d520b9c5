"""The MFPruner pipeline shared by every model family: generate() / forward() on a pruned prompt.

A family class puts `MFPrunerPipelineMixin` before its stock class and writes only its visual
encoding (`encode_visual`): the visual tokens of each image / video, scattered into the prompt
embeddings, with the inputs of the cues (cue A's raw attention, candidates, layout) and any
per-token extras the language model needs (Qwen2.5-VL's M-RoPE positions). Everything else lives
here, once, top to bottom:

  call kwargs -> settings (budget / ratio, min_votes, relevance source)
  -> encode_visual (vision tower; cue capture through CUE_CAPTURE)          timings["vision"]
  -> cues per item (attention, uniqueness, relevance)                        timings["cues"]
  -> vote per item under its own budget (mfpruner_core)                      timings["vote"]
  -> keep mask; drop pruned visual positions and old padding, re-pad         timings["splice"]
  -> the stock forward() / generate() on the kept positions.

Contract (see docs/api.md): the only difference from the stock model is the shorter
prefill. Stock arguments pass through untouched; `max_length` / `min_length` count the original
prompt; `generate()` returns the original prompt followed by the new tokens, and the cache it
fills carries its keep mask, so that continuing from it (re-feeding the returned sequences) works.
Assisted decoding continues from a pruned cache (prefill_all_but_the_last_token). Refused with a
ValueError while pruning: a non-empty cache of another origin with pixel inputs, `inputs_embeds`
instead of `input_ids`.

torch.compile(fullgraph=True): forward() without a pruning step (pruning off, every decoding
step) traces: keyword checks use per-class argument sets and remembered names, and the ContextVars
are read only by calls that prune or capture (the pruning prefill itself runs eagerly).

Thread safety: nothing per call is stored on the model. The vision hooks are installed once in
__init__ and write only into the capture buffer of the current context (`CUE_CAPTURE`, a
ContextVar: None outside a pruning call, so stock calls pay nothing). The result of a call is
returned on the output (`output.pruning`) and kept per thread in `model.last_pruning`.

Timings are wall seconds (time.perf_counter) without device syncs: on CUDA they are approximate
(asynchronous kernels are charged to the stage that waits for them).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

if __package__:  # remote code (transformers_modules.<repo>.<file>): the repo's own sibling files
    from .configuration_mfpruner import (
        MFPRUNER_CALL_KWARGS,
        check_call_kwargs,
        check_setting,
        stock_class,
        stock_config_of,
        validate_mfpruner_settings,
    )
    from .mfpruner_core import (
        MFPrunerResult,
        call_budget,
        call_min_votes,
        candidate_rows,
        clip_text_relevance,
        compact_rows,
        image_cues,
        keep_mask_for_images,
        restore_prompt,
        vote_candidates,
    )
else:  # a top-level module of a checkout (tests, tools, app.py). By module name: transformers' remote-code
    # check would demand that an absolute `from x import y` here name an installed package.
    from importlib import import_module

    _configuration = import_module("configuration_mfpruner")
    MFPRUNER_CALL_KWARGS, check_call_kwargs = _configuration.MFPRUNER_CALL_KWARGS, _configuration.check_call_kwargs
    check_setting, validate_mfpruner_settings = _configuration.check_setting, _configuration.validate_mfpruner_settings
    stock_class, stock_config_of = _configuration.stock_class, _configuration.stock_config_of
    _core = import_module("mfpruner_core")
    MFPrunerResult = _core.MFPrunerResult
    call_budget, call_min_votes, candidate_rows = _core.call_budget, _core.call_min_votes, _core.candidate_rows
    clip_text_relevance, compact_rows = _core.clip_text_relevance, _core.compact_rows
    image_cues, keep_mask_for_images, restore_prompt = _core.image_cues, _core.keep_mask_for_images, _core.restore_prompt
    vote_candidates = _core.vote_candidates

logger = logging.getLogger(__name__)

# Keywords MFPruner adds to forward() / generate(); popped before the stock code sees the call.
PRUNING_KEYWORDS = MFPRUNER_CALL_KWARGS
# generate() options that run assisted decoding: its first step appends the draft's tokens to the
# prompt's ids, so a pruned prompt is prefilled first (prefill_all_but_the_last_token).
ASSISTED_DECODING_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
# The attribute a cache filled by a pruned generate() carries: a PrunedCacheRecord.
PRUNED_CACHE_MARK = "mfpruner_pruned_prompt"

# The capture buffer of the current pruning call (a dict the vision hooks fill), None elsewhere.
CUE_CAPTURE: ContextVar[dict | None] = ContextVar("mfpruner_cue_capture", default=None)
# True while the stock generate() runs with pruning off: its forward() calls must not prune.
STOCK_CALL: ContextVar[bool] = ContextVar("mfpruner_stock_call", default=False)


# How many capture buffers are active, over all threads. The vision hooks read CUE_CAPTURE only
# when one is: a ContextVar is not traceable, and a stock call compiled with
# torch.compile(fullgraph=True) runs the hooks too (dynamo guards on this count instead).
_ACTIVE_CAPTURES = 0
_CAPTURES_LOCK = threading.Lock()


def current_cue_capture() -> dict | None:
    """The capture buffer of this thread / task's pruning call, None outside one."""
    return CUE_CAPTURE.get() if _ACTIVE_CAPTURES else None


@contextmanager
def cue_capture(**settings):
    """Activates a fresh capture buffer for the vision forward passes inside the block (this
    thread / task only); yields it. `settings` are put in the buffer for the hooks to read."""
    global _ACTIVE_CAPTURES
    captured = dict(settings)
    with _CAPTURES_LOCK:
        _ACTIVE_CAPTURES += 1
    token = CUE_CAPTURE.set(captured)
    try:
        yield captured
    finally:
        CUE_CAPTURE.reset(token)
        with _CAPTURES_LOCK:
            _ACTIVE_CAPTURES -= 1


@contextmanager
def stock_call():
    token = STOCK_CALL.set(True)
    try:
        yield
    finally:
        STOCK_CALL.reset(token)


# ----------------------------------------------------------------------------- what a family returns


@dataclass
class VisualItem:
    """One image (or video) of the prompt, N visual tokens in prompt order.

    tokens: (N, D) projected tokens, exactly what the stock model scatters into the prompt.
    attention: (N,) raw cue A (vision attention; 0 where not a candidate), None if not captured.
    select_features: (N, C) vision features for the CLIP text relevance cue, or None.
    candidates: (N,) bool, the tokens that compete for the budget (others are always kept).
    grid / base_grid / layout: see MFPrunerResult.
    """

    kind: str
    token_id: int
    row: int
    tokens: torch.Tensor
    attention: torch.Tensor | None
    select_features: torch.Tensor | None
    candidates: torch.Tensor
    grid: tuple[int, int]
    base_grid: tuple[int, int]
    layout: torch.Tensor


@dataclass
class EncodedPrompt:
    """A family's visual encoding of one call.

    inputs_embeds: (B, L, D) prompt embeddings with every visual token scattered in.
    items: the images, then the videos, in prompt order.
    positions: (P, B, L) position ids the language model needs for the unpruned prompt (Qwen's
        M-RoPE), gathered at the kept positions; None: the stock default (or the caller's).
    vision_outputs: {output field: the stock vision output}, e.g. {"image_outputs": ...}; their
        `pooler_output` is replaced by the kept tokens of each item on forward() outputs.
    """

    inputs_embeds: torch.Tensor
    items: list[VisualItem]
    positions: torch.Tensor | None = None
    vision_outputs: dict | None = None


@dataclass
class PrunedCacheRecord:
    """What continuing from a cache filled by a pruned generate() needs (kept on the cache object).

    keep_mask: (B, L) bool over the sequences that filled it: True where the cache holds the position.
    rope_deltas: (B, 1) next M-RoPE position minus the cached length (Qwen2.5-VL), else None.
    """

    keep_mask: torch.Tensor
    rope_deltas: torch.Tensor | None = None


# ----------------------------------------------------------------------------- per-thread results

_THREAD_RESULTS = threading.local()
_FALLBACK_WARNED: weakref.WeakSet = weakref.WeakSet()
_FALLBACK_LOCK = threading.Lock()


def _results_of_this_thread() -> weakref.WeakKeyDictionary:
    if not hasattr(_THREAD_RESULTS, "by_model"):
        _THREAD_RESULTS.by_model = weakref.WeakKeyDictionary()
    return _THREAD_RESULTS.by_model


def sequence_last(positions: torch.Tensor) -> torch.Tensor:
    """(B, L) or (P, B, L) -> (B, L, ...) so that compact_rows can drop positions."""
    return positions if positions.ndim == 2 else positions.permute(1, 2, 0)


def sequence_back(positions: torch.Tensor, ndim: int) -> torch.Tensor:
    return positions if ndim == 2 else positions.permute(2, 0, 1)


# ----------------------------------------------------------------------------- the mixin


class MFPrunerPipelineMixin:
    """generate() / forward() / save_pretrained() of every MFPruner model. A family sets
    `pixel_input_names` (inputs whose presence means "prune"), `visual_input_names` (every stock
    argument its encoding reads) and implements `encode_visual`."""

    pixel_input_names: tuple[str, ...] = ("pixel_values",)
    visual_input_names: tuple[str, ...] = ("pixel_values",)
    # Auto class name -> the StockHeadMixin class the repo's auto_map names for it (auto_map_entries).
    stock_heads: dict[str, type] = {}

    @classmethod
    def is_custom_code(cls) -> bool:
        """False, as for the stock class. transformers treats a class defined outside its package as
        custom code and then loads it differently: weights missing from a checkpoint skip every
        module without parameters of its own (so a CLIP attention / MLP block's scaled init of its
        projections never runs), and checkpoint key conversions are not applied. Ours only add
        hooks and stock modules to the stock class, initialized by its own `_init_weights`."""
        return False

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers answers by reading the source of the class's module for the stock code
        # path; ours keeps the stock modules, so the stock class's answer holds.
        return stock_class(cls)._can_set_attn_implementation()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # As above (the MoE families: `set_experts_implementation` was refused for ours).
        return stock_class(cls)._can_set_experts_implementation()

    def __init_subclass__(cls, **kwargs):
        """Gives each family's forward() the stock signature plus the MFPruner keywords:
        generate() reads the signature (e.g. to send `logits_to_keep`)."""
        super().__init_subclass__(**kwargs)
        stock_forward = getattr(super(MFPrunerPipelineMixin, cls), "forward", None)
        if stock_forward is not None:
            # Read once per class: forward() must compile with torch.compile(fullgraph=True), and
            # `inspect` is not traceable.
            stock_parameters = list(inspect.signature(stock_forward).parameters.values())[1:]  # without self
            cls.stock_forward_positional = tuple(
                p.name for p in stock_parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            )
            cls.stock_forward_names = frozenset(p.name for p in stock_parameters if p.kind != p.VAR_KEYWORD)
        if stock_forward is None or "forward" in vars(cls) or getattr(cls.forward, "__mfpruner__", False):
            return  # an intermediate mixin (no stock class yet), an own forward(), or a family's subclass

        def forward(self, *args, **kwargs):
            return MFPrunerPipelineMixin.pruning_forward(self, *args, **kwargs)

        parameters = list(inspect.signature(stock_forward).parameters.values())
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in PRUNING_KEYWORDS]
        tail = [p for p in parameters if p.kind == inspect.Parameter.VAR_KEYWORD]
        head = [p for p in parameters if p.kind != inspect.Parameter.VAR_KEYWORD]
        stock_return = inspect.signature(stock_forward).return_annotation  # the stock output class (tools read it)
        forward.__signature__ = inspect.Signature(head + extra + tail, return_annotation=stock_return)
        forward.__annotations__ = dict(stock_forward.__annotations__)
        forward.__doc__ = MFPrunerPipelineMixin.pruning_forward.__doc__
        forward.__mfpruner__ = True
        cls.forward = forward

        def prepare_inputs_for_generation(self, *args, **kwargs):
            return MFPrunerPipelineMixin.step_inputs(self, *args, **kwargs)

        stock_step_inputs = super(MFPrunerPipelineMixin, cls).prepare_inputs_for_generation
        prepare_inputs_for_generation.__signature__ = inspect.signature(stock_step_inputs)  # generate() reads it
        cls.prepare_inputs_for_generation = prepare_inputs_for_generation

    def encode_visual(self, input_ids, inputs_embeds, attention_mask, visual: dict, cues: list[str]) -> EncodedPrompt:
        """The family's visual encoding: its visual tokens scattered into `inputs_embeds` (B, L, D),
        the prompt's embeddings (the caller's, or the embedded `input_ids`)."""
        raise NotImplementedError

    def pruned_position_ids(self, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The family's positions gathered at the kept positions, (P, B, L'), as the language model
        takes them (Qwen2.5-VL prepends the text positions)."""
        return positions

    def remember_prefill(self, position_ids, attention_mask) -> None:
        """What the stock forward() stores on the model after a prefill (Qwen2.5-VL: rope_deltas)."""

    def rope_deltas(self, position_ids, attention_mask) -> torch.Tensor | None:
        """(B, 1) next position minus real length of a pruned prompt, for families whose positions
        are not the running count (Qwen2.5-VL's M-RoPE); None: the running count."""
        return None

    def continuation_position_ids(self, attention_mask, rope_deltas) -> torch.Tensor | None:
        """Position ids of a prompt continued from a pruned cache; None: the stock numbering."""
        return None

    def prefill_inputs(self, encoded: EncodedPrompt, keep_indices: list[torch.Tensor]) -> dict:
        """Extra stock forward() inputs of the pruned prefill, built from the kept tokens (Qwen3-VL:
        `mm_encoder_outputs`, the kept visual tokens with their DeepStack levels); the stock generate()
        sends them with the prefill only. {}: nothing beyond the embeddings."""
        return {}

    # -- per-thread result ------------------------------------------------------------------

    @property
    def last_pruning(self) -> MFPrunerResult | None:
        """The result of this thread's last pruning call on this model (None before one)."""
        return _results_of_this_thread().get(self)

    @last_pruning.setter
    def last_pruning(self, result: MFPrunerResult | None) -> None:
        _results_of_this_thread()[self] = result

    # -- drawing (mfpruner_visualize, imported on first use: numpy / PIL / matplotlib only to draw) --

    # How the family's visual tokens cover the image: a key of mfpruner_visualize.TOKEN_LAYOUTS,
    # set once per family class ("center_crop", "anyres", "smart_resize").
    token_layout: str | None = None

    def draw_pruning(self, image, processor=None, result=None, index: int = 0, base_tile: bool = False):
        """`image` (a PIL image) with the regions of the pruned visual tokens dimmed, the kept regions
        outlined and the pixels no token sees hatched; same size. result: an MFPrunerResult (default:
        this thread's `last_pruning`); index: which image / video of the call (a video: pass its frames,
        drawn in rows); processor: the one that made the inputs (default: the repo's own);
        base_tile: LLaVA-NeXT's base tile tokens instead of the high-res grid's. See docs/visualization.md."""
        if __package__:
            from .mfpruner_visualize import draw_pruning
        else:
            draw_pruning = import_module("mfpruner_visualize").draw_pruning
        return draw_pruning(self, image, processor, result, index, base_tile)

    def plot_pruning(self, image, processor=None, result=None, index: int = 0, cues: bool = True, panel_size: float = 3.6):
        """A matplotlib Figure: the kept tokens' panel and, with cues=True, one heatmap per cue and the
        vote count, titled with kept / total and the call's settings (needs matplotlib). Arguments as
        draw_pruning; panel_size: inches per panel."""
        if __package__:
            from .mfpruner_visualize import plot_pruning
        else:
            plot_pruning = import_module("mfpruner_visualize").plot_pruning
        return plot_pruning(self, image, processor, result, index, cues, panel_size)

    # -- keywords -----------------------------------------------------------------------------

    def pop_pruning_keywords(self, kwargs: dict, known: set[str]) -> dict:
        """Pops the MFPruner keywords from `kwargs`; refuses a misspelled one (a name that is not
        a known argument but close to an MFPruner keyword)."""
        settings = {name: kwargs.pop(name) for name in PRUNING_KEYWORDS if name in kwargs}
        unchecked = [name for name in kwargs if name not in known and name not in UNLIKE_PRUNING_KEYWORDS]
        if unchecked:
            remember_unlike_pruning_keywords(unchecked, known)
        for name, value in settings.items():  # None: the config's value
            if value is not None:
                check_setting(name, value, self.config.relevance_sources)
        return settings

    def stock_forward_arguments(self) -> frozenset[str]:
        return self.stock_forward_names

    def bind_stock_forward(self, args: tuple, kwargs: dict) -> dict:
        """{name: value} of a stock forward() call, as inspect's bind_partial gives it (traceable)."""
        names = self.stock_forward_positional
        if len(args) > len(names):
            raise TypeError(f"forward() takes {len(names)} positional arguments but {len(args)} were given")
        call = dict(zip(names, args))
        for name in kwargs:
            if name in call:
                raise TypeError(f"forward() got multiple values for argument '{name}'")
        call.update(kwargs)
        return call

    def wants_pruning(self, call: dict, settings: dict) -> bool:
        prune = settings.get("prune_visual_tokens")
        prune = self.config.prune_visual_tokens if prune is None else prune
        return bool(prune) and any(call.get(name) is not None for name in self.pixel_input_names)

    def relevance_source(self, clip_input_ids) -> str:
        """"clip_text" or "llm" for this call; warns once per model when a model that carries a CLIP
        text tower falls back to LLM space because the call has no `clip_input_ids`."""
        has_tower = hasattr(self, "clip_text_model")
        source = self.config.relevance_source
        if source == "clip_text" and (not has_tower or clip_input_ids is None):
            raise ValueError(
                "relevance_source='clip_text' needs a model with a CLIP text tower (config.clip_text_config) "
                "and `clip_input_ids` in the call (the processor of an MFPruner repo makes them)"
            )
        if source != "auto":
            return source
        if has_tower and clip_input_ids is None:
            with _FALLBACK_LOCK:
                first = self not in _FALLBACK_WARNED
                _FALLBACK_WARNED.add(self)
            if first:
                logger.warning(
                    "this model carries a CLIP text tower but the call has no `clip_input_ids`: the relevance cue "
                    "falls back to LLM input embeddings (result.relevance_source == 'llm'); build the inputs with "
                    "the repo's processor to use the CLIP text tower"
                )
        return "clip_text" if has_tower and clip_input_ids is not None else "llm"

    # -- cues ---------------------------------------------------------------------------------

    def clip_text_embeddings(self, clip_input_ids, clip_attention_mask):
        """CLIP text tower on the instruction segments: (B, M, T) ids -> ((B, M, E) embeddings,
        (B, M) bool, which segments are real)."""
        batch, segments, length = clip_input_ids.shape
        if clip_attention_mask is None:
            clip_attention_mask = torch.ones_like(clip_input_ids)
        device = self.clip_text_model.device
        text = self.clip_text_model(
            input_ids=clip_input_ids.reshape(-1, length).to(device),
            attention_mask=clip_attention_mask.reshape(-1, length).to(device),
        ).text_embeds.view(batch, segments, -1)
        return text, clip_attention_mask.bool().any(dim=-1).to(device)

    def item_cues(self, item: VisualItem, inputs_embeds, text_mask, clip_text) -> dict[str, torch.Tensor]:
        """Item's cues over its candidate tokens: {name: (n,)}, on the device of its tokens."""
        candidates = item.candidates
        visual = candidate_rows(item.tokens, candidates)  # (n, D)
        attention = candidate_rows(item.attention, candidates) if item.attention is not None else None
        relevance = None
        if clip_text is not None and "relevance" in self.config.mfpruner_cues:
            text, segment_mask = clip_text
            image = self.clip_image_embeddings(candidate_rows(item.select_features, candidates))  # (n, E)
            relevance = clip_text_relevance(
                image[None], text[item.row][None].to(image.device, image.dtype), segment_mask[item.row][None].to(image.device)
            )[0]
        return image_cues(
            self.config.mfpruner_cues, attention, visual, inputs_embeds[item.row], text_mask[item.row], relevance
        )

    # -- the pruning step -------------------------------------------------------------------

    def prune_call(self, call: dict, settings: dict, left_pad: bool | None) -> tuple[dict, MFPrunerResult]:
        """Pops the prompt and visual inputs from `call` and returns (the language model's inputs:
        input_ids, inputs_embeds, attention_mask, [position_ids], [labels]; the result)."""
        validate_mfpruner_settings(self.config)  # the config may have been edited after loading
        config = self.config
        budget, ratio = call_budget(
            config.visual_token_budget, config.visual_token_ratio,
            settings.get("visual_token_budget"), settings.get("visual_token_ratio"),
        )
        min_votes = call_min_votes(config.min_votes, settings.get("min_votes"))
        input_ids, inputs_embeds = call.pop("input_ids", None), call.pop("inputs_embeds", None)
        if input_ids is None:
            raise ValueError(
                "pass `input_ids` (alone or with `inputs_embeds`) with pixel inputs: MFPruner locates the visual tokens by id"
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        attention_mask = call.pop("attention_mask", None)
        labels = call.pop("labels", None)
        caller_positions = call.pop("position_ids", None)
        if attention_mask is None and caller_positions is not None and bool((caller_positions.diff(dim=-1) < 0).any()):
            # The stock code reads restarting positions without a mask as packed sequences; the
            # gaps the pruning leaves would read as sequence starts too.
            raise ValueError(
                "packed sequences (`position_ids` restarting within a row, no `attention_mask`) cannot be pruned: "
                "pass one sequence per row with an `attention_mask`, or prune_visual_tokens=False"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        visual = {name: call.pop(name, None) for name in self.visual_input_names}
        timings = {}

        start = time.perf_counter()
        encoded = self.encode_visual(input_ids, inputs_embeds, attention_mask, visual, list(config.mfpruner_cues))
        timings["vision"] = time.perf_counter() - start

        start = time.perf_counter()
        with torch.no_grad():
            source = None
            if "relevance" in config.mfpruner_cues:
                source = self.relevance_source(settings.get("clip_input_ids"))
            clip_text = None
            if source == "clip_text":
                clip_text = self.clip_text_embeddings(settings["clip_input_ids"], settings.get("clip_attention_mask"))
            is_visual = torch.zeros_like(attention_mask, dtype=torch.bool)
            for token_id in {item.token_id for item in encoded.items}:
                is_visual |= input_ids == token_id
            text_mask = attention_mask.bool() & ~is_visual
            cues = [self.item_cues(item, encoded.inputs_embeds, text_mask, clip_text) for item in encoded.items]
        timings["cues"] = time.perf_counter() - start

        start = time.perf_counter()
        keep_indices = [
            vote_candidates(item_cues, item.candidates, budget, ratio, min_votes, config.fill_by)
            for item_cues, item in zip(cues, encoded.items)
        ]
        timings["vote"] = time.perf_counter() - start

        start = time.perf_counter()
        keep = attention_mask.bool() & ~is_visual  # old padding goes too: the prefill is the longest kept row
        for token_id in {item.token_id for item in encoded.items}:
            chosen = [(idx, len(item.tokens)) for idx, item in zip(keep_indices, encoded.items) if item.token_id == token_id]
            keep = keep_mask_for_images(input_ids == token_id, [i for i, _ in chosen], [n for _, n in chosen], keep=keep)
        if left_pad is None:  # keep the caller's padding side
            left_pad = not bool((attention_mask[:, -1] == 0).any())
        pad_id = config.text_config.pad_token_id
        tensors = {"input_ids": input_ids, "inputs_embeds": encoded.inputs_embeds, "attention_mask": attention_mask}
        pads = {"input_ids": pad_id if pad_id is not None else 0, "inputs_embeds": 0.0, "attention_mask": 0}
        if labels is not None:
            tensors["labels"], pads["labels"] = labels, -100
        positions = caller_positions if caller_positions is not None else encoded.positions
        if positions is not None:
            tensors["position_ids"], pads["position_ids"] = sequence_last(positions), 0
        pruned, _ = compact_rows(keep.to(input_ids.device), tensors, pads, left=left_pad)
        if positions is not None:
            pruned["position_ids"] = sequence_back(pruned["position_ids"], positions.ndim)
            if caller_positions is None:
                pruned["position_ids"] = self.pruned_position_ids(pruned["position_ids"], pruned["attention_mask"])
        timings["splice"] = time.perf_counter() - start

        items = encoded.items
        result = MFPrunerResult(
            keep_indices=[idx.cpu() for idx in keep_indices],
            cue_scores={
                name: [scatter_to_all(c[name], item.candidates).cpu() for c, item in zip(cues, items)]
                for name in config.mfpruner_cues
            },
            num_visual_tokens=[len(item.tokens) for item in items],
            image_to_row=[item.row for item in items],
            lm_input_length=pruned["input_ids"].shape[1],
            grids=[item.grid for item in items],
            kinds=[item.kind for item in items],
            base_grids=[item.base_grid for item in items],
            layouts=[item.layout.cpu() for item in items],
            relevance_source=source,
            visual_token_budget=budget,
            visual_token_ratio=ratio,
            min_votes=min_votes,
            fill_by=config.fill_by,
            timings=timings,
            keep_mask=keep.cpu(),
        )
        if encoded.vision_outputs:
            pruned["vision_outputs"] = kept_vision_outputs(encoded, keep_indices)
        pruned.update(self.prefill_inputs(encoded, keep_indices))
        self.last_pruning = result
        return pruned, result

    def prune_inputs(self, input_ids, pixel_values=None, left_pad: bool | None = None, **kwargs) -> dict:
        """The pruned language-model inputs of one call (input_ids, inputs_embeds, attention_mask,
        [position_ids], [labels]), re-padded on the caller's side unless `left_pad` says; for tools
        and tests that run the language model themselves. Sets `last_pruning`."""
        settings = self.pop_pruning_keywords(kwargs, set(self.visual_input_names) | self.stock_forward_arguments())
        call = dict(kwargs, input_ids=input_ids, pixel_values=pixel_values)
        pruned, _ = self.prune_call(call, settings, left_pad)
        pruned.pop("vision_outputs", None)
        return pruned

    # -- entry points -----------------------------------------------------------------------

    def save_pretrained(self, *args, **kwargs):
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map_entries(type(self))}
        return super().save_pretrained(*args, **kwargs)

    def pruning_forward(self, *args, **kwargs):
        """The stock forward(); with pixel inputs and pruning on, the visual tokens are pruned first:
        logits, loss and hidden states then cover the pruned sequence (`labels` and a caller's
        `position_ids` are gathered at the kept positions), `image_outputs.pooler_output` holds the
        kept visual tokens of each item, and `output.pruning` the MFPrunerResult. Takes the
        MFPruner keywords visual_token_budget, visual_token_ratio, prune_visual_tokens, min_votes,
        clip_input_ids, clip_attention_mask."""
        stock_forward = super(MFPrunerPipelineMixin, self).forward
        settings = self.pop_pruning_keywords(kwargs, self.stock_forward_arguments())
        call = self.bind_stock_forward(args, kwargs)
        # STOCK_CALL is read only for a call that would prune: a ContextVar is not traceable, and the
        # compiled calls (decoding steps, pruning off) must not reach it.
        if not self.wants_pruning(call, settings) or STOCK_CALL.get():
            return stock_forward(*args, **kwargs)
        caller_positions = call.get("position_ids") is not None
        pruned, result = self.prune_call(call, settings, left_pad=None)
        pruned.pop("input_ids")
        vision_outputs = pruned.pop("vision_outputs", {})
        if pruned.get("position_ids") is not None and not caller_positions:
            self.remember_prefill(pruned["position_ids"], pruned["attention_mask"])
        output = stock_forward(**call, **pruned)
        if isinstance(output, tuple):  # return_dict=False: the result is in last_pruning only
            return output
        for name, value in vision_outputs.items():
            if hasattr(output, name):
                output[name] = value
        output.pruning = result
        return output

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """The stock generate() on the pruned prompt: returns the original prompt followed by the new
        tokens (so `out[:, input_ids.shape[1]:]` is the answer); a dict output carries the
        MFPrunerResult as `out.pruning`. Takes the MFPruner keywords of forward()."""
        known = self.stock_forward_arguments() | set(inspect.signature(super().generate).parameters)
        known |= set(self.generation_config.to_dict())
        settings = self.pop_pruning_keywords(kwargs, known)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        call = inspect.signature(super().generate).bind_partial(*args, **kwargs).arguments
        call.update(call.pop("kwargs", {}))
        if "inputs" in call and "input_ids" not in call:
            call["input_ids"] = call.pop("inputs")
        record = getattr(cache, PRUNED_CACHE_MARK, None)
        if record is not None:
            return self.continue_from_pruned_cache(call, record, cache)
        if not self.wants_pruning(call, settings):
            with stock_call():
                return super().generate(*args, **kwargs)
        self.refuse_unsupported_generation(call, cache)

        prompt_ids, prompt_mask = call.get("input_ids"), call.get("attention_mask")  # no ids: prune_call refuses
        pruned, result = self.prune_call(call, settings, left_pad=True)
        pruned.pop("vision_outputs", None)
        record = PrunedCacheRecord(result.keep_mask, self.rope_deltas(pruned.get("position_ids"), pruned["attention_mask"]))
        if assisted_decoding(call, self.generation_config):
            cache = self.prefill_all_but_the_last_token(pruned, record, cache)
            call.update(input_ids=prompt_ids, attention_mask=prompt_mask)
            call[self.cache_argument_name()] = cache
            output = self.continue_from_pruned_cache(call, record, cache)
        else:
            output = self.generate_on_compacted(call, pruned, prompt_ids, record, cache)
        if not isinstance(output, torch.Tensor):
            output.pruning = result
        return output

    def generate_on_compacted(self, call, compacted, prompt_ids, record, cache):
        """The stock generate() on a compacted prompt; returns the original prompt + new tokens and
        marks the cache it filled with `record` (so that continuing from it works)."""
        removed = prompt_ids.shape[1] - compacted["input_ids"].shape[1]
        call.update(prompt_lengths_for_pruned_prompt(call, self.generation_config, removed))
        output = super().generate(**call, **compacted)
        output = restore_prompt(output, prompt_ids, compacted["input_ids"].shape[1])
        for filled in (cache, returned_cache(output)):
            if filled is not None:
                setattr(filled, PRUNED_CACHE_MARK, record)
        return output

    def cache_argument_name(self) -> str:
        return "cache" if "cache" in self.stock_forward_names else "past_key_values"  # transformers < 5.25

    def prefill_all_but_the_last_token(self, compacted: dict, record: PrunedCacheRecord, cache):
        """Assisted decoding appends the draft's tokens to the prompt's ids at its first step, so a
        prompt given as embeddings never reaches it whole. Instead the pruned prompt but its last
        token goes into the cache here, from its embeddings; the stock generate() then continues
        from that cache (continue_from_pruned_cache) with ids only: the last prompt token (text,
        embedded from its id) and the draft's. Returns the cache, marked with `record`."""
        visual_ids = torch.tensor([item for item in self.visual_token_ids() if item is not None])
        if bool(torch.isin(compacted["input_ids"][:, -1].cpu(), visual_ids).any()):
            raise ValueError(
                "assisted decoding with pruning needs a prompt that ends with text (e.g. the chat template's "
                "assistant turn), not with a visual token: the draft continues from the last token's id"
            )
        # Per-position tensors lose the last position; other inputs pass as they are (Qwen3-VL's
        # `mm_encoder_outputs`: the kept visual tokens, which all come before that last text token).
        head = {
            name: value if not isinstance(value, torch.Tensor) else value[..., :-1, :] if name == "inputs_embeds" else value[..., :-1]
            for name, value in compacted.items()
        }
        head.pop("input_ids")
        if cache is not None:  # the caller's empty cache; else the stock forward makes one
            head[self.cache_argument_name()] = cache
        with torch.no_grad(), stock_call():
            cache = returned_cache(self(**head, use_cache=True, logits_to_keep=1))
        setattr(cache, PRUNED_CACHE_MARK, record)
        return cache

    def visual_token_ids(self) -> tuple:
        return (self.config.image_token_id, getattr(self.config, "video_token_id", None))

    def continue_from_pruned_cache(self, call: dict, record: PrunedCacheRecord, cache):
        """generate(input_ids=<sequences of a pruned generate() + more>, cache=<its cache>): drops the
        positions the cache never held (the pruned visual tokens and old padding) from the re-fed
        prompt, so the stock generate() feeds only the uncached tokens. The images are in the
        cache already: pixel inputs are ignored."""
        input_ids = call.pop("input_ids", None)
        if input_ids is None or call.pop("inputs_embeds", None) is not None:
            raise ValueError("continuing from a pruned cache needs `input_ids` (the returned sequences, then new tokens)")
        for name in self.visual_input_names:
            call.pop(name, None)
        attention_mask = call.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = input_ids.shape[0]
        if rows % record.keep_mask.shape[0] or input_ids.shape[1] < record.keep_mask.shape[1]:
            raise ValueError(
                "`input_ids` must start with the sequences of the generate() call that filled this cache "
                f"({record.keep_mask.shape[0]} row(s) of length >= {record.keep_mask.shape[1]}), "
                f"got shape {tuple(input_ids.shape)}"
            )
        repeat = rows // record.keep_mask.shape[0]
        old_keep = record.keep_mask.repeat_interleave(repeat, dim=0).to(attention_mask.device)
        new_part = attention_mask[:, old_keep.shape[1] :].bool()
        keep = torch.cat([old_keep, new_part], dim=-1)
        pad_id = self.config.text_config.pad_token_id
        compacted, _ = compact_rows(
            keep,
            {"input_ids": input_ids, "attention_mask": attention_mask},
            {"input_ids": pad_id if pad_id is not None else 0, "attention_mask": 0},
            left=True,
        )
        deltas = None if record.rope_deltas is None else record.rope_deltas.repeat_interleave(repeat, dim=0)
        positions = self.continuation_position_ids(compacted["attention_mask"], deltas)
        if positions is not None:
            compacted["position_ids"] = positions
        return self.generate_on_compacted(call, compacted, input_ids, PrunedCacheRecord(keep.cpu(), deltas), cache)

    def step_inputs(self, input_ids, *args, **kwargs):
        """The stock prepare_inputs_for_generation(); only the first step of assisted decoding from a
        pruned cache changes: transformers 5.25 feeds that step's whole prompt + draft (it assumes an
        empty cache), so it is given the positions the cache does not hold yet, as later steps are."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if (
            getattr(cache, PRUNED_CACHE_MARK, None) is not None
            and "next_sequence_length" in kwargs
            and kwargs["next_sequence_length"] is None
            and kwargs.get("is_first_iteration")
        ):
            kwargs["next_sequence_length"] = input_ids.shape[1] - cache.get_seq_length()
        return super(MFPrunerPipelineMixin, self).prepare_inputs_for_generation(input_ids, *args, **kwargs)

    def refuse_unsupported_generation(self, call: dict, cache) -> None:
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "a non-empty cache cannot be combined with pruning (its positions would not match the pruned prompt); "
                "pass an empty cache or prune_visual_tokens=False"
            )


# ----------------------------------------------------------------------------- the repo's Auto classes


def auto_classes(model_class) -> dict[str, type]:
    """The Auto classes an MFPruner repo answers, past AutoConfig / AutoProcessor: AutoModel and
    AutoModelForImageTextToText give the MFPruner class, the family's `stock_heads` the other Auto
    classes the stock config maps."""
    return {"AutoModel": model_class, "AutoModelForImageTextToText": model_class, **model_class.stock_heads}


def auto_map_entries(model_class) -> dict[str, str]:
    """`auto_classes` as the repo's auto_map writes them (`register_for_auto_class` keeps only one Auto
    class per model, so save_pretrained and tools.export write them all)."""
    module = model_class.__module__.rsplit(".", 1)[-1]  # remote code: transformers_modules.<repo>.<file>
    return {auto_class: f"{module}.{cls.__name__}" for auto_class, cls in auto_classes(model_class).items()}


class StockHeadMixin:
    """An Auto class that the stock config maps to a head without images (Qwen3.5: AutoModelForCausalLM
    -> the text-only model, AutoModelForSequenceClassification, AutoModelForTokenClassification) gives
    the same on an MFPruner repo: loading returns the stock class (`stock_class(cls)`) built from the
    stock config (`stock_config_of`; the text config for the text-only model, as transformers unwraps it
    for its own classes). Nothing there prunes. The repo's auto_map names this class, whose
    `config_class` is the MFPruner config that transformers checks it against."""

    @classmethod
    def stock_config(cls, config):
        # None: the stock class reads the repo's config. (Not isinstance(config, MFPrunerSettings): the
        # config of a remote-code load comes from another copy of our module than this class's.)
        if config is None or stock_class(type(config)) is type(config):
            return config
        stock = stock_config_of(config)
        if stock_class(cls).config_class is not stock.sub_configs.get("text_config"):
            return stock
        text_config = stock.get_text_config()
        if getattr(stock, "quantization_config", None) is not None:  # as transformers' unwrapping does
            text_config.quantization_config = stock.quantization_config
        return text_config

    @classmethod
    def from_pretrained(cls, *args, config=None, **kwargs):
        return stock_class(cls).from_pretrained(*args, config=cls.stock_config(config), **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return stock_class(cls)._from_config(cls.stock_config(config), **kwargs)


# ----------------------------------------------------------------------------- helpers


# Names checked before and found unlike every MFPruner keyword (so accepted under any `known`).
# forward() compiled with fullgraph=True looks them up here: the fuzzy match (difflib) does not
# trace. Seeded with what generate() passes beyond the stock signature (read by its decorators).
UNLIKE_PRUNING_KEYWORDS: set[str] = set()


def remember_unlike_pruning_keywords(names, known) -> None:
    """Refuses a name close to an MFPruner keyword (check_call_kwargs); remembers the others."""
    check_call_kwargs(dict.fromkeys(names), known, PRUNING_KEYWORDS)
    UNLIKE_PRUNING_KEYWORDS.update(name for name in names if name not in PRUNING_KEYWORDS)


remember_unlike_pruning_keywords(("use_cache", "return_dict"), ())


def returned_cache(output):
    """The cache on a forward() / generate() output (`cache` from transformers 5.25, before it
    `past_key_values`); None for a tensor output or none returned."""
    if isinstance(output, torch.Tensor):
        return None
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def assisted_decoding(call: dict, generation_config) -> bool:
    config = call.get("generation_config") or generation_config
    return any(call.get(option) is not None or getattr(config, option, None) is not None for option in ASSISTED_DECODING_OPTIONS)


def scatter_to_all(score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(n,) candidate scores -> (N,) with 0 at the non-candidate positions."""
    full = torch.zeros(candidates.shape, dtype=score.dtype, device=score.device)
    full[candidates.to(score.device)] = score
    return full


def kept_vision_outputs(encoded: EncodedPrompt, keep_indices) -> dict:
    """The stock vision outputs with `pooler_output` = the kept tokens of each item of that kind."""
    out = {}
    for name, vision_output in encoded.vision_outputs.items():
        kind = name.split("_")[0]  # "image_outputs" -> "image"
        kept = [item.tokens[idx.to(item.tokens.device)] for item, idx in zip(encoded.items, keep_indices) if item.kind == kind]
        vision_output.pooler_output = kept
        out[name] = vision_output
    return out


def prompt_lengths_for_pruned_prompt(call: dict, generation_config, removed: int) -> dict:
    """`max_length` / `min_length` count the original prompt: subtract the removed positions
    (`max_new_tokens` / `min_new_tokens` need nothing)."""
    config = call.get("generation_config") or generation_config
    lengths = {}
    for name, new_name in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if call.get(new_name, getattr(config, new_name, None)) is not None:
            continue
        length = call.get(name, getattr(config, name, None))
        if length:
            lengths[name] = max(length - removed, 0 if name == "min_length" else 1)
    return lengths


def register_stock_key_layout(model_class, stock_key: str) -> None:
    """Loads stock checkpoints (old key layout: `language_model.model.*`, `visual.*`, ...) into an
    MFPruner class with the stock model's key renames; without them the weights of a custom class
    silently come up random (see TRANSFORMERS_NOTES.md). transformers 5.x exposes the mapping only
    in `transformers.conversion_mapping`; the import is guarded so that the model still loads (with
    a warning) if that module moves."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:
        logger.warning(
            "transformers.conversion_mapping is not available in this transformers version: checkpoints with the "
            "old key layout (hub checkpoints) will not load into %s; re-save them with this version first",
            model_class.__name__,
        )
        return
    register_checkpoint_conversion_mapping(
        model_class.__name__, get_checkpoint_conversion_mapping(stock_key), overwrite=True
    )
    # transformers looks a model's conversions up by class name, then by its config's model_type.
    # Where the stock ones are keyed by the stock model_type, ours are keyed by our model_type too, so
    # that a class built with our config finds them as it would with the stock config (the stock base
    # model: transformers' own tests build it with our config).
    if stock_key == stock_class(model_class.config_class).model_type:
        register_checkpoint_conversion_mapping(
            model_class.config_class.model_type, get_checkpoint_conversion_mapping(stock_key), overwrite=True
        )
