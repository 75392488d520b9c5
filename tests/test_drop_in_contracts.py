"""The MFPruner classes are drop-in replacements for the stock ones (issue 11), for every family:
with pruning off every output equals the stock class on the same weights; with pruning on the only
difference is the shorter prefill, and what cannot hold is refused with a clear error.

Checked the way transformers' model / generation tester mixins check a model (written here, not
copied): stock-twin comparisons, signature-driven generate() options (`logits_to_keep`), length
limits, caches, assisted decoding, position ids, threads, device maps."""

from __future__ import annotations

import ast
import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText

from conftest import cache_keyword, config_values, output_cache, random_image, stock_twin_of
from mfpruner_lib.families import FAMILIES as REGISTRY, by_model_type
from mfpruner_lib.tiny_models import build_tiny_llava, qwen_inputs

ROOT = Path(__file__).resolve().parents[1]
LLAVA_PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
LONG_PROMPT = "USER: <image>\nDescribe every object you can see in this picture. ASSISTANT:"
QWEN_QUESTION = "What is in the image?"
FAMILIES = [family.model_type for family in REGISTRY.values()]  # every registry family, by model_type
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # M-RoPE, images through `qwen_inputs`
GREEDY = dict(do_sample=False, max_new_tokens=4)


def qwen_chat(question: str = QWEN_QUESTION) -> str:
    return f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """One family: the MFPruner model, its stock twin (same weights), a one-image prompt, and a
    left-padded batch of two prompts whose rows differ in length (and, where the family allows,
    in image size)."""
    name = request.param
    key = by_model_type(name).key
    model = request.getfixturevalue("tiny_model")(key)
    stock = request.getfixturevalue("tiny_model")(key, stock=True)
    if name in QWEN_FAMILIES:
        tokenizer, image_processor = request.getfixturevalue("qwen_processing" if name == "qwen2_5_vl" else "qwen3_processing")
        token_px = 28 if name == "qwen2_5_vl" else 32  # Qwen2.5-VL: 2 x 2 patches of 14 px; Qwen3-VL, Qwen3.5: of 16 px
        single = qwen_inputs(tokenizer, image_processor, [qwen_chat()], images=[random_image(1, (4 * token_px, 3 * token_px))])
        batch = qwen_inputs(
            tokenizer,
            image_processor,
            [qwen_chat(), qwen_chat("Describe the picture.")],
            images=[random_image(2, (4 * token_px, 4 * token_px)), random_image(3, (8 * token_px, 4 * token_px))],  # 16, 32 tokens
        )
    else:
        processor = request.getfixturevalue(f"{name}_processor")
        processor.tokenizer.padding_side = "left"
        sizes = [(96, 80), (96, 80)] if name == "llava" else [(100, 60), (50, 90)]
        single = processor(images=random_image(0, sizes[0]), text=LLAVA_PROMPT, return_tensors="pt")
        batch = processor(
            images=[random_image(4, sizes[0]), random_image(5, sizes[1])],
            text=[LLAVA_PROMPT, LONG_PROMPT],
            return_tensors="pt",
            padding=True,
        )
    return SimpleNamespace(name=name, key=key, model=model, stock=stock_twin_of(model, stock), single=single, batch=batch)


def visual_positions(model, input_ids) -> torch.Tensor:
    ids = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]
    return torch.isin(input_ids, torch.tensor([i for i in ids if i is not None]))


def record_lm_calls(model):
    """Records the language model's kwargs at every call (a hook; not our bookkeeping)."""
    calls = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    return calls, handle


# ----------------------------------------------------------------------------- pruning off = stock


def test_pruning_off_equals_stock_everywhere(family):
    model, stock, inputs = family.model, family.stock, family.batch
    options = dict(GREEDY, return_dict_in_generate=True, output_scores=True, output_logits=True)
    ours = model.generate(**inputs, prune_visual_tokens=False, **options)
    theirs = stock.generate(**inputs, **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        ours = model(**inputs, prune_visual_tokens=False, output_hidden_states=True)
        theirs = stock(**inputs, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    if hasattr(theirs, "image_outputs"):  # transformers < 5.25 outputs carry no image_outputs
        for a, b in zip(ours.image_outputs.pooler_output, theirs.image_outputs.pooler_output):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not hasattr(ours, "pruning")


def test_forward_signature_is_the_stock_one_plus_the_pruning_keywords(family):
    import inspect

    from mfpruner_pipeline import PRUNING_KEYWORDS

    ours = inspect.signature(family.model.forward).parameters
    stock = inspect.signature(family.stock.forward).parameters
    assert list(ours) == [name for name in stock if name != "kwargs"] + list(PRUNING_KEYWORDS) + ["kwargs"]
    assert "logits_to_keep" in ours


@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "stock"])
def test_generate_runs_the_prefill_lm_head_on_one_position(family, prune):
    head_lengths = []
    handle = family.model.lm_head.register_forward_pre_hook(lambda m, args: head_lengths.append(args[0].shape[1]))
    try:
        family.model.generate(**family.single, prune_visual_tokens=prune, **GREEDY)
    finally:
        handle.remove()
    assert head_lengths == [1] * GREEDY["max_new_tokens"]


# ----------------------------------------------------------------------------- lengths and batches


def test_max_and_min_length_count_the_original_prompt(family):
    inputs = family.single
    length = inputs["input_ids"].shape[1]
    out = family.model.generate(**inputs, do_sample=False, max_length=length + 3, min_length=length + 3)
    assert out.shape[1] == length + 3
    assert family.model.last_pruning.lm_input_length < length  # it did prune
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_length=length + 2, min_length=length + 2)
    assert family.model.generate(**inputs, generation_config=config).shape[1] == length + 2
    # max_new_tokens is unaffected
    assert family.model.generate(**inputs, do_sample=False, max_new_tokens=2, min_new_tokens=2).shape[1] == length + 2


def test_mixed_batch_prefill_is_the_longest_pruned_row(family):
    inputs = family.batch
    mask = inputs["attention_mask"]
    assert (mask == 0).any()  # rows differ: the shorter one is padded
    calls, handle = record_lm_calls(family.model)
    try:
        family.model.generate(**inputs, visual_token_ratio=0.25, **GREEDY)
    finally:
        handle.remove()
    result = family.model.last_pruning
    visual = visual_positions(family.model, inputs["input_ids"])
    text = ((mask == 1) & ~visual).sum(dim=-1)
    kept = torch.zeros_like(text)
    for row, indices in zip(result.image_to_row, result.keep_indices):
        kept[row] += len(indices)
    assert calls[0]["inputs_embeds"].shape[1] == result.lm_input_length == int((text + kept).max())
    if family.name in QWEN_FAMILIES:
        assert result.num_visual_tokens == [16, 32] and [len(k) for k in result.keep_indices] == [4, 8]


# ----------------------------------------------------------------------------- results, keywords, settings


def test_result_records_what_the_call_used(family):
    out = family.model.generate(**family.single, visual_token_budget=5, min_votes=1, return_dict_in_generate=True, **GREEDY)
    result = out.pruning
    assert result is family.model.last_pruning
    assert (result.visual_token_budget, result.visual_token_ratio, result.min_votes) == (5, None, 1)
    assert result.fill_by == family.model.config.fill_by and result.relevance_source == "llm"
    assert set(result.timings) == {"vision", "cues", "vote", "splice"}
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert result.keep_mask.shape == family.single["input_ids"].shape
    assert int(result.keep_mask.sum()) == result.lm_input_length
    assert len(result.layouts) == len(result.grids) == len(result.kinds) == len(result.base_grids) == 1


@pytest.mark.parametrize("entry", ["generate", "forward"])
def test_misspelled_pruning_keyword_is_refused(family, entry):
    call = family.model.generate if entry == "generate" else family.model
    with pytest.raises(ValueError, match="visual_token_budjet.*did you mean `visual_token_budget`"):
        call(**family.single, visual_token_budjet=2, **(GREEDY if entry == "generate" else {}))
    with pytest.raises(ValueError, match="min_vote.*did you mean `min_votes`"):
        call(**family.single, min_vote=1, **(GREEDY if entry == "generate" else {}))


def test_config_edited_after_loading_is_validated_at_the_call(family):
    config = family.model.config
    saved = list(config.mfpruner_cues)
    with pytest.raises(ValueError, match="mfpruner_cues"):  # an assignment is checked at once
        config.mfpruner_cues = ["attention", "colour"]
    config.mfpruner_cues.append("colour")  # an in-place edit is caught at the next call
    try:
        with pytest.raises(ValueError, match="mfpruner_cues"):
            family.model.generate(**family.single, **GREEDY)
    finally:
        config.mfpruner_cues = saved


# ----------------------------------------------------------------------------- forward outputs


def test_forward_returns_the_kept_image_tokens_and_the_result(family):
    model, inputs = family.model, family.single
    with torch.no_grad():
        out = model(**inputs, visual_token_budget=5)
        stock_output = family.stock(**inputs)
    if not hasattr(stock_output, "image_outputs"):
        pytest.skip("transformers < 5.25: forward outputs carry no image_outputs to hold the kept tokens")
    full = stock_output.image_outputs.pooler_output
    result = out.pruning
    assert out.logits.shape[1] == result.lm_input_length
    kept = out.image_outputs.pooler_output
    assert len(kept) == len(full) == len(result.keep_indices)
    for tokens, all_tokens, indices in zip(kept, full, result.keep_indices):
        # Qwen2.5-VL's hooked block computes its attention in one pass with cue A (the same maths
        # as the stock SDPA, not bit-identical); LLaVA's tokens are bit-identical
        torch.testing.assert_close(tokens, all_tokens[indices], rtol=0, atol=1e-6)


def test_caller_position_ids_are_gathered_at_the_kept_positions(family):
    model, inputs = family.model, family.single
    length = inputs["input_ids"].shape[1]
    if family.name in QWEN_FAMILIES:
        positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1) * 2 + 7  # (3, 1, L)
    else:
        positions = torch.arange(length)[None] * 2 + 7  # (1, L), e.g. a packed sequence's offsets
    calls, handle = record_lm_calls(model)
    try:
        with torch.no_grad():
            model(**inputs, position_ids=positions, visual_token_budget=5)
    finally:
        handle.remove()
    keep = model.last_pruning.keep_mask
    assert torch.equal(calls[0]["position_ids"], positions[..., keep[0]])


def test_packed_sequences_without_a_mask_are_refused(family):
    """Restarting `position_ids` and no mask mean packed sequences to the stock code; the gaps of
    a pruned prompt would read as more sequence starts, so pruning refuses them."""
    inputs = {k: v for k, v in family.single.items() if k != "attention_mask"}
    length = inputs["input_ids"].shape[1]
    positions = torch.cat([torch.arange(4), torch.arange(length - 4)])[None]  # two packed sequences
    if family.name in QWEN_FAMILIES:
        positions = positions[None].expand(3, 1, -1)
    with pytest.raises(ValueError, match="packed sequences"):
        with torch.no_grad():
            family.model(**inputs, position_ids=positions)


# ----------------------------------------------------------------------------- caches, assisted decoding


@pytest.mark.parametrize("batch", [False, True], ids=["one-row", "padded-batch"])
def test_continuing_from_a_pruned_generate_cache_equals_one_call(family, batch):
    """The transformers continue-from-cache check with pruning on: generate 3 tokens, then 1 more
    from the returned cache with the returned sequences (and the same pixel inputs) re-fed: the
    same tokens and logits as generating 4 at once."""
    inputs = family.batch if batch else family.single
    once = family.model.generate(
        **inputs, do_sample=False, max_new_tokens=4, return_dict_in_generate=True, output_logits=True
    )
    first = family.model.generate(**inputs, do_sample=False, max_new_tokens=3, return_dict_in_generate=True)
    assert first.sequences.shape[1] == inputs["input_ids"].shape[1] + 3  # the original prompt + 3
    assert output_cache(first).get_seq_length() == first.pruning.lm_input_length + 2
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, inputs["input_ids"].shape[1] :])], -1)
    second = family.model.generate(
        **dict(inputs, input_ids=first.sequences, attention_mask=mask),
        **{cache_keyword(): output_cache(first)},
        do_sample=False,
        max_new_tokens=1,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert torch.equal(second.sequences, once.sequences)
    torch.testing.assert_close(second.logits[0], once.logits[3])


def test_continuing_from_a_stock_cache_equals_the_stock_model(family):
    """Pruning off: the continue-from-cache check (3 tokens, then 1 more from the returned cache,
    the images already in it) gives the stock model's tokens."""
    inputs = family.single
    results = []
    for model, extra in ((family.model, dict(prune_visual_tokens=False)), (family.stock, {})):
        first = model.generate(**inputs, do_sample=False, max_new_tokens=3, return_dict_in_generate=True, **extra)
        mask = torch.ones_like(first.sequences)
        second = model.generate(
            input_ids=first.sequences, attention_mask=mask, **{cache_keyword(): output_cache(first)}, do_sample=False, max_new_tokens=1, **extra
        )
        results.append(second)
    assert torch.equal(results[0], results[1])


def test_a_filled_cache_with_pixel_inputs_is_refused(family):
    from transformers import DynamicCache

    cache = DynamicCache(config=family.model.config)
    with torch.no_grad():
        family.model(**family.single, **{cache_keyword(): cache}, use_cache=True, prune_visual_tokens=False)
    with pytest.raises(ValueError, match="non-empty cache cannot be combined with pruning"):
        family.model.generate(**family.single, **{cache_keyword(): cache}, **GREEDY)


def test_forward_without_return_dict_returns_the_stock_tuple(family):
    with torch.no_grad():
        ours = family.model(**family.single, visual_token_budget=5, return_dict=False)
        reference = family.model(**family.single, visual_token_budget=5)
    assert isinstance(ours, tuple)
    torch.testing.assert_close(ours[0], reference.logits, rtol=0, atol=0)
    assert family.model.last_pruning.lm_input_length == ours[0].shape[1]


def outcome(call):
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - the stock outcome may be an error
        return f"{type(error).__name__}: {error}"


def test_assisted_decoding_with_pruning_off_behaves_as_stock(family):
    ours = outcome(lambda: family.model.generate(**family.single, prompt_lookup_num_tokens=2, prune_visual_tokens=False, **GREEDY))
    theirs = outcome(lambda: family.stock.generate(**family.single, prompt_lookup_num_tokens=2, **GREEDY))
    if isinstance(theirs, str):  # the same refusal, naming our class where the stock names its own
        theirs = theirs.replace(type(family.stock).__name__, type(family.model).__name__)
    assert type(ours) is type(theirs)
    assert (torch.equal(ours, theirs) if isinstance(ours, torch.Tensor) else ours == theirs)


def caller_embeddings(model, input_ids) -> torch.Tensor:
    """Prompt embeddings a caller might pass (e.g. soft prompts): the embedded ids, text scaled."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
    return torch.where(visual_positions(model, input_ids)[..., None], embeds, 1.5 * embeds)


def test_generate_with_ids_and_the_callers_embeddings_prunes_those_embeddings(family):
    model, stock, inputs = family.model, family.stock, family.single
    options = dict(GREEDY, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        embedded_ids = model.get_input_embeddings()(inputs["input_ids"])
    plain = model.generate(**inputs, visual_token_budget=5, **options)
    embedded = model.generate(**inputs, inputs_embeds=embedded_ids, visual_token_budget=5, **options)
    assert torch.equal(embedded.sequences, plain.sequences)
    assert embedded.pruning.lm_input_length == plain.pruning.lm_input_length < inputs["input_ids"].shape[1]
    for a, b in zip(embedded.scores, plain.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Keeping every visual token, changed embeddings give the stock model's output on them.
    embeds = caller_embeddings(model, inputs["input_ids"])
    ours = model.generate(**inputs, inputs_embeds=embeds, visual_token_ratio=1.0, **options)
    theirs = stock.generate(**inputs, inputs_embeds=embeds, **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.scores, theirs.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs.scores[0], stock.generate(**inputs, **options).scores[0])  # the change matters


def test_generate_with_embeddings_and_pixels_but_no_ids_is_refused(family):
    inputs = {k: v for k, v in family.single.items() if k != "input_ids"}
    embeds = caller_embeddings(family.model, family.single["input_ids"])
    with pytest.raises(ValueError, match="pass `input_ids`"):
        family.model.generate(**inputs, inputs_embeds=embeds, **GREEDY)


def test_forward_with_ids_and_embeddings_prunes_those_embeddings(family):
    model, inputs = family.model, family.single
    with torch.no_grad():
        embedded_ids = model.get_input_embeddings()(inputs["input_ids"])
        plain = model(**inputs, visual_token_budget=5)
        embedded = model(**inputs, inputs_embeds=embedded_ids, visual_token_budget=5)
        changed = model(**inputs, inputs_embeds=caller_embeddings(model, inputs["input_ids"]), visual_token_budget=5)
    assert plain.logits.shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(embedded.logits, plain.logits, rtol=0, atol=0)
    assert changed.logits.shape == plain.logits.shape and not torch.allclose(changed.logits, plain.logits)


# ----------------------------------------------------------------------------- threads


def test_two_threads_give_the_sequential_results(family):
    """Two threads x 4 calls on one model, each thread with its own budget: every output and
    every per-thread `last_pruning` equals the sequential run."""
    model, inputs = family.model, family.batch
    budgets = {0: 3, 1: 7}

    def run(budget):
        out = model.generate(**inputs, visual_token_budget=budget, return_dict_in_generate=True, **GREEDY)
        own = model.last_pruning
        return out.sequences, [k.tolist() for k in out.pruning.keep_indices], own is out.pruning

    expected = {t: run(budget) for t, budget in budgets.items()}
    got = {t: [] for t in budgets}

    def worker(t):
        for _ in range(4):
            got[t].append(run(budgets[t]))

    threads = [threading.Thread(target=worker, args=(t,)) for t in budgets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for t, results in got.items():
        assert len(results) == 4
        for sequences, keep, own in results:
            assert torch.equal(sequences, expected[t][0]) and keep == expected[t][1] and own


def test_no_hooks_are_added_or_removed_per_call(family):
    """The cue capture is installed once (in __init__): a pruning call leaves every module's hooks
    as they were, and no capture buffer stays active."""
    from mfpruner_pipeline import CUE_CAPTURE

    def hooks():
        return [
            (name, len(module._forward_hooks), len(module._forward_pre_hooks))
            for name, module in family.model.named_modules()
        ]

    family.model.generate(**family.single, **GREEDY)  # transformers installs its output recorders lazily
    before = hooks()
    family.model.generate(**family.single, **GREEDY)
    assert hooks() == before and CUE_CAPTURE.get() is None


def test_last_pruning_is_per_thread(family):
    family.model.generate(**family.single, visual_token_budget=3, **GREEDY)
    mine = family.model.last_pruning
    seen = []
    thread = threading.Thread(target=lambda: seen.append(family.model.last_pruning))
    thread.start()
    thread.join()
    assert seen == [None] and family.model.last_pruning is mine


@pytest.mark.parametrize("key", list(REGISTRY))
def test_class_inherits_generation_mixin_directly_as_the_stock_class(key):
    """transformers' convention for a generative class: GenerationMixin among its own bases, not
    only through a base class (`can_generate` looks there first; the stock classes follow it)."""
    from transformers import GenerationMixin

    from tools.export import import_object

    family = REGISTRY[key]
    ours, stock = import_object(family.model_class), getattr(transformers, family.stock_model_class)
    assert GenerationMixin in stock.__bases__ and GenerationMixin in ours.__bases__
    assert ours.can_generate()
    assert [c for c in ours.__mro__ if c in stock.__mro__] == list(stock.__mro__)  # the stock order kept


@pytest.mark.parametrize("key", list(REGISTRY))
def test_attention_and_experts_implementations_can_be_set_where_the_stock_class_allows(key, tiny_model):
    """transformers decides whether a class may switch its attention / experts implementation by
    reading its module's source; ours must answer as the stock class, and switch (MoE families)."""
    family = REGISTRY[key]
    model = tiny_model(key)
    ours, stock = type(model), getattr(transformers, family.stock_model_class)
    assert ours._can_set_attn_implementation() == stock._can_set_attn_implementation()
    assert ours._can_set_experts_implementation() == stock._can_set_experts_implementation()
    if stock._can_set_experts_implementation():
        before = model.config._experts_implementation
        try:
            model.set_experts_implementation("eager")
            assert model.config._experts_implementation == "eager"
        finally:
            model.set_experts_implementation(before)


@pytest.mark.parametrize("key", list(REGISTRY))
def test_forward_declares_the_stock_output_class(key):
    """forward()'s return annotation is the stock one: transformers reads it for the fields a
    generative head returns (the MoE families' `router_logits`)."""
    import inspect

    from tools.export import import_object

    family = REGISTRY[key]
    ours, stock = import_object(family.model_class), getattr(transformers, family.stock_model_class)
    assert ours.forward.__annotations__.get("return") is stock.forward.__annotations__["return"]
    assert inspect.signature(ours.forward).return_annotation is inspect.signature(stock.forward).return_annotation


@pytest.mark.parametrize("key", list(REGISTRY))
def test_weights_missing_from_a_checkpoint_are_initialized_as_the_stock_class_does(key, tiny_model):
    """from_pretrained initializes the weights a checkpoint lacks with the model's own init: ours
    (a class outside transformers, which transformers would treat as custom code) draws exactly
    the stock class's values, composite sub-models (the vision tower's scaled init) included."""
    import copy

    stock_class, ours_class = type(tiny_model(key, stock=True)), type(tiny_model(key))
    stock_config = tiny_model(key, stock=True).config
    ours_config = type(tiny_model(key).config)(
        **{name: value for name, value in stock_config.to_dict().items() if name != "model_type"}, prune_visual_tokens=False
    )
    initialized = []
    for model_class, config in ((stock_class, stock_config), (ours_class, ours_config)):
        torch.manual_seed(0)
        model = model_class.from_pretrained(None, config=copy.deepcopy(config), state_dict={})  # every weight missing
        initialized.append(model.state_dict())
    stock, ours = initialized
    assert ours.keys() == stock.keys()
    assert [name for name in stock if not torch.equal(ours[name], stock[name])] == []


@pytest.mark.parametrize("key", list(REGISTRY))
def test_a_class_built_with_our_config_finds_the_stock_checkpoint_conversions(key, tiny_model):
    """transformers looks a model's checkpoint key conversions up by class name, then by its config's
    model_type: the stock base model (what transformers' tests build with our config) finds with our
    config the conversions it finds with the stock config (legacy checkpoint layouts load, and saving
    reverses them, alike)."""
    from transformers import MODEL_MAPPING
    from transformers.conversion_mapping import get_model_conversion_mapping

    stock_config, ours_config = tiny_model(key, stock=True).config, tiny_model(key).config
    base_class = MODEL_MAPPING[type(stock_config)]
    with torch.device("meta"):
        ours, stock = (get_model_conversion_mapping(base_class(config)) for config in (ours_config, stock_config))
    assert stock and repr(ours) == repr(stock)


def test_stock_config_of_gives_the_stock_config_of_the_same_model(tiny_model):
    """stock_config_of (what the stock heads of an MFPruner repo are built from): the stock config
    class, no MFPruner field, every other value as in the stock repo's config."""
    from configuration_mfpruner import MFPRUNER_CONFIG_FIELDS, stock_config_of

    for key in REGISTRY:
        stock, ours = tiny_model(key, stock=True).config, stock_config_of(tiny_model(key).config)
        assert type(ours) is type(stock) and not set(MFPRUNER_CONFIG_FIELDS) & set(ours.to_dict())
        assert config_values(ours) == config_values(stock)


# ----------------------------------------------------------------------------- Qwen2.5-VL specifics


def test_qwen_forward_with_the_old_cache_name_fills_that_cache(qwen_model, qwen_stock_model, qwen_processing):
    """`past_key_values=` (the deprecated name the stock model still maps to `cache`) reaches the
    stock code untouched: the given cache is the one filled, as in the stock model."""
    from transformers import DynamicCache

    tokenizer, image_processor = qwen_processing
    inputs = qwen_inputs(tokenizer, image_processor, [qwen_chat()], images=[random_image(1, (112, 84))])
    stock = stock_twin_of(qwen_model, qwen_stock_model)
    caches = [DynamicCache(config=qwen_model.config), DynamicCache(config=qwen_model.config)]
    with torch.no_grad():
        ours = qwen_model(**inputs, past_key_values=caches[0], use_cache=True, prune_visual_tokens=False)
        theirs = stock(**inputs, past_key_values=caches[1], use_cache=True)
        assert output_cache(ours) is caches[0] and output_cache(theirs) is caches[1]
        assert caches[0].get_seq_length() == caches[1].get_seq_length() == inputs["input_ids"].shape[1]
        torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
        for a, b in zip(caches[0].layers, caches[1].layers):
            torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)
        pruned_cache = DynamicCache(config=qwen_model.config)
        pruned = qwen_model(**inputs, past_key_values=pruned_cache, use_cache=True)
    assert output_cache(pruned) is pruned_cache and pruned_cache.get_seq_length() == pruned.pruning.lm_input_length


def test_qwen_generate_from_embeddings_with_pixels_pruning_off_equals_stock(qwen_model, qwen_stock_model, qwen_processing):
    tokenizer, image_processor = qwen_processing
    inputs = qwen_inputs(tokenizer, image_processor, [qwen_chat()], images=[random_image(1, (112, 84))])
    stock = stock_twin_of(qwen_model, qwen_stock_model)
    embeds = qwen_model.get_input_embeddings()(inputs["input_ids"])
    call = dict(
        inputs_embeds=embeds,
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        **GREEDY,
    )
    ours = qwen_model.generate(**call, prune_visual_tokens=False)
    theirs = stock.generate(**call)
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- CLIP text tower


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    path = build_tiny_llava(tmp_path_factory.mktemp("clip") / "clip", clip_text=True)
    return AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()


def test_clip_tower_fallback_warns_once_and_is_recorded(clip_model, llava_processor, caplog):
    inputs = llava_processor(images=random_image(0), text=LLAVA_PROMPT, return_tensors="pt")
    clip_ids = torch.randint(5, 300, (1, 2, 16))
    with caplog.at_level(logging.WARNING, logger="mfpruner_pipeline"):
        out = clip_model.generate(**inputs, clip_input_ids=clip_ids, return_dict_in_generate=True, **GREEDY)
        assert out.pruning.relevance_source == "clip_text"
        assert not [r for r in caplog.records if "falls back" in r.getMessage()]
        threads = [
            threading.Thread(target=lambda: clip_model.generate(**inputs, **GREEDY)) for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        out = clip_model.generate(**inputs, return_dict_in_generate=True, **GREEDY)
    assert out.pruning.relevance_source == "llm"
    assert len([r for r in caplog.records if "falls back" in r.getMessage()]) == 1


def test_auto_device_map_keeps_the_clip_tower_with_the_vision_tower(clip_model):
    """Two devices, the first big enough for the vision side only: the CLIP text tower and its
    projection land with the vision tower, not after lm_head on the last device."""
    from accelerate import infer_auto_device_map

    def size(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    vision_side = sum(
        size(m) for m in (clip_model.clip_text_model, clip_model.clip_visual_projection, clip_model.model.vision_tower)
    )
    device_map = infer_auto_device_map(
        clip_model,
        max_memory={0: int(vision_side * 1.5), 1: size(clip_model) * 2},
        no_split_module_classes=clip_model._no_split_modules,
    )

    def device_of(module_name):
        owners = [d for name, d in device_map.items() if module_name == name or module_name.startswith(name + ".")]
        inside = {d for name, d in device_map.items() if name.startswith(module_name + ".")}
        return set(owners) | inside

    assert device_of("clip_text_model") == device_of("clip_visual_projection") == device_of("model.vision_tower") == {0}
    assert device_of("lm_head") == {1}


# ----------------------------------------------------------------------------- split device map


def test_split_device_map_gives_the_unsplit_tokens_and_logits(family, request, tmp_path):
    """Vision side on the CPU, the language model offloaded to disk (accelerate hooks move weights
    and activations between them): the same kept tokens, logits and greedy tokens as the unsplit
    model. (`python -m tools.gpu_check device-map` is the same check with the language model on a GPU.)"""
    repo = request.getfixturevalue("tiny_repo")(family.key)
    if family.name in QWEN_FAMILIES:
        device_map = {"model.visual": "cpu", "model.language_model": "disk", "lm_head": "cpu"}
    else:
        device_map = {
            "model.vision_tower": "cpu",
            "model.multi_modal_projector": "cpu",
            "model.language_model": "disk",
            "lm_head": "cpu",
        }
    if family.name == "llava_next":
        device_map["model.image_newline"] = "cpu"
    split = AutoModelForImageTextToText.from_pretrained(
        repo, trust_remote_code=True, device_map=device_map, offload_folder=str(tmp_path)
    ).eval()
    inputs = family.single
    with torch.no_grad():
        ours = split(**inputs, visual_token_budget=5)
        reference = family.model(**inputs, visual_token_budget=5)
    # accelerate's device-map hooks rebuild the output object: the result is in `last_pruning`
    assert [k.tolist() for k in split.last_pruning.keep_indices] == [k.tolist() for k in reference.pruning.keep_indices]
    torch.testing.assert_close(ours.logits, reference.logits)
    assert torch.equal(split.generate(**inputs, **GREEDY), family.model.generate(**inputs, **GREEDY))


# ----------------------------------------------------------------------------- shipped imports


SHIPPED = ["mfpruner_core.py", "mfpruner_pipeline.py", "configuration_mfpruner.py", "modeling_mfpruner_llava.py",
           "modeling_mfpruner_qwen2_5_vl.py", "modeling_mfpruner_qwen3_vl.py", "modeling_mfpruner_qwen3_5.py",
           "processing_mfpruner.py", "mfpruner_visualize.py"]


def transformers_imports(path: Path) -> list[tuple[str, str, bool]]:
    """(module, name, guarded) of every `from transformers... import name` in a file; guarded:
    inside a try block that catches ImportError."""
    found = []

    def visit(node, guarded):
        for child in ast.iter_child_nodes(node):
            child_guarded = guarded
            if isinstance(child, ast.Try):
                child_guarded = guarded or any(
                    "ImportError" in ast.unparse(handler.type or ast.Name("BaseException")) for handler in child.handlers
                )
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("transformers"):
                found.extend((child.module, alias.name, guarded) for alias in child.names)
            if isinstance(child, ast.Import):
                found.extend((alias.name, "", guarded) for alias in child.names if alias.name.startswith("transformers"))
            visit(child, child_guarded)

    visit(ast.parse(path.read_text()), False)
    return found


def test_shipped_files_import_only_public_transformers_api():
    """Public: names exported by the top-level `transformers` package, and model-layer classes of
    a stock modeling file (`transformers.models.<x>.modeling_<x>.<Class>`, what remote code
    subclasses). Anything else (helpers, `transformers.conversion_mapping`, `vision_utils`, ...)
    must be copied in, or imported inside a try/except ImportError that keeps the file loading."""
    import importlib
    import inspect as inspect_module

    import transformers

    listing = {}
    for name in SHIPPED:
        for module, imported, guarded in transformers_imports(ROOT / name):
            listing.setdefault(name, []).append(f"{module}:{imported}{' (guarded)' if guarded else ''}")
            parts = module.split(".")
            if any(part.startswith("_") for part in parts) or imported.startswith("_"):
                raise AssertionError(f"{name} imports private {module}.{imported}")
            if module == "transformers":
                assert hasattr(transformers, imported), (name, imported)
                continue
            stock_layer = (
                len(parts) == 4 and parts[1] == "models" and parts[3] == f"modeling_{parts[2]}"
                and inspect_module.isclass(getattr(importlib.import_module(module), imported, None))
            )
            assert stock_layer or guarded, f"{name} imports {module}.{imported} outside the public API"
    assert listing["modeling_mfpruner_qwen2_5_vl.py"] == [
        "transformers:GenerationMixin",
        "transformers:Qwen2_5_VLForConditionalGeneration",
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLVisionAttention",
    ]
    assert listing["modeling_mfpruner_qwen3_vl.py"] == [
        "transformers:GenerationMixin",
        "transformers:Qwen3VLForConditionalGeneration",
        "transformers:Qwen3VLMoeForConditionalGeneration",
        "transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLVisionAttention",
        "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe:Qwen3VLMoeVisionAttention",
    ]
    assert listing["modeling_mfpruner_qwen3_5.py"] == [
        "transformers:GenerationMixin",
        "transformers:Qwen3_5ForCausalLM",  # the stock heads the repo's other Auto classes give
        "transformers:Qwen3_5ForConditionalGeneration",
        "transformers:Qwen3_5ForSequenceClassification",
        "transformers:Qwen3_5ForTokenClassification",
        "transformers:Qwen3_5MoeForCausalLM",
        "transformers:Qwen3_5MoeForConditionalGeneration",
        "transformers.models.qwen3_5.modeling_qwen3_5:Qwen3_5VisionAttention",
        "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe:Qwen3_5MoeVisionAttention",
    ]
    assert all(m.endswith("(guarded)") for m in listing["mfpruner_pipeline.py"])


def test_shipped_files_still_load_when_transformers_moves_the_conversion_mapping(tmp_path):
    """With `transformers.conversion_mapping` gone the modeling files import (with a warning)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import sys, logging
        logging.basicConfig()
        sys.path.insert(0, {str(ROOT)!r})
        from transformers import CLIPTextModelWithProjection, LlavaForConditionalGeneration  # load them first
        from transformers import LlavaNextForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
        import transformers.conversion_mapping as moved  # then: as if transformers moved the helpers
        del moved.get_checkpoint_conversion_mapping, moved.register_checkpoint_conversion_mapping
        import modeling_mfpruner_llava, modeling_mfpruner_qwen2_5_vl, modeling_mfpruner_qwen3_vl, modeling_mfpruner_qwen3_5
        print("LOADED")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "LOADED" in done.stdout, done.stderr
    assert "transformers.conversion_mapping is not available" in done.stderr


def test_hub_loaded_result_is_the_class_of_the_repo_s_own_core(family):
    """A hub-loaded model runs the repo's own copy of the code: its result is an instance of the
    `MFPrunerResult` of the `mfpruner_core` module that the model's modeling module imported, and
    that core sits in the same loaded repo (transformers_modules.<repo>), not this checkout."""
    import sys

    modeling = sys.modules[type(family.model).__module__]
    assert modeling.__package__ and modeling.__name__.startswith("transformers_modules.")
    pipeline = sys.modules[modeling.MFPrunerPipelineMixin.__module__]  # the pipeline this modeling file imported
    core = sys.modules[pipeline.MFPrunerResult.__module__]
    assert pipeline.__name__ == f"{modeling.__package__}.mfpruner_pipeline"
    assert core.__name__ == f"{modeling.__package__}.mfpruner_core"
    with torch.no_grad():
        out = family.model(**family.single, visual_token_budget=3)
    assert type(out.pruning) is core.MFPrunerResult
    assert type(family.model.last_pruning) is core.MFPrunerResult


@pytest.mark.parametrize("as_package", [False, True])
@pytest.mark.parametrize("shipped", ["configuration_mfpruner.py", "mfpruner_pipeline.py", "modeling_mfpruner_llava.py",
                                     "modeling_mfpruner_qwen2_5_vl.py", "modeling_mfpruner_qwen3_vl.py",
                                     "modeling_mfpruner_qwen3_5.py"])
def test_a_real_import_error_in_a_shipped_module_surfaces(tmp_path, shipped, as_package):
    """A sibling that fails to import (here: mfpruner_core imports a missing package) stops the
    import with that error, both as a checkout's top-level modules and as a package (the way
    transformers loads remote code); no fallback import hides it, not even with a working
    checkout importable next to the package."""
    import subprocess
    import sys

    folder = tmp_path / "repo" if as_package else tmp_path
    folder.mkdir(exist_ok=True)
    for name in SHIPPED:
        (folder / name).write_text((ROOT / name).read_text())
    core = (ROOT / "mfpruner_core.py").read_text()
    assert "\nimport math\n" in core
    (folder / "mfpruner_core.py").write_text(core.replace("\nimport math\n", "\nimport math\nimport mfpruner_missing_dependency\n", 1))
    if as_package:  # a working checkout next to the package: a fallback import would silently take it
        for name in SHIPPED:
            (tmp_path / name).write_text((ROOT / name).read_text())
    module = f"repo.{shipped[:-3]}" if as_package else shipped[:-3]
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    raised = done.stderr.strip().splitlines()[-1]  # the error that ended the import, not one it chained
    assert raised == "ModuleNotFoundError: No module named 'mfpruner_missing_dependency'", done.stderr


def test_saved_repo_loads_outside_the_checkout(llava_repo, qwen_repo, tiny_repo, tmp_path):
    """Remote code loads where this checkout is not importable (a user's machine): transformers'
    import check must not ask for `mfpruner_core` etc. as installed packages."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"for repo in ({str(llava_repo)!r}, {str(qwen_repo)!r}, {str(tiny_repo('qwen3-vl'))!r}, {str(tiny_repo('qwen3.5'))!r}):\n"
        "    model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)\n"
        "    assert type(model).__module__.startswith('transformers_modules.'), type(model).__module__\n"
        "assert 'mfpruner_core' not in sys.modules\n"
        "print('LOADED')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "LOADED" in done.stdout, done.stderr
