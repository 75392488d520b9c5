"""The vLLM plugin (mfpruner_vllm) against the transformers classes, on the same tiny checkpoint.

vLLM lives in its own virtual environment (.venv-vllm, built by tools/setup_vllm_env.sh): this
module computes the transformers reference here and runs tests/vllm_worker.py there once per
model (one vLLM load), then compares: kept indices (`last_pruning`), prompt lengths, greedy ids
and per-step log-probabilities. Skips when the vLLM environment is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, random_image
from mfpruner_core import LAYOUT_NEWLINE

VENV_PYTHON = Path(os.environ.get("MFPRUNER_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
STEPS = 4
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"

pytestmark = pytest.mark.skipif(not VENV_PYTHON.exists(), reason=f"no vLLM environment at {VENV_PYTHON} (tools/setup_vllm_env.sh)")


def run_worker(tmp_path: Path, repo: Path, cases: list[dict], **options) -> dict:
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"repo": str(repo), "cases": cases, **options}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [str(VENV_PYTHON), str(ROOT / "tests" / "vllm_worker.py"), str(spec), str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {entry["name"]: entry for entry in json.loads(out.read_text())}


def save_images(folder: Path, sizes: list[tuple[int, int]], seed: int) -> list[str]:
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"image-{seed}-{i}.png"  # PNG: the same pixels on both sides
        random_image(seed + i, size).save(path)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- LLaVA-1.5

LLAVA_CASES = [
    # name, prompt, image sizes, mm_processor_kwargs, image seed
    ("single", PROMPT, [(96, 80)], None, 0),
    ("budget-override", PROMPT, [(96, 80)], {"visual_token_budget": 5}, 0),
    ("ratio-override", PROMPT, [(120, 90)], {"visual_token_ratio": 0.25}, 20),
    ("same-image-other-prompt", "USER: <image>\nDescribe the picture in detail. Is there a dog? ASSISTANT:", [(96, 80)], None, 0),
    ("two-images", "USER: <image>\n<image>\nHow many people are there? ASSISTANT:", [(64, 96), (100, 70)], None, 40),
    ("bad-budget", PROMPT, [(96, 80)], {"visual_token_budget": 0}, 0),
    ("after-bad-budget", PROMPT, [(96, 80)], {"visual_token_budget": 3}, 0),
]
# Several requests in one generate call: different image sizes, budgets and prompts.
LLAVA_BATCH = [
    (PROMPT, [(96, 80)], {"visual_token_budget": 2}),
    ("USER: <image>\nWhat color is the car? ASSISTANT:", [(150, 60)], None),
    ("USER: <image>\n<image>\nIs there a dog? ASSISTANT:", [(84, 84), (40, 120)], {"visual_token_ratio": 0.5}),
]


def reference_generation(model, inputs, mm_kwargs, visual_token_ids):
    """Greedy ids, per-step log-probabilities, kept indices and pruned prompt ids of the transformers class."""
    with torch.no_grad():
        out = model.generate(
            **inputs, **(mm_kwargs or {}), max_new_tokens=STEPS, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[token]) for step, token in zip(out.logits, new)]
    pruning = model.last_pruning
    ids = inputs["input_ids"][0]
    visual = torch.isin(ids, torch.tensor(visual_token_ids)).nonzero()[:, 0]
    starts = torch.tensor([0, *pruning.num_visual_tokens]).cumsum(0)
    kept = torch.cat([visual[start + idx] for start, idx in zip(starts.tolist(), pruning.keep_indices)])
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[visual] = False
    keep[kept] = True
    return {
        "token_ids": new,
        "logprobs": logprobs,
        "keep_indices": [idx.tolist() for idx in pruning.keep_indices],
        "prompt_token_ids": ids[keep].tolist(),
    }


def save_videos(folder: Path, videos: list[tuple[int, int, int, float]], seed: int) -> list[dict]:
    """Random (T, H, W, 3) uint8 frames per (frames, height, width, fps), saved as .npy: the same
    frames on both sides; returns the worker's video specs ({"path", "fps"})."""
    import numpy as np

    specs = []
    for i, (frames, height, width, fps) in enumerate(videos):
        path = folder / f"video-{seed}-{i}.npy"
        np.save(path, np.random.default_rng(seed + i).integers(0, 256, (frames, height, width, 3), dtype=np.uint8))
        specs.append({"path": str(path), "fps": fps})
    return specs


def collect_runs(folder, repo, cases, batch, reference, unreferenced=(), case_options=None, **options):
    """Writes the images (and videos), computes every reference, runs vLLM once on all cases (then
    the `unreferenced` worker specs, then the batch). A case or batch entry may end with a list of
    videos (frames, height, width, fps); then `reference` also gets `videos=` (the worker's video
    specs). case_options: {case name: worker case settings}; options: worker spec settings."""

    def request(prompt, sizes, mm_kwargs, seed, videos=None):
        entry = {"prompt": prompt, "images": save_images(folder, sizes, seed), "mm_processor_kwargs": mm_kwargs}
        if videos:
            entry["videos"] = save_videos(folder, videos, seed)
        return entry

    def reference_of(entry):
        videos = {"videos": entry["videos"]} if "videos" in entry else {}
        return reference(entry["prompt"], entry["images"], entry["mm_processor_kwargs"], **videos)

    specs, references = [], {}
    for name, prompt, sizes, mm_kwargs, seed, *videos in cases:
        entry = request(prompt, sizes, mm_kwargs, seed, *videos)
        specs.append({"name": name, "requests": [entry], "steps": STEPS, **(case_options or {}).get(name, {})})
        references[name] = [reference_of(entry)]
    specs.extend(unreferenced)
    requests = [request(prompt, sizes, mm_kwargs, 100 + 10 * j, *videos) for j, (prompt, sizes, mm_kwargs, *videos) in enumerate(batch)]
    specs.append({"name": "batch", "requests": requests, "steps": STEPS})
    references["batch"] = [reference_of(entry) for entry in requests]
    return run_worker(folder, repo, specs, **options), references


def or_error(compute):
    try:
        return compute()
    except ValueError as error:
        return {"error": str(error)}


@pytest.fixture(scope="session")
def llava_hub_repo(tiny_dir):
    """A tiny MFPruner LLaVA-1.5 repo in the hub key layout (`vision_tower.vision_model.*`), what
    tools.export writes and what vLLM loads."""
    from mfpruner_lib.tiny_models import build_tiny_llava

    return build_tiny_llava(tiny_dir / "mfpruner-llava-hub", hub_layout=True, text_heads=2, visual_token_budget=8)


def llava_family_runs(repo, folder, cases, batch):
    """(vLLM results, transformers references) of a LLaVA-1.5 or LLaVA-NeXT repo, vLLM loaded once.
    A reference also counts each image's image-newline tokens and candidates (the others)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

    def reference(prompt, paths, mm_kwargs):
        images = [Image.open(p).convert("RGB") for p in paths]
        inputs = processor(images=images, text=prompt, return_tensors="pt")
        result = or_error(lambda: reference_generation(model, inputs, mm_kwargs, [model.config.image_token_id]))
        if "error" not in result:
            pruning = model.last_pruning
            result["relevance_source"] = pruning.relevance_source
            result["newlines"] = [int((layout[:, 0] == LAYOUT_NEWLINE).sum()) for layout in pruning.layouts]
            result["candidates"] = [n - newlines for n, newlines in zip(pruning.num_visual_tokens, result["newlines"])]
        return result

    return collect_runs(folder, repo, cases, batch, reference)


@pytest.fixture(scope="session")
def llava_runs(llava_hub_repo, tmp_path_factory):
    """(vLLM results, transformers references) for every LLaVA case, vLLM loaded once."""
    return llava_family_runs(llava_hub_repo, tmp_path_factory.mktemp("vllm-llava"), LLAVA_CASES, LLAVA_BATCH)


def assert_same_generation(ours: dict, reference: dict):
    assert ours["prompt_token_ids"] == reference["prompt_token_ids"]
    assert ours["token_ids"] == reference["token_ids"]
    # float32 on both sides: ~1e-4 apart; the kept tokens at wrong M-RoPE positions move them by 1e-3 and more
    assert ours["logprobs"] == pytest.approx(reference["logprobs"], abs=5e-4)


def assert_same_bfloat16_generation(ours: dict, reference: dict):
    """bfloat16 on both sides (vLLM's CPU Gated DeltaNet kernel takes nothing else): the pruned prompt
    is exact and the log-probabilities ~2e-3 apart, so a near-tie may pick another token some steps
    in; the steps are compared up to the first different token, the first (the prefill's) always."""
    assert ours["prompt_token_ids"] == reference["prompt_token_ids"]
    pairs = list(zip(ours["token_ids"], reference["token_ids"]))
    agree = next((step for step, (a, b) in enumerate(pairs) if a != b), len(pairs))
    assert agree >= 1 and len(pairs) == STEPS
    assert ours["logprobs"][:agree] == pytest.approx(reference["logprobs"][:agree], abs=1e-2)


@pytest.mark.parametrize("name", ["single", "budget-override", "ratio-override", "same-image-other-prompt", "two-images", "after-bad-budget"])
def test_llava_keeps_the_transformers_tokens_and_generates_the_same(llava_runs, name):
    results, references = llava_runs
    ours, reference = results[name], references[name][0]
    assert "error" not in ours, ours.get("error")
    assert ours["keep_indices"] == reference["keep_indices"]
    assert_same_generation(ours["requests"][0], reference)


def test_llava_budget_sets_the_number_of_placeholders(llava_runs):
    results, references = llava_runs
    assert [len(i) for i in results["single"]["keep_indices"]] == [8]  # config.json's budget
    assert [len(i) for i in results["budget-override"]["keep_indices"]] == [5]
    assert [len(i) for i in results["ratio-override"]["keep_indices"]] == [9]  # round(0.25 * 36)
    assert [len(i) for i in results["two-images"]["keep_indices"]] == [8, 8]


def test_llava_instruction_is_part_of_the_encoder_cache_key(llava_runs):
    """The same image with another prompt is selected again (relevance reads the instruction)."""
    results, references = llava_runs
    assert references["single"][0]["keep_indices"] != references["same-image-other-prompt"][0]["keep_indices"]
    assert results["single"]["keep_indices"] != results["same-image-other-prompt"]["keep_indices"]


def test_llava_engine_keeps_serving_after_a_bad_budget(llava_runs):
    results, _ = llava_runs
    assert "error" in results["bad-budget"]
    assert results["after-bad-budget"]["requests"][0]["token_ids"]


# ----------------------------------------------------------------------------- LLaVA-1.5 with the CLIP text tower

LONG_QUESTION = "What is in the image? Describe the picture in detail. How many people are there? Is there a dog?"
LLAVA_CLIP_CASES = [
    ("single", PROMPT, [(96, 80)], None, 0),
    ("same-image-other-prompt", "USER: <image>\nIs there a red car on the left? ASSISTANT:", [(96, 80)], None, 0),
    ("long-instruction", f"USER: <image>\n{LONG_QUESTION} ASSISTANT:", [(120, 90)], {"visual_token_budget": 5}, 20),  # 2 CLIP windows
    ("two-images", "USER: <image>\n<image>\nHow many people are there? ASSISTANT:", [(64, 96), (100, 70)], None, 40),
]
LLAVA_CLIP_BATCH = [
    (PROMPT, [(96, 80)], {"visual_token_budget": 2}),
    ("USER: <image>\nWhat color is the car? ASSISTANT:", [(150, 60)], None),
]


@pytest.fixture(scope="session")
def llava_clip_repo(tiny_dir):
    """A tiny LLaVA-1.5 repo exported with `--clip-text` from a hub-layout base (32-wide text
    heads): the CLIP text tower, MFPrunerLlavaProcessor with the CLIP tokenizer."""
    from mfpruner_lib.tiny_models import build_tiny_clip, build_tiny_llava, rewrite_as_hub_layout
    from tools.export import export

    base = rewrite_as_hub_layout(build_tiny_llava(tiny_dir / "llava-clip-vllm-base", stock=True, text_heads=2, seed=3))
    clip = build_tiny_clip(tiny_dir / "clip-vllm", vision_from=base)
    out = tiny_dir / "mfpruner-llava-clip-vllm"
    return export(str(base), out, budget=8, clip_text=str(clip), base_model="llava-hf/llava-1.5-7b-hf", overwrite=True)


@pytest.fixture(scope="session")
def llava_next_clip_repo(tiny_dir):
    """The same for LLaVA-NeXT (anyres tiles: the cue reads the packed tiles' select-layer features)."""
    from mfpruner_lib.tiny_models import build_tiny_clip, build_tiny_llava_next
    from tools.export import export

    base = build_tiny_llava_next(tiny_dir / "llava-next-clip-vllm-base", stock=True, hub_layout=True, text_heads=2, seed=3)
    clip = build_tiny_clip(tiny_dir / "clip-next-vllm", vision_from=base)
    out = tiny_dir / "mfpruner-llava-next-clip-vllm"
    return export(str(base), out, ratio=0.25, clip_text=str(clip), base_model="llava-hf/llava-v1.6-vicuna-7b-hf", overwrite=True)


@pytest.fixture(scope="session")
def llava_clip_runs(llava_clip_repo, tmp_path_factory):
    """(vLLM results, transformers references) for the CLIP-cue cases, vLLM loaded once."""
    return llava_family_runs(llava_clip_repo, tmp_path_factory.mktemp("vllm-llava-clip"), LLAVA_CLIP_CASES, LLAVA_CLIP_BATCH)


@pytest.fixture(scope="session")
def llava_next_clip_runs(llava_next_clip_repo, tmp_path_factory):
    return llava_family_runs(llava_next_clip_repo, tmp_path_factory.mktemp("vllm-llava-next-clip"), LLAVA_CLIP_CASES, LLAVA_CLIP_BATCH)


@pytest.mark.parametrize("runs", ["llava_clip_runs", "llava_next_clip_runs"])
@pytest.mark.parametrize("name", ["single", "same-image-other-prompt", "long-instruction", "two-images"])
def test_llava_clip_text_cue_keeps_the_transformers_tokens(request, runs, name):
    """The paper's relevance cue: the plugin runs the repo's CLIP text tower on the instruction
    (found in the prompt as the repo's processor finds it) and keeps the transformers class's tokens."""
    results, references = request.getfixturevalue(runs)
    ours, reference = results[name], references[name][0]
    assert reference["relevance_source"] == "clip_text"
    assert "error" not in ours, ours.get("error")
    assert ours["keep_indices"] == reference["keep_indices"]
    assert_same_generation(ours["requests"][0], reference)


@pytest.mark.parametrize("runs, repo", [("llava_clip_runs", "llava_clip_repo"), ("llava_next_clip_runs", "llava_next_clip_repo")])
def test_llava_clip_batch_and_the_cue_reads_the_instruction(request, runs, repo, tmp_path):
    """A batch with different prompts and budgets; and the CLIP cue decides: the LLM-space cue
    (the plugin's only one before) keeps other tokens for one of these prompts."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    results, references = request.getfixturevalue(runs)
    repo = request.getfixturevalue(repo)
    for ours, reference in zip(results["batch"]["requests"], references["batch"]):
        assert_same_generation(ours, reference)
    model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, relevance_source="llm").eval()
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    differ = []
    for name, prompt, sizes, mm_kwargs, seed in LLAVA_CLIP_CASES:
        images = [Image.open(p).convert("RGB") for p in save_images(tmp_path, sizes, seed)]
        inputs = processor(images=images, text=prompt, return_tensors="pt")
        llm_kept = reference_generation(model, inputs, mm_kwargs, [model.config.image_token_id])["keep_indices"]
        differ.append(llm_kept != results[name]["keep_indices"])
    assert any(differ)


# ----------------------------------------------------------------------------- Qwen2.5-VL

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def qwen_prompt(question: str, images: int = 1, items: str | None = None) -> str:
    """A Qwen chat prompt: `images` image placeholders (or the given `items` placeholders), then the question."""
    return f"<|im_start|>user\n{QWEN_IMAGE * images if items is None else items}{question}<|im_end|>\n<|im_start|>assistant\n"


QWEN_IMAGE_CASES = [
    ("single", qwen_prompt("What is in the image?"), [(96, 80)], None, 0),
    ("budget-override", qwen_prompt("What is in the image?"), [(96, 80)], {"visual_token_budget": 3}, 0),
    ("tall-image", qwen_prompt("Describe the picture in detail."), [(60, 170)], {"visual_token_ratio": 0.5}, 20),
    ("two-images", qwen_prompt("How many people are there?", images=2), [(64, 96), (140, 70)], None, 40),
    ("bad-ratio", qwen_prompt("What is in the image?"), [(96, 80)], {"visual_token_ratio": 1.5}, 0),
    ("uncached", qwen_prompt("What is in the picture?"), [(80, 110)], None, 60),  # selection cache off
]
QWEN_CASES = QWEN_IMAGE_CASES + [
    # Videos (frames, height, width, fps): 2 frames per temporal patch, t positions step by
    # tokens_per_second (2) x 2 / fps. Each video's temporal extent stays within its width in
    # tokens: there vLLM's stock positions for the text after a video (its largest position + 1)
    # and transformers' (>= 5.3: + max(h, w) / 2) agree (docs/vllm.md).
    ("video", qwen_prompt("What happens?", items=QWEN_VIDEO), [], None, 80, [(4, 56, 84, 2.0)]),
    ("video-budget", qwen_prompt("What happens?", items=QWEN_VIDEO), [], {"visual_token_budget": 5}, 90, [(4, 56, 140, 1.0)]),
    ("video-ratio", qwen_prompt("Is anything moving?", items=QWEN_VIDEO), [], {"visual_token_ratio": 0.5}, 100, [(6, 84, 140, 2.0)]),
    ("image-and-video", qwen_prompt("Is the car in the video?", items=QWEN_IMAGE + QWEN_VIDEO), [(96, 80)], None, 70, [(4, 56, 84, 2.0)]),
    ("bad-video-budget", qwen_prompt("What happens?", items=QWEN_VIDEO), [], {"visual_token_budget": 0}, 80, [(4, 56, 84, 2.0)]),
]
QWEN_CASE_OPTIONS = {"uncached": {"selection_cache_capacity": 0}}
QWEN_IMAGE_BATCH = [
    (qwen_prompt("What is in the image?"), [(96, 80)], {"visual_token_budget": 2}),
    (qwen_prompt("What color is the car?"), [(150, 60)], None),
    (qwen_prompt("Is there a dog?", images=2), [(84, 84), (40, 120)], {"visual_token_ratio": 0.5}),
]
QWEN_BATCH = QWEN_IMAGE_BATCH + [
    # a video before an image (the text between them continues after the video's positions), 4 fps
    (qwen_prompt("Which comes first?", items=QWEN_VIDEO + QWEN_IMAGE), [(70, 100)], {"visual_token_ratio": 0.4}, [(4, 84, 84, 4.0)]),
]


@pytest.fixture(scope="session")
def qwen_vllm_repo(tiny_dir):
    from mfpruner_lib.tiny_models import build_tiny_qwen2_5_vl

    repo = build_tiny_qwen2_5_vl(tiny_dir / "mfpruner-qwen2_5_vl-vllm", text_heads=2, visual_token_ratio=0.25)
    sharpen_text_attention(repo, factor=8.0)
    return repo


def sharpen_text_attention(repo: Path, factor: float):
    """Scales the language model's query and key projections: random init gives near-uniform
    attention, which hides wrong M-RoPE positions; peaked attention makes the log-probabilities
    depend on every token's position."""
    from safetensors.torch import load_file, save_file

    file = repo / "model.safetensors"
    state = load_file(file)
    for key in state:
        if key.startswith(("model.layers.", "model.language_model.")) and (".q_proj." in key or ".k_proj." in key):
            state[key] = state[key] * factor
    save_file(state, file, metadata={"format": "pt"})


def qwen_family_runs(repo, folder, cases, batch, extra_cases, dtype: str = "float32"):
    """(vLLM results, transformers references) of a Qwen-VL repo on `cases`, `batch` and
    `extra_cases` (vLLM-only cases), the number of items through the vision tower counted, vLLM loaded
    once; both sides in `dtype`."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from mfpruner_lib.tiny_models import qwen_inputs

    model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo)
    image_processor = AutoImageProcessor.from_pretrained(repo)

    def reference(prompt, paths, mm_kwargs, videos=()):
        """The transformers class on the same pixels: the images through the repo's image processor,
        the videos' frames patched as the stock video processor does (its normalization is the
        image processor's) with second_per_grid_ts = 2 / fps, one video at a time in prompt order."""
        images = [Image.open(p).convert("RGB") for p in paths]
        frames = [torch.from_numpy(np.load(video["path"])).permute(0, 3, 1, 2) / 255 for video in videos]
        fps = {video["fps"] for video in videos}
        assert len(fps) <= 1, "qwen_inputs takes one fps for all videos of a prompt"
        inputs = qwen_inputs(
            tokenizer, image_processor, [prompt], images=images, videos=frames, video_fps=fps.pop() if fps else 2.0,
            video_mean_std=(image_processor.image_mean, image_processor.image_std),
        )
        ids = [model.config.image_token_id, model.config.video_token_id]
        return or_error(lambda: reference_generation(model, inputs, mm_kwargs, ids))

    return collect_runs(
        folder, repo, cases, batch, reference, extra_cases,
        case_options=QWEN_CASE_OPTIONS, count_vision_images=True, dtype=dtype,
    )


@pytest.fixture(scope="session")
def qwen_runs(qwen_vllm_repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-qwen")
    long_video = {  # every token kept: the positions are comparable with stock vLLM's
        "name": "long-video-keep-all", "steps": STEPS, "record_mrope_positions": True,
        "requests": [{"prompt": qwen_prompt("What happens?", items=QWEN_VIDEO), "images": [],
                      "mm_processor_kwargs": {"visual_token_ratio": 1.0}, "videos": save_videos(folder, [(8, 56, 56, 2.0)], seed=140)}],
    }
    return qwen_family_runs(qwen_vllm_repo, folder, QWEN_CASES, QWEN_BATCH, [long_video])


@pytest.mark.parametrize(
    "name", ["single", "budget-override", "tall-image", "two-images", "uncached", "video", "video-budget", "video-ratio", "image-and-video"]
)
def test_qwen_keeps_the_transformers_tokens_and_generates_the_same(qwen_runs, name):
    """Log-probabilities match only with the kept tokens at their original M-RoPE positions."""
    results, references = qwen_runs
    ours, reference = results[name], references[name][0]
    assert "error" not in ours, ours.get("error")
    assert ours["keep_indices"] == reference["keep_indices"]
    assert_same_generation(ours["requests"][0], reference)


def test_qwen_vision_tower_runs_once_per_image(qwen_runs):
    """The selection get_mrope_input_positions computes is reused by embed_multimodal (the
    processor's content key): each image goes through the vision tower once. With the cache off
    both run it (and still agree: correctness never depends on the cache)."""
    results, _ = qwen_runs
    items = {"single": 1, "budget-override": 1, "tall-image": 1, "two-images": 2, "video": 1, "image-and-video": 2, "batch": 6}
    assert {name: results[name]["vision_images"] for name in items} == items
    assert results["uncached"]["vision_images"] == 2


def test_qwen_text_after_a_video_continues_at_stock_vllm_positions(qwen_runs, qwen_vllm_repo):
    """A video whose t positions run past its height and width (8 frames at 2 fps, 56 px: t = 0, 2,
    4, 6; h, w = 0, 1), every token kept: the plugin's positions are stock vLLM's, the text after
    the video continuing at its largest position + 1 = video start + 7 (transformers >= 5.3
    continues at start + 2 there; docs/vllm.md)."""
    results, _ = qwen_runs
    ours = results["long-video-keep-all"]
    assert "error" not in ours, ours.get("error")
    assert ours["mrope_positions"] == ours["stock_mrope_positions"]
    video_token_id = json.loads((qwen_vllm_repo / "config.json").read_text())["video_token_id"]
    prompt, positions = ours["requests"][0]["prompt_token_ids"], torch.tensor(ours["mrope_positions"])
    video = [i for i, token in enumerate(prompt) if token == video_token_id]
    assert len(video) == len(ours["keep_indices"][0]) == 4 * 2 * 2
    first, after = video[0], video[-1] + 1
    assert positions[:, after].tolist() == [positions[0, first].item() + 7] * 3


def test_qwen_video_budget_is_per_video_over_all_its_frames(qwen_runs):
    """One budget per video, over the tokens of all its frame pairs (t * h/2 * w/2), per request."""
    from mfpruner_core import resolve_budget

    results, references = qwen_runs
    tokens = {"video": 2 * 2 * 3, "video-budget": 2 * 2 * 5, "video-ratio": 3 * 3 * 5}  # (frames / 2) x (h / 28) x (w / 28)
    settings = {"video": (None, 0.25), "video-budget": (5, None), "video-ratio": (None, 0.5)}  # 0.25: the repo's ratio
    for name, (budget, ratio) in settings.items():
        assert [len(i) for i in results[name]["keep_indices"]] == [resolve_budget(tokens[name], budget, ratio)], name
    assert len(results["image-and-video"]["keep_indices"][1]) == resolve_budget(12, None, 0.25)  # the image's, then the video's
    assert references["video"][0]["keep_indices"] != references["video-budget"][0]["keep_indices"]


# ----------------------------------------------------------------------------- Qwen3-VL, Qwen3.5 (and their MoE models)

# The Qwen cases above (32 px per visual token here: fewer tokens per image than Qwen2.5-VL's 28 px).
QWEN3_FAMILIES = ["qwen3_vl_runs", "qwen3_vl_moe_runs", "qwen3_5_runs", "qwen3_5_moe_runs"]  # Qwen3.5: Qwen3-VL's pruning
# How each family's generations are compared: Qwen3.5 runs in bfloat16 (see qwen3_5_runs).
SAME_GENERATION = {
    "qwen3_vl_runs": assert_same_generation, "qwen3_vl_moe_runs": assert_same_generation,
    "qwen3_5_runs": assert_same_bfloat16_generation, "qwen3_5_moe_runs": assert_same_bfloat16_generation,
}
# A video request (Qwen3-VL videos are not served yet): fails alone, before the batch that follows it.
QWEN3_VIDEO_REQUEST = {
    "name": "video", "steps": STEPS,
    "requests": [{"prompt": qwen_prompt("What happens?", items=QWEN_VIDEO), "images": [], "mm_processor_kwargs": None,
                  "video_frames": [4, 56, 56]}],
}


def qwen3_vl_vllm_repo(tiny_dir, moe: bool) -> Path:
    """A tiny MFPruner Qwen3-VL (MoE) repo: 32-wide text heads, 2 DeepStack levels, text attention
    sharpened (as for Qwen2.5-VL) so wrong M-RoPE positions or DeepStack rows show in the log-probabilities."""
    from mfpruner_lib.tiny_models import build_tiny_qwen3_vl, rewrite_qwen3_vl_moe_as_hub_layout

    if not moe:
        repo = build_tiny_qwen3_vl(tiny_dir / "mfpruner-qwen3_vl-vllm", text_heads=2, visual_token_ratio=0.25)
    else:  # the experts in the hub layout (vLLM reads only that one), non-square so that transformers reads it too
        repo = build_tiny_qwen3_vl(
            tiny_dir / "mfpruner-qwen3_vl_moe-vllm", moe=True, text_heads=2, moe_intermediate_size=48, visual_token_ratio=0.25
        )
        rewrite_qwen3_vl_moe_as_hub_layout(repo)
    sharpen_text_attention(repo, factor=8.0)
    return repo


@pytest.fixture(scope="session")
def qwen3_vl_runs(tiny_dir, tmp_path_factory):
    return qwen_family_runs(
        qwen3_vl_vllm_repo(tiny_dir, moe=False), tmp_path_factory.mktemp("vllm-qwen3-vl"), QWEN_IMAGE_CASES, QWEN_IMAGE_BATCH,
        [QWEN3_VIDEO_REQUEST],
    )


@pytest.fixture(scope="session")
def qwen3_vl_moe_runs(tiny_dir, tmp_path_factory):
    return qwen_family_runs(
        qwen3_vl_vllm_repo(tiny_dir, moe=True), tmp_path_factory.mktemp("vllm-qwen3-vl-moe"), QWEN_IMAGE_CASES, QWEN_IMAGE_BATCH,
        [QWEN3_VIDEO_REQUEST],
    )


def qwen3_5_vllm_repo(tiny_dir, moe: bool) -> Path:
    """A tiny MFPruner Qwen3.5 (MoE) repo: three Gated DeltaNet layers (64-wide heads: vLLM's CPU
    kernel takes 64 or 128) and one full-attention layer, whose attention is sharpened (as for Qwen2.5-VL) so that wrong M-RoPE positions show in the
    log-probabilities. The MoE's experts are saved in the hub layout (each expert's projections apart)."""
    from mfpruner_lib.tiny_models import build_tiny_qwen3_5

    name = "mfpruner-qwen3_5_moe-vllm" if moe else "mfpruner-qwen3_5-vllm"
    repo = build_tiny_qwen3_5(tiny_dir / name, moe=moe, linear_head_dim=64, visual_token_ratio=0.25)
    sharpen_text_attention(repo, factor=8.0)
    return repo


@pytest.fixture(scope="session")
def qwen3_5_runs(tiny_dir, tmp_path_factory):
    """In bfloat16 on both sides: vLLM's CPU kernel of the Gated DeltaNet layers takes nothing else
    (float32 fails at the first request). The vision tower, cues and vote run in bfloat16 too: the
    kept indices are still compared exactly."""
    return qwen_family_runs(
        qwen3_5_vllm_repo(tiny_dir, moe=False), tmp_path_factory.mktemp("vllm-qwen3-5"), QWEN_IMAGE_CASES, QWEN_IMAGE_BATCH,
        [QWEN3_VIDEO_REQUEST], dtype="bfloat16",
    )


@pytest.fixture(scope="session")
def qwen3_5_moe_runs(tiny_dir, tmp_path_factory):
    return qwen_family_runs(
        qwen3_5_vllm_repo(tiny_dir, moe=True), tmp_path_factory.mktemp("vllm-qwen3-5-moe"), QWEN_IMAGE_CASES, QWEN_IMAGE_BATCH,
        [QWEN3_VIDEO_REQUEST], dtype="bfloat16",
    )


@pytest.mark.parametrize("runs", QWEN3_FAMILIES)
@pytest.mark.parametrize("name", ["single", "budget-override", "tall-image", "two-images", "uncached"])
def test_qwen3_vl_keeps_the_transformers_tokens_and_generates_the_same(request, runs, name):
    """Cue A from the last vision block, every DeepStack level kept with the same indices (Qwen3.5:
    none), kept tokens at their original interleaved M-RoPE positions: the log-probabilities match
    only with all three. Qwen3.5's linear-attention layers run on the pruned prompt as on any prompt."""
    results, references = request.getfixturevalue(runs)
    ours, reference = results[name], references[name][0]
    assert "error" not in ours, ours.get("error")
    assert ours["keep_indices"] == reference["keep_indices"]
    SAME_GENERATION[runs](ours["requests"][0], reference)


@pytest.mark.parametrize("runs", QWEN3_FAMILIES)
def test_qwen3_vl_budget_and_batch(request, runs):
    """Per-request budget and ratio set the kept count; a batch of requests with different image
    sizes, budgets and image counts matches request by request; the vision tower runs once per image."""
    results, references = request.getfixturevalue(runs)
    assert [len(i) for i in results["budget-override"]["keep_indices"]] == [3]
    assert len(results["batch"]["requests"]) == len(QWEN_IMAGE_BATCH)
    for ours, reference in zip(results["batch"]["requests"], references["batch"]):
        SAME_GENERATION[runs](ours, reference)
    images = {"single": 1, "budget-override": 1, "tall-image": 1, "two-images": 2, "batch": 4}
    assert {name: results[name]["vision_images"] for name in images} == images
    assert results["uncached"]["vision_images"] == 2


@pytest.mark.parametrize("runs", QWEN3_FAMILIES)
def test_qwen3_vl_bad_value_and_video_fail_alone(request, runs):
    """A bad ratio and a video request each fail alone with a clear error; the requests after them are served."""
    results, references = request.getfixturevalue(runs)
    assert "visual_token_ratio" in results["bad-ratio"]["error"]
    assert "visual_token_ratio" in references["bad-ratio"][0]["error"]
    assert "video" in results["video"]["error"] and ("Qwen3.5" if "3_5" in runs else "Qwen3-VL") in results["video"]["error"]
    assert "images only" in results["video"]["error"]
    assert len(results["batch"]["requests"]) == len(QWEN_IMAGE_BATCH) and "error" not in results["uncached"]


# ----------------------------------------------------------------------------- LLaVA-1.6 (LLaVA-NeXT)

# The tiny NeXT tiles are 56 px (16 patch tokens each), pinpoints up to 2 x 2 tiles: the number of
# visual tokens, newlines and kept tokens depends on each image's size.
LLAVA_NEXT_CASES = [
    ("single", PROMPT, [(96, 80)], None, 0),
    ("budget-override", PROMPT, [(96, 80)], {"visual_token_budget": 5}, 0),
    ("ratio-override", PROMPT, [(60, 150)], {"visual_token_ratio": 0.5}, 20),
    ("two-images", "USER: <image>\n<image>\nHow many people are there? ASSISTANT:", [(64, 96), (150, 60)], None, 40),
    ("bad-budget", PROMPT, [(96, 80)], {"visual_token_budget": 0}, 0),
]
LLAVA_NEXT_BATCH = [
    (PROMPT, [(96, 80)], {"visual_token_budget": 2}),
    ("USER: <image>\nWhat color is the car? ASSISTANT:", [(150, 60)], None),
    ("USER: <image>\n<image>\nIs there a dog? ASSISTANT:", [(84, 84), (40, 120)], {"visual_token_ratio": 0.5}),
]


@pytest.fixture(scope="session")
def llava_next_hub_repo(tiny_dir):
    """A tiny MFPruner LLaVA-NeXT repo in the hub key layout, 32-wide text heads."""
    from mfpruner_lib.tiny_models import build_tiny_llava_next

    return build_tiny_llava_next(tiny_dir / "mfpruner-llava-next-vllm", hub_layout=True, text_heads=2)


@pytest.fixture(scope="session")
def llava_next_runs(llava_next_hub_repo, tmp_path_factory):
    """(vLLM results, transformers references) for every LLaVA-NeXT case, vLLM loaded once."""
    folder = tmp_path_factory.mktemp("vllm-llava-next")
    return llava_family_runs(llava_next_hub_repo, folder, LLAVA_NEXT_CASES, LLAVA_NEXT_BATCH)


@pytest.mark.parametrize("name", ["single", "budget-override", "ratio-override", "two-images"])
def test_llava_next_keeps_the_transformers_tokens_and_generates_the_same(llava_next_runs, name):
    """Anyres: base tile + unpadded grid tiles + newlines; the same kept indices (into each image's
    packed sequence, newlines included) and the same generation as the transformers class."""
    results, references = llava_next_runs
    ours, reference = results[name], references[name][0]
    assert "error" not in ours, ours.get("error")
    assert ours["keep_indices"] == reference["keep_indices"]
    assert_same_generation(ours["requests"][0], reference)


def test_llava_next_placeholders_are_the_kept_patches_plus_every_newline(llava_next_runs, llava_next_hub_repo):
    """Per image: resolve_budget over its patch tokens (which depend on its size), plus all its
    image-newline tokens, outside the budget."""
    from mfpruner_core import resolve_budget

    results, references = llava_next_runs
    repo_ratio = json.loads((llava_next_hub_repo / "config.json").read_text())["visual_token_ratio"]
    settings = [("single", None, repo_ratio), ("budget-override", 5, None), ("ratio-override", None, 0.5), ("two-images", None, repo_ratio)]
    for name, budget, ratio in settings:
        reference = references[name][0]
        expected = [resolve_budget(n, budget, ratio) + newlines for n, newlines in zip(reference["candidates"], reference["newlines"])]
        assert [len(i) for i in results[name]["keep_indices"]] == expected, name
    assert len(set(references["two-images"][0]["candidates"])) == 2  # two sizes, two token counts


# ----------------------------------------------------------------------------- every family


@pytest.mark.parametrize("runs, batch", [("llava_runs", LLAVA_BATCH), ("llava_next_runs", LLAVA_NEXT_BATCH), ("qwen_runs", QWEN_BATCH)])
def test_batch_of_different_sizes_and_budgets(request, runs, batch):
    """Several requests in one generate call, each with its own images, sizes and budget."""
    results, references = request.getfixturevalue(runs)
    assert len(results["batch"]["requests"]) == len(batch)
    for ours, reference in zip(results["batch"]["requests"], references["batch"]):
        assert_same_generation(ours, reference)


@pytest.mark.parametrize(
    "runs, case, parameter",
    [("llava_runs", "bad-budget", "visual_token_budget"), ("llava_next_runs", "bad-budget", "visual_token_budget"),
     ("qwen_runs", "bad-ratio", "visual_token_ratio"), ("qwen_runs", "bad-video-budget", "visual_token_budget")],
)
def test_bad_value_is_a_clear_error_naming_the_parameter(request, runs, case, parameter):
    results, references = request.getfixturevalue(runs)
    assert parameter in results[case]["error"]
    assert parameter in references[case][0]["error"]


# ----------------------------------------------------------------------------- OpenAI-compatible server


@pytest.fixture(scope="session")
def llava_server(llava_hub_repo, tmp_path_factory):
    """vLLM's OpenAI-compatible server on the tiny LLaVA repo, loopback only; yields its URL."""
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path_factory.mktemp("vllm-server") / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    command = [
        str(VENV_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(llava_hub_repo), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
        "--limit-mm-per-prompt", '{"image": 2}', "--trust-request-mm-kwargs",  # per-request budgets
    ]
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, f"the vLLM server exited; see {log.name}"
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the vLLM server did not start; see {log.name}"
            time.sleep(2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def chat(url: str, image_path: str, question: str, mm_kwargs: dict | None) -> tuple[int, dict]:
    """One chat completion with an image (data URL); returns (HTTP status, JSON body)."""
    import base64
    import urllib.error
    import urllib.request

    image = base64.b64encode(Path(image_path).read_bytes()).decode()
    body = {
        "model": json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"],
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": question},
        ]}],
        "max_tokens": 3,
        "temperature": 0.0,
    }
    if mm_kwargs is not None:
        body["mm_processor_kwargs"] = mm_kwargs
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_concurrent_requests_with_different_budgets(llava_server, tmp_path):
    """Concurrent requests, each with its own budget: each prompt holds its own number of kept
    tokens (config.json's 8 when none is given); a bad budget fails alone, the others and the
    next request are served."""
    from concurrent.futures import ThreadPoolExecutor

    (path,) = save_images(tmp_path, [(96, 80)], seed=7)
    budgets = [None, {"visual_token_budget": 2}, {"visual_token_budget": 5}, {"visual_token_ratio": 0.5}, {"visual_token_budget": -1}]
    with ThreadPoolExecutor(len(budgets)) as pool:
        answers = list(pool.map(lambda kwargs: chat(llava_server, path, "What is in the image?", kwargs), budgets))
    statuses = [status for status, _ in answers]
    assert statuses == [200, 200, 200, 200, 400], answers
    assert "visual_token_budget" in json.dumps(answers[-1][1])
    prompt_tokens = [body["usage"]["prompt_tokens"] for _, body in answers[:4]]
    text_tokens = prompt_tokens[0] - 8
    assert prompt_tokens[1:] == [text_tokens + 2, text_tokens + 5, text_tokens + 18]  # 0.5 * 36 = 18
    status, body = chat(llava_server, path, "What is in the image?", {"visual_token_budget": 3})
    assert status == 200 and body["usage"]["prompt_tokens"] == text_tokens + 3


# ----------------------------------------------------------------------------- benchmark script


# The smoke geometry: LLaVA-1.5's 36 visual tokens at 192/128/64/32 of 576 scaled to 36; Qwen2.5-VL's
# 112 px image (16 visual tokens) and Qwen3.5's 256 px image (64: the real Qwen3-VL processor's minimum
# size, which mfpruner_lib.flops counts), at keep-ratios 0.444/0.333/0.222.
BENCHMARK_SETTINGS = {
    "llava-1.5": (36, [("stock", 36), ("192 (= 12 of 36)", 12), ("128 (= 8 of 36)", 8), ("64 (= 4 of 36)", 4),
                       ("32 (= 2 of 36)", 2)]),
    "qwen2.5-vl": (16, [("stock", 16), ("44.4%", 7), ("33.3%", 5), ("22.2%", 4)]),
    "qwen3.5": (64, [("stock", 64), ("44.4%", 28), ("33.3%", 21), ("22.2%", 14)]),  # bfloat16 servers
}


def test_benchmark_vllm_serving_smoke(tmp_path):
    """tools/benchmark_vllm.py --smoke end to end (two OpenAI servers per family, N = 1/4/16 clients;
    Qwen3.5's in bfloat16):
    one row per (setting, N), each MFPruner prompt is its stock prompt minus the dropped visual tokens
    (request by request), KV blocks from the usage and block size, the FLOPs-ideal ratio grows as
    fewer tokens are kept, the tables land between their markers. Timings are not checked."""
    import math

    out, docs = tmp_path / "out", tmp_path / "vllm.md"
    docs.write_text("# vLLM\n\nhand-written text\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [str(VENV_PYTHON), str(ROOT / "tools" / "benchmark_vllm.py"), "--smoke", "--force",
               "--output-dir", str(out), "--docs", str(docs)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    page = docs.read_text()
    assert page.startswith("# vLLM\n\nhand-written text\n")
    for key, (visual, settings) in BENCHMARK_SETTINGS.items():
        result = json.loads((out / f"vllm_serving_{key}_smoke.json").read_text())
        report = (out / f"vllm_serving_{key}_smoke.md").read_text()
        assert f"<!-- BEGIN vllm serving {key} smoke -->" in page and report.strip() in page
        assert "Machine: " in report and "Load average" in report and "vllm" in result["machine"]
        assert result["visual_tokens"] == visual
        dtype = result["server_args"][result["server_args"].index("--dtype") + 1]
        assert dtype == ("bfloat16" if key == "qwen3.5" else "float32")  # vLLM's CPU Gated DeltaNet: bfloat16 only
        rows = result["rows"]
        assert [(r["setting"], r["kept"], r["clients"]) for r in rows] == [
            (label, kept, n) for label, kept in settings for n in (1, 4, 16)
        ]
        table = [line for line in report.splitlines() if line.startswith("|")]
        assert len(table) == 2 + len(rows) and table[0].count("|") == 14
        stock = {r["clients"]: r for r in rows if r["setting"] == "stock"}
        for r in rows:
            assert r["requests"] == len(r["prompt_tokens"]) == {1: 2, 4: 4, 16: 16}[r["clients"]]
            assert r["prompt_tokens"] == [n - (visual - r["kept"]) for n in stock[r["clients"]]["prompt_tokens"]]
            assert r["output_tokens"] == [4] * r["requests"]
            assert r["kv_blocks"] == [math.ceil((p + 4) / result["block_size"]) for p in r["prompt_tokens"]]
            assert r["requests_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p95_s"]
        ideals = [r["flops_ideal"] for r in rows if r["clients"] == 1]
        assert ideals[0] == 1.0 and ideals == sorted(ideals) and ideals[-1] > 1.0
        assert (result["target"] is not None) == (key == "llava-1.5")
    assert "Target (issue 25" in page


# ----------------------------------------------------------------------------- selection cache (no vLLM needed)


def test_selection_cache_is_bounded_and_evicts_the_least_recently_used():
    from concurrent.futures import ThreadPoolExecutor

    from mfpruner_vllm.pruning import Selection, SelectionCache

    def selection(i):
        return Selection(torch.full((2, 4), float(i)), torch.tensor([0, i]), {"uniqueness": torch.zeros(8)}, 8)

    cache = SelectionCache(capacity=2)
    cache.put((1, 0), selection(1))
    cache.put((2, 0), selection(2))
    assert cache.get((1, 0)).keep_indices.tolist() == [0, 1]  # (1, 0) is now the most recently used
    cache.put((3, 0), selection(3))
    assert cache.get((2, 0)) is None and cache.get((1, 0)) is not None and cache.get((3, 0)) is not None
    with ThreadPoolExecutor(8) as pool:  # many threads at once: never more than `capacity` entries
        list(pool.map(lambda i: (cache.put((i, 1), selection(i)), cache.get((i - 1, 1))), range(200)))
    assert len(cache.entries) == 2
    assert all(int(selection.rows[0, 0]) == key[0] and key[1] == 1 for key, selection in cache.entries.items())
    off = SelectionCache(capacity=0)
    off.put((1, 0), selection(1))
    assert off.get((1, 0)) is None


def test_content_key_changes_with_any_input_of_the_selection():
    from mfpruner_vllm.pruning import content_key

    rows, grid, text, keep = torch.randn(16, 12), torch.tensor([1, 4, 4]), torch.tensor([5, 6, 7]), torch.tensor(3)
    key = content_key(rows, grid, text, keep)
    assert key.shape == (2,) and key.dtype == torch.long
    assert torch.equal(key, content_key(rows.clone(), grid.clone(), text.clone(), keep.clone()))
    changed_rows = rows.clone()
    changed_rows[3, 5] += 1e-3
    others = [
        content_key(changed_rows, grid, text, keep), content_key(rows, torch.tensor([1, 2, 8]), text, keep),
        content_key(rows, grid, torch.tensor([5, 6, 8]), keep), content_key(rows, grid, text, torch.tensor(4)),
        content_key(rows.view(8, 24), grid, text, keep),
    ]
    assert all(not torch.equal(key, other) for other in others)
