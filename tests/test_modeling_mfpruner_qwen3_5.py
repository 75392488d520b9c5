"""MFPruner Qwen3.5 (dense and MoE): the hybrid language model's recurrent state. A pruned, left-padded batch gives each
row the linear-attention (Gated DeltaNet) state of that row alone, and generation continues from the
returned cache. Qwen3.5's visual side (Qwen3-VL's without DeepStack: loading, stock equivalence,
budgets, positions, cue A, videos, batching, errors) is tested with Qwen3-VL's in
test_modeling_mfpruner_qwen3_vl.py; the drop-in contracts in test_drop_in_contracts.py."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText

from mfpruner_lib.tiny_models import qwen_inputs
from configuration_mfpruner import stock_class
from tests.conftest import cache_keyword, config_values, output_cache, random_image
from tests.test_modeling_mfpruner_qwen3_vl import chat

@pytest.fixture(scope="module", params=["qwen3.5", "qwen3.5-moe"])
def model(request, tiny_model):
    """Dense and MoE: the same hybrid layers (the MoE's MLPs are experts)."""
    return tiny_model(request.param)


def linear_layers(model) -> list[int]:
    return [i for i, kind in enumerate(model.config.text_config.layer_types) if kind == "linear_attention"]


def test_tiny_model_has_the_published_layer_pattern(model):
    """Three linear-attention layers, then one full-attention layer (Qwen3.5-27B: that pattern 16 times)."""
    assert model.config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]


def recurrent_states(cache, layers: list[int], row: int) -> list[torch.Tensor]:
    """One row's linear-attention state after the prefill: the delta rule's (heads, k, v) state and
    the convolution's last inputs, per linear-attention layer."""
    return [state[row] for i in layers for state in (cache.get_recurrent_state(i, state_idx=0), cache.get_conv_state(i))]


@pytest.fixture(scope="module")
def mixed_batch(qwen3_processing):
    """Two rows with different image sizes (12 and 30 visual tokens) and questions: row 0 is left padded
    (the tiny Qwen3.5 repo has the tiny Qwen3-VL tokenizer and image processor)."""
    tokenizer, image_processor = qwen3_processing
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
            for ours, reference in zip(recurrent_states(output_cache(batched), layers, row), recurrent_states(output_cache(alone[row]), layers, 0)):
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
    for ours, expected in zip(recurrent_states(output_cache(masked), layers, 0), recurrent_states(output_cache(alone[0]), layers, 0)):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.logits[0, -lengths[0]:], alone[0].logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked.logits[0, -lengths[0]:], alone[0].logits[0], atol=1e-3, rtol=0)
    # the leak starts in the first layer, a linear-attention one (hidden_states[1]: its output)
    assert layers[0] == 0
    torch.testing.assert_close(masked.hidden_states[1][0, -lengths[0]:], alone_0.hidden_states[1][0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked.hidden_states[1][0, -lengths[0]:], alone_0.hidden_states[1][0], atol=1e-3, rtol=0)


def test_continuing_from_the_returned_cache_equals_recomputing_the_whole_sequence(model, mixed_batch):
    """The pruned prefill's cache (KV of the full-attention layers, conv and recurrent states of the
    linear-attention ones) continues the sequence: one step from it gives the logits of the pruned
    prompt + that token computed from scratch; generate() with the cache gives the no-cache tokens."""
    inputs, _ = mixed_batch  # two left-padded rows: the cache holds both rows' states
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
        cached = model(inputs_embeds=step_embeds, attention_mask=mask, position_ids=positions[..., -1:],
                       **{cache_keyword(): output_cache(first)})
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


# ----------------------------------------------------------------------------- the other Auto classes

# The Auto classes the stock Qwen3.5 configs map beyond image-text-to-text (heads without images).
STOCK_HEADS = [
    ("qwen3.5", "AutoModelForCausalLM"),
    ("qwen3.5", "AutoModelForSequenceClassification"),
    ("qwen3.5", "AutoModelForTokenClassification"),
    ("qwen3.5-moe", "AutoModelForCausalLM"),
]


@pytest.mark.parametrize("key, auto_class", STOCK_HEADS)
def test_other_auto_classes_give_on_our_repo_what_they_give_on_the_stock_repo(tiny_repo, key, auto_class):
    """AutoModelForCausalLM (the text-only model, from the text config), AutoModelForSequenceClassification
    and AutoModelForTokenClassification on an MFPruner repo: the stock class, with the same config,
    weights and outputs as from the stock repo (the tiny repos share their weights; a new head is
    initialized alike under the same seed)."""
    auto = getattr(transformers, auto_class)
    kwargs = {} if auto_class == "AutoModelForCausalLM" else {"num_labels": 3}
    torch.manual_seed(0)
    stock, stock_info = auto.from_pretrained(tiny_repo(key, stock=True), output_loading_info=True, **kwargs)
    torch.manual_seed(0)
    ours, info = auto.from_pretrained(tiny_repo(key), trust_remote_code=True, output_loading_info=True, **kwargs)
    assert type(ours) is type(stock) and type(ours).__module__.startswith("transformers.")
    assert type(ours.config) is type(stock.config) and config_values(ours.config) == config_values(stock.config)
    assert info == stock_info  # the text-only model: every weight found; the classification heads: only the new head missing
    assert ours.state_dict().keys() == stock.state_dict().keys()
    assert all(torch.equal(tensor, stock.state_dict()[name]) for name, tensor in ours.state_dict().items())
    ids = torch.tensor([[5, 9, 2, 7, 11, 3]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, stock(input_ids=ids).logits)


@pytest.mark.parametrize("key", ["qwen3.5", "qwen3.5-moe"])
def test_auto_model_for_causal_lm_from_config_unwraps_the_text_config(tiny_repo, key):
    """from_config with the repo's config (as loaded with trust_remote_code) builds the stock
    text-only model from the text config, as for the stock config."""
    config = transformers.AutoConfig.from_pretrained(tiny_repo(key), trust_remote_code=True)
    stock_config = transformers.AutoConfig.from_pretrained(tiny_repo(key, stock=True))
    with torch.device("meta"):
        ours = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        stock = transformers.AutoModelForCausalLM.from_config(stock_config)
    assert type(ours) is type(stock) and type(ours.config) is type(stock.config)
    assert config_values(ours.config) == config_values(stock.config)


def test_auto_model_for_causal_lm_honours_dtype_over_the_saved_one(tiny_repo, tmp_path):
    """A repo saved in bfloat16: no dtype or "auto" loads bfloat16, a concrete dtype wins (as for the
    stock repo: transformers re-applies it past the text-config unwrapping)."""
    AutoModelForImageTextToText.from_pretrained(tiny_repo("qwen3.5"), trust_remote_code=True, dtype=torch.bfloat16).save_pretrained(tmp_path)
    load = transformers.AutoModelForCausalLM.from_pretrained
    assert next(load(tmp_path, trust_remote_code=True).parameters()).dtype == torch.bfloat16
    assert next(load(tmp_path, trust_remote_code=True, dtype="auto").parameters()).dtype == torch.bfloat16
    assert next(load(tmp_path, trust_remote_code=True, dtype=torch.float32).parameters()).dtype == torch.float32


def test_sequence_classification_passes_the_loading_options_to_the_stock_class(tiny_repo):
    """A config with another vocabulary: refused without `ignore_mismatched_sizes`, re-initialized
    (and reported) with it, as for the stock class."""
    repo = tiny_repo("qwen3.5")
    config = transformers.AutoConfig.from_pretrained(repo, trust_remote_code=True, num_labels=5)
    config.text_config.vocab_size = 10
    auto = transformers.AutoModelForSequenceClassification
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        auto.from_pretrained(repo, config=config, trust_remote_code=True)
    model, info = auto.from_pretrained(repo, config=config, trust_remote_code=True, ignore_mismatched_sizes=True,
                                       output_loading_info=True)
    assert model.get_input_embeddings().num_embeddings == 10 and model.score.out_features == 5
    assert any("embed_tokens" in str(key) for key in info["mismatched_keys"])


def test_the_repo_auto_map_names_the_stock_heads(tiny_repo):
    """save_pretrained writes the other Auto classes into the auto_map (tools/export.py writes the same:
    tests/test_export.py), each a class of the shipped modeling file."""
    import json

    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    for key, auto_class in STOCK_HEADS:
        entry = json.loads((tiny_repo(key) / "config.json").read_text())["auto_map"][auto_class]
        head = get_class_from_dynamic_module(entry, str(tiny_repo(key)))
        assert head.__name__.removeprefix("MFPruner") == stock_class(head).__name__
