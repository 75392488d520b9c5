"""Which region of the ORIGINAL image each visual token covers, per model family: a re-export of
the shipped `mfpruner_visualize` module (the one copy of the geometry, in every model repo), for
the code that imported it from here."""

from __future__ import annotations

from mfpruner_visualize import (  # noqa: F401 (re-exported)
    AnyresGeometry,
    anyres_geometry,
    cell_boxes,
    llava_boxes,
    llava_next_token_boxes,
    llava_token_boxes,
    result_core,
    smart_resize_grid,
    whole_image_boxes,
    whole_image_grid_boxes,
)
