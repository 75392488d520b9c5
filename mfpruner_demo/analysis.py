"""One demo run: check the inputs, prefill pruned and unpruned (timed), optionally generate the
answers, draw the panels and heatmaps, count tokens and FLOPs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mfpruner_demo.inputs import check_question, is_number, load_image
from mfpruner_demo.loading import DemoModel
from mfpruner_demo.render import cue_heatmap, kept_overlay, shade_unseen, to_image, token_canvas, token_maps
from mfpruner_lib.bench_utils import time_interleaved
from mfpruner_lib.families import by_model_type
from mfpruner_lib.flops import fastv_flops, mlp_width
from mfpruner_visualize import anyres_geometry, competing_tokens, cue_votes, keep_mask, single_cue_keeps

MAX_NEW_TOKENS = 48
TIMING_REPEATS = 3  # timed prefills per setting (after one warm-up each); the median is shown
CUE_TITLES = {"attention": "[CLS] attention", "uniqueness": "uniqueness", "relevance": "relevance"}


@dataclass
class Analysis:
    """Everything one run shows. panels: title -> image; heatmaps: cue -> image."""

    panels: dict[str, Image.Image]
    heatmaps: dict[str, Image.Image]
    stats: dict
    answer: str | None = None
    notes: list[str] = field(default_factory=list)


def build_inputs(demo: DemoModel, image: Image.Image, question: str) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = demo.processor.apply_chat_template(messages, add_generation_prompt=True)
    return demo.processor(images=image, text=prompt, return_tensors="pt").to(demo.device)


def visual_token_count(demo: DemoModel, image: Image.Image) -> int:
    """Visual tokens of this image that compete for the budget: the processor's image
    placeholders, less LLaVA-NeXT's row newlines (kept outside the budget)."""
    inputs = build_inputs(demo, image, "?")
    count = int((inputs["input_ids"] == demo.model.config.image_token_id).sum())
    if getattr(by_model_type(demo.family), "anyres", False):  # LLaVA-NeXT: one newline per grid row
        vision = demo.model.config.vision_config
        count -= anyres_geometry(image.size, demo.processor.image_processor, vision.patch_size).grid[0]
    return count


@torch.no_grad()
def timed_prefills(demo: DemoModel, inputs: dict, prune_kwargs: dict, repeats: int = TIMING_REPEATS):
    """Prefill (one forward pass over the prompt, KV cache on, last logits only) with and without
    pruning, alternated after one warm-up round. Returns (median pruned s, median unpruned s,
    the pruned call's MFPrunerResult)."""
    calls = {
        setting: (lambda kwargs=kwargs: demo.model(**inputs, **kwargs, use_cache=True, logits_to_keep=1))
        for setting, kwargs in (("unpruned", {"prune_visual_tokens": False}), ("pruned", prune_kwargs))
    }
    times = time_interleaved(calls, repeats=repeats, warmup=1, device=str(demo.device))
    # The pruned call runs last in every round, and the unpruned one leaves last_pruning alone.
    return statistics.median(times["pruned"]), statistics.median(times["unpruned"]), demo.model.last_pruning


def clean_text(text: str) -> str:
    """Answers of the random-weights model hold control characters; keep them readable."""
    return "".join(ch if ch.isprintable() or ch == "\n" else "\N{REPLACEMENT CHARACTER}" for ch in text).strip()


@torch.no_grad()
def generate_answers(demo: DemoModel, inputs: dict, prune_kwargs: dict, max_new_tokens: int):
    """Greedy answers (pruned, unpruned): with MFPruner's pruning and with the stock model."""
    prompt_length = inputs["input_ids"].shape[1]
    answers = []
    for kwargs in (prune_kwargs, {"prune_visual_tokens": False}):
        output = demo.model.generate(**inputs, **kwargs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(clean_text(demo.processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0]))
    return answers[0], answers[1]


def analyze(
    demo: DemoModel,
    image_path,
    question,
    budget_mode: str = "tokens",
    budget: int = 64,
    ratio: float = 0.111,
    min_votes: int = 2,
    generate_answer: bool = False,
    progress=None,
    timing_repeats: int = TIMING_REPEATS,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Analysis:
    """One demo run: check the inputs, prefill pruned and unpruned, draw, count. Raises
    ValueError with a message for the user on bad input."""
    progress = progress or (lambda *args, **kwargs: None)
    progress(0.0, desc="Reading the image")
    image, notes = load_image(image_path)
    question = check_question(question)
    if budget_mode == "tokens":
        if not is_number(budget) or budget != int(budget) or budget < 1:
            raise ValueError(f"The token budget must be a whole number >= 1, got {budget!r}.")
        prune_kwargs = {"visual_token_budget": int(budget)}
    elif budget_mode == "ratio":
        if not is_number(ratio) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"The keep ratio must be in (0, 1], got {ratio!r}.")
        prune_kwargs = {"visual_token_ratio": float(ratio)}
    else:
        raise ValueError(f"The budget mode must be 'tokens' or 'ratio', got {budget_mode!r}.")
    if not is_number(min_votes) or min_votes not in range(1, len(CUE_TITLES) + 1):
        raise ValueError(f"The vote threshold must be 1, 2 or 3, got {min_votes!r}.")
    if not isinstance(generate_answer, bool):  # the API passes any JSON: "yes" or 1 would read as true
        raise ValueError(f"'Also generate the answer' must be true or false, got {generate_answer!r}.")

    prune_kwargs["min_votes"] = int(min_votes)  # per call: the model's config is never touched

    inputs = build_inputs(demo, image, question)
    progress(0.15, desc="Prefill, pruned and unpruned (timed)")
    pruned_s, unpruned_s, result = timed_prefills(demo, inputs, prune_kwargs, timing_repeats)
    keep_indices = result.keep_indices[0]
    num_tokens = result.num_visual_tokens[0]  # all of the image's tokens, LLaVA-NeXT's newlines included
    # The tokens that compete for the budget: all but LLaVA-NeXT's row newlines, which the model
    # keeps outside the budget (they stand for no region and are drawn on no map).
    total = int(competing_tokens(result, 0).sum())
    newlines = num_tokens - total
    kept = len(keep_indices) - newlines
    answer = None
    if generate_answer:
        progress(0.6, desc="Generating the answers")
        pruned_answer, full_answer = generate_answers(demo, inputs, prune_kwargs, max_new_tokens)
        answer = f"MFPruner ({kept} visual tokens): {pruned_answer}\n\nUnpruned ({total} visual tokens): {full_answer}"

    progress(0.85, desc="Drawing")
    canvas = token_canvas(image, token_maps(demo, image.size, result))

    def mask_of(indices) -> np.ndarray:
        mask = np.zeros(num_tokens, dtype=bool)
        mask[indices] = True
        return mask

    panels = {"original": to_image(shade_unseen(canvas.pixels, canvas.index_map))}
    heatmaps = {}
    # Each cue alone: its own top-k over the candidates at the same budget (shipped with the model code).
    cue_kept = single_cue_keeps(result, 0)
    for name, per_image in result.cue_scores.items():
        panels[name] = kept_overlay(canvas, mask_of(cue_kept[name]))
        heatmaps[name] = cue_heatmap(canvas, per_image[0].float().numpy())
    panels["mfpruner"] = kept_overlay(canvas, keep_mask(result, 0))
    votes = cue_votes(result, 0)
    heatmaps["votes"] = cue_heatmap(canvas, votes.astype(np.float64), (0.0, float(len(cue_kept))))

    text = demo.model.config.get_text_config()
    dims = (text.hidden_size, mlp_width(text), text.num_hidden_layers)  # MoE: the active (and shared) experts
    full_length = int(inputs["input_ids"].shape[1])
    pruned_length = int(result.lm_input_length)
    # FastV's visual-token FLOPs over the image tokens the LLM sees (LLaVA-NeXT: newlines included).
    visual_full, visual_pruned = fastv_flops(num_tokens, *dims), fastv_flops(kept + newlines, *dims)
    prefill_full, prefill_pruned = fastv_flops(full_length, *dims), fastv_flops(pruned_length, *dims)
    stats = {
        "model": demo.name,
        "random_weights": demo.random_weights,
        "image_size": list(image.size),
        "visual_tokens": total,
        "kept": kept,
        "newline_tokens": newlines,
        "kept_indices": keep_indices.tolist(),
        "cue_kept_indices": cue_kept,
        "votes": votes.tolist(),
        "min_votes": int(min_votes),
        "budget": prune_kwargs,
        "prefill_length_unpruned": full_length,
        "prefill_length_pruned": pruned_length,
        "visual_flops_unpruned": visual_full,
        "visual_flops_pruned": visual_pruned,
        "visual_flops_saved": 1.0 - visual_pruned / visual_full,
        "prefill_flops_unpruned": prefill_full,
        "prefill_flops_pruned": prefill_pruned,
        "prefill_flops_saved": 1.0 - prefill_pruned / prefill_full,
        "prefill_seconds_unpruned": unpruned_s,
        "prefill_seconds_pruned": pruned_s,
        "speedup": unpruned_s / pruned_s,
        "timing_repeats": timing_repeats,
        "device": str(demo.device),
    }
    progress(1.0, desc="Done")
    return Analysis(panels, heatmaps, stats, answer, notes)
