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
