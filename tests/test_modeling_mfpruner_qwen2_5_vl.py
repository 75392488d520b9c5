"""MFPruner Qwen2.5-VL: loading, equivalence with the stock model, M-RoPE positions, the chunked
attention cue, batching, and input errors. Tiny random models (mfpruner_lib.tiny_models)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLVisionAttention,
    apply_rotary_pos_emb_vision,
    eager_attention_forward,
)
from transformers.vision_utils import get_vision_window_index

from configuration_mfpruner import MFPrunerQwen2_5_VLConfig
from mfpruner_core import resolve_budget, select_tokens
from modeling_mfpruner_qwen2_5_vl import MFPrunerQwen2_5_VLForConditionalGeneration, attention_and_received_per_patch
from tests.conftest import random_image
from mfpruner_lib.bench_utils import peak_memory
from mfpruner_lib.tiny_models import qwen_inputs

QUESTION = "What is in the image?"


def chat(*items: str) -> str:
    """A Qwen chat prompt whose user turn holds the given items ("image", "video") then QUESTION."""
    pads = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    vision = "".join(f"<|vision_start|>{pads[item]}<|vision_end|>" for item in items)
    return f"<|im_start|>user\n{vision}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def random_video(seed: int, frames: int = 4, height: int = 56, width: int = 84) -> torch.Tensor:
    return torch.rand(frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def prompts(qwen_processing):
    """Single-row inputs: one image, two images of different sizes, one video."""
    tokenizer, image_processor = qwen_processing
    return {
        "image": qwen_inputs(tokenizer, image_processor, [chat("image")], images=[random_image(1, (112, 84))]),
        "two_images": qwen_inputs(
            tokenizer,
            image_processor,
            [chat("image", "image")],
            images=[random_image(2, (112, 84)), random_image(3, (140, 112))],
        ),
        "video": qwen_inputs(tokenizer, image_processor, [chat("video")], videos=[random_video(4)]),
    }


def language_model_calls(model):
    """Records (inputs_embeds length, position_ids) of every call of the language model."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs["inputs_embeds"].shape[1], kwargs["position_ids"].clone()))

    return calls, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def visual_mask(model, input_ids):
    return (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)


def kept_positions_mask(model, input_ids) -> torch.Tensor:
    """(B, L) bool from model.last_pruning: text positions and kept visual positions."""
    result = model.last_pruning
    keep = ~visual_mask(model, input_ids)
    for kind, token_id in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
        flags = [
            torch.zeros(n, dtype=torch.bool).index_fill_(0, idx, True)
            for idx, n, k in zip(result.keep_indices, result.num_visual_tokens, result.kinds)
            if k == kind
        ]
        if flags:
            keep[input_ids == token_id] = torch.cat(flags)
    return keep


# ----------------------------------------------------------------------------- loading


def test_stock_checkpoint_loads_bit_identically(qwen_stock_repo):
    with safe_open(qwen_stock_repo / "model.safetensors", "pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    # the hub layout of real Qwen2.5-VL checkpoints: visual.*, model.layers.*, lm_head.*
    assert {key.split(".")[0] for key in stored} == {"visual", "model", "lm_head"}
    assert not any(key.startswith(("model.visual", "model.language_model")) for key in stored)

    model, info = MFPrunerQwen2_5_VLForConditionalGeneration.from_pretrained(qwen_stock_repo, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    params = model.state_dict()
    for key, tensor in stored.items():
        if key.startswith("visual."):
            name = "model." + key
        elif key.startswith("model."):
            name = "model.language_model." + key.removeprefix("model.")
        else:
            name = key
        assert torch.equal(params[name], tensor), name
    assert len(stored) == len(params)


def test_save_pretrained_writes_auto_map_and_code(qwen_repo):
    config = json.loads((qwen_repo / "config.json").read_text())
    entry = "modeling_mfpruner_qwen2_5_vl.MFPrunerQwen2_5_VLForConditionalGeneration"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mfpruner.MFPrunerQwen2_5_VLConfig",
        "AutoModel": entry,
        "AutoModelForImageTextToText": entry,
    }
    assert config["visual_token_ratio"] == 0.222 and config["visual_token_budget"] is None
    for name in ("modeling_mfpruner_qwen2_5_vl.py", "configuration_mfpruner.py", "mfpruner_core.py"):
        assert (qwen_repo / name).exists()


# ----------------------------------------------------------------------------- equivalence with stock


@pytest.mark.parametrize("prompt", ["image", "two_images", "video"])
def test_no_pruning_matches_stock(qwen_model, qwen_stock_model, prompts, prompt):
    inputs = prompts[prompt]
    greedy = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        stock_logits = qwen_stock_model(**inputs).logits
        kept_all_logits = qwen_model(**inputs, visual_token_ratio=1.0).logits
        off_logits = qwen_model(**inputs, prune_visual_tokens=False).logits
    assert kept_all_logits.shape == stock_logits.shape
    torch.testing.assert_close(kept_all_logits, stock_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(off_logits, stock_logits, atol=1e-5, rtol=0)

    stock_tokens = qwen_stock_model.generate(**inputs, **greedy)
    assert torch.equal(qwen_model.generate(**inputs, **greedy, visual_token_ratio=1.0), stock_tokens)
    assert torch.equal(qwen_model.generate(**inputs, **greedy, prune_visual_tokens=False), stock_tokens)


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize(
    "prompt, settings",
    [
        ("image", {}),  # the config default: keep 22.2%
        ("two_images", {"visual_token_ratio": 0.444}),
        ("two_images", {"visual_token_budget": 5}),
        ("video", {"visual_token_ratio": 0.333}),
    ],
)
def test_language_model_input_length_follows_budgets(qwen_model, prompts, prompt, settings):
    inputs = prompts[prompt]
    calls, handle = language_model_calls(qwen_model)
    try:
        qwen_model.generate(**inputs, max_new_tokens=2, do_sample=False, **settings)
    finally:
        handle.remove()
    grids = torch.cat([inputs[key] for key in ("image_grid_thw", "video_grid_thw") if key in inputs])
    tokens = (grids.prod(-1) // 4).tolist()
    ratio = settings.get("visual_token_ratio", None if "visual_token_budget" in settings else 0.222)
    kept = [resolve_budget(n, settings.get("visual_token_budget"), ratio) for n in tokens]
    text = int((~visual_mask(qwen_model, inputs["input_ids"])).sum())
    assert calls[0][0] == text + sum(kept)  # the prefill
    assert [len(idx) for idx in qwen_model.last_pruning.keep_indices] == kept
    assert qwen_model.last_pruning.num_visual_tokens == tokens
    assert calls[0][0] == qwen_model.last_pruning.lm_input_length < inputs["input_ids"].shape[1]


@pytest.mark.parametrize("prompt", ["two_images", "video"])
def test_kept_tokens_keep_their_unpruned_positions(qwen_model, prompts, prompt):
    inputs = prompts[prompt]
    unpruned, unpruned_deltas = qwen_model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"],
    )  # (3, 1, L)
    calls, handle = language_model_calls(qwen_model)
    qwen_model.model.rope_deltas = sentinel = torch.tensor([[123]])
    try:
        qwen_model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    # generate() carries its positions per call: nothing shared on the model is written
    assert qwen_model.model.rope_deltas is sentinel
    keep = kept_positions_mask(qwen_model, inputs["input_ids"])[0]
    prefill_positions = calls[0][1]  # (4, 1, L'): text positions, then t, h, w
    assert torch.equal(prefill_positions[1:, 0], unpruned[:, 0, keep])
    assert torch.equal(prefill_positions[0, 0], torch.arange(int(keep.sum())))
    # decoding continues at the unpruned sequence's next position, in all three M-RoPE rows
    next_position = int(unpruned.max()) + 1
    assert calls[1][1][1:, 0, -1].tolist() == [next_position] * 3
    assert calls[2][1][1:, 0, -1].tolist() == [next_position + 1] * 3
    # a pruned forward() stores rope_deltas as the stock forward() does: what the stock model adds
    # to a pruned-length count to reach the same position (for manual decoding after it)
    qwen_model(**inputs)
    pruned_length = int(keep.sum())
    assert qwen_model.model.rope_deltas.tolist() == [[next_position - pruned_length]]
    assert int(unpruned_deltas) + inputs["input_ids"].shape[1] == next_position


@pytest.mark.parametrize("prompt", ["two_images", "video"])
def test_cached_generate_equals_no_cache_recomputation(qwen_model, prompts, prompt):
    inputs = prompts[prompt]
    new_tokens = 5
    output = qwen_model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    generated = output[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])  # original prompt returned

    with torch.no_grad():
        pruned = qwen_model.prune_inputs(**{k: v for k, v in inputs.items()}, left_pad=True)
        embeds, mask, positions = pruned["inputs_embeds"], pruned["attention_mask"], pruned["position_ids"]
        tokens = []
        for _ in range(new_tokens):
            output = qwen_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
            logits = output.logits
            token = logits[:, -1].argmax(-1)  # (B,)
            tokens.append(token)
            embeds = torch.cat([embeds, qwen_model.get_input_embeddings()(token)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
    assert torch.equal(torch.stack(tokens, dim=1), generated)


def test_forward_prunes_labels_with_the_tokens(qwen_model, prompts):
    inputs = prompts["two_images"]
    labels = inputs["input_ids"].masked_fill(visual_mask(qwen_model, inputs["input_ids"]), -100)
    with torch.no_grad():
        output = qwen_model(**inputs, labels=labels)
    keep = kept_positions_mask(qwen_model, inputs["input_ids"])
    pruned_labels = labels[keep][None]
    assert output.logits.shape[1] == pruned_labels.shape[1] == qwen_model.last_pruning.lm_input_length
    expected = F.cross_entropy(output.logits[0, :-1], pruned_labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


def test_authors_variant_fills_by_relevance(qwen_model, prompts):
    inputs = prompts["two_images"]
    qwen_model.config.fill_by = "relevance"
    try:
        qwen_model.generate(**inputs, max_new_tokens=1, do_sample=False, visual_token_ratio=0.444)
    finally:
        qwen_model.config.fill_by = "sum"
    result = qwen_model.last_pruning
    for i, keep in enumerate(result.keep_indices):
        cues = {name: scores[i][None] for name, scores in result.cue_scores.items()}
        assert torch.equal(keep, select_tokens(cues, len(keep), 2, fill_by="relevance")[0])


def test_min_votes_per_call_sets_the_vote_threshold(qwen_model, prompts):
    """A per-call `min_votes` changes each item's vote exactly as core.select_tokens says, for
    that call only; generate(), forward() and prune_inputs() take it; bad values raise."""
    inputs = prompts["two_images"]
    kept = {}
    for min_votes in (1, 3):
        qwen_model.generate(**inputs, max_new_tokens=1, do_sample=False, visual_token_ratio=0.5, min_votes=min_votes)
        result = qwen_model.last_pruning
        kept[min_votes] = [keep.tolist() for keep in result.keep_indices]
        for i, keep in enumerate(result.keep_indices):
            cues = {name: scores[i][None] for name, scores in result.cue_scores.items()}
            assert keep.tolist() == select_tokens(cues, len(keep), min_votes)[0].tolist()
        qwen_model(**inputs, visual_token_ratio=0.5, min_votes=min_votes)
        assert [keep.tolist() for keep in qwen_model.last_pruning.keep_indices] == kept[min_votes]
        vision = {key: inputs[key] for key in ("image_grid_thw", "mm_token_type_ids")}
        qwen_model.prune_inputs(
            inputs["input_ids"], inputs["pixel_values"], visual_token_ratio=0.5, min_votes=min_votes, **vision
        )
        assert [keep.tolist() for keep in qwen_model.last_pruning.keep_indices] == kept[min_votes]
    assert kept[1] != kept[3] and qwen_model.config.min_votes == 2
    for bad in (0, 1.5, True, "3"):
        with pytest.raises(ValueError, match="min_votes"):
            qwen_model.generate(**inputs, max_new_tokens=1, min_votes=bad)
        with pytest.raises(ValueError, match="min_votes"):
            qwen_model(**inputs, min_votes=bad)


def test_cue_subset_skips_the_attention_hook(qwen_model, prompts):
    inputs = prompts["video"]
    qwen_model.config.mfpruner_cues = ["uniqueness"]
    try:
        qwen_model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        qwen_model.config.mfpruner_cues = ["attention", "uniqueness", "relevance"]
    result = qwen_model.last_pruning
    assert list(result.cue_scores) == ["uniqueness"]
    scores, keep = result.cue_scores["uniqueness"][0], result.keep_indices[0]
    assert torch.equal(keep, scores.topk(len(keep)).indices.sort().values)  # one cue: its own top-k


def test_result_describes_each_item(qwen_model, qwen_processing):
    tokenizer, image_processor = qwen_processing
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
    inputs = qwen_inputs(
        tokenizer, image_processor, [text + QUESTION], images=[random_image(5, (84, 56))], videos=[random_video(6)]
    )
    qwen_model.generate(**inputs, max_new_tokens=1, do_sample=False)
    result = qwen_model.last_pruning
    assert result.kinds == ["image", "video"]  # images first, then videos
    assert result.grids == [(2, 3), (2 * 2, 3)]  # a video's frames (t = 2) stacked top to bottom
    assert result.num_visual_tokens == [rows * cols for rows, cols in result.grids]
    assert all(len(scores) == 2 for scores in result.cue_scores.values())


# ----------------------------------------------------------------------------- the attention cue


def materialised_received_attention(model, inputs, kind: str) -> torch.Tensor:
    """Reference for cue A: eager attention weights of the last full-attention block, whole
    (H, n, n) map per segment, column sums, mean over heads, mean over 2x2 groups, raster order."""
    visual = model.model.visual
    attn = visual.blocks[max(visual.fullatt_block_indexes)].attn
    captured = {}
    handle = attn.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(hidden=args[0], **kwargs), with_kwargs=True
    )
    grid = inputs[f"{kind}_grid_thw"]
    try:
        with torch.no_grad():
            if kind == "image":
                model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=grid)
            else:
                model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=grid)
    finally:
        handle.remove()
    hidden, cu_seqlens = captured["hidden"], captured["cu_seqlens"]
    length = hidden.shape[0]
    q, k, v = attn.qkv(hidden).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *captured["position_embeddings"])
    received = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        segment = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]  # (1, H, n, Dh)
        _, weights = eager_attention_forward(attn, *segment, attention_mask=None, scaling=attn.scaling)
        received.append(weights[0].sum(dim=1).mean(dim=0))  # (n,)
    received = torch.cat(received).view(-1, 4).mean(dim=-1)
    window_index, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
    return received[torch.argsort(window_index)]


@pytest.mark.parametrize("prompt, kind", [("two_images", "image"), ("video", "video")])
@pytest.mark.parametrize("query_chunk", [1024, 7])
def test_chunked_attention_cue_matches_materialised_eager(qwen_model, prompts, prompt, kind, query_chunk):
    inputs = prompts[prompt]
    default_chunk = qwen_model.config.attention_query_chunk
    qwen_model.config.attention_query_chunk = query_chunk
    try:
        with torch.no_grad():
            _, attention, _ = qwen_model.visual_features_with_attention(
                inputs[f"pixel_values{'' if kind == 'image' else '_videos'}"], inputs[f"{kind}_grid_thw"], kind
            )
    finally:
        qwen_model.config.attention_query_chunk = default_chunk
    reference = materialised_received_attention(qwen_model, inputs, kind)
    torch.testing.assert_close(torch.cat(attention), reference, atol=1e-4, rtol=0)


def test_attention_cue_peak_memory_is_bounded_by_the_chunk():
    torch.manual_seed(0)
    config = MFPrunerQwen2_5_VLConfig(vision_config=dict(hidden_size=64, num_heads=4)).vision_config
    attn = Qwen2_5_VLVisionAttention(config).eval()
    tokens, heads, chunk = 2048, 4, 64
    hidden = torch.randn(tokens, 64)
    cu_seqlens = torch.tensor([0, tokens], dtype=torch.int32)
    angles = torch.randn(tokens, 8)
    position_embeddings = (torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1))
    full_map_bytes = heads * tokens * tokens * 4

    with torch.no_grad():
        output, chunked = attention_and_received_per_patch(attn, hidden, cu_seqlens, position_embeddings, chunk)
        cue = lambda: attention_and_received_per_patch(attn, hidden, cu_seqlens, position_embeddings, chunk)  # noqa: E731
        peak, _ = peak_memory(cue)  # tensor bytes allocated during the call, above what was live
        q, k, v = attn.qkv(hidden).reshape(tokens, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        _, weights = eager_attention_forward(
            attn, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, attn.scaling
        )
    torch.testing.assert_close(chunked, weights[0].sum(dim=1).mean(dim=0), atol=1e-4, rtol=0)
    # one pass: the same call also gives the module's own output
    torch.testing.assert_close(output, attn(hidden, cu_seqlens, position_embeddings=position_embeddings), atol=1e-5, rtol=1e-5)
    # the largest temporaries are a few (H, chunk, N) blocks: a small fraction of one (H, N, N) map
    assert 0 < peak < full_map_bytes / 4, (peak, full_map_bytes)


# ----------------------------------------------------------------------------- batching


def test_batch_with_different_image_sizes_equals_each_row_alone(qwen_model, qwen_processing):
    tokenizer, image_processor = qwen_processing
    images = [random_image(7, (112, 84)), random_image(8, (168, 140))]
    texts = [chat("image"), chat("image").replace(QUESTION, "Describe the picture in detail.")]
    batch = qwen_inputs(tokenizer, image_processor, texts, images=images)
    assert batch["attention_mask"][0, 0] == 0  # row 0 has fewer image tokens: left padded

    greedy = dict(max_new_tokens=5, do_sample=False, min_new_tokens=5)
    batched = qwen_model.generate(**batch, **greedy)
    batch_keep = qwen_model.last_pruning.keep_indices
    for row, (text, image) in enumerate(zip(texts, images)):
        alone = qwen_inputs(tokenizer, image_processor, [text], images=[image])
        single = qwen_model.generate(**alone, **greedy)
        assert torch.equal(qwen_model.last_pruning.keep_indices[0], batch_keep[row])
        assert torch.equal(batched[row, -5:], single[0, -5:])


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(qwen_model, prompts):
    inputs = prompts["image"]
    with pytest.raises(ValueError, match="image_grid_thw"):
        qwen_model.generate(**{**inputs, "image_grid_thw": torch.tensor([[1, 6, 6]])}, max_new_tokens=1)
    with pytest.raises(ValueError, match="image_grid_thw"):
        qwen_model.generate(**{**inputs, "image_grid_thw": None}, max_new_tokens=1)
    with pytest.raises(ValueError, match="image tokens"):
        ids = inputs["input_ids"].clone()
        ids[ids == qwen_model.config.image_token_id] = qwen_model.config.text_config.pad_token_id + 0
        ids[0, -1] = qwen_model.config.image_token_id
        qwen_model.generate(**{**inputs, "input_ids": ids}, max_new_tokens=1)
    with pytest.raises(ValueError, match="no video token"):
        qwen_model(**inputs, pixel_values_videos=inputs["pixel_values"], video_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="visual_token_budget"):
        qwen_model.generate(**inputs, max_new_tokens=1, visual_token_budget=4, visual_token_ratio=0.5)
    with pytest.raises(ValueError, match="visual_token_ratio"):
        qwen_model.generate(**inputs, max_new_tokens=1, visual_token_ratio=1.5)
    with pytest.raises(ValueError, match="visual_token_budget"):
        qwen_model.generate(**inputs, max_new_tokens=1, visual_token_budget=0)
    with pytest.raises(ValueError, match="inputs_embeds"):
        qwen_model(inputs_embeds=torch.zeros(1, 3, 64), pixel_values=inputs["pixel_values"])


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"relevance_source": "clip_text"}, "relevance_source"),
        ({"fill_by": "max"}, "fill_by"),
        ({"visual_token_budget": 8, "visual_token_ratio": 0.5}, "visual_token_budget"),
        ({"mfpruner_cues": ["attention", "colour"]}, "mfpruner_cues"),
        ({"attention_query_chunk": 0}, "attention_query_chunk"),
    ],
)
def test_bad_config_raises_clear_errors(settings, field):
    with pytest.raises(ValueError, match=field):
        MFPrunerQwen2_5_VLConfig(**settings)


# ----------------------------------------------------------------------------- a tower without a full-attention block


@pytest.mark.parametrize("fullatt_block_indexes", [[], [7, 15]])  # none, or only past the last block (stock-valid)
def test_tower_without_full_attention_block_constructs_and_prunes_without_cue_a(
    qwen_stock_model, prompts, fullatt_block_indexes
):
    """Every config the stock class accepts constructs; pruning off is the stock model; pruning
    refuses cue A only at a call that needs it, naming `mfpruner_cues`, and works without it."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen_stock_model.config.to_dict()
    config["vision_config"]["fullatt_block_indexes"] = fullatt_block_indexes
    stock = Qwen2_5_VLForConditionalGeneration(type(qwen_stock_model.config)(**config)).eval()
    ours = MFPrunerQwen2_5_VLForConditionalGeneration(MFPrunerQwen2_5_VLConfig(**config)).eval()
    ours.load_state_dict(stock.state_dict())
    assert ours.cue_block is None
    inputs = prompts["image"]
    greedy = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        stock_logits = stock(**inputs).logits
        torch.testing.assert_close(ours(**inputs, prune_visual_tokens=False).logits, stock_logits, atol=1e-5, rtol=0)
    stock_tokens = stock.generate(**inputs, **greedy)
    assert torch.equal(ours.generate(**inputs, **greedy, prune_visual_tokens=False), stock_tokens)
    text_only = {"input_ids": inputs["input_ids"][:, :5], "attention_mask": inputs["attention_mask"][:, :5]}
    assert torch.equal(ours.generate(**text_only, **greedy), stock.generate(**text_only, **greedy))

    with pytest.raises(ValueError, match=r"`mfpruner_cues` includes 'attention'.*fullatt_block_indexes"):
        ours.generate(**inputs, **greedy)
    ours.config.mfpruner_cues = ["uniqueness", "relevance"]
    out = ours.generate(**inputs, **greedy, return_dict_in_generate=True)
    assert list(out.pruning.cue_scores) == ["uniqueness", "relevance"]
    assert out.pruning.lm_input_length < inputs["input_ids"].shape[1]
