"""MFPrunerLlavaNextForConditionalGeneration (LLaVA-1.6, anyres), loaded through the remote-code path.

The tiny model: 56 px tiles of 14 px patches (16 tokens a tile), pinpoints up to a 2 x 2 grid, so
an image has a base tile plus 2-4 grid tiles and 36-88 visual tokens (patches + row newlines).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForImageTextToText

import mfpruner_core as core
from conftest import (
    assert_loads_bit_identical,
    assert_remote_code_repo,
    greedy_without_cache,
    lm_input_lengths,
    random_image,
    stock_twin_of,
)
from mfpruner_core import LAYOUT_BASE, LAYOUT_GRID, LAYOUT_NEWLINE
from mfpruner_lib.tiny_models import build_tiny_llava_next

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
GREEDY = dict(max_new_tokens=5, do_sample=False)
WIDE, TALL = (100, 60), (50, 90)  # (width, height): 2 x 2 tiles, unpadded to a 4 x 8 and an 8 x 4-ish grid


@pytest.fixture(scope="module")
def inputs(llava_next_processor):
    return llava_next_processor(images=random_image(0, size=WIDE), text=PROMPT, return_tensors="pt")


@pytest.fixture(scope="module")
def stock_twin(llava_next_model, llava_next_stock_model):
    """The stock LLaVA-NeXT class holding exactly our model's weights."""
    return stock_twin_of(llava_next_model, llava_next_stock_model)


def image_token_count(inputs, model):
    return int((inputs["input_ids"] == model.config.image_token_id).sum())


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("hub_layout", [False, True], ids=["save_pretrained-layout", "hub-layout"])
def test_stock_checkpoint_loads_bit_identical(tmp_path, llava_next_stock_model, hub_layout):
    from modeling_mfpruner_llava import MFPrunerLlavaNextForConditionalGeneration

    path = build_tiny_llava_next(tmp_path / "stock", stock=True, hub_layout=hub_layout)
    assert "model.image_newline" in llava_next_stock_model.state_dict()
    assert_loads_bit_identical(MFPrunerLlavaNextForConditionalGeneration, path, llava_next_stock_model)


def test_save_pretrained_writes_code_and_auto_map(llava_next_repo):
    config = assert_remote_code_repo(
        llava_next_repo, "MFPrunerLlavaNextConfig", "MFPrunerLlavaNextForConditionalGeneration"
    )
    assert config["model_type"] == "mfpruner_llava_next"


def test_fresh_process_loads_with_auto_classes_and_prunes(llava_next_repo):
    script = textwrap.dedent(
        f"""
        import numpy as np
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        repo = {str(llava_next_repo)!r}
        model = AutoModel.from_pretrained(repo, trust_remote_code=True)
        assert type(model).__name__ == "MFPrunerLlavaNextForConditionalGeneration", type(model)
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        image = Image.fromarray(np.zeros((60, 100, 3), dtype=np.uint8))
        inputs = processor(images=image, text={PROMPT!r}, return_tensors="pt")
        model.generate(**inputs, max_new_tokens=2, visual_token_budget=5)
        print("KEPT", len(model.last_pruning.keep_indices[0]))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KEPT 9" in result.stdout  # 5 patch tokens + the 4 row newlines of the 4 x 8 grid


def test_config_default_budget_is_a_ratio():
    from configuration_mfpruner import MFPrunerLlavaNextConfig

    default = MFPrunerLlavaNextConfig()
    assert (default.visual_token_budget, default.visual_token_ratio) == (None, 0.222)
    assert default.mfpruner_cues == ["attention", "uniqueness", "relevance"] and default.min_votes == 2
    assert MFPrunerLlavaNextConfig(visual_token_budget=640).visual_token_ratio is None
    for kwargs, message in [
        (dict(visual_token_budget=0), "visual_token_budget"),
        (dict(visual_token_ratio=1.5), "visual_token_ratio"),
        (dict(visual_token_budget=8, visual_token_ratio=0.5), "only one"),
        (dict(mfpruner_cues=["colour"]), "mfpruner_cues"),
        (dict(fill_by="max"), "fill_by"),
    ]:
        with pytest.raises(ValueError, match=message):
            MFPrunerLlavaNextConfig(**kwargs)


# ----------------------------------------------------------------------------- equality with the stock model


@pytest.mark.parametrize(
    "switch", [dict(visual_token_budget=10_000), dict(visual_token_ratio=1.0), dict(prune_visual_tokens=False)]
)
def test_no_pruning_equals_stock_model(llava_next_model, stock_twin, inputs, switch):
    expected = stock_twin.generate(**inputs, **GREEDY)
    assert torch.equal(llava_next_model.generate(**inputs, **GREEDY, **switch), expected)
    with torch.no_grad():
        ours = llava_next_model(**inputs, **switch).logits
        stock = stock_twin(**inputs).logits
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- budget and newlines


@pytest.mark.parametrize("budget", [dict(visual_token_budget=1), dict(visual_token_budget=12), dict(visual_token_ratio=0.222), dict(visual_token_ratio=0.056)])
def test_language_model_receives_the_pruned_length(llava_next_model, inputs, budget):
    length = inputs["input_ids"].shape[1]
    n_tokens = image_token_count(inputs, llava_next_model)  # 16 base + 4 x 8 grid + 4 newlines = 52
    rows = 4
    patches = n_tokens - rows
    k = core.resolve_budget(patches, budget.get("visual_token_budget"), budget.get("visual_token_ratio"))
    lengths, handle = lm_input_lengths(llava_next_model)
    try:
        out = llava_next_model.generate(**inputs, max_new_tokens=3, do_sample=False, **budget)
        logits = llava_next_model(**inputs, **budget).logits
    finally:
        handle.remove()
    expected = length - n_tokens + k + rows  # the kept patch tokens plus every row newline
    assert n_tokens == 52 and lengths[0] == expected
    assert lengths[1:3] == [1, 1]  # decoding over the shorter cache
    assert lengths[3] == expected and logits.shape[1] == expected
    assert out.shape[1] == length + 3 and torch.equal(out[:, :length], inputs["input_ids"])
    assert llava_next_model.last_pruning.lm_input_length == expected


def test_newlines_are_kept_outside_the_budget_and_patches_follow_the_vote(llava_next_model, inputs):
    """The documented choice: every image_newline is kept, does not vote, and does not use budget."""
    llava_next_model.generate(**inputs, max_new_tokens=1, visual_token_budget=7)
    result = llava_next_model.last_pruning
    layout, keep = result.layouts[0], result.keep_indices[0]
    newline = layout[:, 0] == LAYOUT_NEWLINE
    assert newline.sum() == 4 and result.grids[0] == (4, 8) and result.base_grids[0] == (4, 4)
    assert set(newline.nonzero()[:, 0].tolist()) <= set(keep.tolist())
    kept_patches = [i for i in keep.tolist() if not newline[i]]
    assert len(kept_patches) == 7 and keep.tolist() == sorted(set(keep.tolist()))
    for name, scores in result.cue_scores.items():
        assert scores[0].shape == (52,) and (scores[0][newline] == 0).all(), name
    candidate_scores = {name: scores[0][~newline][None] for name, scores in result.cue_scores.items()}
    voted = core.select_tokens(candidate_scores, 7)[0]
    assert kept_patches == (~newline).nonzero()[:, 0][voted].tolist()


def test_min_votes_per_call_sets_the_vote_threshold(llava_next_model, inputs):
    """A per-call `min_votes` changes the vote over the patch tokens exactly as
    core.select_tokens says, for that call only; newlines stay kept."""
    kept = {}
    for min_votes in (1, 3):
        llava_next_model.generate(**inputs, max_new_tokens=1, visual_token_budget=7, min_votes=min_votes)
        result = llava_next_model.last_pruning
        newline = result.layouts[0][:, 0] == LAYOUT_NEWLINE
        candidate_scores = {name: scores[0][~newline][None] for name, scores in result.cue_scores.items()}
        voted = (~newline).nonzero()[:, 0][core.select_tokens(candidate_scores, 7, min_votes)[0]]
        kept[min_votes] = result.keep_indices[0].tolist()
        assert kept[min_votes] == sorted(voted.tolist() + newline.nonzero()[:, 0].tolist())
        llava_next_model(**inputs, visual_token_budget=7, min_votes=min_votes)
        assert llava_next_model.last_pruning.keep_indices[0].tolist() == kept[min_votes]
    assert kept[1] != kept[3] and llava_next_model.config.min_votes == 2
    for bad in (0, 2.5, False):
        with pytest.raises(ValueError, match="min_votes"):
            llava_next_model.generate(**inputs, max_new_tokens=1, min_votes=bad)
        with pytest.raises(ValueError, match="min_votes"):
            llava_next_model(**inputs, min_votes=bad)


def test_layout_maps_every_token_to_its_region(llava_next_model, llava_next_processor):
    """Base tile tokens raster the base grid; grid tokens raster the unpadded grid, each row
    closed by its newline. A 60 x 100 image padded to a 112 x 112 grid loses rows to unpadding."""
    inputs = llava_next_processor(images=random_image(3, size=(112, 60)), text=PROMPT, return_tensors="pt")
    llava_next_model(**inputs, visual_token_budget=4)
    result = llava_next_model.last_pruning
    layout = result.layouts[0]
    rows, cols = result.grids[0]
    base = layout[layout[:, 0] == LAYOUT_BASE]
    grid = layout[layout[:, 0] == LAYOUT_GRID]
    newline = layout[layout[:, 0] == LAYOUT_NEWLINE]
    assert base[:, 1:].tolist() == [[r, c] for r in range(4) for c in range(4)]
    assert grid[:, 1:].tolist() == [[r, c] for r in range(rows) for c in range(cols)]
    assert newline[:, 1].tolist() == list(range(rows)) and (newline[:, 2] == -1).all()
    assert len(layout) == result.num_visual_tokens[0] == image_token_count(inputs, llava_next_model)
    assert (layout[16:, 0] == LAYOUT_NEWLINE).nonzero()[:, 0].tolist() == [(cols + 1) * r + cols for r in range(rows)]


# ----------------------------------------------------------------------------- generation


def test_cached_generate_equals_no_cache_recomputation(llava_next_model, inputs):
    out = llava_next_model.generate(**inputs, max_new_tokens=5, do_sample=False, visual_token_ratio=0.111)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    pruned = llava_next_model.prune_inputs(
        inputs["input_ids"], inputs["pixel_values"], image_sizes=inputs["image_sizes"], visual_token_ratio=0.111
    )
    assert new_tokens.tolist() == greedy_without_cache(llava_next_model, pruned["inputs_embeds"], 5)


def test_batch_of_two_image_sizes_equals_each_row_alone(llava_next_model, llava_next_processor):
    prompts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nDescribe the picture in detail please. ASSISTANT:"]
    images = [random_image(1, size=(112, 112)), random_image(2, size=TALL)]
    batch = llava_next_processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # left padded
    out = llava_next_model.generate(**batch, **GREEDY, visual_token_ratio=0.222)
    result = llava_next_model.last_pruning
    assert result.num_visual_tokens[0] != result.num_visual_tokens[1]  # different token counts
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone = llava_next_processor(images=image, text=prompt, return_tensors="pt")
        single = llava_next_model.generate(**alone, **GREEDY, visual_token_ratio=0.222)
        assert llava_next_model.last_pruning.keep_indices[0].tolist() == result.keep_indices[row].tolist()
        for name in result.cue_scores:
            torch.testing.assert_close(llava_next_model.last_pruning.cue_scores[name][0], result.cue_scores[name][row])
        assert out[row, -GREEDY["max_new_tokens"] :].tolist() == single[0, -GREEDY["max_new_tokens"] :].tolist()


def test_forward_prunes_labels_with_the_tokens(llava_next_model, inputs):
    labels = inputs["input_ids"].clone()
    labels[labels == llava_next_model.config.image_token_id] = -100
    out = llava_next_model(**inputs, labels=labels, visual_token_budget=5)
    keep = torch.ones_like(labels, dtype=torch.bool)
    positions = (inputs["input_ids"] == llava_next_model.config.image_token_id).nonzero()[:, 1].tolist()
    kept = set(llava_next_model.last_pruning.keep_indices[0].tolist())
    keep[0, [p for i, p in enumerate(positions) if i not in kept]] = False
    kept_labels = labels[keep]
    assert out.logits.shape[1] == len(kept_labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], kept_labels[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


# ----------------------------------------------------------------------------- attention capture


def eager_tiles_and_sources(model, inputs):
    """Runs the vision tower eagerly on image 0's tiles and finds, by exact feature match, the
    (tile, patch) each packed non-newline token comes from: an independent check of the packing.
    Returns (eager vision output, (n,) flat tile * P + patch index per packed patch token)."""
    vision, layer = model.model.vision_tower, model.config.vision_feature_layer
    with torch.no_grad():
        eager = vision(inputs["pixel_values"][0], output_attentions=True, output_hidden_states=True)
        tile_tokens = model.model.multi_modal_projector(eager.hidden_states[layer][:, 1:]).flatten(0, 1)  # (tiles * P, D)
        packed = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output[0]
    patch = model.last_pruning.layouts[0][:, 0] != LAYOUT_NEWLINE
    source = torch.cdist(packed[patch], tile_tokens).argmin(dim=-1)
    torch.testing.assert_close(packed[patch], tile_tokens[source], atol=1e-6, rtol=0)
    return eager, source


def test_hook_captured_per_tile_attention_equals_eager_attention(llava_next_repo, llava_next_processor):
    """Per tile, the hooked [CLS] row equals eager attention; packed, each token's cue A is the
    eager attention of the (tile, patch) its features come from."""
    from modeling_mfpruner_llava import capture_clip_select_layer, clip_encoder_layer_index

    model = AutoModelForImageTextToText.from_pretrained(llava_next_repo, trust_remote_code=True, attn_implementation="eager").eval()
    inputs = llava_next_processor(images=random_image(4, size=(112, 60)), text=PROMPT, return_tensors="pt")
    vision, layer = model.model.vision_tower, model.config.vision_feature_layer
    assert inputs["pixel_values"].shape[1] == 5  # base + 2 x 2 grid
    with torch.no_grad(), capture_clip_select_layer(vision, layer) as captured:
        vision(inputs["pixel_values"][0])
    model(**inputs, visual_token_budget=3)
    result = model.last_pruning
    eager, source = eager_tiles_and_sources(model, inputs)
    index = clip_encoder_layer_index(layer, len(vision.encoder.layers))
    eager_cls = eager.attentions[index][:, :, 0].mean(dim=1)[:, 1:]  # (tiles, P): [CLS] row, patch columns
    hooked = core.attention_from_query(captured["q_cls"], captured["k"], vision.encoder.layers[0].self_attn.scale)[:, 1:]
    torch.testing.assert_close(hooked, eager_cls, atol=1e-5, rtol=0)

    layout = result.layouts[0]
    patch = layout[:, 0] != LAYOUT_NEWLINE
    expected = core.min_max_normalize(eager_cls.flatten()[source][None])[0]
    torch.testing.assert_close(result.cue_scores["attention"][0][patch], expected, atol=1e-5, rtol=0)
    tile, within = source // 16, source % 16
    assert ((tile == 0) == (layout[patch, 0] == LAYOUT_BASE)).all()
    grid = tile > 0
    global_row = (tile[grid] - 1) // 2 * 4 + within[grid] // 4  # tile row * side + patch row, in the padded grid
    global_col = (tile[grid] - 1) % 2 * 4 + within[grid] % 4
    assert torch.unique(global_row - layout[patch][grid, 1]).numel() == 1  # one unpadding offset
    assert torch.equal(global_col, layout[patch][grid, 2])  # a wide image loses no columns


def test_clip_text_relevance_over_all_tiles(tmp_path, llava_next_processor):
    """The paper's cue C with a CLIP text tower: every packed patch token against the instruction."""
    path = build_tiny_llava_next(tmp_path / "clip", clip_text=True)
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    inputs = llava_next_processor(images=random_image(5, size=(112, 60)), text=PROMPT, return_tensors="pt")
    clip_ids = torch.randint(5, 300, (1, 2, 16))
    clip_mask = torch.ones_like(clip_ids)
    clip_mask[0, 1, 9:] = 0
    model.generate(**inputs, max_new_tokens=1, clip_input_ids=clip_ids, clip_attention_mask=clip_mask)
    eager, source = eager_tiles_and_sources(model, inputs)
    with torch.no_grad():
        text = model.clip_text_model(input_ids=clip_ids[0], attention_mask=clip_mask[0]).text_embeds  # (M, E)
        hidden = eager.hidden_states[model.config.vision_feature_layer][:, 1:].flatten(0, 1)  # (tiles * P, C)
        image = model.clip_visual_projection(model.model.vision_tower.post_layernorm(hidden))[source]
    cos = torch.nn.functional.cosine_similarity(image[:, None], text[None], dim=-1)  # (n, M)
    expected = core.min_max_normalize((-cos.mean(dim=1))[None])[0]
    patch = model.last_pruning.layouts[0][:, 0] != LAYOUT_NEWLINE
    torch.testing.assert_close(model.last_pruning.cue_scores["relevance"][0][patch], expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors(llava_next_model, inputs, llava_next_processor):
    no_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="image_sizes"):
        llava_next_model.generate(**no_sizes, max_new_tokens=1)
    with pytest.raises(ValueError, match="visual_token_ratio"):
        llava_next_model.generate(**inputs, max_new_tokens=1, visual_token_ratio=0.0)
    with pytest.raises(ValueError, match="visual_token_budget"):
        llava_next_model(**inputs, visual_token_budget=-3)
    with pytest.raises(ValueError, match="only one"):
        llava_next_model(**inputs, visual_token_budget=3, visual_token_ratio=0.5)
    ids = inputs["input_ids"].clone()
    ids[0, ids[0].tolist().index(llava_next_model.config.image_token_id)] = 5  # one placeholder short
    with pytest.raises(ValueError, match="image tokens but"):
        llava_next_model.generate(**{**inputs, "input_ids": ids}, max_new_tokens=1)
    text_only = llava_next_processor(text="USER: hello ASSISTANT:", return_tensors="pt")
    with pytest.raises(ValueError, match="no image token"):
        llava_next_model(**text_only, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    embeds = llava_next_model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="inputs_embeds"):
        llava_next_model(inputs_embeds=embeds, input_ids=None, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
