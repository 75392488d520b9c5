"""MFPruner Qwen3-VL and Qwen3.5, dense and MoE (Qwen3.5: the same visual encoding without DeepStack): loading,
equivalence with the stock model, DeepStack levels, M-RoPE positions, cue A in the last vision block,
videos with timestamps, batching, input errors. Qwen3.5's recurrent state: test_modeling_mfpruner_qwen3_5.py.
Tiny random models (mfpruner_lib.tiny_models); the drop-in contracts (threads, caches, max_length,
device_map, refusals) are in test_drop_in_contracts.py, parametrised over every family."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision, eager_attention_forward

from configuration_mfpruner import (
    MFPrunerQwen3_5Config,
    MFPrunerQwen3_5MoeConfig,
    MFPrunerQwen3VLConfig,
    MFPrunerQwen3VLMoeConfig,
)
from mfpruner_core import resolve_budget
from mfpruner_lib.families import FAMILIES
from mfpruner_lib.tiny_models import qwen3_vl_video_inputs, qwen_inputs
from modeling_mfpruner_qwen3_vl import (
    MFPrunerQwen3VLForConditionalGeneration,
    MFPrunerQwen3VLMoeForConditionalGeneration,
    gather_deepstack,
)
from modeling_mfpruner_qwen3_5 import MFPrunerQwen3_5ForConditionalGeneration, MFPrunerQwen3_5MoeForConditionalGeneration
from tests.conftest import random_image

QUESTION = "What is in the image?"
KEYS = ["qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe"]
CLASSES = {"qwen3-vl": MFPrunerQwen3VLForConditionalGeneration, "qwen3-vl-moe": MFPrunerQwen3VLMoeForConditionalGeneration,
           "qwen3.5": MFPrunerQwen3_5ForConditionalGeneration, "qwen3.5-moe": MFPrunerQwen3_5MoeForConditionalGeneration}
GREEDY = dict(max_new_tokens=5, do_sample=False)


def chat(*items: str, question: str = QUESTION) -> str:
    pads = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    vision = "".join(f"<|vision_start|>{pads[item]}<|vision_end|>" for item in items)
    return f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"


def random_video(seed: int, frames: int = 4, height: int = 64, width: int = 96) -> torch.Tensor:
    return torch.rand(frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def prompts(qwen3_processing):
    """Single-row inputs: one image, two images of different sizes, one video (timestamps in the prompt)."""
    tokenizer, image_processor = qwen3_processing
    return {
        "image": qwen_inputs(tokenizer, image_processor, [chat("image")], images=[random_image(1, (128, 96))]),
        "two_images": qwen_inputs(
            tokenizer, image_processor, [chat("image", "image")], images=[random_image(2, (128, 96)), random_image(3, (160, 128))]
        ),
        "video": qwen3_vl_video_inputs(tokenizer, [chat("video")], random_video(4)),
    }


@pytest.fixture(scope="module", params=KEYS)
def pair(request):
    """(MFPruner model loaded as remote code, stock model with the same weights) of one family."""
    tiny_model = request.getfixturevalue("tiny_model")
    return request.param, tiny_model(request.param), tiny_model(request.param, stock=True)


def language_model_calls(model):
    """Records the language model's kwargs at every call."""
    calls = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    return calls, handle


def is_visual(model, input_ids):
    return (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("key", KEYS)
def test_stock_checkpoint_loads_bit_identically(tiny_repo, key):
    stock_repo = tiny_repo(key, stock=True)
    with safe_open(stock_repo / "model.safetensors", "pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    stock = getattr(transformers, FAMILIES[key].stock_model_class).from_pretrained(stock_repo)
    model, info = CLASSES[key].from_pretrained(stock_repo, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours, reference = model.state_dict(), stock.state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    if key in ("qwen3-vl", "qwen3.5"):  # the hub layout is the module layout: every stored tensor, as stored
        assert all(torch.equal(ours[name], tensor) for name, tensor in stored.items())
        assert len(stored) == len(ours)


@pytest.mark.parametrize("key", KEYS)
def test_save_pretrained_writes_auto_map_and_code(tiny_repo, key):
    repo = tiny_repo(key)
    config = json.loads((repo / "config.json").read_text())
    entry = FAMILIES[key].model_class
    heads = {"qwen3.5": ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification"),
             "qwen3.5-moe": ("AutoModelForCausalLM",)}.get(key, ())  # the stock config's other Auto classes
    module, name = entry.split(".")
    assert config["auto_map"] == {
        "AutoConfig": FAMILIES[key].config_class,
        "AutoModel": entry,
        "AutoModelForImageTextToText": entry,
        **{head: f"{module}.{name.replace('ForConditionalGeneration', head.removeprefix('AutoModel'))}" for head in heads},
    }
    assert config["visual_token_ratio"] == 0.222 and config["visual_token_budget"] is None
    assert config["attention_query_chunk"] == 256
    # the Qwen2.5-VL file ships too: its encoding and cue A code serve Qwen3-VL (and Qwen3-VL's serve Qwen3.5)
    for name in (entry.split(".")[0] + ".py", "modeling_mfpruner_qwen3_vl.py", "modeling_mfpruner_qwen2_5_vl.py", "configuration_mfpruner.py",
                 "mfpruner_pipeline.py", "mfpruner_core.py"):
        assert (repo / name).exists(), name


# ----------------------------------------------------------------------------- equivalence with stock


@pytest.mark.parametrize("prompt", ["image", "two_images", "video"])
def test_no_pruning_and_keeping_every_token_match_stock(pair, prompts, prompt):
    _, model, stock = pair
    inputs = prompts[prompt]
    with torch.no_grad():
        stock_logits = stock(**inputs).logits
        off_logits = model(**inputs, prune_visual_tokens=False).logits
        kept_all_logits = model(**inputs, visual_token_ratio=1.0).logits
    assert torch.equal(off_logits, stock_logits)  # pruning off: the stock code, bit for bit
    assert kept_all_logits.shape == stock_logits.shape
    torch.testing.assert_close(kept_all_logits, stock_logits, atol=1e-5, rtol=0)
    stock_tokens = stock.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, **GREEDY, prune_visual_tokens=False), stock_tokens)
    assert torch.equal(model.generate(**inputs, **GREEDY, visual_token_ratio=1.0), stock_tokens)


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize(
    "prompt, settings",
    [("image", {}), ("two_images", {"visual_token_ratio": 0.444}), ("two_images", {"visual_token_budget": 5}),
     ("video", {"visual_token_ratio": 0.333})],
)
def test_language_model_input_length_follows_budgets(pair, prompts, prompt, settings):
    _, model, _ = pair
    inputs = prompts[prompt]
    calls, handle = language_model_calls(model)
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False, **settings)
    finally:
        handle.remove()
    grids = torch.cat([inputs[key] for key in ("image_grid_thw", "video_grid_thw") if key in inputs])
    tokens = (grids.prod(-1) // 4).tolist()  # a video is one item: all its frame pairs
    ratio = settings.get("visual_token_ratio", None if "visual_token_budget" in settings else 0.222)
    kept = [resolve_budget(n, settings.get("visual_token_budget"), ratio) for n in tokens]
    text = int((~is_visual(model, inputs["input_ids"])).sum())
    assert calls[0]["inputs_embeds"].shape[1] == text + sum(kept) == model.last_pruning.lm_input_length
    assert [len(idx) for idx in model.last_pruning.keep_indices] == kept
    assert model.last_pruning.num_visual_tokens == tokens


@pytest.mark.parametrize("prompt", ["two_images", "video"])
def test_every_deepstack_level_is_gathered_with_the_kept_indices(pair, prompts, prompt):
    """The prefill hands the language model the kept positions as `visual_pos_masks` and, for every
    DeepStack level, the stock vision output's features of exactly the kept tokens (the same indices
    as the merged tokens); decoding steps get none. Fails if a level were not pruned or used another mask.
    Qwen3.5's tower has no DeepStack: none is computed and none is passed."""
    key, model, _ = pair
    inputs = prompts[prompt]
    if key.startswith("qwen3.5"):
        calls, handle = language_model_calls(model)
        try:
            model.generate(**inputs, max_new_tokens=2, do_sample=False, visual_token_ratio=0.333)
        finally:
            handle.remove()
        assert not hasattr(model.config.vision_config, "deepstack_visual_indexes")
        assert all("deepstack_visual_embeds" not in call for call in calls)
        return
    kind = "image" if "pixel_values" in inputs else "video"
    with torch.no_grad():
        if kind == "image":
            vision = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        else:
            vision = model.model.get_video_features(
                pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"]
            )
    levels = vision.deepstack_features  # [level][item] (N_i, D), the stock tower's
    assert len(levels) == len(model.config.vision_config.deepstack_visual_indexes) == 2
    calls, handle = language_model_calls(model)
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False, visual_token_ratio=0.333)
    finally:
        handle.remove()
    result = model.last_pruning
    keep_mask = result.keep_mask  # (B, L) over the prompt
    visual = is_visual(model, inputs["input_ids"])
    assert torch.equal(calls[0]["visual_pos_masks"][0], visual[0][keep_mask[0]])
    assert len(calls[0]["deepstack_visual_embeds"]) == len(levels)
    for level, passed in zip(levels, calls[0]["deepstack_visual_embeds"]):
        expected = torch.cat([features[idx] for features, idx in zip(level, result.keep_indices)])
        assert torch.equal(passed, expected)
        full = torch.cat(list(level))
        assert passed.shape[0] < full.shape[0]  # pruned, not the whole level
    assert all(call.get("deepstack_visual_embeds") is None for call in calls[1:])


def test_gather_deepstack_uses_one_index_set_per_item_for_every_level():
    levels = [[torch.arange(5.0)[:, None] + 10 * level, torch.arange(3.0)[:, None] + 100 * level] for level in range(3)]
    keep = [torch.tensor([0, 3]), torch.tensor([2])]
    gathered = gather_deepstack(levels, keep)
    for level, items in enumerate(gathered):
        assert items[0][:, 0].tolist() == [10 * level, 3 + 10 * level]
        assert items[1][:, 0].tolist() == [2 + 100 * level]


@pytest.mark.parametrize("prompt", ["two_images", "video"])
def test_kept_tokens_keep_their_unpruned_positions(pair, prompts, prompt):
    _, model, _ = pair
    inputs = prompts[prompt]
    unpruned, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"],
    )  # (3, 1, L)
    calls, handle = language_model_calls(model)
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    keep = model.last_pruning.keep_mask[0]
    prefill = calls[0]["position_ids"]  # (4, 1, L'): text positions, then t, h, w
    assert torch.equal(prefill[1:, 0], unpruned[:, 0, keep])
    assert torch.equal(prefill[0, 0], torch.arange(int(keep.sum())))
    next_position = int(unpruned.max()) + 1  # decoding continues where the unpruned prompt would
    assert calls[1]["position_ids"][1:, 0, -1].tolist() == [next_position] * 3
    assert calls[2]["position_ids"][1:, 0, -1].tolist() == [next_position + 1] * 3


def test_video_timestamps_stay_and_the_video_is_pruned_as_one_item(pair, prompts):
    _, model, _ = pair
    inputs = prompts["video"]
    ids = inputs["input_ids"][0]
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    result = model.last_pruning
    assert result.kinds == ["video"] and len(result.keep_indices) == 1
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert result.grids == [(t * h // 2, w // 2)]  # frame pairs stacked top to bottom
    keep = result.keep_mask[0]
    assert bool(keep[~is_visual(model, ids[None])[0]].all())  # every text token, timestamps included, stays
    tokenizer_text = model.config.video_token_id
    assert int((ids == tokenizer_text).sum()) == result.num_visual_tokens[0] == t * h * w // 4
    assert int(keep[ids == tokenizer_text].sum()) == resolve_budget(result.num_visual_tokens[0], ratio=0.222)


def test_cached_generate_equals_no_cache_recomputation(pair, prompts):
    _, model, _ = pair
    inputs = prompts["two_images"]
    output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    generated = output[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])  # original prompt returned
    with torch.no_grad():
        pruned = model.prune_inputs(**inputs, left_pad=True)
        ids, mask, positions = pruned["input_ids"], pruned["attention_mask"], pruned["position_ids"]
        embeds, encoded = pruned["inputs_embeds"], pruned["mm_encoder_outputs"]
        tokens = []
        for _ in range(4):
            logits = model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, mm_encoder_outputs=encoded, use_cache=False
            ).logits
            token = logits[:, -1].argmax(-1)
            tokens.append(token)
            embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
    assert ids.shape[1] == model.last_pruning.lm_input_length
    assert torch.equal(torch.stack(tokens, dim=1), generated)


# ----------------------------------------------------------------------------- cue A


def materialised_received_attention(model, inputs) -> torch.Tensor:
    """Reference for cue A: eager attention weights of the LAST vision block, the whole (H, n, n) map
    per segment, column sums, mean over heads, mean over each 2x2 merge group (no reordering)."""
    attn = model.model.visual.blocks[-1].attn
    captured = {}
    handle = attn.register_forward_pre_hook(lambda module, args, kwargs: captured.update(hidden=args[0], **kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    finally:
        handle.remove()
    hidden, cu_seqlens = captured["hidden"], captured["cu_seqlens"]
    q, k, v = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *captured["position_embeddings"])
    received = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        segment = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]
        _, weights = eager_attention_forward(attn, *segment, attention_mask=None, scaling=attn.scaling)
        received.append(weights[0].sum(dim=1).mean(dim=0))
    return torch.cat(received).view(-1, 4).mean(dim=-1)


@pytest.mark.parametrize("query_chunk", [1024, 7])
def test_chunked_attention_cue_matches_materialised_eager(pair, prompts, query_chunk):
    _, model, _ = pair
    inputs = prompts["two_images"]
    default = model.config.attention_query_chunk
    model.config.attention_query_chunk = query_chunk
    try:
        with torch.no_grad():
            _, attention, _ = model.visual_features_with_attention(inputs["pixel_values"], inputs["image_grid_thw"], "image")
    finally:
        model.config.attention_query_chunk = default
    torch.testing.assert_close(torch.cat(attention), materialised_received_attention(model, inputs), atol=1e-4, rtol=0)


def test_only_the_last_vision_block_captures(pair):
    _, model, _ = pair
    CueCapturingAttentionMixin = sys.modules[type(model).__module__].CueCapturingAttentionMixin  # the repo's own copy
    blocks = model.model.visual.blocks
    capturing = [i for i, block in enumerate(blocks) if isinstance(block.attn, CueCapturingAttentionMixin)]
    assert capturing == [len(blocks) - 1]
    assert blocks[-1].attn.qkv is not None and sum(p.numel() for p in blocks[-1].attn.parameters()) == sum(
        p.numel() for p in blocks[0].attn.parameters()
    )


# ----------------------------------------------------------------------------- batching


def test_batch_with_different_image_sizes_equals_each_row_alone(pair, qwen3_processing):
    _, model, _ = pair
    tokenizer, image_processor = qwen3_processing
    images = [random_image(7, (128, 96)), random_image(8, (192, 160))]
    texts = [chat("image"), chat("image", question="Describe the picture in detail.")]
    batch = qwen_inputs(tokenizer, image_processor, texts, images=images)
    assert batch["attention_mask"][0, 0] == 0  # row 0 has fewer tokens: left padded
    batched = model.generate(**batch, **GREEDY, min_new_tokens=5)
    batch_keep = model.last_pruning.keep_indices
    for row, (text, image) in enumerate(zip(texts, images)):
        single = model.generate(**qwen_inputs(tokenizer, image_processor, [text], images=[image]), **GREEDY, min_new_tokens=5)
        assert torch.equal(model.last_pruning.keep_indices[0], batch_keep[row])
        assert torch.equal(batched[row, -5:], single[0, -5:])


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(pair, prompts):
    _, model, _ = pair
    inputs = prompts["image"]
    with pytest.raises(ValueError, match="image_grid_thw"):
        model.generate(**{**inputs, "image_grid_thw": torch.tensor([[1, 6, 6]])}, max_new_tokens=1)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model.generate(**{**inputs, "image_grid_thw": None}, max_new_tokens=1)
    with pytest.raises(ValueError, match="no video token"):
        model(**inputs, pixel_values_videos=inputs["pixel_values"], video_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="visual_token_ratio"):
        model.generate(**inputs, max_new_tokens=1, visual_token_ratio=1.5)


@pytest.mark.parametrize("config_class", [MFPrunerQwen3VLConfig, MFPrunerQwen3VLMoeConfig, MFPrunerQwen3_5Config,
                                          MFPrunerQwen3_5MoeConfig])
@pytest.mark.parametrize(
    "settings, field",
    [({"relevance_source": "clip_text"}, "relevance_source"), ({"attention_query_chunk": 0}, "attention_query_chunk"),
     ({"visual_token_budget": 8, "visual_token_ratio": 0.5}, "visual_token_budget")],
)
def test_bad_config_raises_clear_errors(config_class, settings, field):
    with pytest.raises(ValueError, match=field):
        config_class(**settings)
