"""Prefill benchmark: unpruned vs MFPruner at the paper's budgets, side by side in one run.

For each model family, a model with the real token geometry (random weights, built in memory)
is timed unpruned and at every budget, the calls interleaved round by round (warm-up rounds
discarded, medians of the rest). Reported per setting:
  * prefill: the whole forward (vision tower, cues + vote + splice when pruning, LLM over the
    prompt, LM head on the last position) and its speed-up over the unpruned one;
  * the FLOPs-ideal speed-up of the same config and geometry (mfpruner_lib.flops) and the fraction of it
    reached; the same for the LLM-only prefill (the part pruning shortens);
  * cue overhead: the pruning path up to the LLM input (`prune_inputs`) minus the stock image
    encoding (vision tower + projector + embedding scatter), i.e. cue capture + cues + vote +
    splice, as a percentage of the pruned prefill: the median of the differences of the two
    calls run back to back in each round (a noisy machine can still make it slightly negative);
  * peak tensor memory of the prefill (mfpruner_lib.bench_utils) and decode tokens/s with the shorter
    KV cache (greedy, one token per step).

Families: LLaVA-1.5 (336 px, 576 visual tokens; budgets 192/128/64/32), LLaVA-NeXT (a 672x672 image:
5 tiles, 2,928 visual tokens; keep-ratios 0.222/0.111/0.056), Qwen2.5-VL (a 1024x1024 image, 1,369
visual tokens; keep-ratios 0.444/0.333/0.222), Qwen3-VL, Qwen3-VL MoE, Qwen3.5 and Qwen3.5 MoE (a
1024x1024 image, 1,024 visual tokens; the same keep-ratios).

Sizes: "smoke" (tiny, seconds, for CI), "cpu" (real token counts, narrow and shallow towers),
"real" (the published sizes; meant for `--device cuda`). Absolute times mean something only on a
GPU; on a CPU the ratios are the result.

    python -m tools.benchmark_prefill --size cpu --output-dir benchmarks --plot assets/prefill_speedup.png
    python -m tools.benchmark_prefill --size cpu --family llava-next --family qwen2.5-vl --output-dir benchmarks \
        --plot assets/prefill_speedup.png --plot-also benchmarks/prefill_llava-1.5_cpu_cpu.json
    python -m tools.benchmark_prefill --size real --device cuda --dtype bfloat16

A family is one `Family` entry in FAMILIES: how to build the model at each size, its inputs, its
budgets, and four small calls (stock encoding, pruning, LLM-only prefill, FLOPs).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mfpruner_lib import bench_utils, families, flops, model_sizes
from mfpruner_lib.cli import ArgumentParser, refusals_as_errors

SIZES = ("smoke", "cpu", "real")
PAPER_VISUAL_TOKENS = 576  # LLaVA-1.5's budgets 192/128/64/32 are "of 576"


@dataclass
class Family:
    """One model family in the benchmark.

    build(size, dtype, device): the model, eval mode. inputs(model, size, seed, device, text_tokens):
    the model's keyword inputs for one image + prompt (batch 1). budgets(num_visual_tokens): [(label, per-call kwargs)].
    encode(model, inputs): the stock image encoding up to the LLM input embeddings.
    prune(model, inputs, budget_kwargs): MFPruner's pruned LLM inputs (a dict with
    inputs_embeds, attention_mask, ...). lm_prefill(model, pruned): the LLM alone on them.
    prefill_flops(config, size, text_tokens, kept): mfpruner_lib.flops.PrefillFlops of that prefill (kept: the
    visual tokens that reach the LLM, None = unpruned). text_tokens: every prompt token that is not
    an image placeholder.
    cue_attention(model, inputs): for a family whose cue capture is an extra computation inside a
    vision block (Qwen2.5-VL's cue A), {"stock": call, "capture": call}: that module's stock forward
    and its capturing forward on the image's shapes, timed as a pair in every round; None: the
    capture cost is the in-call vision stage minus the stock encoding.
    """

    name: str
    build: Callable
    inputs: Callable
    budgets: Callable
    encode: Callable
    prune: Callable
    lm_prefill: Callable
    prefill_flops: Callable
    text_tokens: dict = field(default_factory=lambda: {"smoke": 12, "cpu": 60, "real": 60})
    note: dict = field(default_factory=dict)
    cue_attention: Callable | None = None


# ----------------------------------------------------------------------------- LLaVA-1.5

# Widths and depths per size. "cpu": the real 577-token tower input and ~60 + 576 prompt tokens,
# with the vision tower at ~5% of the prefill FLOPs as in the 7B model (mfpruner_lib.flops).
LLAVA_1_5_SIZES = {
    "smoke": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=84,
                    patch_size=14),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=512),
        image_token_id=500,
    ),
    "cpu": dict(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6, image_size=336,
                    patch_size=14),
        text=dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096),
        image_token_id=32000,
    ),
    "real": dict(vision=model_sizes.CLIP_VIT_L_336, text=model_sizes.VICUNA_7B, image_token_id=32000),
}


def instantiate(model_class, config, dtype: torch.dtype, device: str):
    """Random weights, allocated on `device` directly ("meta": shapes only), eval mode."""
    with torch.device(device):
        model = model_class(config)
    return model.to(dtype).eval()


def describe_llava(size: str) -> str:
    v, t = LLAVA_1_5_SIZES[size]["vision"], LLAVA_1_5_SIZES[size]["text"]
    return (
        f"CLIP tower {v['num_hidden_layers']} layers x {v['hidden_size']} at {v['image_size']} px "
        f"({(v['image_size'] // v['patch_size']) ** 2} visual tokens); Llama {t['num_hidden_layers']} layers x "
        f"{t['hidden_size']} (MLP {t['intermediate_size']})"
    )


def build_llava_1_5(size: str, dtype: torch.dtype, device: str):
    from configuration_mfpruner import MFPrunerLlavaConfig
    from modeling_mfpruner_llava import MFPrunerLlavaForConditionalGeneration

    sizes = LLAVA_1_5_SIZES[size]
    config = model_sizes.llava_config(
        sizes["vision"], sizes["text"], config_class=MFPrunerLlavaConfig, image_token_id=sizes["image_token_id"]
    )
    return instantiate(MFPrunerLlavaForConditionalGeneration, config, dtype, device)


def prompt_with_image(image_part: torch.Tensor, delimiters: int, text_tokens: int, vocab_end: int, generator):
    """(1, L) ids: BOS, the first third of the text, `image_part` (placeholders and `delimiters`
    delimiter ids), the rest of the text; `text_tokens` counts every id that is not a placeholder."""
    text = torch.randint(5, vocab_end, (text_tokens - 1 - delimiters,), generator=generator)
    split = len(text) // 3
    return torch.cat([torch.tensor([1]), text[:split], image_part, text[split:]])[None]


def llava_1_5_inputs(model, size: str, seed: int, device: str, text_tokens: int) -> dict:
    """BOS, the first third of the text, the image placeholders, the rest of the text."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    image_size = config.vision_config.image_size
    visual = (image_size // config.vision_config.patch_size) ** 2
    image = torch.full((visual,), config.image_token_id)
    input_ids = prompt_with_image(image, 0, text_tokens, config.image_token_id, generator)
    pixel_values = torch.randn(1, 3, image_size, image_size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, model.dtype),
    }


def paper_budgets(num_visual_tokens: int) -> list[tuple[str, dict]]:
    """192 / 128 / 64 / 32 of 576, scaled to the model's visual tokens when it has fewer (smoke)."""
    budgets = []
    for paper in (192, 128, 64, 32):
        k = max(1, round(paper * num_visual_tokens / PAPER_VISUAL_TOKENS))
        budgets.append((str(paper) if k == paper else f"{paper} (= {k} of {num_visual_tokens})",
                        {"visual_token_budget": k}))
    return budgets


def llava_encode(model, inputs):
    """The stock path up to the LLM input: vision tower, projector (NeXT: packing), scatter into the embeddings."""
    sizes = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}  # LLaVA-NeXT only
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"], **sizes).pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features  # (I*N, D) or (I, N, D)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    is_image = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(is_image, features.to(embeds.dtype))


def llava_prune(model, inputs, budget_kwargs):
    return model.prune_inputs(
        inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"],
        image_sizes=inputs.get("image_sizes"), **budget_kwargs
    )


def llava_lm_prefill(model, pruned):
    mask = pruned["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.model.language_model(
        inputs_embeds=pruned["inputs_embeds"], attention_mask=mask, position_ids=positions, use_cache=True
    ).last_hidden_state
    return model.lm_head(hidden[:, -1:])


def llava_1_5_flops(config, size: str, text_tokens: int, kept: int | None):
    return flops.prefill_flops(config, text_tokens, kept)


def ratio_budgets(ratios: tuple[float, ...]) -> Callable:
    """The paper's keep-ratios, applied per image by the model (`visual_token_ratio`)."""
    return lambda num_visual_tokens: [(f"{100 * r:.1f}%", {"visual_token_ratio": r}) for r in ratios]


# ----------------------------------------------------------------------------- LLaVA-1.6 (LLaVA-NeXT)

# A 672x672 image on LLaVA-1.6's anyres pinpoints: a base tile + a 2 x 2 grid of 336 px tiles =
# 576 + 48 x 48 patch tokens + 48 newlines = 2,928 visual tokens. "cpu": the LLaVA-1.5 cpu towers.
LLAVA_NEXT_RATIOS = (0.222, 0.111, 0.056)  # the paper's LLaVA-NeXT settings
LLAVA_NEXT_SIZES = {
    "smoke": dict(LLAVA_1_5_SIZES["smoke"], vision=dict(LLAVA_1_5_SIZES["smoke"]["vision"], image_size=56),
                  pinpoints=[[56, 112], [112, 56], [112, 112]], image_hw=(112, 112)),
    "cpu": dict(LLAVA_1_5_SIZES["cpu"], pinpoints=model_sizes.LLAVA_NEXT_PINPOINTS, image_hw=(672, 672)),
    "real": dict(LLAVA_1_5_SIZES["real"], pinpoints=model_sizes.LLAVA_NEXT_PINPOINTS, image_hw=(672, 672)),
}


def describe_llava_next(size: str) -> str:
    v, t, (h, w) = LLAVA_NEXT_SIZES[size]["vision"], LLAVA_NEXT_SIZES[size]["text"], LLAVA_NEXT_SIZES[size]["image_hw"]
    return (
        f"CLIP tower {v['num_hidden_layers']} layers x {v['hidden_size']} on {v['image_size']} px tiles, "
        f"one {h}x{w} image (anyres: base + grid tiles, newline tokens); Llama {t['num_hidden_layers']} layers x "
        f"{t['hidden_size']} (MLP {t['intermediate_size']})"
    )


def build_llava_next(size: str, dtype: torch.dtype, device: str):
    from configuration_mfpruner import MFPrunerLlavaNextConfig
    from modeling_mfpruner_llava import MFPrunerLlavaNextForConditionalGeneration

    sizes = LLAVA_NEXT_SIZES[size]
    config = model_sizes.llava_config(
        sizes["vision"], sizes["text"], config_class=MFPrunerLlavaNextConfig, image_token_id=sizes["image_token_id"],
        image_grid_pinpoints=sizes["pinpoints"],
    )
    return instantiate(MFPrunerLlavaNextForConditionalGeneration, config, dtype, device)


def llava_next_inputs(model, size: str, seed: int, device: str, text_tokens: int) -> dict:
    """One image of LLAVA_NEXT_SIZES[size]["image_hw"]: its tiles as random pixels, its packed
    placeholder count from mfpruner_lib.flops' anyres geometry (the processor's count)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    image_hw = LLAVA_NEXT_SIZES[size]["image_hw"]
    geo = flops.geometry(config, image_hw)
    tile = config.vision_config.image_size
    image = torch.full((geo.visual_tokens,), config.image_token_id)
    input_ids = prompt_with_image(image, 0, text_tokens, config.image_token_id, generator)
    pixel_values = torch.randn(1, geo.tiles, 3, tile, tile, generator=generator)  # (images, tiles, 3, H, W)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, model.dtype),
        "image_sizes": torch.tensor([image_hw], device=device),
    }


def llava_next_flops(config, size: str, text_tokens: int, kept: int | None):
    return flops.prefill_flops(config, text_tokens, kept, image_hw=LLAVA_NEXT_SIZES[size]["image_hw"])


# ----------------------------------------------------------------------------- Qwen2.5-VL

# A 1024x1024 image (resized to 1036x1036 by the 7B repo's processor): 74 x 74 patches of 14 px,
# merged 2 x 2 into 1,369 visual tokens; 112 px windows in all vision blocks but the full-attention
# ones (where cue A is read). "cpu": 2 vision blocks (the last full attention) x 384, LLM 8 x 1024.
QWEN_RATIOS = (0.444, 0.333, 0.222)  # the paper's Qwen2.5-VL settings
QWEN_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                      vision_end_token_id=151653)  # the 7B repo's ids
QWEN_SMALL_TOKEN_IDS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
QWEN_SIZES = {
    "smoke": dict(
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        token_ids=QWEN_SMALL_TOKEN_IDS, image_hw=(112, 112),
    ),
    "cpu": dict(
        vision=dict(depth=2, hidden_size=384, intermediate_size=1024, num_heads=6, out_hidden_size=1024, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                    hidden_act="silu"),
        text=dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32064, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}),
        token_ids=dict(image_token_id=32000, video_token_id=32001, vision_start_token_id=32002,
                       vision_end_token_id=32003),
        image_hw=(1024, 1024),
    ),
    "real": dict(
        vision=model_sizes.QWEN2_5_VL_7B_VISION,
        text=dict(model_sizes.QWEN2_5_VL_7B_TEXT,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        token_ids=QWEN_TOKEN_IDS, image_hw=(1024, 1024),
    ),
}


def describe_qwen(size: str) -> str:
    v, t, (h, w) = QWEN_SIZES[size]["vision"], QWEN_SIZES[size]["text"], QWEN_SIZES[size]["image_hw"]
    return (
        f"Qwen2.5-VL vision {v['depth']} blocks x {v['hidden_size']} (full attention: {v['fullatt_block_indexes']}, "
        f"the rest {v['window_size']} px windows), one {h}x{w} image; Qwen2 LLM {t['num_hidden_layers']} layers x "
        f"{t['hidden_size']} (MLP {t['intermediate_size']}, {t['num_key_value_heads']} KV heads)"
    )


def build_qwen2_5_vl(size: str, dtype: torch.dtype, device: str):
    from configuration_mfpruner import MFPrunerQwen2_5_VLConfig
    from modeling_mfpruner_qwen2_5_vl import MFPrunerQwen2_5_VLForConditionalGeneration

    sizes = QWEN_SIZES[size]
    text = dict(sizes["text"], bos_token_id=None, eos_token_id=None)
    config = model_sizes.qwen2_5_vl_config(
        sizes["vision"], text, config_class=MFPrunerQwen2_5_VLConfig, **sizes["token_ids"]
    )
    return instantiate(MFPrunerQwen2_5_VLForConditionalGeneration, config, dtype, device)


def qwen_random_inputs(model, size: str, seed: int, device: str, text_tokens: int, sizes: dict = QWEN_SIZES) -> dict:
    """One image of sizes[size]["image_hw"], resized as the real repo's processor does (mfpruner_lib.flops'
    geometry): random patches (patches, 3 x 2 x p x p), <|vision_start|> placeholders <|vision_end|>."""
    config = model.config
    v = config.vision_config
    generator = torch.Generator().manual_seed(seed)
    geo = flops.geometry(config, sizes[size]["image_hw"])
    side = int(geo.vision_patches**0.5)  # square images: side x side patches
    image = torch.cat([
        torch.tensor([config.vision_start_token_id]), torch.full((geo.visual_tokens,), config.image_token_id),
        torch.tensor([config.vision_end_token_id]),
    ])
    input_ids = prompt_with_image(image, 2, text_tokens, config.image_token_id, generator)
    pixel_values = torch.randn(geo.vision_patches, 3 * v.temporal_patch_size * v.patch_size**2, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "mm_token_type_ids": (input_ids == config.image_token_id).int().to(device),
        "pixel_values": pixel_values.to(device, model.dtype),
        "image_grid_thw": torch.tensor([[1, side, side]], device=device),
    }


def qwen_encode(model, inputs):
    """The stock path up to the LLM input: vision tower + merger, scatter, M-RoPE positions."""
    features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
    ).pooler_output
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    is_image = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(is_image, torch.cat(list(features)).to(embeds.dtype))
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    return embeds, positions


def qwen_cue_attention(model, inputs) -> dict:
    """Cue A where it is computed: the last full-attention block's attention module on this image's
    patches (one segment), the stock forward (no capture active) against the one-pass forward with
    the column sums that a pruning call runs. Random hidden states and rotary angles of the real
    shapes: the cost does not depend on the values."""
    from mfpruner_core import last_full_attention_block
    from modeling_mfpruner_qwen2_5_vl import attention_and_received_per_patch

    visual = model.model.visual
    # Qwen3-VL's tower has no windows: cue A is read in its last block
    cue_block = last_full_attention_block(visual) if hasattr(visual, "fullatt_block_indexes") else len(visual.blocks) - 1
    attn = visual.blocks[cue_block].attn
    length = int(inputs["image_grid_thw"].prod(-1).sum())  # patches before the 2x2 merge
    parameter = next(attn.parameters())
    hidden, cu_seqlens, rotary = bench_utils.vision_attention_inputs(
        attn, length, torch.Generator().manual_seed(0), parameter.device, parameter.dtype
    )
    chunk = model.config.attention_query_chunk
    return {
        "stock": lambda: attn(hidden, cu_seqlens, position_embeddings=rotary),
        "capture": lambda: attention_and_received_per_patch(attn, hidden, cu_seqlens, rotary, chunk),
        "patches": length,
    }


def qwen_prune(model, inputs, budget_kwargs):
    return model.prune_inputs(
        inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"],
        image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=inputs["mm_token_type_ids"], **budget_kwargs
    )


def qwen_lm_prefill(model, pruned):
    """The decoder alone on the pruned inputs, with their gathered (4, B, L') M-RoPE positions."""
    hidden = model.model.language_model(
        inputs_embeds=pruned["inputs_embeds"], attention_mask=pruned["attention_mask"],
        position_ids=pruned["position_ids"], use_cache=True,
    ).last_hidden_state
    return model.lm_head(hidden[:, -1:])


def qwen_flops(config, size: str, text_tokens: int, kept: int | None, sizes: dict = QWEN_SIZES):
    return flops.prefill_flops(config, text_tokens, kept, image_hw=sizes[size]["image_hw"])


# ----------------------------------------------------------------------------- Qwen3-VL

# A 1024x1024 image (Qwen3-VL-8B's processor keeps it): 64 x 64 patches of 16 px, merged 2 x 2 into
# 1,024 visual tokens; every vision block attends over the whole image; DeepStack mergers after
# some blocks. "cpu": 2 vision blocks x 384 (DeepStack after block 0), LLM 8 x 1024.
QWEN3_VL_SIZES = {
    "smoke": dict(
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0]),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}),
        token_ids=QWEN_SMALL_TOKEN_IDS, image_hw=(256, 256),  # the processor's minimum: 64 tokens
    ),
    "cpu": dict(
        vision=dict(depth=2, hidden_size=384, intermediate_size=1024, num_heads=6, out_hidden_size=1024, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[0]),
        text=dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16, head_dim=64,
                  num_key_value_heads=4, vocab_size=32064, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12],
                                   "mrope_interleaved": True}),
        token_ids=dict(image_token_id=32000, video_token_id=32001, vision_start_token_id=32002,
                       vision_end_token_id=32003),
        image_hw=(1024, 1024),
    ),
    "real": dict(
        vision=model_sizes.QWEN3_VL_VISION,
        text=dict(model_sizes.QWEN3_VL_8B_TEXT,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}),
        token_ids=QWEN_TOKEN_IDS, image_hw=(1024, 1024),
    ),
}


def describe_qwen3_vl(size: str) -> str:
    v, t, (h, w) = QWEN3_VL_SIZES[size]["vision"], QWEN3_VL_SIZES[size]["text"], QWEN3_VL_SIZES[size]["image_hw"]
    return (
        f"Qwen3-VL vision {v['depth']} blocks x {v['hidden_size']} (all full attention, DeepStack after "
        f"{v['deepstack_visual_indexes']}), one {h}x{w} image; Qwen3 LLM {t['num_hidden_layers']} layers x "
        f"{t['hidden_size']} (MLP {t['intermediate_size']}, {t['num_key_value_heads']} KV heads)"
    )


# Qwen3-VL MoE: the same towers and image; the LLM's MLPs are experts (the real one: Qwen3-VL-30B-A3B's).
QWEN3_VL_MOE_SIZES = {
    "smoke": dict(QWEN3_VL_SIZES["smoke"], text=dict(
        QWEN3_VL_SIZES["smoke"]["text"], moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "cpu": dict(QWEN3_VL_SIZES["cpu"], text=dict(
        QWEN3_VL_SIZES["cpu"]["text"], moe_intermediate_size=352, num_experts=16, num_experts_per_tok=8)),
    "real": dict(
        QWEN3_VL_SIZES["real"],
        vision=dict(model_sizes.QWEN3_VL_VISION, out_hidden_size=model_sizes.QWEN3_VL_30B_A3B_TEXT["hidden_size"]),
        text=dict(model_sizes.QWEN3_VL_30B_A3B_TEXT, rope_parameters=QWEN3_VL_SIZES["real"]["text"]["rope_parameters"]),
    ),
}


# Qwen3.5: Qwen3-VL's tower without DeepStack and image; a hybrid LLM, every 4th layer full attention,
# the others Gated DeltaNet (the real one: Qwen3.5-27B's).
def without_deepstack(vision: dict) -> dict:
    return {name: value for name, value in vision.items() if name != "deepstack_visual_indexes"}


QWEN3_5_LINEAR = dict(linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
                      linear_conv_kernel_dim=4)
QWEN3_5_SIZES = {
    "smoke": dict(
        QWEN3_VL_SIZES["smoke"], vision=without_deepstack(QWEN3_VL_SIZES["smoke"]["vision"]),
        text=dict(QWEN3_VL_SIZES["smoke"]["text"], num_hidden_layers=4, head_dim=32, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                   "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
    ),
    "cpu": dict(
        QWEN3_VL_SIZES["cpu"], vision=without_deepstack(QWEN3_VL_SIZES["cpu"]["vision"]),
        text=dict(QWEN3_VL_SIZES["cpu"]["text"], head_dim=128, **QWEN3_5_LINEAR,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                   "mrope_section": [6, 5, 5], "mrope_interleaved": True}),
    ),
    "real": dict(
        QWEN3_VL_SIZES["real"], vision=model_sizes.QWEN3_5_27B_VISION,
        text=dict(model_sizes.QWEN3_5_27B_TEXT,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                   "mrope_section": [11, 11, 10], "mrope_interleaved": True}),
    ),
}


# Qwen3.5 MoE: the same towers, image and layer pattern; the LLM's MLPs are experts with a shared one
# (the real one: Qwen3.5-35B-A3B's).
QWEN3_5_MOE_EXPERTS = {"smoke": dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                                     num_experts_per_tok=2),
                       "cpu": dict(moe_intermediate_size=352, shared_expert_intermediate_size=352, num_experts=16,
                                   num_experts_per_tok=8)}
QWEN3_5_MOE_SIZES = {
    **{size: dict(QWEN3_5_SIZES[size], text=dict(QWEN3_5_SIZES[size]["text"], **experts))
       for size, experts in QWEN3_5_MOE_EXPERTS.items()},
    "real": dict(
        QWEN3_5_SIZES["real"],
        vision=dict(model_sizes.QWEN3_5_27B_VISION, out_hidden_size=model_sizes.QWEN3_5_35B_A3B_TEXT["hidden_size"]),
        text=dict(model_sizes.QWEN3_5_35B_A3B_TEXT, rope_parameters=QWEN3_5_SIZES["real"]["text"]["rope_parameters"]),
    ),
}


def describe_qwen3_5(size: str) -> str:
    v, t, (h, w) = QWEN3_5_SIZES[size]["vision"], QWEN3_5_SIZES[size]["text"], QWEN3_5_SIZES[size]["image_hw"]
    return (
        f"Qwen3.5 vision {v['depth']} blocks x {v['hidden_size']} (all full attention, no DeepStack), one {h}x{w} "
        f"image; hybrid LLM {t['num_hidden_layers']} layers x {t['hidden_size']} (every 4th full attention, the "
        f"others Gated DeltaNet; MLP {t['intermediate_size']})"
    )


def build_qwen3_5(size: str, dtype: torch.dtype, device: str, moe: bool = False):
    from configuration_mfpruner import MFPrunerQwen3_5Config, MFPrunerQwen3_5MoeConfig
    from modeling_mfpruner_qwen3_5 import MFPrunerQwen3_5ForConditionalGeneration, MFPrunerQwen3_5MoeForConditionalGeneration

    if moe:
        return build_qwen_sized(QWEN3_5_MOE_SIZES[size], MFPrunerQwen3_5MoeConfig, MFPrunerQwen3_5MoeForConditionalGeneration,
                                dtype, device)
    return build_qwen_sized(QWEN3_5_SIZES[size], MFPrunerQwen3_5Config, MFPrunerQwen3_5ForConditionalGeneration, dtype, device)


def build_qwen_sized(sizes: dict, config_class, model_class, dtype: torch.dtype, device: str):
    """A Qwen-VL model of one size entry (vision, text, token ids), random weights."""
    text = dict(sizes["text"], bos_token_id=None, eos_token_id=None)
    config = model_sizes.qwen2_5_vl_config(sizes["vision"], text, config_class=config_class, **sizes["token_ids"])
    return instantiate(model_class, config, dtype, device)


def build_qwen3_vl(size: str, dtype: torch.dtype, device: str, moe: bool = False):
    from configuration_mfpruner import MFPrunerQwen3VLConfig, MFPrunerQwen3VLMoeConfig
    from modeling_mfpruner_qwen3_vl import (
        MFPrunerQwen3VLForConditionalGeneration,
        MFPrunerQwen3VLMoeForConditionalGeneration,
    )

    sizes = (QWEN3_VL_MOE_SIZES if moe else QWEN3_VL_SIZES)[size]
    config_class = MFPrunerQwen3VLMoeConfig if moe else MFPrunerQwen3VLConfig
    model_class = MFPrunerQwen3VLMoeForConditionalGeneration if moe else MFPrunerQwen3VLForConditionalGeneration
    return build_qwen_sized(sizes, config_class, model_class, dtype, device)


def qwen3_vl_lm_prefill(model, pruned):
    """The language model on the pruned inputs: the stock model scatters the kept tokens and adds their
    DeepStack levels (`mm_encoder_outputs`), with the gathered (4, B, L') M-RoPE positions."""
    hidden = model.model(
        inputs_embeds=pruned["inputs_embeds"], attention_mask=pruned["attention_mask"],
        position_ids=pruned["position_ids"], mm_encoder_outputs=pruned["mm_encoder_outputs"], use_cache=True,
    ).last_hidden_state
    return model.lm_head(hidden[:, -1:])


# One entry per family of the registry (mfpruner_lib.families), under its key.
FAMILIES = {
    "llava-1.5": Family(
        name=families.FAMILIES["llava-1.5"].name,
        build=build_llava_1_5,
        inputs=llava_1_5_inputs,
        budgets=paper_budgets,
        encode=llava_encode,
        prune=llava_prune,
        lm_prefill=llava_lm_prefill,
        prefill_flops=llava_1_5_flops,
        note={size: describe_llava(size) for size in SIZES},
    ),
    "llava-next": Family(
        name=families.FAMILIES["llava-next"].name,
        build=build_llava_next,
        inputs=llava_next_inputs,
        budgets=ratio_budgets(LLAVA_NEXT_RATIOS),
        encode=llava_encode,
        prune=llava_prune,
        lm_prefill=llava_lm_prefill,
        prefill_flops=llava_next_flops,
        note={size: describe_llava_next(size) for size in SIZES},
    ),
    "qwen2.5-vl": Family(
        name=families.FAMILIES["qwen2.5-vl"].name,
        build=build_qwen2_5_vl,
        inputs=qwen_random_inputs,
        budgets=ratio_budgets(QWEN_RATIOS),
        encode=qwen_encode,
        prune=qwen_prune,
        lm_prefill=qwen_lm_prefill,
        prefill_flops=qwen_flops,
        note={size: describe_qwen(size) for size in SIZES},
        cue_attention=qwen_cue_attention,
    ),
    "qwen3-vl": Family(
        name=families.FAMILIES["qwen3-vl"].name,
        build=build_qwen3_vl,
        inputs=functools.partial(qwen_random_inputs, sizes=QWEN3_VL_SIZES),
        budgets=ratio_budgets(QWEN_RATIOS),
        encode=qwen_encode,
        prune=qwen_prune,
        lm_prefill=qwen3_vl_lm_prefill,
        prefill_flops=functools.partial(qwen_flops, sizes=QWEN3_VL_SIZES),
        note={size: describe_qwen3_vl(size) for size in SIZES},
        cue_attention=qwen_cue_attention,
    ),
    "qwen3-vl-moe": Family(
        name=families.FAMILIES["qwen3-vl-moe"].name,
        build=functools.partial(build_qwen3_vl, moe=True),
        inputs=functools.partial(qwen_random_inputs, sizes=QWEN3_VL_MOE_SIZES),
        budgets=ratio_budgets(QWEN_RATIOS),
        encode=qwen_encode,
        prune=qwen_prune,
        lm_prefill=qwen3_vl_lm_prefill,
        prefill_flops=functools.partial(qwen_flops, sizes=QWEN3_VL_MOE_SIZES),
        note={size: describe_qwen3_vl(size) + " (MoE)" for size in SIZES},
        cue_attention=qwen_cue_attention,
    ),
    "qwen3.5": Family(
        name=families.FAMILIES["qwen3.5"].name,
        build=build_qwen3_5,
        inputs=functools.partial(qwen_random_inputs, sizes=QWEN3_5_SIZES),
        budgets=ratio_budgets(QWEN_RATIOS),
        encode=qwen_encode,
        prune=qwen_prune,
        lm_prefill=qwen3_vl_lm_prefill,  # the stock model scatters the kept tokens (`mm_encoder_outputs`)
        prefill_flops=functools.partial(qwen_flops, sizes=QWEN3_5_SIZES),
        note={size: describe_qwen3_5(size) for size in SIZES},
        cue_attention=qwen_cue_attention,
    ),
    "qwen3.5-moe": Family(
        name=families.FAMILIES["qwen3.5-moe"].name,
        build=functools.partial(build_qwen3_5, moe=True),
        inputs=functools.partial(qwen_random_inputs, sizes=QWEN3_5_MOE_SIZES),
        budgets=ratio_budgets(QWEN_RATIOS),
        encode=qwen_encode,
        prune=qwen_prune,
        lm_prefill=qwen3_vl_lm_prefill,
        prefill_flops=functools.partial(qwen_flops, sizes=QWEN3_5_MOE_SIZES),
        note={size: describe_qwen3_5(size) + " (MoE)" for size in SIZES},
        cue_attention=qwen_cue_attention,
    ),
}


# ----------------------------------------------------------------------------- measuring

# Stages of one pruning call after the vision tower (keys of `MFPrunerResult.timings`): the cue
# overhead. "vision" (the tower with cue capture) is reported beside them, not counted in.
CUE_STAGES = ("cues", "vote", "splice")


def prefill_recording_stages(model, inputs: dict, settings: dict, recorded: list | None):
    """One timed prefill. When the call pruned and the model records per-stage wall seconds
    (`model.last_pruning.timings`), appends them to `recorded` (a call that did not prune leaves
    `last_pruning` alone, so only a new result counts)."""
    before = getattr(model, "last_pruning", None)
    output = model(**inputs, **settings, use_cache=True, logits_to_keep=1)
    after = getattr(model, "last_pruning", None)
    if recorded is not None and after is not None and after is not before and getattr(after, "timings", None):
        recorded.append(dict(after.timings))
    return output


def stage_medians(recorded: list[dict]) -> dict[str, float]:
    """{stage: median seconds} over the rounds (empty when the model records no timings)."""
    if not recorded:
        return {}
    return {key: bench_utils.median([r[key] for r in recorded if key in r]) for key in recorded[0]}


def lm_input_length(model, inputs, settings: dict) -> int:
    if settings.get("prune_visual_tokens") is False:
        return int(inputs["attention_mask"].shape[1])
    return int(model.last_pruning.lm_input_length)


def decode_tokens_per_second(model, inputs, settings: dict, steps: int, device: str) -> float:
    """Prefill (untimed), then `steps` greedy one-token forwards on its KV cache (timed). Batch 1,
    no padding, so no attention mask: the models number the new positions from the cache length
    (Qwen2.5-VL adds the `rope_deltas` its prefill stored; with a mask its plain forward would
    number the whole mask, which only generate() slices)."""
    out = model(**inputs, **settings, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    prefilled = lm_input_length(model, inputs, settings)
    if cache.get_seq_length() != prefilled:  # decoding must run on the pruned (shorter) cache
        raise RuntimeError(f"KV cache holds {cache.get_seq_length()} positions, the LLM prefilled {prefilled}")
    bench_utils.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    bench_utils.synchronize(device)
    return steps / (time.perf_counter() - start)


def run_family(family: Family, size: str, repeats: int, warmup: int, decode_steps: int, device: str,
               dtype: torch.dtype, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = family.build(size, dtype, device)
    text_tokens = family.text_tokens[size]
    inputs = family.inputs(model, size, seed, device, text_tokens)
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    settings = [("unpruned", {"prune_visual_tokens": False})] + family.budgets(num_visual)

    with torch.inference_mode():
        calls, kept, lengths, stages = {}, {}, {}, {label: [] for label, _ in settings}
        for label, budget in settings:
            recorded = None if label == "unpruned" else stages[label]
            calls[f"prefill/{label}"] = lambda b=budget, r=recorded: prefill_recording_stages(model, inputs, b, r)
            keep_all = {"visual_token_budget": num_visual} if label == "unpruned" else budget
            pruned = family.prune(model, inputs, keep_all)
            kept[label] = num_visual if label == "unpruned" else int(model.last_pruning.keep_indices[0].numel())
            calls[f"lm/{label}"] = lambda p=pruned: family.lm_prefill(model, p)
            if label != "unpruned":  # the stock encoding right before the pruning path: paired samples
                calls[f"encode/{label}"] = lambda: family.encode(model, inputs)
                calls[f"prune/{label}"] = lambda b=budget: family.prune(model, inputs, b)
            model(**inputs, **budget, use_cache=True, logits_to_keep=1)
            lengths[label] = lm_input_length(model, inputs, budget)
        cue_pair = None if family.cue_attention is None else family.cue_attention(model, inputs)
        if cue_pair is not None:  # paired in every round: capture minus stock
            calls["cue-attention/stock"], calls["cue-attention/capture"] = cue_pair["stock"], cue_pair["capture"]
        for recorded in stages.values():
            recorded.clear()  # keep the timed rounds' stage timings only
        samples = bench_utils.time_interleaved(calls, repeats + warmup, 0, device)
        samples = {name: values[warmup:] for name, values in samples.items()}
        stages = {label: recorded[warmup:] for label, recorded in stages.items()}
        peak = {
            label: bench_utils.peak_memory(
                lambda b=budget: model(**inputs, **b, use_cache=True, logits_to_keep=1), device
            )[0]
            for label, budget in settings
        }
        decode = {
            label: bench_utils.median(
                [decode_tokens_per_second(model, inputs, budget, decode_steps, device) for _ in range(max(1, repeats // 2))]
            )
            for label, budget in settings
        }

    times = {name: bench_utils.median(values) for name, values in samples.items()}
    full_flops = family.prefill_flops(model.config, size, text_tokens, None)
    capture_pairs = None
    if "cue-attention/capture" in samples:
        capture_pairs = [c - s for c, s in zip(samples["cue-attention/capture"], samples["cue-attention/stock"])]
        paired_capture = bench_utils.median(capture_pairs)
    rows = []
    for label, _ in settings:
        pruned_flops = full_flops if label == "unpruned" else family.prefill_flops(model.config, size, text_tokens, kept[label])
        prefill, lm = times[f"prefill/{label}"], times[f"lm/{label}"]
        overhead, overhead_source, stage_s = None, None, stage_medians(stages[label])
        capture, capture_source = None, None
        if label != "unpruned" and capture_pairs is not None:  # cue A timed at its block, the same every setting
            capture, capture_source = paired_capture, "paired block"
        elif label != "unpruned" and "vision" in stage_s:
            capture, capture_source = stage_s["vision"] - times[f"encode/{label}"], "vision stage"
        if label != "unpruned" and stage_s:  # timers inside the pruned call itself
            overhead, overhead_source = sum(stage_s.get(key, 0.0) for key in CUE_STAGES), "in-call timers"
        elif label != "unpruned":  # fallback: median of the per-round differences of adjacent calls
            overhead = bench_utils.median([p - e for p, e in zip(samples[f"prune/{label}"], samples[f"encode/{label}"])])
            overhead_source = "difference of paired calls"
        rows.append(dict(
            setting=label,
            kept=kept[label],
            visual_tokens=num_visual,
            lm_length=lengths[label],
            prefill_s=prefill,
            prefill_spread_s=bench_utils.spread(samples[f"prefill/{label}"]),
            speedup=times["prefill/unpruned"] / prefill,
            ideal_speedup=full_flops.total / pruned_flops.total,
            lm_prefill_s=lm,
            lm_prefill_spread_s=bench_utils.spread(samples[f"lm/{label}"]),
            lm_speedup=times["lm/unpruned"] / lm,
            lm_ideal_speedup=full_flops.llm / pruned_flops.llm,
            cue_overhead_s=overhead,
            cue_overhead_pct=None if overhead is None else 100.0 * overhead / prefill,
            cue_overhead_source=overhead_source,
            stage_s=stage_s,
            capture_overhead_s=capture,
            capture_source=capture_source,
            peak_bytes=peak[label],
            decode_tokens_per_s=decode[label],
            prefill_tflops=pruned_flops.total / 1e12,
        ))
    cue_attention = None
    if capture_pairs is not None:
        cue_attention = dict(patches=cue_pair["patches"], stock_s=times["cue-attention/stock"], capture_s=times["cue-attention/capture"],
                             extra_spread_s=bench_utils.spread(capture_pairs))
    return dict(
        family=family.name, size=size, model=family.note.get(size, ""), text_tokens=text_tokens,
        cue_attention=cue_attention, llm_weight_bytes=llm_weight_bytes(model),
        visual_tokens=num_visual, encode_s=bench_utils.median(
            [t for name, values in samples.items() if name.startswith("encode/") for t in values]
        ), repeats=repeats, warmup=warmup,
        decode_steps=decode_steps, device=device, dtype=str(dtype).removeprefix("torch."),
        machine=bench_utils.machine_description(device), rows=rows,
    )


# ----------------------------------------------------------------------------- reporting


def lm_time_fit(rows: list[dict]) -> tuple[float, float, float, float]:
    """Least-squares fit of the LLM-only prefill time over the settings: seconds = fixed + per_row x
    L + per_pair x L^2 (L: the LLM length; the L^2 term is attention). Returns (fixed_s, per_row_s,
    per_pair_s, largest residual as a fraction of the measured time). FLOPs grow with L only, so the
    fixed part of every forward is what a FLOPs-ideal speed-up cannot see."""
    lengths = torch.tensor([float(r["lm_length"]) for r in rows], dtype=torch.float64)
    seconds = torch.tensor([r["lm_prefill_s"] for r in rows], dtype=torch.float64)
    design = torch.stack([torch.ones_like(lengths), lengths, lengths**2], dim=1)  # (settings, 3)
    solution = torch.linalg.lstsq(design, seconds[:, None]).solution.flatten()  # (3,)
    residual = float((design @ solution - seconds).abs().div(seconds).max())
    fixed, per_row, per_pair = solution.tolist()
    return fixed, per_row, per_pair, residual


def llm_weight_bytes(model) -> int:
    """Bytes of the LLM weights that every forward reads in full whatever its length: the decoder
    layers and the LM head (the input embedding table is only gathered from)."""
    embedding = model.get_input_embeddings().weight
    decoder = sum(p.numel() * p.element_size() for p in model.get_decoder().parameters() if p is not embedding)
    head = model.get_output_embeddings().weight
    return decoder + head.numel() * head.element_size()


def lm_fit_note(result: dict) -> str:
    """A sentence under the table: the LLM time's fixed part per forward (needs 4+ settings)."""
    rows = result["rows"]
    if len({r["lm_length"] for r in rows}) < 4:
        return ""
    fixed, per_row, _, residual = lm_time_fit(rows)
    shortest = min(rows, key=lambda r: r["lm_length"])
    weights = result.get("llm_weight_bytes")
    return (
        f"\nLLM-only time against the LLM length L (least squares over the {len(rows)} settings, time = fixed + "
        f"a x L + b x L^2, largest residual {100 * residual:.1f}%): fixed {1e3 * fixed:.1f} ms per forward, "
        f"{100 * fixed / shortest['lm_prefill_s']:.0f}% of the LLM time at L = {shortest['lm_length']}, "
        f"a = {1e3 * per_row:.3f} ms per row. The fixed part does not shrink with pruning and FLOPs do not count it"
        + (
            f" (the LLM's {bench_utils.megabytes(weights)} MB of weights are read in every forward; one 1-row "
            f"decode step takes {1e3 / rows[0]['decode_tokens_per_s']:.1f} ms)" if weights else ""
        )
        + ".\n"
    )


def capture_note(result: dict) -> str:
    """How the capture column was measured."""
    cue = result.get("cue_attention")
    if cue:
        extra = cue["extra_spread_s"]
        return (
            "capture: cue A measured where it is computed, paired in every round: the hooked full-attention "
            "block's attention with the column sums (one pass) minus its stock forward, on this image's "
            f"{cue['patches']} patches (medians: stock {1e3 * cue['stock_s']:.1f} ms, with the cue "
            f"{1e3 * cue['capture_s']:.1f} ms; extra per round {1e3 * extra['median']:.1f} "
            f"({1e3 * extra['min']:.1f}-{1e3 * extra['max']:.1f}) ms) - the same in every setting, the tower runs in full"
        )
    return ("capture: the in-call vision stage (tower with cue capture, projector, scatter) minus the stock "
            "encoding, a difference of medians")


def markdown_report(result: dict) -> str:
    load = result.get("load")
    header = (
        f"### {result['family']} prefill ({result['size']} size): {result['model']}; "
        f"{result['visual_tokens']} visual + {result['text_tokens']} text tokens, batch 1, "
        f"{result['device']} {result['dtype']}\n\n"
        f"Machine: {result['machine']}. {result['repeats']} interleaved rounds after {result['warmup']} warm-up: "
        "times are median (min-max); speed-ups and % of ideal from the medians; decode: "
        f"{result['decode_steps']} greedy steps. Random weights."
        + (f" {bench_utils.describe_load(bench_utils.MachineLoad(**load))}" if load else "")
        + "\n"
    )
    sources = {r["cue_overhead_source"] for r in result["rows"] if r["cue_overhead_source"]}
    if sources:
        header += (
            "\ncues+vote+splice: " + " / ".join(sorted(sources)) + " (in-call timers: the pruning call's own "
            "`last_pruning.timings`; difference of paired calls: the pruning path minus the stock encoding, "
            "per round). "
            + capture_note(result)
            + (" (CUDA: the in-call timers do not synchronise, so stages are approximate)" if result["device"].startswith("cuda") else "")
            + ".\n"
        )
    headers = [
        "setting", "kept / visual", "LLM length", "prefill ms", "speed-up", "FLOPs-ideal", "% of ideal",
        "LLM-only ms", "LLM speed-up (ideal)", "cues+vote+splice ms (% of prefill)", "capture ms (%)", "peak MB",
        "decode tok/s",
    ]
    rows = []
    for r in result["rows"]:
        overhead = "-" if r["cue_overhead_s"] is None else f"{1e3 * r['cue_overhead_s']:.1f} ({r['cue_overhead_pct']:.1f}%)"
        capture = "-" if r.get("capture_overhead_s") is None else (
            f"{1e3 * r['capture_overhead_s']:.1f} ({100 * r['capture_overhead_s'] / r['prefill_s']:.1f}%)"
        )
        spread = r["prefill_spread_s"]
        rows.append([
            r["setting"], f"{r['kept']} / {r['visual_tokens']}", r["lm_length"],
            f"{1e3 * spread['median']:.1f} ({1e3 * spread['min']:.1f}-{1e3 * spread['max']:.1f})",
            f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{100 * r['speedup'] / r['ideal_speedup']:.0f}%",
            f"{1e3 * r['lm_prefill_s']:.1f}", f"{r['lm_speedup']:.2f}x ({r['lm_ideal_speedup']:.2f}x)", overhead, capture,
            bench_utils.megabytes(r["peak_bytes"]), f"{r['decode_tokens_per_s']:.1f}",
        ])
    return header + "\n" + bench_utils.markdown_table(headers, rows) + "\n" + lm_fit_note(result)


def plot_speedups(results: list[dict], path: str | Path) -> None:
    """Speed-up vs kept visual tokens, measured and FLOPs-ideal, whole prefill and LLM only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for axis, result in zip(axes[0], results):
        rows = [r for r in result["rows"] if r["setting"] != "unpruned"]
        kept = [r["kept"] for r in rows]
        axis.plot(kept, [r["ideal_speedup"] for r in rows], "k--", marker="o", label="FLOPs-ideal (whole prefill)")
        axis.plot(kept, [r["speedup"] for r in rows], "C0-", marker="o", label="measured (whole prefill)")
        axis.plot(kept, [r["lm_ideal_speedup"] for r in rows], "C1--", marker="s", label="FLOPs-ideal (LLM only)")
        axis.plot(kept, [r["lm_speedup"] for r in rows], "C1-", marker="s", label="measured (LLM only)")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xlabel(f"visual tokens kept (of {result['visual_tokens']})")
        axis.set_ylabel("prefill speed-up over unpruned")
        axis.set_title(f"{result['family']} ({result['size']} size, {result['device']})")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@refusals_as_errors
def main(argv=None) -> list[dict]:
    parser = ArgumentParser(description="MFPruner prefill benchmark (unpruned vs the paper's budgets)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="repeatable; default: all")
    parser.add_argument("--size", choices=SIZES, default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 1 round: seconds (CI)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output-dir", help="write prefill_<family>_<size>_<device>.md / .json here")
    parser.add_argument("--plot", help="write the speed-up plot (png) here")
    parser.add_argument("--plot-also", nargs="+", default=[], metavar="JSON",
                        help="saved results (.json from --output-dir) of earlier runs to plot before this run's")
    parser.add_argument("--docs", help="also write each table into this markdown page, between the markers "
                        "<!-- BEGIN prefill FAMILY SIZE DEVICE --> / <!-- END ... --> (e.g. docs/benchmarks.md)")
    bench_utils.add_load_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.repeats, args.warmup, args.decode_steps = "smoke", 1, 0, 2
    if args.repeats < 1 or args.warmup < 0 or args.decode_steps < 1:
        raise ValueError("`--repeats` and `--decode-steps` must be >= 1 and `--warmup` >= 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` was asked for but torch sees no CUDA device")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"`--threads` must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    results = []
    for key in args.family or sorted(FAMILIES):
        with bench_utils.LoadMonitor() as load:
            result = run_family(
                FAMILIES[key], args.size, args.repeats, args.warmup, args.decode_steps, args.device, DTYPES[args.dtype]
            )
        result["key"] = key
        results.append(result)
        busy = None
        try:
            bench_utils.check_quiet(load, args.force, args.max_load, args.max_other_cores)
        except bench_utils.MachineBusy as error:
            busy = error
        result["load"] = bench_utils.load_record(load)
        report = markdown_report(result)
        print(report)
        if busy is not None:  # the table is printed for a look, never written
            raise busy
        device = torch.device(args.device).type
        if args.docs:
            bench_utils.write_between_markers(args.docs, f"prefill {key} {args.size} {device}", report)
        if args.output_dir:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"prefill_{key}_{args.size}_{torch.device(args.device).type}"
            (out / f"{stem}.md").write_text(report)
            (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        earlier = [json.loads(Path(path).read_text()) for path in args.plot_also]
        plot_speedups(earlier + results, args.plot)
    return results


if __name__ == "__main__":
    main()
