"""Drop-in, the rest (issue 23): torch.compile(fullgraph=True) of forward() and of the decoding
steps after a pruned prefill, speculative decoding (a draft model, prompt lookup) with pruning,
and no deprecation warnings from our call paths. Checked the way transformers' generation tests
check a model (written here, not copied): compiled vs eager, assisted vs greedy."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from transformers import CompileConfig

from conftest import cache_keyword, output_cache
from test_drop_in_contracts import GREEDY, family  # noqa: F401 - the per-family fixture


def fullgraph_config() -> CompileConfig:
    """fullgraph=True is the property tested; the "eager" backend keeps the CPU tests quick."""
    config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    config._compile_all_devices = True  # transformers compiles on CUDA-like devices only, unless told
    return config


def compiled_forward(model):
    torch._dynamo.reset()
    return torch.compile(model.forward, fullgraph=True, backend="eager")


def text_part(inputs: dict) -> dict:
    """The prompt's first text tokens alone (no visual inputs): a call that never prunes."""
    return {"input_ids": inputs["input_ids"][:, :4], "attention_mask": inputs["attention_mask"][:, :4]}


# ----------------------------------------------------------------------------- torch.compile


def compiled_logits(model, call: dict, **kwargs):
    """Logits of forward() compiled with fullgraph=True, or the error's type where it does not compile."""
    with torch.no_grad():
        model(**call, **kwargs)  # transformers installs its output-capturing hooks at the first call
        try:
            return compiled_forward(model)(**call, **kwargs).logits
        except Exception as error:  # noqa: BLE001 - the stock class's outcome is the standard
            return type(error)


def test_forward_pruning_off_compiles_with_fullgraph(family):
    """A call without visual inputs (a decoding step) compiles; with pixel inputs and pruning off,
    ours compiles wherever the stock class does (LLaVA-NeXT's tile selection does not trace)."""
    model, stock, inputs = family.model, family.stock, family.single
    with torch.no_grad():
        eager = model(**text_part(inputs)).logits
    torch.testing.assert_close(compiled_logits(model, text_part(inputs)), eager, rtol=0, atol=0)
    ours = compiled_logits(model, inputs, prune_visual_tokens=False)
    theirs = compiled_logits(stock, inputs)
    if isinstance(theirs, type):  # the stock code does not trace here: nothing to match
        assert isinstance(ours, type)
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("settings", [{"visual_token_ratio": 0.5}, {"prune_visual_tokens": False}], ids=["pruned", "off"])
def test_static_cache_compiled_decoding_equals_eager(family, settings):
    """generate(cache_implementation="static", compile_config=fullgraph), pruning on or off: the
    prefill runs eagerly, every decoding step through the compiled forward (a graph break would
    raise; a second call must not recompile), and the tokens are the eager ones."""
    model, inputs = family.model, family.batch
    options = dict(GREEDY, max_new_tokens=5, cache_implementation="static", **settings)
    eager = model.generate(**inputs, **options, disable_compile=True)
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)
    config = fullgraph_config()
    try:
        compiled = model.generate(**inputs, **options, compile_config=config)
        assert "_compiled_call" in model.__dict__  # the decoding steps did go through torch.compile
        with torch.compiler.set_stance("fail_on_recompile"):  # and a second call reuses the graphs
            again = model.generate(**inputs, **options, compile_config=config)
    finally:
        model.__dict__.pop("_compiled_call", None)
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


# ----------------------------------------------------------------------------- speculative decoding


def stock_refusal_of_speculative_decoding(stock, draft: dict) -> str | None:
    """The stock class's own refusal of speculative decoding on a text prompt, or None (transformers
    5.23 refuses it for stateful models, e.g. Qwen3.5's linear-attention layers; 5.25 runs it)."""
    ids = torch.tensor([[1, 2, 3, 4]])
    try:
        stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, **draft)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("option", ["assistant_model", "prompt_lookup_num_tokens"])
@pytest.mark.parametrize("settings", [{"visual_token_ratio": 0.5}, {"visual_token_budget": 3}])
def test_speculative_decoding_with_pruning_equals_greedy(family, option, settings):
    """A draft model (the stock twin, run as a text model on the ids) or prompt lookup proposes
    tokens; the verifier continues from the pruned cache, so the tokens are greedy search's on the
    pruned prompt, and the returned cache continues like the plain call's."""
    model, inputs = family.model, family.single
    options = dict(GREEDY, max_new_tokens=6, return_dict_in_generate=True, **settings)
    draft = {"assistant_model": family.stock} if option == "assistant_model" else {"prompt_lookup_num_tokens": 2}
    refusal = stock_refusal_of_speculative_decoding(family.stock, draft)
    if refusal is not None:  # this transformers refuses it for the stock class: ours refuses it alike
        with pytest.raises(ValueError, match=re.escape(refusal.replace(type(family.stock).__name__, type(model).__name__))):
            model.generate(**inputs, **options, **draft)
        return
    greedy = model.generate(**inputs, **options)
    assisted = model.generate(**inputs, **options, **draft)
    assert torch.equal(assisted.sequences, greedy.sequences)
    assert assisted.pruning.lm_input_length == greedy.pruning.lm_input_length < inputs["input_ids"].shape[1]
    assert torch.equal(assisted.pruning.keep_mask, greedy.pruning.keep_mask)
    more = torch.cat([greedy.sequences, greedy.sequences[:, -2:]], dim=-1)
    mask = torch.ones_like(more)
    continued = [model.generate(input_ids=more, attention_mask=mask, **{cache_keyword(): output_cache(out)}, **GREEDY)
        for out in (greedy, assisted)]
    assert torch.equal(continued[0], continued[1])


def test_speculative_decoding_on_a_prompt_ending_with_a_kept_visual_token_is_refused(family):
    model, inputs = family.model, dict(family.single)
    ids = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]
    visual = torch.isin(inputs["input_ids"][0], torch.tensor([i for i in ids if i is not None]))
    end = int(visual.nonzero().max()) + 1
    for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if name in inputs:
            inputs[name] = inputs[name][:, :end]
    with pytest.raises(ValueError, match="assisted decoding with pruning needs a prompt that ends with text"):
        model.generate(**inputs, **GREEDY, prompt_lookup_num_tokens=2, visual_token_ratio=1.0)


# ----------------------------------------------------------------------------- deprecations


@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "stock"])
def test_our_call_paths_raise_no_deprecation_warning(family, prune):
    """generate() (also continuing from its cache) and forward() run with deprecation warnings as
    errors: nothing on our paths uses a name transformers is retiring (e.g. `past_key_values`)."""
    model, inputs = family.model, family.single
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            model(**inputs, prune_visual_tokens=prune)
        out = model.generate(**inputs, **GREEDY, prune_visual_tokens=prune, return_dict_in_generate=True)
        more = torch.cat([out.sequences, out.sequences[:, -1:]], dim=-1)
        model.generate(input_ids=more, attention_mask=torch.ones_like(more), **{cache_keyword(): output_cache(out)}, **GREEDY)
