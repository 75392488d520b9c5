"""Drawing: the demo draws with the shipped functions of `mfpruner_visualize` (the module every
model repo carries for model.draw_pruning / plot_pruning), re-exported here for the demo's modules.

A panel is a canvas: the image at display size with the "main" token map, and for LLaVA-NeXT a
smaller copy to its right with the base tile's tokens (mfpruner_visualize.token_canvas).
"""

from __future__ import annotations

from mfpruner_lib.families import by_model_type
from mfpruner_visualize import (  # noqa: F401 (re-exported for the demo)
    GROUND,
    HEATMAP_ALPHA,
    HEATMAP_CMAP,
    INSET_GAP,
    UNSEEN,
    Canvas,
    checked_box_counts,
    cue_heatmap,
    display_copy,
    kept_overlay,
    shade_unseen,
    to_image,
    token_canvas,
    token_index_map,
    whole_image_boxes,
)


def token_maps(demo, image_size: tuple[int, int], result, image_index: int = 0) -> dict:
    """{map name: (N, 4) boxes} of image `image_index`'s visual tokens, in original image pixels."""
    family = by_model_type(demo.family)
    if family is None:
        import gradio as gr

        gr.Warning(f"No token-to-region mapping for model family '{demo.family}': drawn as a whole-image grid.")
    boxes_fn = family.token_boxes if family is not None else whole_image_boxes
    return checked_box_counts(boxes_fn(image_size, demo.processor.image_processor, result, image_index), result, image_index)
