"""Session fixtures: tiny models built once, loaded through the real remote-code path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from mfpruner_lib.families import FAMILIES  # noqa: E402


def random_image(seed: int, size=(96, 80), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def refused(main, argv: list[str], capsys) -> str:
    """Runs a tool's main(argv), which must refuse the input by the command-line rule
    (mfpruner_lib.cli): exit status 2 and one line `error: ...` on stderr, no traceback. Returns
    that line without `error: `."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err[-3000:]
    assert "Traceback" not in err
    return err.removeprefix("error: ").rstrip("\n")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Folder that holds this session's tiny model repos."""
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_repo(tiny_dir):
    """tiny_repo(key, stock=False): the tiny repo of a registry family (mfpruner_lib.families),
    built once per session: an MFPruner remote-code repo, or the stock checkpoint (same weights)."""
    built = {}

    def get(key: str, stock: bool = False) -> Path:
        if (key, stock) not in built:
            family = FAMILIES[key]
            folder = tiny_dir / (f"{family.model_type}-stock" if stock else f"mfpruner-{family.model_type}")
            built[key, stock] = family.build_tiny(folder, stock=stock)
        return built[key, stock]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_repo):
    """tiny_model(key, stock=False): that repo loaded once per session, eval mode; the MFPruner one
    through the real remote-code path (AutoModelForImageTextToText, trust_remote_code)."""
    import transformers

    loaded = {}

    def get(key: str, stock: bool = False):
        if (key, stock) not in loaded:
            path = tiny_repo(key, stock)
            if stock:
                model = getattr(transformers, FAMILIES[key].stock_model_class).from_pretrained(path)
            else:
                model = transformers.AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
            loaded[key, stock] = model.eval()
        return loaded[key, stock]

    return get


# ----------------------------------------------------------------------------- LLaVA-1.5


@pytest.fixture(scope="session")
def llava_repo(tiny_repo) -> Path:
    return tiny_repo("llava-1.5")


@pytest.fixture(scope="session")
def llava_stock_repo(tiny_repo) -> Path:
    return tiny_repo("llava-1.5", stock=True)


@pytest.fixture(scope="session")
def llava_processor(llava_repo):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_repo, trust_remote_code=True)


@pytest.fixture(scope="session")
def llava_model(tiny_model):
    return tiny_model("llava-1.5")


@pytest.fixture(scope="session")
def llava_stock_model(tiny_model):
    return tiny_model("llava-1.5", stock=True)


# ----------------------------------------------------------------------------- Qwen2.5-VL


@pytest.fixture(scope="session")
def qwen_repo(tiny_repo) -> Path:
    return tiny_repo("qwen2.5-vl")


@pytest.fixture(scope="session")
def qwen_stock_repo(tiny_repo) -> Path:
    return tiny_repo("qwen2.5-vl", stock=True)


@pytest.fixture(scope="session")
def qwen_model(tiny_model):
    return tiny_model("qwen2.5-vl")


@pytest.fixture(scope="session")
def qwen_stock_model(tiny_model):
    return tiny_model("qwen2.5-vl", stock=True)


@pytest.fixture(scope="session")
def qwen_processing(qwen_repo):
    """(tokenizer, image processor) of the tiny Qwen repo (see mfpruner_lib.tiny_models.qwen_inputs)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    return (
        AutoTokenizer.from_pretrained(qwen_repo, trust_remote_code=True),
        AutoImageProcessor.from_pretrained(qwen_repo, trust_remote_code=True),
    )


# ----------------------------------------------------------------------------- Qwen3-VL (dense and MoE)


@pytest.fixture(scope="session")
def qwen3_processing(tiny_repo):
    """(tokenizer, image processor) of the tiny Qwen3-VL repo (16 px patches; the MoE repo's are the same)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    repo = tiny_repo("qwen3-vl")
    return (
        AutoTokenizer.from_pretrained(repo, trust_remote_code=True),
        AutoImageProcessor.from_pretrained(repo, trust_remote_code=True),
    )


# ----------------------------------------------------------------------------- LLaVA-1.6 (LLaVA-NeXT)


@pytest.fixture(scope="session")
def llava_next_repo(tiny_repo) -> Path:
    return tiny_repo("llava-next")


@pytest.fixture(scope="session")
def llava_next_stock_repo(tiny_repo) -> Path:
    return tiny_repo("llava-next", stock=True)


@pytest.fixture(scope="session")
def llava_next_processor(llava_next_repo):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_next_repo, trust_remote_code=True)


@pytest.fixture(scope="session")
def llava_next_model(tiny_model):
    return tiny_model("llava-next")


@pytest.fixture(scope="session")
def llava_next_stock_model(tiny_model):
    return tiny_model("llava-next", stock=True)


# ----------------------------------------------------------------------------- checks shared by the model tests


def assert_loads_bit_identical(model_class, path, stock_model):
    """A stock checkpoint loaded into an MFPruner class: no missing / unexpected keys, every
    tensor equal to the stock model's (without a conversion mapping they come up random)."""
    import torch

    model, info = model_class.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    stock = stock_model.state_dict()
    ours = model.state_dict()
    assert ours.keys() == stock.keys()
    for name, tensor in stock.items():
        assert torch.equal(ours[name], tensor), name


def config_values(config) -> dict:
    """A config's values without the folder it was loaded from (`_name_or_path`)."""
    return {name: value for name, value in config.to_dict().items() if name != "_name_or_path"}


def assert_remote_code_repo(repo: Path, config_class: str, model_class: str):
    """save_pretrained wrote the auto_map for the three Auto classes and the code files, verbatim."""
    import json

    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_mfpruner.{config_class}",
        "AutoModel": f"modeling_mfpruner_llava.{model_class}",
        "AutoModelForImageTextToText": f"modeling_mfpruner_llava.{model_class}",
    }
    for name in ("configuration_mfpruner.py", "modeling_mfpruner_llava.py", "mfpruner_pipeline.py", "mfpruner_core.py"):
        assert (repo / name).read_text() == (ROOT / name).read_text()
    return config


def cache_keyword() -> str:
    """The cache's keyword in forward() / generate(): `cache` from transformers 5.25, before it
    `past_key_values` (the suite runs at both ends of the supported range)."""
    import inspect

    from transformers import GenerationMixin

    return "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"


def output_cache(output):
    """The cache on a forward() / generate() output, under either name (see cache_keyword)."""
    return getattr(output, "cache", None) if cache_keyword() == "cache" else output.past_key_values


def stock_twin_of(model, stock_model):
    """A model of the stock class holding exactly `model`'s weights: `stock_model` itself when it
    holds them already (the tiny repos of a family share their weights), else a copy loaded with
    them. (A deep copy of Qwen3-VL MoE gave generate() logits 1e-7 off the original's on the same
    weights: its grouped-experts kernels on CPU are not bit-stable across copies.)"""
    import copy

    import torch

    ours, theirs = model.state_dict(), stock_model.state_dict()
    if ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours):
        return stock_model
    twin = copy.deepcopy(stock_model)
    assert twin.state_dict().keys() == model.state_dict().keys()
    twin.load_state_dict(model.state_dict())
    return twin


def lm_input_lengths(model):
    """Records the sequence length of every language-model call (a hook, not our bookkeeping)."""
    lengths = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return lengths, handle


def greedy_without_cache(model, embeds, steps: int) -> list[int]:
    """Greedy decoding by recomputing the whole (1, L, D) sequence every step, no KV cache."""
    import torch

    embed = model.get_input_embeddings()
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            token = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, -1].argmax(-1)
            tokens.append(int(token))
            embeds = torch.cat([embeds, embed(token)[:, None]], dim=1)
    return tokens
