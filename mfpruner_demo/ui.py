"""The Gradio page: the stats text, the banner, the layout and its events, launching.

The page, top to bottom: inputs and stats; the panel row (original image, the tokens each single
cue keeps, the tokens MFPruner keeps, pruned patches dimmed); one continuous heatmap per cue.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
import matplotlib
from PIL import Image

from mfpruner_demo.analysis import CUE_TITLES, MAX_NEW_TOKENS, analyze, visual_token_count
from mfpruner_demo.inputs import load_image, upload_path
from mfpruner_demo.loading import MODEL_ENV, DemoModel
from mfpruner_demo.render import HEATMAP_CMAP
from mfpruner_lib.families import by_model_type

try:  # Hugging Face ZeroGPU Spaces: the model calls run on a GPU borrowed per call
    import spaces

    gpu = spaces.GPU
except ImportError:  # anywhere else: a plain call

    def gpu(fn):
        return fn


logger = logging.getLogger("mfpruner.app")

# Every run writes its 11 panels (~3 MB of PNG) and the upload to Gradio's cache: every 5 minutes,
# delete those older than 30 minutes (and all of them when the server stops)
CACHE_CLEANUP = (300, 1800)
EXAMPLE_QUESTIONS = {
    "grace_hopper.jpg": "Who is the person in the picture, and what is she wearing?",
    "logo2.png": "What does the logo say?",
    "Minduka_Present_Blue_Pack.png": "What color is the present?",
}


# ----------------------------------------------------------------------------- page text


def format_flops(flops: float) -> str:
    for unit, size in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if flops >= size:
            return f"{flops / size:.2f} {unit}"
    return f"{flops:.0f} FLOPs"


TINY_PREFILL_NOTE = (
    "\n*Why the measured prefill barely shortens here:* this tiny model's language model is so small that "
    "the vision tower (which runs in full either way) and fixed per-call costs take most of the time. In a "
    "real 7B model the language model dominates the prefill and its time falls with the pruned FLOPs: "
    "ideal and measured speed-ups per model are on the project's *Benchmarks* page (docs/benchmarks.md)."
)
# The note shows when the measured speed-up got less than this share of the FLOPs-ideal one's gain.
TINY_PREFILL_NOTE_BELOW = 0.5


def tiny_prefill_note_applies(stats: dict) -> bool:
    """A random-weights tiny model whose measured prefill speed-up falls well short of the FLOPs-ideal
    one (ideal = unpruned / pruned whole-prefill FLOPs): the case the note explains."""
    ideal = stats["prefill_flops_unpruned"] / stats["prefill_flops_pruned"]
    return bool(stats["random_weights"]) and stats["speedup"] - 1.0 < TINY_PREFILL_NOTE_BELOW * (ideal - 1.0)


def stats_markdown(stats: dict) -> str:
    s = stats
    fraction = s["kept"] / s["visual_tokens"]
    return "\n".join(
        [
            f"### Kept {s['kept']} / {s['visual_tokens']} visual tokens ({fraction:.1%})",
            *(
                [f"Plus {s['newline_tokens']} row-newline tokens (LLaVA-NeXT), always kept, outside the budget."]
                if s["newline_tokens"]
                else []
            ),
            "",
            "| | unpruned | MFPruner | saved |",
            "|:--|--:|--:|--:|",
            f"| visual tokens | {s['visual_tokens']} | {s['kept']} | {1 - fraction:.1%} |",
            f"| LLM prefill length | {s['prefill_length_unpruned']} | {s['prefill_length_pruned']} "
            f"| {1 - s['prefill_length_pruned'] / s['prefill_length_unpruned']:.1%} |",
            f"| visual-token FLOPs | {format_flops(s['visual_flops_unpruned'])} | "
            f"{format_flops(s['visual_flops_pruned'])} | {s['visual_flops_saved']:.1%} |",
            f"| whole-prefill FLOPs | {format_flops(s['prefill_flops_unpruned'])} | "
            f"{format_flops(s['prefill_flops_pruned'])} | {s['prefill_flops_saved']:.1%} |",
            f"| measured prefill | {s['prefill_seconds_unpruned'] * 1e3:.1f} ms "
            f"| {s['prefill_seconds_pruned'] * 1e3:.1f} ms | **{s['speedup']:.2f}x** |",
            "",
            f"FLOPs: FastV's `4nd² + 2n²d + 2ndm` per LLM layer (n = visual tokens, or the whole prompt). "
            f"Prefill: median of {s['timing_repeats']} forward passes on {s['device']}, vision tower included. "
            f"Vote threshold: {s['min_votes']}.",
            *([TINY_PREFILL_NOTE] if tiny_prefill_note_applies(s) else []),
        ]
    )


def model_banner(demo: DemoModel) -> str:
    if demo.random_weights:
        family = by_model_type(demo.family)
        name, geometry = family.demo_name, family.demo_geometry
        return (
            f"⚠️ **Built-in {name} with RANDOM weights** ({geometry}). "
            "The pruning, the counts and the timings are real; the cue maps and answers are noise, not a "
            f"trained model's. Start the app with `--model` or `{MODEL_ENV}` for a real model."
        )
    return f"Model: **{demo.name}** on {demo.device}."


def example_images() -> list[list[str]]:
    """A few images that ship with matplotlib (its sample data), never downloaded."""
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return [[str(folder / name), question] for name, question in EXAMPLE_QUESTIONS.items() if (folder / name).exists()]


# ----------------------------------------------------------------------------- the page


CSS = """
#banner {border-left: 4px solid #f59e0b; padding: 6px 12px; background: rgba(245, 158, 11, 0.08); border-radius: 6px}
.panel img {object-fit: contain}
#stats table {font-size: 0.92em}
footer {display: none !important}
"""

PANEL_TITLES = {
    "original": "Original (hatched: cropped away)",
    "attention": "[CLS] attention alone",
    "uniqueness": "Uniqueness alone",
    "relevance": "Relevance alone",
    "mfpruner": "MFPruner (vote)",
}
ANYRES_NOTE = (
    "\n\nLLaVA-NeXT sees each image twice: as a high-res grid of tiles (the large map) and as one base "
    "tile of the whole image (the small map on the right). One budget covers the tokens of both maps; "
    "the row-newline tokens that close each grid row are always kept and not drawn."
)
HEATMAP_TITLES = {**{name: f"{CUE_TITLES[name]} score" for name in CUE_TITLES}, "votes": "votes"}


def result_image(label: str, elem_id: str) -> gr.Image:
    return gr.Image(
        label=label, type="pil", format="png", interactive=False, height=260, elem_id=elem_id,
        elem_classes="panel", buttons=["fullscreen"],
    )


def build_demo(demo: DemoModel, delete_cache: tuple[int, int] = CACHE_CLEANUP) -> gr.Blocks:
    """delete_cache: (every s, older than s) for Gradio's files of this page (see CACHE_CLEANUP)."""
    default_count = visual_token_count(demo, Image.new("RGB", (448, 448), (128, 128, 128)))
    config_budget = demo.model.config.visual_token_budget or max(1, default_count // 9)
    # analytics_enabled=False: else Gradio checks its version online and sends usage data (through
    # huggingface_hub's telemetry) when the page is built and launched; the demo reaches no network.
    with gr.Blocks(
        title="MFPruner: which visual tokens survive", delete_cache=delete_cache, analytics_enabled=False
    ) as page:
        gr.Markdown(
            "# MFPruner: which visual tokens survive\n"
            "Training-free visual-token pruning: three cues — the vision tower's [CLS] attention, token "
            "uniqueness and relevance to your question — vote on the visual tokens; the language model "
            "prefills only the kept ones. Upload a picture, ask a question, slide the budget."
        )
        gr.Markdown(model_banner(demo), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(
                    label="Image", type="filepath", image_mode=None, height=300, elem_id="image",
                    sources=["upload", "clipboard"],
                )
                question = gr.Textbox(label="Question", value="What is in the image?", lines=2, elem_id="question")
                gr.Examples(
                    example_images(), inputs=[image, question], api_visibility="private",
                    label="Examples (matplotlib sample data)",
                )
            with gr.Column(scale=2):
                budget_mode = gr.Radio(
                    [("Token count", "tokens"), ("Keep ratio", "ratio")], value="tokens", label="Budget",
                    elem_id="budget-mode",
                )
                budget = gr.Slider(
                    1, default_count, value=min(config_budget, default_count), step=1, precision=0,
                    label=f"Visual tokens kept (of {default_count})", elem_id="budget",
                )
                ratio = gr.Slider(
                    0.01, 1.0, value=demo.model.config.visual_token_ratio or 0.111, step=0.001,
                    label="Fraction of visual tokens kept", visible=False,
                    elem_id="ratio",
                )
                min_votes = gr.Slider(
                    1, len(CUE_TITLES), value=demo.model.config.min_votes, step=1, precision=0,
                    label="Vote threshold (cues that must agree)", elem_id="min-votes",
                )
                generate_answer = gr.Checkbox(
                    label=f"Also generate the answer (pruned and unpruned, {MAX_NEW_TOKENS} tokens max)",
                    value=False, elem_id="generate",
                )
                run = gr.Button("Prune and prefill", variant="primary", elem_id="run")
            with gr.Column(scale=3):
                stats = gr.Markdown("### Upload an image and press *Prune and prefill*", label="Summary", elem_id="stats")
                answer = gr.Textbox(
                    label="Answer", lines=4, interactive=False, elem_id="answer",
                    placeholder="Tick 'Also generate the answer' to compare the answers with and without pruning.",
                )
        gr.Markdown(
            "### The tokens each cue alone keeps at the same budget, and what the vote keeps (pruned patches dimmed)"
            + (ANYRES_NOTE if getattr(by_model_type(demo.family), "anyres", False) else "")
        )
        with gr.Row(equal_height=True):
            panels = {name: result_image(title, f"panel-{name}") for name, title in PANEL_TITLES.items()}
        with gr.Row(equal_height=True):
            gr.Markdown(
                f"### Scores per token\nEach cue's score, colour-mapped (`{HEATMAP_CMAP}`: dark = low, "
                "bright = high; min-max per image) and blended over the image.\n\n"
                "**Votes**: how many cues put the token in their top-k (dark = 0, bright = 3); the vote keeps "
                "tokens at or above the threshold first, then fills by the summed score.",
                elem_id="legend",
            )
            heatmaps = {name: result_image(title, f"heatmap-{name}") for name, title in HEATMAP_TITLES.items()}
        with gr.Accordion("Details (JSON)", open=False):
            details = gr.JSON(label="Details", elem_id="details")

        inputs = [image, question, budget_mode, budget, ratio, min_votes, generate_answer]
        outputs = [*panels.values(), *heatmaps.values(), stats, details, answer]

        # The image events take the raw upload (preprocess=False) and open the file themselves:
        # gr.Image's own preprocessing would fail on a corrupt file before a clear message.
        @gpu
        def prune_and_prefill(
            image, question, budget_mode, budget, ratio, min_votes, generate_answer, progress=gr.Progress()
        ):
            """Prunes the image's visual tokens, prefills pruned and unpruned, draws and counts."""
            try:
                result = analyze(
                    demo, upload_path(image), question, budget_mode, budget, ratio, min_votes, generate_answer, progress
                )
            except ValueError as error:
                raise gr.Error(str(error), print_exception=False)
            except Exception as error:  # a bug or an out-of-memory: say so and keep serving
                logger.exception("demo run failed")
                raise gr.Error(f"The run failed ({type(error).__name__}: {error}). Try another image or setting.")
            for note in result.notes:
                gr.Warning(note)
            images = [result.panels.get(name) for name in PANEL_TITLES]
            images += [result.heatmaps.get(name) for name in HEATMAP_TITLES]
            return *images, stats_markdown(result.stats), result.stats, result.answer or ""

        def token_count_for(image, current):
            """Helper: the slider's range follows the image's real visual-token count."""
            if image is None:
                return gr.skip()
            try:
                count = visual_token_count(demo, load_image(upload_path(image))[0])
            except ValueError:  # reported when the run starts
                return gr.skip()
            update = {"maximum": count, "label": f"Visual tokens kept (of {count})"}
            if current > count:  # else the value stays: the user may be moving the slider right now
                update["value"] = count
            return gr.Slider(**update)

        def show_budget_mode(mode):
            return gr.Slider(visible=mode == "tokens"), gr.Slider(visible=mode == "ratio")

        run.click(
            prune_and_prefill, inputs, outputs, api_name="prune", preprocess=False,
            concurrency_limit=1, concurrency_id="model",
        )
        for slider in (budget, ratio, min_votes):
            slider.release(
                prune_and_prefill, inputs, outputs, api_visibility="private", trigger_mode="always_last",
                preprocess=False, concurrency_limit=1, concurrency_id="model",
            )
        image.change(token_count_for, [image, budget], budget, api_visibility="private", preprocess=False)
        budget_mode.change(
            show_budget_mode, budget_mode, [budget, ratio], api_visibility="private", queue=False
        )
    return page


def launch(page: gr.Blocks, host: str, port: int | None, **kwargs):
    """show_error: an input Gradio refuses before the handler runs (a file path that was not
    uploaded) reaches the client with Gradio's message, not as `{"error": null}`; the handler's own
    errors are gr.Error messages already."""
    theme = gr.themes.Default(primary_hue="indigo")
    return page.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, ssr_mode=False, css=CSS, theme=theme, show_error=True, **kwargs
    )
