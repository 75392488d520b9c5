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

from tools.tiny_models import build_tiny_llava  # noqa: E402


def random_image(seed: int, size=(96, 80), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Folder that holds this session's tiny model repos."""
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def llava_repo(tiny_dir) -> Path:
    return build_tiny_llava(tiny_dir / "mfpruner-llava")


@pytest.fixture(scope="session")
def llava_stock_repo(tiny_dir) -> Path:
    return build_tiny_llava(tiny_dir / "llava-stock", stock=True)


@pytest.fixture(scope="session")
def llava_processor(llava_repo):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_repo, trust_remote_code=True)


@pytest.fixture(scope="session")
def llava_model(llava_repo):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(llava_repo, trust_remote_code=True).eval()


@pytest.fixture(scope="session")
def llava_stock_model(llava_stock_repo):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(llava_stock_repo).eval()


# ----------------------------------------------------------------------------- Qwen2.5-VL


@pytest.fixture(scope="session")
def qwen_repo(tiny_dir) -> Path:
    from tools.tiny_models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tiny_dir / "mfpruner-qwen2_5_vl")


@pytest.fixture(scope="session")
def qwen_stock_repo(tiny_dir) -> Path:
    from tools.tiny_models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tiny_dir / "qwen2_5_vl-stock", stock=True)


@pytest.fixture(scope="session")
def qwen_model(qwen_repo):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(qwen_repo, trust_remote_code=True).eval()


@pytest.fixture(scope="session")
def qwen_stock_model(qwen_stock_repo):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_stock_repo).eval()


@pytest.fixture(scope="session")
def qwen_processing(qwen_repo):
    """(tokenizer, image processor) of the tiny Qwen repo (see tools.tiny_models.qwen_inputs)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    return (
        AutoTokenizer.from_pretrained(qwen_repo, trust_remote_code=True),
        AutoImageProcessor.from_pretrained(qwen_repo, trust_remote_code=True),
    )


# ----------------------------------------------------------------------------- LLaVA-1.6 (LLaVA-NeXT)


@pytest.fixture(scope="session")
def llava_next_repo(tiny_dir) -> Path:
    from tools.tiny_models import build_tiny_llava_next

    return build_tiny_llava_next(tiny_dir / "mfpruner-llava-next")


@pytest.fixture(scope="session")
def llava_next_stock_repo(tiny_dir) -> Path:
    from tools.tiny_models import build_tiny_llava_next

    return build_tiny_llava_next(tiny_dir / "llava-next-stock", stock=True)


@pytest.fixture(scope="session")
def llava_next_processor(llava_next_repo):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_next_repo, trust_remote_code=True)


@pytest.fixture(scope="session")
def llava_next_model(llava_next_repo):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(llava_next_repo, trust_remote_code=True).eval()


@pytest.fixture(scope="session")
def llava_next_stock_model(llava_next_stock_repo):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(llava_next_stock_repo).eval()


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


def stock_twin_of(model, stock_model):
    """A copy of the stock class holding exactly `model`'s weights."""
    import copy

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
