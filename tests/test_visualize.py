"""model.draw_pruning / plot_pruning (the shipped mfpruner_visualize module): for every family the
drawn panel dims exactly the pruned tokens' regions (pixels counted on flat-colour images), the
heatmaps hold the cue values at the token centres, multi-image prompts and videos draw every item,
each refusal names its parameter, and a repo loaded away from this checkout draws with its own copy."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mfpruner_visualize as visualize
from mfpruner_lib import tiny_models
from mfpruner_lib.families import FAMILIES

from conftest import ROOT, random_image

FLAT = (200, 120, 40)  # the flat colour of the test images
SIZES = {"llava-1.5": (120, 80), "llava-next": (100, 60), "qwen2.5-vl": (150, 90), "qwen3-vl": (150, 90), "qwen3-vl-moe": (150, 90),
         "qwen3.5": (150, 90), "qwen3.5-moe": (150, 90)}


def flat_image(size) -> Image.Image:
    return Image.new("RGB", size, FLAT)


def dimmed(colour) -> np.ndarray:
    return np.rint(np.asarray(colour, dtype=np.float64) * visualize.DIM + visualize.DIM_COLOR * (1 - visualize.DIM))


def call_inputs(key: str, repo: Path, images: list, videos=None):
    """(inputs of one prompt holding `images` then `videos`, the processor to draw with)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if key.startswith("qwen"):  # the tiny Qwen repos: tokenizer + image processor (qwen_inputs expands the placeholders)
        tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
        image_processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
        placeholders = "<|vision_start|><|image_pad|><|vision_end|>" * len(images)
        placeholders += "<|vision_start|><|video_pad|><|vision_end|>" * len(videos or [])
        inputs = tiny_models.qwen_inputs(tokenizer, image_processor, [placeholders + "What is here?"], images, videos)
        return inputs, image_processor
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    return processor(images=images, text="<image>" * len(images) + " What is here?", return_tensors="pt"), processor


def pixel_sets(boxes: np.ndarray, keep: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """(pruned, kept) (H, W) bool: pixels whose centre lies in a pruned / kept token's box."""
    width, height = size
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    pruned, kept = np.zeros((height, width), bool), np.zeros((height, width), bool)
    for token, (x0, y0, x1, y1) in enumerate(boxes):
        if np.isnan(x0):
            continue
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        (kept if keep[token] else pruned)[inside] = True
    return pruned, kept


def assert_panel_dims_the_pruned_boxes(panel: Image.Image, boxes: np.ndarray, keep: np.ndarray, colour=FLAT):
    """Counted per pixel: the original colour exactly where a kept token is, the dimmed colour or the
    outline where a pruned one is, and neither where no token is (hatched)."""
    pixels = np.asarray(panel, dtype=np.float64)
    pruned, kept = pixel_sets(boxes, keep, panel.size)
    original = (pixels == colour).all(-1)
    dark = (pixels == dimmed(colour)).all(-1) | (pixels == visualize.OUTLINE_COLOR).all(-1)
    assert original.sum() == kept.sum() and (original == kept).all()
    assert dark.sum() == pruned.sum() and (dark == pruned).all()
    assert not (original | dark)[~(pruned | kept)].any()  # the unseen pixels are neither


def run_call(model, inputs, **settings):
    with torch.no_grad():
        model(**inputs, **settings)
    return model.last_pruning


# ----------------------------------------------------------------------------- one layout per family


@pytest.mark.parametrize("key", FAMILIES)
def test_each_family_declares_its_token_layout_once(tiny_model, key):
    """The model class names its layout; the registry's token_boxes is that layout's shipped function."""
    model = tiny_model(key)
    assert visualize.TOKEN_LAYOUTS[type(model).token_layout] is FAMILIES[key].token_boxes
    assert "token_layout" in vars(type(model))  # set on the family's class, read by the shared mixin


@pytest.mark.parametrize("key", FAMILIES)
def test_drawn_panel_dims_exactly_the_pruned_tokens(tiny_repo, tiny_model, key):
    model = tiny_model(key)
    image = flat_image(SIZES[key])
    inputs, processor = call_inputs(key, tiny_repo(key), [image])
    result = run_call(model, inputs, visual_token_ratio=0.3)
    panel = model.draw_pruning(image, processor=processor)
    assert isinstance(panel, Image.Image) and panel.size == image.size
    image_processor = getattr(processor, "image_processor", processor)
    maps = FAMILIES[key].token_boxes(image.size, image_processor, result, 0)
    keep = np.isin(np.arange(result.num_visual_tokens[0]), result.keep_indices[0].numpy())
    assert 0 < keep.sum() < len(keep)
    assert_panel_dims_the_pruned_boxes(panel, maps["main"], keep)
    if key == "llava-1.5":  # a 3:2 image: the center crop leaves the left and right borders unseen
        pruned, kept = pixel_sets(maps["main"], keep, image.size)
        assert (~(pruned | kept)).sum() == 80 * 20 * 2
    if key == "llava-next":  # the base tile's tokens, on their own panel of the same size
        base = model.draw_pruning(image, processor=processor, base_tile=True)
        assert base.size == image.size
        assert_panel_dims_the_pruned_boxes(base, maps["base"], keep)


@pytest.mark.parametrize("key", FAMILIES)
def test_heatmaps_hold_the_cue_values_at_the_token_centres(tiny_repo, tiny_model, key):
    import matplotlib.figure

    model = tiny_model(key)
    image = random_image(5, SIZES[key])
    inputs, processor = call_inputs(key, tiny_repo(key), [image])
    result = run_call(model, inputs, visual_token_budget=5)
    figure = model.plot_pruning(image, processor=processor, cues=True)
    assert isinstance(figure, matplotlib.figure.Figure)
    cues = list(result.cue_scores)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    competing = visualize.competing_tokens(result, 0)
    assert titles[0] == f"kept 5 / {int(competing.sum())}" and titles[1 : 1 + len(cues)] == cues
    suptitle = figure._suptitle.get_text()
    assert "kept 5 of" in suptitle and "budget=5" in suptitle and f"min_votes={result.min_votes}" in suptitle

    image_processor = getattr(processor, "image_processor", processor)
    maps = FAMILIES[key].token_boxes(image.size, image_processor, result, 0)
    left = 0
    centres = []  # (token, x, y) on the canvas: the main map, then LLaVA-NeXT's base tile to its right
    for name, scale in (("main", 1.0), ("base", visualize.INSET_SCALE)):
        if name not in maps:
            continue
        for token, (x0, y0, x1, y1) in enumerate(maps[name]):
            if not np.isnan(x0):
                centres.append((token, left + math.floor((x0 + x1) / 2 * scale), math.floor((y0 + y1) / 2 * scale)))
        left += image.width + visualize.INSET_GAP
    tokens, xs, ys = map(np.array, zip(*centres))
    assert sorted(set(tokens.tolist())) == np.flatnonzero(competing).tolist()  # every competing token is drawn
    heatmap_axes = [ax for ax in figure.axes if ax.get_title() in cues or ax.get_title().startswith("votes")]
    # Votes: how many cues keep the token alone: its top-k over the competing tokens, k = the kept count.
    votes = np.zeros(result.num_visual_tokens[0])
    for name in cues:
        scores = result.cue_scores[name][0].float().numpy()
        order = np.flatnonzero(competing)[np.argsort(-scores[competing], kind="stable")]
        votes[order[:5]] += 1
    for ax, values in zip(heatmap_axes, [result.cue_scores[name][0].float().numpy() for name in cues] + [votes]):
        layer = np.ma.filled(ax.images[-1].get_array().astype(np.float64), np.nan)
        np.testing.assert_allclose(layer[ys, xs], values[tokens], rtol=1e-6)


def test_votes_replay_the_models_vote(tiny_repo, tiny_model):
    """With min_votes = the number of cues, every token the model kept by votes has all votes."""
    model = tiny_model("llava-1.5")
    image = random_image(6, (84, 84))
    inputs, _ = call_inputs("llava-1.5", tiny_repo("llava-1.5"), [image])
    result = run_call(model, inputs, visual_token_budget=6, min_votes=1)
    votes = visualize.cue_votes(result, 0)
    assert votes.max() <= len(result.cue_scores) and votes.sum() == 6 * len(result.cue_scores)
    singles = visualize.single_cue_keeps(result, 0)
    for name, kept in singles.items():
        assert len(kept) == 6 and kept == sorted(kept)


# ----------------------------------------------------------------------------- several items


def test_multi_image_prompt_draws_each_image(tiny_repo, tiny_model):
    model = tiny_model("llava-1.5")
    first, second = flat_image((84, 84)), Image.new("RGB", (84, 84), (30, 160, 220))
    inputs, processor = call_inputs("llava-1.5", tiny_repo("llava-1.5"), [first, second])
    result = run_call(model, inputs, visual_token_budget=7)
    assert len(result.keep_indices) == 2
    for index, image in enumerate((first, second)):
        panel = model.draw_pruning(image, processor=processor, index=index)
        boxes = visualize.llava_boxes(image.size, processor.image_processor, result, index)["main"]
        keep = np.isin(np.arange(36), result.keep_indices[index].numpy())
        assert keep.sum() == 7
        assert_panel_dims_the_pruned_boxes(panel, boxes, keep, image.getpixel((0, 0)))
        assert f"image {index}: kept 7 of 36" in model.plot_pruning(image, processor=processor, index=index, cues=False)._suptitle.get_text()
    with pytest.raises(ValueError, match=r"`index` must be an int in \[0, 2\).*0: image, 1: image.*got 2"):
        model.draw_pruning(first, processor=processor, index=2)


def test_video_draws_every_frame_with_its_group_tokens(tiny_repo, tiny_model):
    """An image then a 4-frame video (2 frame pairs): the video is drawn as a row of its 4 frames, each
    dimmed where its pair's pruned tokens are."""
    model = tiny_model("qwen2.5-vl")
    image = flat_image((84, 56))
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10)]
    frames = torch.stack([torch.tensor(c, dtype=torch.float32)[:, None, None].expand(3, 56, 84) / 255 for c in colours])
    inputs, processor = call_inputs("qwen2.5-vl", tiny_repo("qwen2.5-vl"), [image], [frames])
    result = run_call(model, inputs, visual_token_ratio=0.4)
    assert result.kinds == ["image", "video"] and tuple(result.grids[1]) == (4, 3)  # 2 pairs of 2 x 3 tokens
    drawing = model.draw_pruning(frames, processor=processor, index=1)
    assert drawing.size == (4 * 84 + 3 * visualize.INSET_GAP, 56)
    keep = np.isin(np.arange(12), result.keep_indices[1].numpy())
    assert 0 < keep.sum() < 12
    frame_boxes = visualize.whole_image_grid_boxes((84, 56), None, (2, 3))
    for frame, colour in enumerate(colours):
        left = frame * (84 + visualize.INSET_GAP)
        panel = drawing.crop((left, 0, left + 84, 56))
        group = frame // 2
        assert_panel_dims_the_pruned_boxes(panel, frame_boxes, keep[group * 6 : (group + 1) * 6], colour)
    figure = model.plot_pruning(frames, processor=processor, index=1)
    assert figure._suptitle.get_text().startswith(f"video 1: kept {len(result.keep_indices[1])} of 12")
    with pytest.raises(ValueError, match=r"`image` \(6 frames\) does not match"):
        model.draw_pruning(torch.cat([frames, frames[:2]]), processor=processor, index=1)


# ----------------------------------------------------------------------------- refusals


def in_fresh_thread(fn):
    """fn() in a new thread (its own last_pruning, None until it prunes); returns what it raised."""
    raised = []

    def run():
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - handed back to the test
            raised.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return raised[0] if raised else None


def test_no_result_says_why(tiny_repo, tiny_model):
    from transformers import AutoTokenizer

    model = tiny_model("qwen2.5-vl")
    tokenizer = AutoTokenizer.from_pretrained(tiny_repo("qwen2.5-vl"), trust_remote_code=True)
    text_only = tokenizer(["What is here?"], return_tensors="pt")  # what a processor that ignores images returns

    def call_then_draw():
        with torch.no_grad():
            model(**text_only)
        assert model.last_pruning is None
        model.draw_pruning(flat_image((56, 56)), processor=tokenizer)

    error = in_fresh_thread(call_then_draw)
    assert isinstance(error, ValueError)
    message = str(error)
    assert "`result`" in message and "last_pruning` is None" in message and "pixel_values" in message and "images=" in message


@pytest.mark.parametrize("key", FAMILIES)
def test_refusals_name_the_parameter(tiny_repo, tiny_model, key):
    from transformers import AutoTokenizer

    model = tiny_model(key)
    image = flat_image(SIZES[key])
    inputs, processor = call_inputs(key, tiny_repo(key), [image])
    run_call(model, inputs, visual_token_budget=4)
    with pytest.raises(ValueError, match=r"`index` must be an int in \[0, 1\)"):
        model.draw_pruning(image, processor=processor, index=-1)
    with pytest.raises(ValueError, match=r"`index`"):
        model.plot_pruning(image, processor=processor, index="0")
    with pytest.raises(ValueError, match=r"`result` must be an MFPrunerResult"):
        model.draw_pruning(image, processor=processor, result={"keep_indices": []})
    with pytest.raises(ValueError, match=r"`processor` must be the processor that made the inputs"):
        model.draw_pruning(image, processor=AutoTokenizer.from_pretrained(tiny_repo(key), trust_remote_code=True))
    with pytest.raises(ValueError, match=r"`image` must be a PIL image"):
        model.draw_pruning("photo.jpg", processor=processor)
    if key == "llava-1.5":  # every image size maps onto its center crop; no base tile
        with pytest.raises(ValueError, match=r"`base_tile=True` needs a model with a base tile"):
            model.draw_pruning(image, processor=processor, base_tile=True)
    else:  # another aspect: another token grid than the call's
        other = flat_image((SIZES[key][1], SIZES[key][0] * 2))
        with pytest.raises(ValueError, match=r"`image` \(\d+x\d+ px\) does not match the pruning result"):
            model.draw_pruning(other, processor=processor)


def test_processor_defaults_to_the_repos_own(tiny_repo, tiny_model):
    model = tiny_model("llava-1.5")
    image = flat_image((120, 80))
    inputs, processor = call_inputs("llava-1.5", tiny_repo("llava-1.5"), [image])
    run_call(model, inputs, visual_token_budget=4)
    assert np.array_equal(np.asarray(model.draw_pruning(image)), np.asarray(model.draw_pruning(image, processor=processor)))


# ----------------------------------------------------------------------------- shipped in every repo


@pytest.mark.parametrize("key", FAMILIES)
def test_every_export_ships_the_drawing_module(key):
    from tools.export import code_files

    arch = FAMILIES[key].export
    names = [path.name for path in code_files(arch, with_processor=arch.processor_class is not None)]
    assert "mfpruner_visualize.py" in names


HUB_STYLE = r"""
import json, os, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo, out = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
image = Image.new("RGB", (120, 80), (200, 120, 40))
inputs = processor(images=image, text="<image> What is here?", return_tensors="pt")
with torch.no_grad():
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
before = sorted(name for name in sys.modules if name.split(".")[0] == "matplotlib" or name.endswith("mfpruner_visualize"))
model.draw_pruning(image, processor=processor).save(os.path.join(out, "panel.png"))
figure = model.plot_pruning(image, processor=processor)
print(json.dumps({
    "before": before,
    "module": type(model).draw_pruning.__module__,
    "drawing_module": [name for name in sys.modules if name.endswith("mfpruner_visualize")],
    "project_on_path": [p for p in sys.path if p and os.path.exists(os.path.join(p, "mfpruner_lib"))],
    "keep_indices": model.last_pruning.keep_indices[0].tolist(),
    "total": model.last_pruning.num_visual_tokens[0],
    "titles": [ax.get_title() for ax in figure.axes if ax.get_title()],
}))
"""


def test_hub_style_repo_draws_away_from_the_checkout(tmp_path):
    """A tiny exported repo (tools.export of a stock checkpoint, default settings) loaded from a subprocess
    whose cwd is elsewhere and whose sys.path holds no project folder: its default call prunes, it draws
    with the repo's own copy of the module (dimmed pixels = the pruned boxes), and matplotlib is
    imported only to draw."""
    from transformers import AutoProcessor

    from tools.export import main as export_main

    stock = FAMILIES["llava-1.5"].build_tiny(tmp_path / "stock", stock=True)
    repo = tmp_path / "hub-repo"
    export_main([str(stock), str(repo), "--base-model-id", "llava-hf/llava-1.5-7b-hf"])
    config = json.loads((repo / "config.json").read_text())
    assert config["visual_token_budget"] is None and config["visual_token_ratio"] == 0.111  # 64 of 576's share
    assert (repo / "mfpruner_visualize.py").read_text() == (ROOT / "mfpruner_visualize.py").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run(
        [sys.executable, "-I", "-c", HUB_STYLE, str(repo), str(elsewhere)],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["project_on_path"] == []
    assert report["before"] == []  # neither the drawing module nor matplotlib before the first drawing
    assert report["module"].startswith("transformers_modules.") and report["drawing_module"]
    assert all(name.startswith("transformers_modules.") for name in report["drawing_module"])
    assert report["total"] == 36 and len(report["keep_indices"]) == 4  # round(0.111 * 36)
    assert report["titles"][:5] == ["kept 4 / 36", "attention", "uniqueness", "relevance", "votes (cues keeping it)"]
    image_processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True).image_processor
    boxes = visualize.llava_token_boxes((120, 80), image_processor, (6, 6))
    keep = np.isin(np.arange(36), report["keep_indices"])
    assert_panel_dims_the_pruned_boxes(Image.open(elsewhere / "panel.png").convert("RGB"), boxes, keep)


def test_tiny_qwen_repo_ships_a_processor_that_takes_images(tiny_repo):
    """AutoProcessor of a tiny Qwen2.5-VL repo processes `images=` without torchvision, exactly as the
    stock processor's expansion (tiny_models.qwen_inputs), and refuses videos with the reason."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    repo = tiny_repo("qwen2.5-vl")
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    image = random_image(2, (100, 60))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is here?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    expected = tiny_models.qwen_inputs(
        AutoTokenizer.from_pretrained(repo, trust_remote_code=True),
        AutoImageProcessor.from_pretrained(repo, trust_remote_code=True), [prompt], images=[image],
    )
    assert inputs.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(inputs[name], value), name
    with pytest.raises(ValueError, match="`videos`.*torchvision"):
        processor(videos=[np.zeros((2, 56, 56, 3), np.uint8)], text=prompt)


def test_example_notebook_runs_headless(tmp_path):
    """examples/visualize_pruning.ipynb, executed as committed (outputs stripped) on the tiny model
    it builds: three drawings at shrinking budgets side by side, then the cue figure."""
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "examples" / "visualize_pruning.ipynb"
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)  # stripped in git
    env_before = os.environ.pop("MFPRUNER_MODEL", None)
    try:
        NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_before is not None:
            os.environ["MFPRUNER_MODEL"] = env_before
    printed = "".join(o.get("text", "") for cell in code for o in cell.outputs if o.output_type == "stream")
    kept = [int(line.split("kept ")[1].split(" of")[0]) for line in printed.splitlines() if line.startswith("ratio ")]
    assert kept == [18, 9, 4]  # round(ratio * 36) of the tiny LLaVA-1.5's 36 tokens
    pictures = [cell for cell in code if any("image/png" in o.get("data", {}) for o in cell.outputs)]
    assert len(pictures) == 2 and "plt.subplots(1, len(drawings)" in pictures[0].source
    assert "plot_pruning" in pictures[1].source


def test_matplotlib_stays_optional_for_loading_a_repo():
    """transformers' remote-code check demands every top-level import of a shipped file; matplotlib
    must not be one (it is imported on first use, inside a try)."""
    from transformers.dynamic_module_utils import get_imports

    assert "matplotlib" not in get_imports(ROOT / "mfpruner_visualize.py")
    assert "matplotlib" not in get_imports(ROOT / "mfpruner_pipeline.py")


def test_missing_processor_is_named(tiny_model, tiny_repo, tmp_path):
    """Without `processor=`, a model whose folder holds no image processor is refused by name."""
    model = tiny_model("llava-1.5")
    image = flat_image((84, 84))
    inputs, _ = call_inputs("llava-1.5", tiny_repo("llava-1.5"), [image])
    result = run_call(model, inputs, visual_token_budget=4)
    source = model.config._name_or_path
    try:
        model.config._name_or_path = str(tmp_path / "moved-away")
        with pytest.raises(ValueError, match=r"`processor` was not given and the model's folder .* has no image processor"):
            model.draw_pruning(image, result=result)
    finally:
        model.config._name_or_path = source


def test_demo_tiny_qwen_processor_keeps_the_real_pixel_limit(tmp_path):
    """The demo's tiny Qwen2.5-VL repo: its AutoProcessor and AutoImageProcessor both resize to at most
    1,024 tokens (the real model's limit), as its banner says."""
    from transformers import AutoImageProcessor, AutoProcessor

    path = FAMILIES["qwen2.5-vl"].demo_tiny(tmp_path)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    assert processor.image_processor.size["longest_edge"] == 28 * 28 * 1024
    assert AutoImageProcessor.from_pretrained(path, trust_remote_code=True).size["longest_edge"] == 28 * 28 * 1024
