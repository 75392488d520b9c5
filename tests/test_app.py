"""The demo (app.py): token regions, overlays, stats, bad input, the API, and a real browser."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
from mfpruner_demo import analysis as demo_analysis
from mfpruner_demo import inputs as demo_inputs
from mfpruner_demo import loading, render, ui
import mfpruner_visualize
from mfpruner_lib.families import FAMILIES, by_model_type
from mfpruner_core import resolve_budget, select_tokens, vote
from mfpruner_lib.flops import fastv_flops

from conftest import random_image, refused

QUESTION = "What is in the image?"
# The registry families besides LLaVA-1.5 (the default model, tested throughout), by model_type.
OTHER_FAMILIES = [family.model_type for family in FAMILIES.values() if family.key != "llava-1.5"]


def analyze(*args, **kwargs):
    """demo_analysis.analyze with one timed prefill per setting: these tests check results, not timings."""
    return demo_analysis.analyze(*args, timing_repeats=1, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from intra-op threads; on a busy 2-core machine two threads
    made each forward pass 40x slower (1.7 s vs 0.04 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_model(llava_repo):
    return loading.load_model(str(llava_repo))  # the tiny repo through the real --model path


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "wide.png"
    random_image(1, size=(120, 80)).save(path)
    return path


def last_keep(demo):
    return demo.model.last_pruning.keep_indices[0].tolist()


def pixel_map(demo, analysis, image_path):
    """The panels' canvas (the image copies) and its (H, W) token-per-pixel map, rebuilt from the
    model's result."""
    image, _ = demo_inputs.load_image(image_path)
    canvas = render.token_canvas(image, render.token_maps(demo, image.size, demo.model.last_pruning))
    return render.to_image(canvas.pixels), canvas.index_map


def test_importing_the_app_writes_no_files():
    """Subclassing a Gradio component writes a .pyi next to the module: the app must not."""
    for module in (app, demo_analysis, demo_inputs, loading, render, ui):
        assert not (Path(module.__file__).with_suffix(".pyi")).exists(), module.__name__


# ----------------------------------------------------------------------------- token regions


@pytest.mark.parametrize("size", [(120, 80), (70, 130), (84, 84), (300, 90)])
def test_llava_token_boxes_match_the_processor(demo_model, size):
    """Each token's box holds the original pixels the processor put into that token's patch:
    an image whose colour encodes (x, y), then the centre of every 14 px patch decoded back."""
    width, height = size
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    coded = np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.zeros_like(xs)], -1)
    image = Image.fromarray(np.rint(coded).astype(np.uint8))
    processor = demo_model.processor.image_processor
    pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]  # (3, S, S)
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    rgb = ((pixels * std + mean) * 255).numpy()
    grid = pixels.shape[1] // 14
    boxes = mfpruner_visualize.llava_token_boxes(size, processor, (grid, grid))
    assert boxes.shape == (grid * grid, 4)
    for token, (x0, y0, x1, y1) in enumerate(boxes):
        row, col = divmod(token, grid)
        centre = rgb[:, row * 14 + 7, col * 14 + 7]
        x, y = centre[0] / 255 * (width - 1), centre[1] / 255 * (height - 1)
        assert abs(x - (x0 + x1) / 2) < 1.5 and abs(y - (y0 + y1) / 2) < 1.5, (token, x, y, (x0, y0, x1, y1))


def test_token_index_map_tiles_the_crop_and_leaves_the_borders(demo_model):
    boxes = mfpruner_visualize.llava_token_boxes((120, 80), demo_model.processor.image_processor, (6, 6))
    index_map = render.token_index_map(boxes, 120, 80)
    assert set(np.unique(index_map)) == {-1, *range(36)}
    assert (index_map[:, :20] == -1).all() and (index_map[:, -20:] == -1).all()  # cropped sides
    assert (index_map[:, 20:100] >= 0).all()
    areas = np.bincount(index_map[index_map >= 0])  # 80 / 6 = 13.3 px per token side
    assert areas.min() >= 13 * 13 and areas.max() <= 14 * 14 and areas.sum() == 80 * 80


# ----------------------------------------------------------------------------- handler


def test_overlay_marks_exactly_the_kept_tokens(demo_model, image_file):
    analysis = analyze(demo_model, image_file, QUESTION, "tokens", 8)
    keep = last_keep(demo_model)
    display, index_map = pixel_map(demo_model, analysis, image_file)
    original = np.asarray(display)
    overlay = np.asarray(analysis.panels["mfpruner"])
    unchanged = (overlay == original).all(axis=-1)
    seen_tokens = range(36)
    kept_in_overlay = [t for t in seen_tokens if unchanged[index_map == t].all()]
    dimmed_in_overlay = [t for t in seen_tokens if not unchanged[index_map == t].any()]
    assert kept_in_overlay == keep
    assert sorted(kept_in_overlay + dimmed_in_overlay) == list(seen_tokens)
    assert not unchanged[index_map == -1].all()  # the cropped-away borders are hatched
    assert analysis.stats["kept_indices"] == keep


def test_single_cue_panels_show_each_cues_top_k(demo_model, image_file):
    analysis = analyze(demo_model, image_file, QUESTION, "tokens", 6)
    result = demo_model.model.last_pruning
    display, index_map = pixel_map(demo_model, analysis, image_file)
    original = np.asarray(display)
    for name, scores in result.cue_scores.items():
        top_k = torch.sort(scores[0], descending=True, stable=True).indices[:6].sort().values.tolist()
        assert analysis.stats["cue_kept_indices"][name] == top_k
        unchanged = (np.asarray(analysis.panels[name]) == original).all(axis=-1)
        assert [t for t in range(36) if unchanged[index_map == t].all()] == top_k
    votes = sum(np.isin(np.arange(36), kept) for kept in analysis.stats["cue_kept_indices"].values())
    assert analysis.stats["votes"] == votes.tolist()


def test_two_budgets_give_different_masks(demo_model, image_file):
    small = analyze(demo_model, image_file, QUESTION, "tokens", 4)
    large = analyze(demo_model, image_file, QUESTION, "tokens", 20)
    assert (small.stats["kept"], large.stats["kept"]) == (4, 20)
    small_mask = np.asarray(small.panels["mfpruner"]) == np.asarray(large.panels["original"])
    large_mask = np.asarray(large.panels["mfpruner"]) == np.asarray(large.panels["original"])
    assert small_mask.all(-1).sum() < large_mask.all(-1).sum()
    assert set(small.stats["kept_indices"]) != set(large.stats["kept_indices"])


def test_stats_agree_with_the_model(demo_model, image_file, llava_processor):
    analysis = analyze(demo_model, image_file, QUESTION, "tokens", 10)
    result = demo_model.model.last_pruning
    stats = analysis.stats
    assert stats["kept"] == len(result.keep_indices[0]) == 10
    assert stats["visual_tokens"] == result.num_visual_tokens[0] == 36
    assert stats["prefill_length_pruned"] == result.lm_input_length
    assert stats["prefill_length_unpruned"] - stats["prefill_length_pruned"] == 36 - 10
    text = demo_model.model.config.text_config
    dims = (text.hidden_size, text.intermediate_size, text.num_hidden_layers)
    assert stats["visual_flops_saved"] == pytest.approx(1 - fastv_flops(10, *dims) / fastv_flops(36, *dims))
    assert stats["speedup"] == pytest.approx(stats["prefill_seconds_unpruned"] / stats["prefill_seconds_pruned"])
    shown = ui.stats_markdown(stats)
    assert "Kept 10 / 36 visual tokens" in shown and f"| {stats['prefill_length_pruned']} |" in shown


def test_fastv_flops_reproduces_the_papers_figure():
    """LLaVA-1.5-7B, 32 of 576 tokens: FLOPs -94.6% (d 4096, m 11008, 32 layers)."""
    saved = 1 - fastv_flops(32, 4096, 11008, 32) / fastv_flops(576, 4096, 11008, 32)
    assert round(saved * 100, 1) == 94.6
    assert fastv_flops(1, 2, 3, 1) == 4 * 4 + 2 * 2 + 2 * 2 * 3


def test_ratio_mode_and_vote_threshold(demo_model, image_file):
    config_votes = demo_model.model.config.min_votes
    analysis = analyze(demo_model, image_file, QUESTION, "ratio", ratio=0.25)
    assert analysis.stats["kept"] == resolve_budget(36, ratio=0.25) == 9
    for min_votes in (1, 3):
        analysis = analyze(demo_model, image_file, QUESTION, "tokens", 7, min_votes=min_votes)
        cues = {name: scores[0][None] for name, scores in demo_model.model.last_pruning.cue_scores.items()}
        assert analysis.stats["kept_indices"] == select_tokens(cues, 7, min_votes)[0].tolist()
    assert demo_model.model.config.min_votes == config_votes  # passed per call, the config untouched


def test_generated_answers(demo_model, image_file):
    analysis = analyze(demo_model, image_file, QUESTION, "tokens", 5, generate_answer=True, max_new_tokens=4)
    assert analysis.answer.startswith("MFPruner (5 visual tokens): ")
    assert "Unpruned (36 visual tokens): " in analysis.answer
    assert analyze(demo_model, image_file, QUESTION, "tokens", 5).answer is None


def test_heatmap_colours_follow_the_scores(demo_model, image_file):
    analysis = analyze(demo_model, image_file, QUESTION, "tokens", 8)
    scores = demo_model.model.last_pruning.cue_scores["uniqueness"][0].numpy()
    display, index_map = pixel_map(demo_model, analysis, image_file)
    heat = np.asarray(analysis.heatmaps["uniqueness"], dtype=np.float64)
    best, worst = int(scores.argmax()), int(scores.argmin())
    import matplotlib

    for token, level in ((best, 1.0), (worst, 0.0)):
        ys, xs = np.nonzero(index_map == token)
        colour = np.asarray(matplotlib.colormaps[render.HEATMAP_CMAP](level)[:3]) * 255
        expected = np.asarray(display, dtype=np.float64)[ys, xs] * (1 - render.HEATMAP_ALPHA) + colour * render.HEATMAP_ALPHA
        assert np.abs(heat[ys, xs] - expected).max() <= 0.5 + 1e-9


# ----------------------------------------------------------------------------- bad input


def test_image_modes_are_converted_with_a_note(demo_model, tmp_path):
    for mode in ("RGBA", "L", "P", "LA", "1", "CMYK"):
        path = tmp_path / f"image-{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        random_image(2, size=(90, 60), mode=mode).save(path)
        image, notes = demo_inputs.load_image(path)
        assert image.mode == "RGB" and image.size == (90, 60)
        assert notes == [f"Converted the {mode} image to RGB" + (" (transparent areas on white)." if "A" in mode else ".")]
        if mode in ("RGBA", "L", "P"):  # the cases, through the whole run
            analysis = analyze(demo_model, path, QUESTION, "tokens", 8)
            assert analysis.stats["kept"] == 8 and analysis.notes == notes
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(path)
    image, _ = demo_inputs.load_image(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_large_image_is_downscaled_with_a_note(tmp_path):
    path = tmp_path / "large.png"
    Image.new("RGB", (demo_inputs.MAX_SIDE * 2, 300), (10, 200, 30)).save(path)
    image, notes = demo_inputs.load_image(path)
    assert max(image.size) == demo_inputs.MAX_SIDE and "Downscaled" in notes[0]


@pytest.mark.parametrize("case", ["no image", "corrupt", "truncated", "huge", "empty question", "long question", "budget"])
def test_bad_input_gives_a_clear_message(demo_model, tmp_path, image_file, case):
    path, question, budget = image_file, QUESTION, 8
    if case == "no image":
        path, expected = None, "Upload an image"
    elif case == "corrupt":
        path, expected = tmp_path / "corrupt.png", "Could not read the file as an image"
        path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png at all")
    elif case == "truncated":
        path, expected = tmp_path / "truncated.jpg", "Could not read the file as an image"
        random_image(3, size=(200, 200)).save(tmp_path / "full.jpg")
        path.write_bytes((tmp_path / "full.jpg").read_bytes()[:600])
    elif case == "huge":  # 64 MP, refused from the header before decoding
        path, expected = tmp_path / "huge.png", "this demo takes at most"
        Image.new("1", (8000, 8000)).save(path)
    elif case == "empty question":
        question, expected = "   ", "Type a question"
    elif case == "long question":
        question, expected = "why? " * 300, "at most"
    else:
        budget, expected = 0, "token budget"
    with pytest.raises(ValueError, match=expected):
        analyze(demo_model, path, question, "tokens", budget)


# ----------------------------------------------------------------------------- served app


@pytest.fixture(scope="module")
def served(demo_model):
    page = ui.build_demo(demo_model)
    _, url, _ = ui.launch(page, "127.0.0.1", None, prevent_thread_lock=True, quiet=True)
    yield url
    page.close()


def test_api_through_gradio_client(served, image_file, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False)
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/prune"]
    outputs = client.predict(handle_file(str(image_file)), QUESTION, "tokens", 5, 0.1, 2, False, api_name="/prune")
    *images, stats_text, details, answer = outputs
    assert len(images) == len(ui.PANEL_TITLES) + len(ui.HEATMAP_TITLES)
    assert all(os.path.exists(image) for image in images)
    assert details["kept"] == 5 and len(details["kept_indices"]) == 5 and "Kept 5 / 36" in stats_text
    assert Image.open(images[-1]).size == Image.open(images[0]).size == (120, 80)

    with pytest.raises(AppError, match="Type a question"):
        client.predict(handle_file(str(image_file)), "", "tokens", 5, 0.1, 2, False, api_name="/prune")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(AppError, match="Could not read the file as an image"):
        client.predict(handle_file(str(corrupt)), QUESTION, "tokens", 5, 0.1, 2, False, api_name="/prune")
    outputs = client.predict(handle_file(str(image_file)), QUESTION, "ratio", 5, 0.5, 1, True, api_name="/prune")
    assert outputs[-2]["kept"] == 18 and outputs[-1].startswith("MFPruner (18 visual tokens)")  # still serving


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium: apt-get install -y chromium")
def test_real_browser(served, image_file, tmp_path):
    from playwright.sync_api import sync_playwright

    from mfpruner_lib.browser import open_browser, run_in_browser

    with sync_playwright() as playwright:
        browser = open_browser(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        stats_text = run_in_browser(page, served, image_file, "Is there a dog?", budget=7)
        assert "Kept 7 / 36 visual tokens" in stats_text
        assert page.locator("#panel-mfpruner img").first.is_visible()
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        page.locator("#question textarea").fill("")  # bad input: a message on the page, then it serves on
        page.locator("#run").click()
        page.get_by_text("Type a question about the image").first.wait_for(timeout=30_000)
        page.locator("#question textarea").fill("Is there a cat?")
        page.locator("#budget input[type=number]").fill("9")
        page.locator("#budget input[type=number]").press("Tab")  # the slider's release runs the model
        page.get_by_text("Kept 9 / 36 visual tokens").first.wait_for(timeout=30_000)
        browser.close()
    assert Image.open(tmp_path / "demo.png").size[0] == 1400


# ----------------------------------------------------------------------------- LLaVA-NeXT and Qwen2.5-VL


@pytest.fixture(scope="session")
def family_demo(tiny_repo):
    """family_demo(model_type): the demo on that registry family's tiny repo, loaded once. The tiny
    Qwen repo has no full processor (it needs torchvision): the app falls back."""
    loaded = {}

    def get(model_type: str):
        if model_type not in loaded:
            loaded[model_type] = loading.load_model(str(tiny_repo(by_model_type(model_type).key)))
        return loaded[model_type]

    return get


@pytest.fixture(scope="session")
def next_demo(family_demo):
    return family_demo("llava_next")


@pytest.fixture(scope="session")
def qwen_demo(family_demo):
    return family_demo("qwen2_5_vl")


def coded_image(width: int, height: int) -> Image.Image:
    """Red encodes x, green y (0..255 over the image); blue 255 marks image pixels (padding is 0)."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    coded = np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.full_like(xs, 255)], -1)
    return Image.fromarray(np.rint(coded).astype(np.uint8))


def decoded_sums(pixels: torch.Tensor, image_processor, size) -> torch.Tensor:
    """(..., 3, h, w) normalised pixels of a coded image -> (..., 3): per patch, the sums of the
    decoded x and y (original pixel centres) over its image pixels, and their count."""
    width, height = size
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    rgb = (pixels * std + mean) * 255
    inside = (rgb[..., 2, :, :] > 127).float()
    x = rgb[..., 0, :, :] / 255 * (width - 1) + 0.5
    y = rgb[..., 1, :, :] / 255 * (height - 1) + 0.5
    return torch.stack([(x * inside).sum((-2, -1)), (y * inside).sum((-2, -1)), inside.sum((-2, -1))], -1)


def assert_boxes_centre_on(boxes: np.ndarray, sums: torch.Tensor, tolerance: float):
    """Each drawn token's box centre is the mean original position of the image pixels in its patch."""
    for token, ((x0, y0, x1, y1), (sx, sy, count)) in enumerate(zip(boxes, sums.tolist())):
        if np.isnan(x0):
            continue
        assert count > 0, token
        x, y = sx / count, sy / count
        assert abs(x - (x0 + x1) / 2) < tolerance and abs(y - (y0 + y1) / 2) < tolerance, (token, x, y, (x0, y0, x1, y1))


@pytest.mark.parametrize("size", [(120, 80), (70, 130), (84, 84), (200, 60)])
def test_qwen_token_boxes_match_the_processor(qwen_demo, size):
    """Qwen2.5-VL: smart_resize, no crop; each token is a 28 x 28 px block of the resized image,
    raster order. The pixels' decoded positions, per token, centre on the token's box."""
    processor = qwen_demo.processor.image_processor
    inputs = processor(images=coded_image(*size), return_tensors="pt")
    _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
    rows, cols = grid_h // 2, grid_w // 2
    blocks = inputs["pixel_values"].view(rows, cols, 2, 2, 3, 2, 14, 14)  # the processor's patch order
    blocks = blocks.permute(0, 1, 4, 5, 2, 6, 3, 7).reshape(rows * cols, 3, 2, 28, 28)[:, :, 0]  # (N, 3, 28, 28)
    boxes = mfpruner_visualize.whole_image_grid_boxes(size, processor, (rows, cols))
    assert_boxes_centre_on(boxes, decoded_sums(blocks, processor, size), tolerance=1.0)
    index_map = render.token_index_map(boxes, *size)
    assert (index_map >= 0).all() and set(np.unique(index_map)) == set(range(rows * cols))  # the whole image


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (112, 112), (150, 56)])
def test_llava_next_token_boxes_match_the_processor(next_demo, size):
    """LLaVA-NeXT: base tile = the whole image squashed; high-res grid = the image resized into
    the best pinpoint, centre-padded, unpadded by the model. The pixel sums per patch are packed
    by the model's own pack_image_features, so they line up with the packed tokens; each drawn
    token's box centres on the mean decoded position of the image pixels in its patch."""
    model, processor = next_demo.model, next_demo.processor
    inputs = processor(images=coded_image(*size), text="USER: <image>\nHi ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        model(**inputs, visual_token_budget=4)
    result = model.last_pruning
    tiles = inputs["pixel_values"][0]  # (tiles, 3, 56, 56), padded to the model's max tile count
    tiles = tiles[: len(tiles) - int((tiles.flatten(1) == 0).all(-1).sum())]
    patches = tiles.unfold(2, 14, 14).unfold(3, 14, 14).permute(0, 2, 3, 1, 4, 5)  # (t, 4, 4, 3, 14, 14)
    sums = decoded_sums(patches, processor.image_processor, size).reshape(len(tiles), 16, 3)
    (packed,), _ = model.model.pack_image_features(
        [sums], inputs["image_sizes"], model.config.vision_feature_select_strategy, torch.tensor([0.0, 0.0, 0.0])
    )
    maps = render.token_maps(next_demo, size, result)
    layout = result.layouts[0]
    for name, part in (("main", mfpruner_visualize.result_core(result).LAYOUT_GRID), ("base", mfpruner_visualize.result_core(result).LAYOUT_BASE)):
        drawn = ~np.isnan(maps[name][:, 0])
        assert (drawn == (layout[:, 0] == part).numpy()).all(), name  # each patch token on its own map
        assert_boxes_centre_on(maps[name], packed, tolerance=1.5)
    assert np.isnan(maps["main"][(layout[:, 0] == mfpruner_visualize.result_core(result).LAYOUT_NEWLINE).numpy()]).all()


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("size", [(120, 80), (60, 110)])
def test_overlay_marks_exactly_the_kept_tokens_for_other_families(request, family, size, tmp_path):
    demo = request.getfixturevalue("family_demo")(family)
    path = tmp_path / "image.png"
    random_image(7, size=size).save(path)
    analysis = analyze(demo, path, QUESTION, "tokens", 5, min_votes=1)
    result = demo.model.last_pruning
    keep = result.keep_indices[0].tolist()
    display, index_map = pixel_map(demo, analysis, path)
    drawn = sorted(set(np.unique(index_map).tolist()) - {render.UNSEEN, render.GROUND})
    candidates = list(range(result.num_visual_tokens[0]))
    seen_from = 0  # Qwen: no crop, the whole image is seen
    if family == "llava_next":  # every patch token drawn once (grid, or base map); newlines nowhere
        candidates = [t for t in candidates if result.layouts[0][t, 0] != mfpruner_visualize.result_core(result).LAYOUT_NEWLINE]
        main_width = render.display_copy(demo_inputs.load_image(path)[0])[0].width
        assert (index_map[:, main_width : main_width + render.INSET_GAP] == render.GROUND).all()
        seen_from = main_width  # the base tile sees the whole image (unpadding may cut grid edges)
    assert drawn == candidates and not (index_map[:, seen_from:] == render.UNSEEN).any()
    unchanged = (np.asarray(analysis.panels["mfpruner"]) == np.asarray(display)).all(axis=-1)
    assert [t for t in drawn if unchanged[index_map == t].all()] == [t for t in keep if t in drawn]
    assert [t for t in drawn if not unchanged[index_map == t].any()] == [t for t in drawn if t not in keep]
    for name, kept in analysis.stats["cue_kept_indices"].items():  # single-cue panels: top-5 of the candidates
        scores = result.cue_scores[name][0]
        top = torch.tensor(candidates)[torch.sort(scores[candidates], descending=True, stable=True).indices[:5]]
        assert [t for t in kept if t in candidates] == sorted(top.tolist())

    stats = analysis.stats
    cues = {name: scores[0][candidates][None] for name, scores in result.cue_scores.items()}
    voted = torch.tensor(candidates)[select_tokens(cues, 5, 1)[0]].tolist()
    assert [t for t in keep if t in candidates] == voted  # the per-call min_votes=1 reached the model
    newlines = result.num_visual_tokens[0] - len(candidates)
    assert (stats["kept"], stats["visual_tokens"], stats["newline_tokens"]) == (5, len(candidates), newlines)
    assert stats["kept_indices"] == keep and len(keep) == 5 + newlines
    assert stats["prefill_length_pruned"] == result.lm_input_length
    assert stats["prefill_length_unpruned"] - stats["prefill_length_pruned"] == len(candidates) - 5
    assert demo_analysis.visual_token_count(demo, demo_inputs.load_image(path)[0]) == len(candidates)  # the slider's maximum
    assert f"Kept 5 / {len(candidates)} visual tokens" in ui.stats_markdown(stats)
    assert demo.model.config.min_votes == 2


def test_qwen_ratio_mode_and_answers(qwen_demo, image_file):
    # The tiny repo's own AutoProcessor takes images= without torchvision (processing_mfpruner).
    assert type(qwen_demo.processor).__name__ == "MFPrunerQwen2_5_VLProcessor" and qwen_demo.family == "qwen2_5_vl"
    analysis = analyze(qwen_demo, image_file, QUESTION, "ratio", ratio=0.25, generate_answer=True, max_new_tokens=3)
    total = qwen_demo.model.last_pruning.num_visual_tokens[0]
    assert analysis.stats["kept"] == resolve_budget(total, ratio=0.25) == len(analysis.stats["kept_indices"])
    assert analysis.answer.startswith(f"MFPruner ({analysis.stats['kept']} visual tokens): ")
    assert f"Unpruned ({total} visual tokens): " in analysis.answer


def test_qwen_repo_whose_processor_needs_torchvision_gets_the_stand_in(qwen_repo, tmp_path):
    """A real Qwen2.5-VL repo names the stock Qwen2_5_VLProcessor, which transformers 5.x cannot build
    without torchvision: the demo then drives tokenizer + image processor (QwenInputsProcessor)."""
    import importlib.util
    import json
    import shutil

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("with torchvision the stock processor builds")
    repo = tmp_path / "real-like"
    shutil.copytree(qwen_repo, repo)
    config = json.loads((repo / "processor_config.json").read_text())
    config.pop("auto_map")
    config["processor_class"] = "Qwen2_5_VLProcessor"
    (repo / "processor_config.json").write_text(json.dumps(config))
    assert isinstance(loading.load_processor(str(repo), "qwen2_5_vl"), loading.QwenInputsProcessor)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_tiny_flag_builds_the_family(tmp_path, family):
    path = loading.build_default_model(tmp_path, family)
    from transformers import AutoConfig

    assert loading.model_family(AutoConfig.from_pretrained(path, trust_remote_code=True)) == family
    with pytest.raises(ValueError, match="--tiny"):
        loading.build_default_model(tmp_path, "llava_2")


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_page_builds_for_other_families(request, family):
    """The budget slider spans the budget-competing tokens of a 448 px image; LLaVA-NeXT's page
    explains its two maps."""
    import gradio as gr

    demo = request.getfixturevalue("family_demo")(family)
    page = ui.build_demo(demo)
    count = demo_analysis.visual_token_count(demo, Image.new("RGB", (448, 448)))
    sliders = {block.elem_id: block for block in page.blocks.values() if isinstance(block, gr.Slider)}
    assert sliders["budget"].maximum == count
    texts = " ".join(block.value for block in page.blocks.values() if isinstance(block, gr.Markdown))
    assert (ui.ANYRES_NOTE.strip() in texts) == (family == "llava_next")
    assert "RANDOM" not in texts and demo.name in texts  # a real repo path: no random-weights banner
    page.close()


# ----------------------------------------------------------------------------- a tidy, self-describing demo


@pytest.mark.parametrize("budget_mode, budget, ratio, min_votes, expected", [
    ("tokens", float("inf"), 0.1, 2, "token budget must be a whole number"),
    ("tokens", float("-inf"), 0.1, 2, "token budget must be a whole number"),
    ("tokens", float("nan"), 0.1, 2, "token budget must be a whole number"),
    ("tokens", "5", 0.1, 2, "token budget must be a whole number"),
    ("tokens", True, 0.1, 2, "token budget must be a whole number"),
    ("tokens", 5.5, 0.1, 2, "token budget must be a whole number"),
    ("ratio", 5, float("nan"), 2, "keep ratio must be in"),
    ("ratio", 5, float("inf"), 2, "keep ratio must be in"),
    ("ratio", 5, "half", 2, "keep ratio must be in"),
    ("tokens", 5, 0.1, float("inf"), "vote threshold must be"),
    ("tokens", 5, 0.1, float("nan"), "vote threshold must be"),
    ("tokens", 5, 0.1, 2.5, "vote threshold must be"),
])
def test_non_finite_or_non_numeric_settings_give_the_clear_message(demo_model, image_file, budget_mode, budget, ratio, min_votes, expected):
    with pytest.raises(ValueError, match=expected):
        analyze(demo_model, image_file, QUESTION, budget_mode, budget, ratio, min_votes)


def post_prune_raw(url: str, image_file: Path | str, settings: str, generate_answer: str = "false", upload: bool = True) -> str:
    """POSTs /prune with a hand-written JSON body (`settings` may hold `Infinity` / `NaN`, which
    gradio_client refuses to encode but a browser or curl can send); returns the event stream.
    upload=False: the request names `image_file` as it is, without uploading it first."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as http:
        path = str(image_file)
        if upload:
            with open(image_file, "rb") as f:
                path = http.post("gradio_api/upload", files={"files": f}).json()[0]
        image = json.dumps({"path": path, "meta": {"_type": "gradio.FileData"}})
        body = f'{{"data": [{image}, {json.dumps(QUESTION)}, {settings}, {generate_answer}]}}'
        event = http.post("gradio_api/call/prune", content=body, headers={"content-type": "application/json"}).json()
        return http.get(f"gradio_api/call/prune/{event['event_id']}").text


def test_infinite_budget_over_http_gets_the_clear_message(served, image_file):
    for budget in ("Infinity", "NaN", "-Infinity", "1e400"):
        stream = post_prune_raw(served, image_file, f'"tokens", {budget}, 0.1, 2')
        assert "event: error" in stream and "The token budget must be a whole number" in stream, stream[-2000:]
        assert "OverflowError" not in stream and "cannot convert" not in stream
    stream = post_prune_raw(served, image_file, '"ratio", 5, Infinity, 2')
    assert "The keep ratio must be in (0, 1]" in stream, stream[-2000:]
    stream = post_prune_raw(served, image_file, '"tokens", 5, 0.1, 2')  # the same request, well-formed
    assert "event: complete" in stream and "Kept 5 / 36" in stream, stream[-2000:]


def test_the_api_schema_reads_well(served):
    from gradio_client import Client

    endpoint = Client(served, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]["/prune"]
    returns = [r["label"] for r in endpoint["returns"]]
    assert returns == [*ui.PANEL_TITLES.values(), *ui.HEATMAP_TITLES.values(), "Summary", "Details", "Answer"]
    types = {p["parameter_name"]: p["type"]["type"] for p in endpoint["parameters"]}
    assert types["budget"] == "integer" and types["min_votes"] == "integer" and types["ratio"] == "number"


def test_gradio_cache_is_emptied_of_old_results(demo_model, image_file):
    """Each run leaves ~3 MB of panels in Gradio's cache: files older than the age go (here 1 s,
    by default CACHE_CLEANUP), and all when the server stops."""
    from gradio_client import Client, handle_file

    default = ui.build_demo(demo_model)
    assert default.delete_cache == ui.CACHE_CLEANUP
    default.close()
    page = ui.build_demo(demo_model, delete_cache=(1, 1))
    _, url, _ = ui.launch(page, "127.0.0.1", None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False, download_files=False)  # the files may be gone before a download
        client.predict(handle_file(str(image_file)), QUESTION, "tokens", 5, 0.1, 2, False, api_name="/prune")
        examples = {f for block in page.blocks.values() for f in getattr(block, "keep_in_cache", ())}  # fixed, kept
        written = [Path(f) for files in page.temp_file_sets for f in files if f not in examples]  # panels, upload
        assert sum(f.suffix == ".png" for f in written) >= len(ui.PANEL_TITLES) + len(ui.HEATMAP_TITLES)
        import time

        deadline = time.monotonic() + 30
        while any(f.exists() for f in written) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(f.exists() for f in written)
    finally:
        page.close()


STARTUP = """
import glob, os, tempfile
from mfpruner_demo.loading import load_model
demo = load_model(None)
print("LEFT:", glob.glob(os.path.join(tempfile.gettempdir(), "mfpruner-demo-*")))
print("NAME:", demo.name)
"""


def test_default_model_start_is_quiet_and_leaves_no_folder(tmp_path):
    """Building the tiny model prints no torchvision fallback warning and no progress bars, and its
    temporary folder is gone once it is loaded."""
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [sys.executable, "-c", STARTUP], cwd=Path(app.__file__).parent, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LEFT: []" in done.stdout and "NAME: tiny MFPruner LLaVA-1.5 (random weights)" in done.stdout
    assert "falling back" not in done.stderr and "torchvision" not in done.stderr
    assert "Loading weights" not in done.stderr and "Writing model shards" not in done.stderr and "it/s" not in done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_tiny_model_stats_explain_the_small_speedup(demo_model, image_file):
    stats = analyze(demo_model, image_file, QUESTION, "tokens", 5).stats
    assert ui.TINY_PREFILL_NOTE not in ui.stats_markdown(stats)  # a real repo (here: loaded with --model)
    ideal = stats["prefill_flops_unpruned"] / stats["prefill_flops_pruned"]
    assert ideal > 1.5
    shown = ui.stats_markdown({**stats, "random_weights": True, "speedup": 1.05})  # measured: barely shorter
    assert ui.TINY_PREFILL_NOTE in shown and "vision tower" in shown and "Benchmarks" in shown
    # The note explains a small measured speed-up only: not when it comes near the FLOPs-ideal one.
    assert ui.TINY_PREFILL_NOTE not in ui.stats_markdown({**stats, "random_weights": True, "speedup": 0.95 * ideal})


# ----------------------------------------------------------------------------- refused inputs, no network


@pytest.mark.parametrize("value", ["yes", "false", 1, 0, None, [True]])
def test_generate_answer_must_be_a_bool(demo_model, image_file, value):
    """The API passes any JSON: "yes" and 1 once read as true, while every other input is checked."""
    with pytest.raises(ValueError, match="'Also generate the answer' must be true or false"):
        analyze(demo_model, image_file, QUESTION, "tokens", 5, 0.1, 2, value)


def test_refused_api_inputs_reach_the_client_as_messages(served, image_file):
    """A path that the client did not upload is refused by Gradio before the handler runs: the
    client gets Gradio's reason, not `{"error": null}`; a non-bool generate_answer our message."""
    for path in ("/etc/passwd", image_file):  # a real image too: only uploads may be read
        stream = post_prune_raw(served, path, '"tokens", 5, 0.1, 2', upload=False)
        assert "event: error" in stream and '"error": null' not in stream, stream[-2000:]
        assert "was not uploaded by a user" in stream, stream[-2000:]
    stream = post_prune_raw(served, image_file, '"tokens", 5, 0.1, 2', generate_answer='"yes"')
    assert "event: error" in stream and "must be true or false, got 'yes'" in stream, stream[-2000:]
    assert "event: complete" in post_prune_raw(served, image_file, '"tokens", 5, 0.1, 2')  # an upload is served


def test_app_refuses_a_model_it_cannot_serve_in_one_line(llava_stock_repo, tmp_path, monkeypatch, capsys):
    """--model: a stock checkpoint gets the export command, a missing path is not taken for a hub id;
    each one line, no traceback, before anything is loaded."""
    monkeypatch.chdir(tmp_path)
    message = refused(app.main, ["--model", str(llava_stock_repo)], capsys)
    assert message.startswith(f"--model {str(llava_stock_repo)!r} is a stock 'llava' checkpoint, not an MFPruner repo")
    assert f"python -m tools.export {llava_stock_repo} {llava_stock_repo}-mfpruner" in message
    for missing in (str(tmp_path / "nope"), "./nope", "models/a/nope"):
        assert refused(app.main, ["--model", missing], capsys) == (
            f"--model folder {missing!r} does not exist (and it is not a hub repo id)"
        )
    assert "invalid choice: 'llava_2'" in refused(app.main, ["--tiny", "llava_2"], capsys)


# Starts `python app.py` on the tiny model, as a user does, with every DNS look-up of the process
# (all threads) recorded and refused; once the page answers and the background threads had time
# to run, prints the hosts looked up. The last look-up is the test's own: it shows the stub works.
NO_NETWORK_START = textwrap.dedent(
    """
    import json, os, socket, sys, threading, time, urllib.request

    looked_up = []
    local_getaddrinfo = socket.getaddrinfo
    LOCAL = ("127.0.0.1", "localhost", "::1", "0.0.0.0", None, "")

    def record(name, real):
        def stub(host, *args, **kwargs):
            host = host.decode() if isinstance(host, bytes) else host
            if host in LOCAL:
                return real(host, *args, **kwargs)
            looked_up.append(f"{name}({host})")
            raise socket.gaierror(socket.EAI_NONAME, "look-ups are refused in this test")
        return stub

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        setattr(socket, name, record(name, getattr(socket, name)))

    def report_when_served(port):
        deadline = time.monotonic() + 500
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
                break
            except OSError:
                time.sleep(1)
        time.sleep(8)  # Gradio's version check and launch analytics run in background threads
        try:
            socket.getaddrinfo("huggingface.co", 443)
        except socket.gaierror:
            pass
        print("LOOKED UP:", json.dumps(looked_up), flush=True)
        os._exit(0)

    port = sys.argv[1]
    threading.Thread(target=report_when_served, args=(port,), daemon=True).start()
    sys.argv = ["app.py", "--port", port]
    import app
    app.main()
    """
)


def test_the_demo_starts_without_any_network_look_up(tmp_path):
    """`python app.py` on the tiny model, without HF_HUB_OFFLINE and Gradio's or huggingface_hub's
    switches in the environment: no DNS look-up at all (Gradio's analytics are off in the page)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    switches = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "GRADIO_ANALYTICS_ENABLED",
                "DO_NOT_TRACK", "MFPRUNER_MODEL", "HF_HUB_DISABLE_UPDATE_CHECK")
    env = {key: value for key, value in os.environ.items() if key not in switches}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_START, str(port)], cwd=Path(app.__file__).parent, env=env,
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("LOOKED UP: ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    assert json.loads(lines[0].removeprefix("LOOKED UP: ")) == ["getaddrinfo(huggingface.co)"], done.stderr[-3000:]
