"""MFPruner Qwen3.5: loading, equivalence with the stock model, M-RoPE positions, no DeepStack, and
the hybrid language model's recurrent state: a pruned, left-padded batch gives each row the
linear-attention state of that row alone, and generation continues from the returned cache.
Tiny random models (mfpruner_lib.tiny_models); the drop-in contracts (threads, caches, max_length,
device_map, refusals) are in test_drop_in_contracts.py, parametrised over every family."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from configuration_mfpruner import MFPrunerQwen3_5Config
from mfpruner_core import resolve_budget
from mfpruner_lib.families import FAMILIES
from mfpruner_lib.tiny_models import qwen3_vl_video_inputs, qwen_inputs
from modeling_mfpruner_qwen3_5 import MFPrunerQwen3_5ForConditionalGeneration
from tests.conftest import random_image

KEY = "qwen3.5"
GREEDY = dict(max_new_tokens=5, do_sample=False)


def chat(*items: str, question: str = "What is in the image?") -> str:
    pads = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    vision = "".join(f"<|vision_start|>{pads[item]}<|vision_end|>" for item in items)
    return f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(KEY)


@pytest.fixture(scope="module")
def stock(tiny_model):
    return tiny_model(KEY, stock=True)


@pytest.fixture(scope="module")
def processing(qwen3_processing):
    return qwen3_processing  # the tiny Qwen3.5 repo has the tiny Qwen3-VL tokenizer and image processor


@pytest.fixture(scope="module")
def prompts(processing):
    tokenizer, image_processor = processing
    video = torch.rand(4, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    return {
        "image": qwen_inputs(tokenizer, image_processor, [chat("image")], images=[random_image(1, (128, 96))]),
        "two_images": qwen_inputs(
            tokenizer, image_processor, [chat("image", "image")], images=[random_image(2, (128, 96)), random_image(3, (160, 128))]
        ),
        "video": qwen3_vl_video_inputs(tokenizer, [chat("video")], video),
    }


def language_model_calls(model):
    calls = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    return calls, handle


def linear_layers(model) -> list[int]:
    return [i for i, kind in enumerate(model.config.text_config.layer_types) if kind == "linear_attention"]


# ----------------------------------------------------------------------------- loading


def test_tiny_model_has_the_published_layer_pattern(model):
    assert model.config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert not hasattr(model.config.vision_config, "deepstack_visual_indexes")


def test_stock_checkpoint_loads_bit_identically(tiny_repo, stock):
    """transformers has no key renames for qwen3_5: the stored keys are the module keys, loaded as stored."""
    stock_repo = tiny_repo(KEY, stock=True)
    with safe_open(stock_repo / "model.safetensors", "pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    loaded, info = MFPrunerQwen3_5ForConditionalGeneration.from_pretrained(stock_repo, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = loaded.state_dict()
    assert ours.keys() == stock.state_dict().keys() and len(stored) == len(ours)
    assert all(torch.equal(ours[name], tensor) for name, tensor in stored.items())
    assert isinstance(loaded, getattr(transformers, FAMILIES[KEY].stock_model_class))


def test_save_pretrained_writes_auto_map_and_code(tiny_repo):
    repo = tiny_repo(KEY)
    config = json.loads((repo / "config.json").read_text())
    entry = FAMILIES[KEY].model_class
    assert config["auto_map"] == {"AutoConfig": FAMILIES[KEY].config_class, "AutoModel": entry,
                                  "AutoModelForImageTextToText": entry}
    assert config["visual_token_ratio"] == 0.222 and config["attention_query_chunk"] == 256
    # Qwen3-VL's and Qwen2.5-VL's files ship too: their encoding and cue A code serve Qwen3.5
    for name in ("modeling_mfpruner_qwen3_5.py", "modeling_mfpruner_qwen3_vl.py", "modeling_mfpruner_qwen2_5_vl.py",
                 "configuration_mfpruner.py", "mfpruner_pipeline.py", "mfpruner_core.py"):
        assert (repo / name).exists(), name


# ----------------------------------------------------------------------------- equivalence with stock


@pytest.mark.parametrize("prompt", ["image", "two_images", "video"])
def test_no_pruning_and_keeping_every_token_match_stock(model, stock, prompts, prompt):
    inputs = prompts[prompt]
    with torch.no_grad():
        stock_logits = stock(**inputs).logits
        off_logits = model(**inputs, prune_visual_tokens=False).logits
        kept_all_logits = model(**inputs, visual_token_ratio=1.0).logits
    assert torch.equal(off_logits, stock_logits)  # pruning off: the stock code, bit for bit
    torch.testing.assert_close(kept_all_logits, stock_logits, atol=1e-5, rtol=0)
    stock_tokens = stock.generate(**inputs, **GREEDY)
    assert torch.equal(model.generate(**inputs, **GREEDY, prune_visual_tokens=False), stock_tokens)
    assert torch.equal(model.generate(**inputs, **GREEDY, visual_token_ratio=1.0), stock_tokens)


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("prompt, settings", [("image", {}), ("two_images", {"visual_token_budget": 5}),
                                              ("video", {"visual_token_ratio": 0.333})])
def test_language_model_gets_the_kept_tokens_only_without_deepstack(model, prompts, prompt, settings):
    inputs = prompts[prompt]
    calls, handle = language_model_calls(model)
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False, **settings)
    finally:
        handle.remove()
    grids = torch.cat([inputs[key] for key in ("image_grid_thw", "video_grid_thw") if key in inputs])
    tokens = (grids.prod(-1) // 4).tolist()
    ratio = settings.get("visual_token_ratio", None if "visual_token_budget" in settings else 0.222)
    kept = [resolve_budget(n, settings.get("visual_token_budget"), ratio) for n in tokens]
    ids = inputs["input_ids"]
    text = int(((ids != model.config.image_token_id) & (ids != model.config.video_token_id)).sum())
    assert calls[0]["inputs_embeds"].shape[1] == text + sum(kept) == model.last_pruning.lm_input_length
    assert "deepstack_visual_embeds" not in calls[0]  # Qwen3.5's language model takes no DeepStack levels


def test_kept_tokens_keep_their_unpruned_positions(model, prompts):
    inputs = prompts["two_images"]
    unpruned, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # (3, 1, L)
    calls, handle = language_model_calls(model)
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    keep = model.last_pruning.keep_mask[0]
    prefill = calls[0]["position_ids"]  # (4, 1, L'): text positions, then t, h, w
    assert torch.equal(prefill[1:, 0], unpruned[:, 0, keep])
    next_position = int(unpruned.max()) + 1  # decoding continues where the unpruned prompt would
    assert calls[1]["position_ids"][1:, 0, -1].tolist() == [next_position] * 3


# ----------------------------------------------------------------------------- the recurrent state


def recurrent_states(cache, layers: list[int], row: int) -> list[torch.Tensor]:
    """One row's linear-attention state after the prefill: the delta rule's (heads, k, v) state and
    the convolution's last inputs, per linear-attention layer."""
    return [state[row] for i in layers for state in (cache.get_recurrent_state(i, state_idx=0), cache.get_conv_state(i))]


@pytest.fixture(scope="module")
def mixed_batch(processing):
    """Two rows with different image sizes (12 and 30 visual tokens) and questions: row 0 is left padded."""
    tokenizer, image_processor = processing
    texts = [chat("image"), chat("image", question="Describe the picture in detail, please.")]
    images = [random_image(7, (128, 96)), random_image(8, (192, 160))]
    rows = [qwen_inputs(tokenizer, image_processor, [text], images=[image]) for text, image in zip(texts, images)]
    return qwen_inputs(tokenizer, image_processor, texts, images=images), rows


def test_pruned_left_padded_rows_get_the_recurrent_state_of_each_row_alone(model, mixed_batch):
    """The pruned batch is re-padded on the left (row 0 has fewer kept tokens). Every linear-attention
    layer's recurrent and convolution state of each row equals that row's state alone, and so do the
    logits at every real position of the row; also with a non-zero embedding at the padded positions
    (the pipeline writes zeros, and the tiny pad token's embedding is zero; a checkpoint's need not
    be). The control: with that padding not masked, row 0's output of the first linear-attention
    layer differs, so the check would catch padding leaking into the linear-attention layers. (The tiny random model's recurrent state forgets
    within a few tokens, so the final state alone would not show a leak; the first real positions do.)"""
    batch, rows = mixed_batch
    layers = linear_layers(model)
    with torch.no_grad():
        batched = model(**batch, use_cache=True)
        assert batched.pruning.num_visual_tokens == [12, 30]
        lengths = batched.pruning.keep_mask.sum(-1).tolist()
        assert lengths[0] < lengths[1]  # row 0 is re-padded on the left
        alone = [model(**inputs, use_cache=True) for inputs in rows]
        for row in range(2):
            assert torch.equal(alone[row].pruning.keep_indices[0], batched.pruning.keep_indices[row])
            for ours, reference in zip(recurrent_states(batched.cache, layers, row), recurrent_states(alone[row].cache, layers, 0)):
                torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
            assert alone[row].logits.shape[1] == lengths[row]
            torch.testing.assert_close(batched.logits[row, -lengths[row]:], alone[row].logits[0], atol=1e-5, rtol=1e-5)

        pruned = model.prune_inputs(**batch, left_pad=True)
        mask = pruned["attention_mask"]
        assert int((mask[0] == 0).sum()) == lengths[1] - lengths[0]
        pad = model.get_input_embeddings()(torch.tensor(model.config.text_config.eos_token_id))  # a non-zero text embedding
        assert pad.abs().sum() > 0
        embeds = torch.where(mask[..., None].bool(), pruned["inputs_embeds"], pad)

        def prefill(attention_mask):
            return model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pruned["position_ids"],
                         mm_encoder_outputs=pruned["mm_encoder_outputs"], use_cache=True, output_hidden_states=True)

        masked, unmasked = prefill(mask), prefill(torch.ones_like(mask))
        alone_0 = model(**rows[0], output_hidden_states=True)
    for ours, expected in zip(recurrent_states(masked.cache, layers, 0), recurrent_states(alone[0].cache, layers, 0)):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.logits[0, -lengths[0]:], alone[0].logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked.logits[0, -lengths[0]:], alone[0].logits[0], atol=1e-3, rtol=0)
    # the leak starts in the first layer, a linear-attention one (hidden_states[1]: its output)
    assert layers[0] == 0
    torch.testing.assert_close(masked.hidden_states[1][0, -lengths[0]:], alone_0.hidden_states[1][0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked.hidden_states[1][0, -lengths[0]:], alone_0.hidden_states[1][0], atol=1e-3, rtol=0)


def test_pruned_batch_generates_what_each_row_generates_alone(model, mixed_batch):
    batch, rows = mixed_batch
    batched = model.generate(**batch, **GREEDY, min_new_tokens=5)
    for row, inputs in enumerate(rows):
        single = model.generate(**inputs, **GREEDY, min_new_tokens=5)
        assert torch.equal(batched[row, -5:], single[0, -5:])


def test_continuing_from_the_returned_cache_equals_recomputing_the_whole_sequence(model, prompts):
    """The pruned prefill's cache (KV of the full-attention layers, conv and recurrent states of the
    linear-attention ones) continues the sequence: one step from it gives the logits of the pruned
    prompt + that token computed from scratch; generate() with the cache gives the no-cache tokens."""
    inputs = prompts["two_images"]
    with torch.no_grad():
        pruned = model.prune_inputs(**inputs, left_pad=True)
        embeds, mask, positions = pruned["inputs_embeds"], pruned["attention_mask"], pruned["position_ids"]
        encoded = pruned["mm_encoder_outputs"]
        first = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, mm_encoder_outputs=encoded,
                      use_cache=True)
        token = first.logits[:, -1].argmax(-1)
        step_embeds = model.get_input_embeddings()(token)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
        cached = model(inputs_embeds=step_embeds, attention_mask=mask, position_ids=positions[..., -1:], cache=first.cache)
        recomputed = model(inputs_embeds=torch.cat([embeds, step_embeds], dim=1), attention_mask=mask,
                           position_ids=positions, mm_encoder_outputs=encoded, use_cache=False)
        torch.testing.assert_close(cached.logits[:, -1], recomputed.logits[:, -1], atol=1e-5, rtol=1e-5)
        tokens, embeds_all, mask_all = [], embeds, pruned["attention_mask"]
        positions = pruned["position_ids"]
        for _ in range(4):
            logits = model(inputs_embeds=embeds_all, attention_mask=mask_all, position_ids=positions,
                           mm_encoder_outputs=encoded, use_cache=False).logits
            token = logits[:, -1].argmax(-1)
            tokens.append(token)
            embeds_all = torch.cat([embeds_all, model.get_input_embeddings()(token)[:, None]], dim=1)
            mask_all = torch.cat([mask_all, torch.ones_like(mask_all[:, :1])], dim=1)
            positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
    output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(output[:, inputs["input_ids"].shape[1]:], torch.stack(tokens, dim=1))


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(model, prompts):
    inputs = prompts["image"]
    with pytest.raises(ValueError, match="image_grid_thw"):
        model.generate(**{**inputs, "image_grid_thw": torch.tensor([[1, 6, 6]])}, max_new_tokens=1)
    with pytest.raises(ValueError, match="visual_token_ratio"):
        model.generate(**inputs, max_new_tokens=1, visual_token_ratio=1.5)


@pytest.mark.parametrize(
    "settings, field",
    [({"relevance_source": "clip_text"}, "relevance_source"), ({"attention_query_chunk": 0}, "attention_query_chunk"),
     ({"visual_token_budget": 8, "visual_token_ratio": 0.5}, "visual_token_budget")],
)
def test_bad_config_raises_clear_errors(settings, field):
    with pytest.raises(ValueError, match=field):
        MFPrunerQwen3_5Config(**settings)
