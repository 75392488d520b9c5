"""MFPruner demo: upload a picture, ask a question, slide the visual-token budget, and see which
visual tokens MFPruner keeps, what each cue alone would keep at the same budget, and how much
shorter and faster the language model's prefill gets.

    pip install -r requirements.txt && python app.py            # built-in tiny LLaVA-1.5, random weights
    python app.py --tiny llava_next                              # tiny LLaVA-NeXT (or qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe)
    python app.py --model <hub id or local MFPruner repo>        # a real model (or MFPRUNER_MODEL=...)

This file only reads the command line and launches: the demo is the `mfpruner_demo` package
(loading, inputs, analysis, render, ui; see docs/demo.md), on the shipped model code and
`mfpruner_lib` (the family registry, token geometry, FLOPs, timing). A Hugging Face Space runs
this file (`python -m tools.make_space` writes a ready-to-push Space folder).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mfpruner_demo.loading import MODEL_ENV, MODEL_FILE, TINY_FAMILIES, default_model_spec, load_model
from mfpruner_demo.ui import build_demo, launch
from mfpruner_lib.cli import ArgumentParser, refusals_as_errors


@refusals_as_errors
def main(argv=None):
    parser = ArgumentParser(prog="python app.py", description="MFPruner demo (Gradio)")
    parser.add_argument(
        "--model", default=default_model_spec(Path(__file__).parent),
        help=f"hub id or local MFPruner repo (default: ${MODEL_ENV}, else {MODEL_FILE} beside app.py, "
        "else the tiny random-weights model)",
    )
    parser.add_argument(
        "--tiny", choices=sorted(TINY_FAMILIES), default="llava",
        help="without --model: the family of the built-in tiny random-weights model (default: llava, LLaVA-1.5)",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    launch(build_demo(load_model(args.model, tiny=args.tiny)), args.host, args.port)


if __name__ == "__main__":
    main()
