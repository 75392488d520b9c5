"""MFPrunerLlavaForConditionalGeneration, loaded through save_pretrained -> from_pretrained(trust_remote_code)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

from conftest import (
    assert_loads_bit_identical,
    assert_remote_code_repo,
    greedy_without_cache,
    lm_input_lengths,
    random_image,
    stock_twin_of,
)
from mfpruner_lib.tiny_models import build_tiny_llava

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
N = 36  # visual tokens of the tiny model
GREEDY = dict(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def inputs(llava_processor):
    return llava_processor(images=random_image(0), text=PROMPT, return_tensors="pt")


@pytest.fixture(scope="module")
def stock_twin(llava_model, llava_stock_model):
    """The stock LLaVA class holding exactly our model's weights."""
    return stock_twin_of(llava_model, llava_stock_model)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("hub_layout", [False, True], ids=["save_pretrained-layout", "hub-layout"])
def test_stock_checkpoint_loads_bit_identical(tmp_path, llava_stock_model, hub_layout):
    from modeling_mfpruner_llava import MFPrunerLlavaForConditionalGeneration

    path = build_tiny_llava(tmp_path / "stock", stock=True, hub_layout=hub_layout)
    assert_loads_bit_identical(MFPrunerLlavaForConditionalGeneration, path, llava_stock_model)


def test_save_pretrained_writes_code_and_auto_map(llava_repo):
    assert_remote_code_repo(llava_repo, "MFPrunerLlavaConfig", "MFPrunerLlavaForConditionalGeneration")


def test_fresh_process_loads_with_auto_classes_and_prunes(llava_repo):
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
        repo = {str(llava_repo)!r}
        a = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
        b = AutoModel.from_pretrained(repo, trust_remote_code=True)
        assert type(a).__name__ == type(b).__name__ == "MFPrunerLlavaForConditionalGeneration", type(b)
        assert type(a).__module__.startswith("transformers_modules"), type(a).__module__
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        image = Image.fromarray(np.zeros((50, 60, 3), dtype=np.uint8))
        inputs = processor(images=image, text={PROMPT!r}, return_tensors="pt")
        a.generate(**inputs, max_new_tokens=2, visual_token_budget=5)
        print("KEPT", len(a.last_pruning.keep_indices[0]))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KEPT 5" in result.stdout


def test_config_defaults_follow_the_paper(llava_model):
    config = llava_model.config
    assert config.visual_token_budget == 8  # the tiny builder's setting; the class default is 64
    from configuration_mfpruner import MFPrunerLlavaConfig

    default = MFPrunerLlavaConfig()
    assert (default.visual_token_budget, default.visual_token_ratio, default.min_votes) == (64, None, 2)
    assert default.mfpruner_cues == ["attention", "uniqueness", "relevance"]
    assert default.prune_visual_tokens and default.fill_by == "sum"


# ----------------------------------------------------------------------------- equality with the stock model


@pytest.mark.parametrize("switch", [dict(visual_token_budget=N), dict(visual_token_budget=10_000), dict(prune_visual_tokens=False)])
def test_no_pruning_equals_stock_model(llava_model, stock_twin, inputs, switch):
    expected = stock_twin.generate(**inputs, **GREEDY)
    assert torch.equal(llava_model.generate(**inputs, **GREEDY, **switch), expected)
    with torch.no_grad():
        ours = llava_model(**inputs, **switch).logits
        stock = stock_twin(**inputs).logits
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)


def test_pruning_switched_off_in_config(tmp_path, inputs, stock_twin):
    path = build_tiny_llava(tmp_path / "off", prune_visual_tokens=False)  # same seed, same weights
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    lengths, handle = lm_input_lengths(model)
    try:
        out = model.generate(**inputs, **GREEDY)
    finally:
        handle.remove()
    assert lengths[0] == inputs["input_ids"].shape[1]
    assert torch.equal(out, stock_twin.generate(**inputs, **GREEDY))


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("budget", [1, 8, 20])
def test_language_model_receives_the_pruned_length(llava_model, inputs, budget):
    length = inputs["input_ids"].shape[1]
    lengths, handle = lm_input_lengths(llava_model)
    try:
        out = llava_model.generate(**inputs, max_new_tokens=3, do_sample=False, visual_token_budget=budget)
        forward_logits = llava_model(**inputs, visual_token_budget=budget).logits
    finally:
        handle.remove()
    assert lengths[0] == length - (N - budget)  # the prefill
    assert lengths[1:3] == [1, 1]  # decoding, one token a step over the shorter cache
    assert lengths[3] == length - (N - budget) and forward_logits.shape[1] == lengths[3]
    assert out.shape[1] == length + 3
    assert torch.equal(out[:, :length], inputs["input_ids"])  # the original prompt is restored
    result = llava_model.last_pruning
    assert len(result.keep_indices[0]) == budget and result.lm_input_length == lengths[0]
    assert result.keep_indices[0].tolist() == sorted(set(result.keep_indices[0].tolist()))
    assert set(result.cue_scores) == {"attention", "uniqueness", "relevance"}
    assert all(score[0].shape == (N,) for score in result.cue_scores.values())


def test_ratio_per_call_and_in_config(tmp_path, llava_model, inputs):
    llava_model.generate(**inputs, max_new_tokens=1, visual_token_ratio=0.25)
    assert len(llava_model.last_pruning.keep_indices[0]) == 9
    path = build_tiny_llava(tmp_path / "ratio", visual_token_budget=None, visual_token_ratio=0.5)
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    model.generate(**inputs, max_new_tokens=1)
    assert len(model.last_pruning.keep_indices[0]) == 18


def test_kept_tokens_follow_the_vote_of_the_recorded_cues(llava_model, inputs):
    import mfpruner_core as core

    llava_model.generate(**inputs, max_new_tokens=1, visual_token_budget=7)
    result = llava_model.last_pruning
    scores = {name: values[0][None] for name, values in result.cue_scores.items()}
    assert result.keep_indices[0].tolist() == core.select_tokens(scores, 7)[0].tolist()


def test_min_votes_per_call_sets_the_vote_threshold(llava_model, inputs):
    """A per-call `min_votes` changes the vote exactly as core.select_tokens says, for that call
    only (the config is not touched); generate(), forward() and prune_inputs() take it."""
    import mfpruner_core as core

    kept = {}
    for min_votes in (1, 3):
        llava_model.generate(**inputs, max_new_tokens=1, visual_token_budget=7, min_votes=min_votes)
        result = llava_model.last_pruning
        scores = {name: values[0][None] for name, values in result.cue_scores.items()}
        kept[min_votes] = result.keep_indices[0].tolist()
        assert kept[min_votes] == core.select_tokens(scores, 7, min_votes)[0].tolist()
        llava_model(**inputs, visual_token_budget=7, min_votes=min_votes)
        assert llava_model.last_pruning.keep_indices[0].tolist() == kept[min_votes]
        llava_model.prune_inputs(inputs["input_ids"], inputs["pixel_values"], visual_token_budget=7, min_votes=min_votes)
        assert llava_model.last_pruning.keep_indices[0].tolist() == kept[min_votes]
    assert kept[1] != kept[3]
    assert llava_model.config.min_votes == 2
    llava_model.generate(**inputs, max_new_tokens=1, visual_token_budget=7)
    assert llava_model.last_pruning.keep_indices[0].tolist() == core.select_tokens(scores, 7, 2)[0].tolist()


@pytest.mark.parametrize("min_votes", [0, -1, 1.5, True, "2"])
def test_bad_min_votes_per_call_raises(llava_model, inputs, min_votes):
    with pytest.raises(ValueError, match="min_votes"):
        llava_model.generate(**inputs, max_new_tokens=1, min_votes=min_votes)
    with pytest.raises(ValueError, match="min_votes"):
        llava_model(**inputs, min_votes=min_votes)


def test_cached_generate_equals_no_cache_recomputation(llava_model, inputs):
    out = llava_model.generate(**inputs, max_new_tokens=5, do_sample=False, visual_token_budget=6)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    pruned = llava_model.prune_inputs(inputs["input_ids"], inputs["pixel_values"], visual_token_budget=6)
    assert new_tokens.tolist() == greedy_without_cache(llava_model, pruned["inputs_embeds"], 5)


def test_forward_prunes_labels_with_the_tokens(llava_model, inputs):
    labels = inputs["input_ids"].clone()
    labels[labels == llava_model.config.image_token_id] = -100
    out = llava_model(**inputs, labels=labels, visual_token_budget=5)
    keep = torch.ones_like(labels, dtype=torch.bool)
    image_positions = (inputs["input_ids"] == llava_model.config.image_token_id).nonzero()[:, 1]
    dropped = [p for i, p in enumerate(image_positions.tolist()) if i not in llava_model.last_pruning.keep_indices[0].tolist()]
    keep[0, dropped] = False
    kept_labels = labels[keep][None]
    assert out.logits.shape[1] == kept_labels.shape[1]
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], kept_labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_batch_rows_equal_each_row_alone(llava_model, llava_processor):
    prompts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nDescribe the picture in detail please. ASSISTANT:"]
    images = [random_image(1), random_image(2, size=(60, 90))]
    batch = llava_processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][0] == 0).any()  # the shorter prompt is left padded
    out = llava_model.generate(**batch, **GREEDY, visual_token_budget=7)
    batch_keep = [k.tolist() for k in llava_model.last_pruning.keep_indices]
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone = llava_processor(images=image, text=prompt, return_tensors="pt")
        single = llava_model.generate(**alone, **GREEDY, visual_token_budget=7)
        assert llava_model.last_pruning.keep_indices[0].tolist() == batch_keep[row]
        assert out[row, -GREEDY["max_new_tokens"] :].tolist() == single[0, -GREEDY["max_new_tokens"] :].tolist()


def test_beam_search_and_sampling(llava_model, inputs):
    length = inputs["input_ids"].shape[1]
    beams = llava_model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (2, length + 4)
    assert torch.equal(beams[:, :length], inputs["input_ids"].expand(2, -1))
    torch.manual_seed(0)
    first = llava_model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=20)
    torch.manual_seed(0)
    second = llava_model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=20)
    assert first.shape == (1, length + 4) and torch.equal(first, second)
    scored = llava_model.generate(
        **inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True,
        repetition_penalty=1.3, no_repeat_ngram_size=2,
    )
    assert scored.sequences.shape == (1, length + 3) and len(scored.scores) == 3


# ----------------------------------------------------------------------------- attention capture


def test_hook_captured_cls_attention_equals_eager_attention(llava_repo, inputs):
    from modeling_mfpruner_llava import capture_clip_select_layer, clip_encoder_layer_index
    import mfpruner_core as core

    model = AutoModelForImageTextToText.from_pretrained(llava_repo, trust_remote_code=True, attn_implementation="eager")
    vision = model.model.vision_tower
    layer = model.config.vision_feature_layer
    with torch.no_grad(), capture_clip_select_layer(vision, layer) as captured:
        eager = vision(inputs["pixel_values"], output_attentions=True).attentions
    index = clip_encoder_layer_index(layer, len(vision.encoder.layers))
    expected = eager[index][:, :, 0].mean(dim=1)  # [CLS] row, mean over heads
    hooked = core.attention_from_query(captured["q_cls"], captured["k"], vision.encoder.layers[0].self_attn.scale)
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=0)


def test_model_runs_under_sdpa_with_the_same_cues(llava_repo, llava_model, inputs):
    assert llava_model.model.vision_tower.config._attn_implementation == "sdpa"
    eager = AutoModelForImageTextToText.from_pretrained(llava_repo, trust_remote_code=True, attn_implementation="eager")
    llava_model.generate(**inputs, max_new_tokens=1, visual_token_budget=8)
    sdpa_result = llava_model.last_pruning
    eager.generate(**inputs, max_new_tokens=1, visual_token_budget=8)
    torch.testing.assert_close(eager.last_pruning.cue_scores["attention"][0], sdpa_result.cue_scores["attention"][0], atol=1e-5, rtol=0)
    assert eager.last_pruning.keep_indices[0].tolist() == sdpa_result.keep_indices[0].tolist()


# ----------------------------------------------------------------------------- CLIP text relevance


def test_clip_text_relevance_drives_cue_c(tmp_path, inputs):
    import mfpruner_core as core

    path = build_tiny_llava(tmp_path / "clip", clip_text=True)
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    clip_ids = torch.randint(5, 300, (1, 2, 16))
    clip_mask = torch.ones_like(clip_ids)
    clip_mask[0, 1, 10:] = 0
    model.generate(**inputs, max_new_tokens=1, clip_input_ids=clip_ids, clip_attention_mask=clip_mask)
    with torch.no_grad():
        text = model.clip_text_model(input_ids=clip_ids[0], attention_mask=clip_mask[0]).text_embeds  # (M, E)
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        image = model.clip_visual_projection(model.model.vision_tower.post_layernorm(hidden))[0]
    cos = torch.nn.functional.cosine_similarity(image[:, None], text[None], dim=-1)  # (N, M)
    expected = core.min_max_normalize((-cos.mean(dim=1))[None])[0]
    torch.testing.assert_close(model.last_pruning.cue_scores["relevance"][0], expected, atol=1e-5, rtol=0)
    # Without the text-tower inputs the "auto" source falls back to LLM-space relevance.
    model.generate(**inputs, max_new_tokens=1)
    assert not torch.allclose(model.last_pruning.cue_scores["relevance"][0], expected)


def test_clip_text_source_without_tower_is_a_clear_error(tmp_path, inputs):
    path = build_tiny_llava(tmp_path / "need-clip", relevance_source="clip_text")
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
    with pytest.raises(ValueError, match="relevance_source='clip_text'"):
        model.generate(**inputs, max_new_tokens=1)


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_colour_image_and_half_precision_stay_finite(llava_repo, llava_processor, dtype):
    from PIL import Image

    inputs = llava_processor(images=Image.new("RGB", (90, 70), (120, 40, 200)), text=PROMPT, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(llava_repo, trust_remote_code=True, dtype=dtype).eval()
    logits = model(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}, visual_token_budget=5).logits
    result = model.last_pruning
    assert torch.isfinite(logits).all()
    assert len(result.keep_indices[0]) == 5
    assert all(torch.isfinite(score[0]).all() for score in result.cue_scores.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(visual_token_budget=0), "visual_token_budget"),
        (dict(visual_token_budget=2.5), "visual_token_budget"),
        (dict(visual_token_ratio=0.0), "visual_token_ratio"),
        (dict(visual_token_ratio=1.2), "visual_token_ratio"),
        (dict(visual_token_budget=4, visual_token_ratio=0.5), "only one"),
    ],
)
def test_bad_budget_arguments_raise(llava_model, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llava_model.generate(**inputs, max_new_tokens=1, **kwargs)
    with pytest.raises(ValueError, match=message):
        llava_model(**inputs, **kwargs)


def test_image_tokens_that_do_not_match_the_images_raise(llava_model, inputs, llava_processor):
    ids = inputs["input_ids"].clone()
    ids[ids == llava_model.config.image_token_id] = 5
    ids[0, :30] = llava_model.config.image_token_id
    with pytest.raises(ValueError, match="image tokens but"):
        llava_model.generate(input_ids=ids, pixel_values=inputs["pixel_values"], max_new_tokens=1)
    text_only = llava_processor(text="USER: hello ASSISTANT:", return_tensors="pt")
    with pytest.raises(ValueError, match="no image token"):
        llava_model.generate(**text_only, pixel_values=inputs["pixel_values"], max_new_tokens=1)
    with pytest.raises(ValueError, match="no image token"):
        llava_model(**text_only, pixel_values=inputs["pixel_values"])


def test_bad_config_values_raise():
    from configuration_mfpruner import MFPrunerLlavaConfig

    for kwargs, message in [
        (dict(visual_token_budget=-1), "visual_token_budget"),
        (dict(visual_token_budget=None, visual_token_ratio=2.0), "visual_token_ratio"),
        (dict(visual_token_budget=8, visual_token_ratio=0.5), "only one"),
        (dict(mfpruner_cues=["attention", "colour"]), "mfpruner_cues"),
        (dict(min_votes=0), "min_votes"),
        (dict(relevance_source="bert"), "relevance_source"),
        (dict(fill_by="max"), "fill_by"),
    ]:
        with pytest.raises(ValueError, match=message):
            MFPrunerLlavaConfig(**kwargs)
