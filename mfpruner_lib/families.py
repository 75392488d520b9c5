"""The model families: one entry each, the only per-family table outside the modeling code.

Adding a family = its config class (configuration_mfpruner.py), its modeling file, and one
`Family` entry here: the export, the FLOPs calculator, the benchmarks, the demo and the tests all
read this registry (tests/test_families.py checks that every entry is complete and that each of
them covers every family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mfpruner_visualize
from mfpruner_lib import flops, model_sizes, tiny_models


@dataclass(frozen=True)
class Architecture:
    """How to export one stock model_type (tools/export.py). Classes are "module.Class" of flat
    top-level files."""

    config_class: str
    model_class: str
    processor_class: str | None  # the processor that adds the CLIP tokenizer (None: no --clip-text)
    vision_patch_key: str | None  # regex of the vision tower's patch embedding in the stock keys
    tags: tuple[str, ...]
    family: str = "LLaVA"  # the model family, for messages and the card
    attention_cue: str = "the vision tower's [CLS] attention"  # cue A, for the card
    per_call_setting: str = "visual_token_budget=128"  # the card's per-call override example
    processor_note: str = ""  # what the card says about the processor (when it needs more than AutoProcessor)


@dataclass(frozen=True)
class RealModel:
    """A published checkpoint's sizes, for the FLOPs table (no weights)."""

    name: str
    config: Callable  # () -> the stock config (mfpruner_lib.model_sizes)
    image_hw: tuple[int, int] | None  # the image the table counts (None: one fixed-size tile)
    clip_text: bool  # the paper's relevance cue uses the CLIP text tower
    note: str


@dataclass(frozen=True)
class Family:
    """One model family.

    key: the short name the command lines take (`--family llava-1.5`); name: for tables and pages.
    model_type: the stock config's (the MFPruner config's is "mfpruner_" + it).
    stock_model_class: the stock transformers class (tests compare against it).
    export: the export row (config, model and processor classes in the shipped files).
    build_tiny(path, stock=False, seed=0, **config): a tiny random-weights repo (mfpruner_lib.tiny_models).
    processor_stand_in: the demo may need tokenizer + image processor in place of AutoProcessor
        (Qwen2.5-VL: its processor cannot be built without torchvision in transformers 5.x).
    anyres: LLaVA-NeXT's tiles: row-newline tokens outside the budget, a second (base tile) map.
    geometry(config, image_hw): one image's token counts (mfpruner_lib.flops.Geometry).
    real_models / flops_budgets: the FLOPs table's rows: published sizes, the paper's settings.
    token_boxes: the token -> image-region function (the shipped mfpruner_visualize.TOKEN_LAYOUTS entry
        of the model class's `token_layout`; tests/test_visualize.py checks they agree).
    demo_tiny(folder): the demo's built-in tiny model with the real model's token geometry;
        demo_geometry: what the demo's banner says about that geometry.
    """

    key: str
    name: str
    model_type: str
    stock_model_class: str
    export: Architecture
    build_tiny: Callable
    geometry: Callable
    real_models: tuple[RealModel, ...]
    flops_budgets: tuple
    token_boxes: Callable
    demo_tiny: Callable
    demo_geometry: str
    processor_stand_in: bool = False
    anyres: bool = False

    @property
    def config_class(self) -> str:
        return self.export.config_class

    @property
    def model_class(self) -> str:
        return self.export.model_class

    @property
    def demo_name(self) -> str:
        return f"tiny MFPruner {self.name}"


# ----------------------------------------------------------------------------- the demo's tiny models
# Random weights, the real models' token geometry, built locally.


def demo_tiny_llava(folder: str | Path) -> Path:
    """LLaVA-1.5: 336 px, 14 px patches: 24 x 24 = 576 tokens, budget 64."""
    return tiny_models.build_tiny_llava(Path(folder) / "tiny-mfpruner-llava", image_size=336, visual_token_budget=64)


def demo_tiny_llava_next(folder: str | Path) -> Path:
    """LLaVA-1.6: 336 px tiles on its published pinpoints."""
    return tiny_models.build_tiny_llava_next(
        Path(folder) / "tiny-mfpruner-llava-next", tile_size=336, grid_pinpoints=model_sizes.LLAVA_NEXT_PINPOINTS
    )


def demo_tiny_qwen2_5_vl(folder: str | Path) -> Path:
    """Qwen2.5-VL: 28 px per token, images resized to at most 1,024 tokens."""
    return tiny_models.build_tiny_qwen2_5_vl(Path(folder) / "tiny-mfpruner-qwen2_5_vl", max_pixels=28 * 28 * 1024)


def demo_tiny_qwen3_vl(folder: str | Path) -> Path:
    """Qwen3-VL: 32 px per token, images resized to at most 1,024 tokens."""
    return demo_tiny_qwen3(folder, "tiny-mfpruner-qwen3_vl", tiny_models.build_tiny_qwen3_vl)


def demo_tiny_qwen3_vl_moe(folder: str | Path) -> Path:
    """Qwen3-VL MoE: the dense model's geometry (32 px per token, at most 1,024 tokens)."""
    return demo_tiny_qwen3(folder, "tiny-mfpruner-qwen3_vl_moe", tiny_models.build_tiny_qwen3_vl_moe)


def demo_tiny_qwen3_5(folder: str | Path) -> Path:
    """Qwen3.5: Qwen3-VL's geometry (32 px per token, at most 1,024 tokens)."""
    return demo_tiny_qwen3(folder, "tiny-mfpruner-qwen3_5", tiny_models.build_tiny_qwen3_5)


def demo_tiny_qwen3_5_moe(folder: str | Path) -> Path:
    """Qwen3.5 MoE: Qwen3-VL's geometry (32 px per token, at most 1,024 tokens)."""
    return demo_tiny_qwen3(folder, "tiny-mfpruner-qwen3_5_moe", tiny_models.build_tiny_qwen3_5_moe)


def demo_tiny_qwen3(folder: str | Path, name: str, build: Callable) -> Path:
    path = build(Path(folder) / name)
    _, image_processor = tiny_models.build_tiny_qwen3_vl_processor(max_pixels=32 * 32 * 1024)
    image_processor.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- the registry

CLIP_PATCH_EMBEDDING = r"vision_tower\.(vision_model\.)?embeddings\.patch_embedding\.weight$"
# The paper's settings in the FLOPs table: 192 / 128 / 64 / 32 of 576 (LLaVA-1.5), the same as
# ratios (LLaVA-NeXT: the last three are the paper's), Qwen2.5-VL: prune 55.5% / 66.7% / 77.8%.
LLAVA_BUDGETS = tuple((str(k), {"budget": k}) for k in (192, 128, 64, 32))
RATIO_BUDGETS = tuple((f"{100 * r:.1f}%", {"ratio": r}) for r in (0.333, 0.222, 0.111, 0.056))
QWEN_BUDGETS = tuple((f"{100 * r:.1f}%", {"ratio": r}) for r in (0.445, 0.333, 0.222))

def qwen3_vl_architecture(config_class: str, model_class: str, tags: tuple[str, ...], family: str) -> Architecture:
    """The export row of a Qwen3-VL family (dense or MoE): LLM-space relevance, cue A in the last vision block."""
    return Architecture(
        config_class=config_class,
        model_class=model_class,
        processor_class=None,  # no CLIP text tower: relevance is measured in the LLM's space
        vision_patch_key=None,
        tags=tags,
        family=family,
        attention_cue="the attention each patch receives in the last vision block (full attention)",
        per_call_setting="visual_token_ratio=0.333",
        processor_note=(
            "The processor is the base model's own `Qwen3VLProcessor`; in transformers 5.x it needs "
            "`torchvision` (for its video processor)."
        ),
    )


FAMILIES = {family.key: family for family in (  # keyed by Family.key
    Family(
        key="llava-1.5",
        name="LLaVA-1.5",
        model_type="llava",
        stock_model_class="LlavaForConditionalGeneration",
        export=Architecture(
            config_class="configuration_mfpruner.MFPrunerLlavaConfig",
            model_class="modeling_mfpruner_llava.MFPrunerLlavaForConditionalGeneration",
            processor_class="processing_mfpruner.MFPrunerLlavaProcessor",
            vision_patch_key=CLIP_PATCH_EMBEDDING,
            tags=("llava",),
            family="LLaVA-1.5",
        ),
        build_tiny=tiny_models.build_tiny_llava,
        geometry=lambda config, image_hw=None: flops.llava_geometry(config),
        real_models=(
            RealModel("LLaVA-1.5-7B", model_sizes.llava_1_5_7b, None, True, "336 px, 576 tokens"),
            RealModel("LLaVA-1.5-13B", model_sizes.llava_1_5_13b, None, True, "336 px, 576 tokens"),
        ),
        flops_budgets=LLAVA_BUDGETS,
        token_boxes=mfpruner_visualize.llava_boxes,
        demo_tiny=demo_tiny_llava,
        demo_geometry="LLaVA-1.5 geometry: 576 visual tokens",
    ),
    Family(
        key="llava-next",
        name="LLaVA-NeXT",
        model_type="llava_next",
        stock_model_class="LlavaNextForConditionalGeneration",
        export=Architecture(
            config_class="configuration_mfpruner.MFPrunerLlavaNextConfig",
            model_class="modeling_mfpruner_llava.MFPrunerLlavaNextForConditionalGeneration",
            processor_class="processing_mfpruner.MFPrunerLlavaNextProcessor",
            vision_patch_key=CLIP_PATCH_EMBEDDING,
            tags=("llava", "llava_next"),
            family="LLaVA-NeXT / LLaVA-1.6",
            attention_cue="the vision tower's [CLS] attention of each tile",
            per_call_setting="visual_token_ratio=0.111",
        ),
        build_tiny=tiny_models.build_tiny_llava_next,
        geometry=flops.llava_next_geometry,
        real_models=(
            RealModel(
                "LLaVA-1.6-vicuna-7B", model_sizes.llava_1_6_vicuna_7b, (672, 672), True,
                "672x672 image: 5 tiles, 2,880 patch + 48 newline tokens",
            ),
        ),
        flops_budgets=RATIO_BUDGETS,
        token_boxes=mfpruner_visualize.llava_next_token_boxes,
        demo_tiny=demo_tiny_llava_next,
        demo_geometry="LLaVA-1.6 anyres tiles: up to 2,928 visual tokens",
        anyres=True,
    ),
    Family(
        key="qwen2.5-vl",
        name="Qwen2.5-VL",
        model_type="qwen2_5_vl",
        stock_model_class="Qwen2_5_VLForConditionalGeneration",
        export=Architecture(
            config_class="configuration_mfpruner.MFPrunerQwen2_5_VLConfig",
            model_class="modeling_mfpruner_qwen2_5_vl.MFPrunerQwen2_5_VLForConditionalGeneration",
            processor_class=None,  # Qwen2.5-VL has no CLIP text tower: relevance is measured in the LLM's space
            vision_patch_key=None,
            tags=("qwen2_5_vl",),
            family="Qwen2.5-VL",
            attention_cue="the attention each patch receives in the last full-attention vision block",
            per_call_setting="visual_token_ratio=0.333",
            processor_note=(
                "The processor is the base model's own `Qwen2_5_VLProcessor`; in transformers 5.x it needs "
                "`torchvision` (for its video processor)."
            ),
        ),
        build_tiny=tiny_models.build_tiny_qwen2_5_vl,
        geometry=flops.qwen2_5_vl_geometry,
        real_models=(
            RealModel("Qwen2.5-VL-7B", model_sizes.qwen2_5_vl_7b, (1024, 1024), False,
                      "1024x1024 image (resized to 1036x1036)"),
        ),
        flops_budgets=QWEN_BUDGETS,
        token_boxes=mfpruner_visualize.whole_image_boxes,
        demo_tiny=demo_tiny_qwen2_5_vl,
        demo_geometry="Qwen2.5-VL geometry: 28 px per visual token, up to 1,024",
        processor_stand_in=True,
    ),
    Family(
        key="qwen3-vl",
        name="Qwen3-VL",
        model_type="qwen3_vl",
        stock_model_class="Qwen3VLForConditionalGeneration",
        export=qwen3_vl_architecture(
            "configuration_mfpruner.MFPrunerQwen3VLConfig",
            "modeling_mfpruner_qwen3_vl.MFPrunerQwen3VLForConditionalGeneration",
            ("qwen3_vl",),
            "Qwen3-VL",
        ),
        build_tiny=tiny_models.build_tiny_qwen3_vl,
        geometry=flops.qwen3_vl_geometry,
        real_models=(
            RealModel("Qwen3-VL-8B", model_sizes.qwen3_vl_8b, (1024, 1024), False, "1024x1024 image, 32 px per token"),
        ),
        flops_budgets=QWEN_BUDGETS,
        token_boxes=mfpruner_visualize.whole_image_boxes,  # the same smart-resize raster grid as Qwen2.5-VL (32 px tokens)
        demo_tiny=demo_tiny_qwen3_vl,
        demo_geometry="Qwen3-VL geometry: 32 px per visual token, up to 1,024",
        processor_stand_in=True,
    ),
    Family(
        key="qwen3-vl-moe",
        name="Qwen3-VL MoE",
        model_type="qwen3_vl_moe",
        stock_model_class="Qwen3VLMoeForConditionalGeneration",
        export=qwen3_vl_architecture(
            "configuration_mfpruner.MFPrunerQwen3VLMoeConfig",
            "modeling_mfpruner_qwen3_vl.MFPrunerQwen3VLMoeForConditionalGeneration",
            ("qwen3_vl_moe",),
            "Qwen3-VL MoE",
        ),
        build_tiny=tiny_models.build_tiny_qwen3_vl_moe,
        geometry=flops.qwen3_vl_geometry,
        real_models=(
            RealModel("Qwen3-VL-30B-A3B", model_sizes.qwen3_vl_30b_a3b, (1024, 1024), False,
                      "1024x1024 image, 32 px per token; 8 of 128 experts per token"),
        ),
        flops_budgets=QWEN_BUDGETS,
        token_boxes=mfpruner_visualize.whole_image_boxes,
        demo_tiny=demo_tiny_qwen3_vl_moe,
        demo_geometry="Qwen3-VL geometry: 32 px per visual token, up to 1,024",
        processor_stand_in=True,
    ),
    Family(
        key="qwen3.5",
        name="Qwen3.5",
        model_type="qwen3_5",
        stock_model_class="Qwen3_5ForConditionalGeneration",
        export=qwen3_vl_architecture(
            "configuration_mfpruner.MFPrunerQwen3_5Config",
            "modeling_mfpruner_qwen3_5.MFPrunerQwen3_5ForConditionalGeneration",
            ("qwen3_5",),
            "Qwen3.5",
        ),
        build_tiny=tiny_models.build_tiny_qwen3_5,
        geometry=flops.qwen3_vl_geometry,  # Qwen3-VL's tower and processor geometry (no DeepStack)
        real_models=(
            RealModel("Qwen3.5-27B", model_sizes.qwen3_5_27b, (1024, 1024), False,
                      "1024x1024 image, 32 px per token; 48 linear-attention + 16 full-attention layers"),
        ),
        flops_budgets=QWEN_BUDGETS,
        token_boxes=mfpruner_visualize.whole_image_boxes,
        demo_tiny=demo_tiny_qwen3_5,
        demo_geometry="Qwen3.5 geometry: 32 px per visual token, up to 1,024",
        processor_stand_in=True,
    ),
    Family(
        key="qwen3.5-moe",
        name="Qwen3.5 MoE",
        model_type="qwen3_5_moe",
        stock_model_class="Qwen3_5MoeForConditionalGeneration",
        export=qwen3_vl_architecture(
            "configuration_mfpruner.MFPrunerQwen3_5MoeConfig",
            "modeling_mfpruner_qwen3_5.MFPrunerQwen3_5MoeForConditionalGeneration",
            ("qwen3_5_moe",),
            "Qwen3.5 MoE",
        ),
        build_tiny=tiny_models.build_tiny_qwen3_5_moe,
        geometry=flops.qwen3_vl_geometry,
        real_models=(
            RealModel("Qwen3.5-35B-A3B", model_sizes.qwen3_5_35b_a3b, (1024, 1024), False,
                      "1024x1024 image, 32 px per token; 8 of 256 experts + a shared expert per token"),
        ),
        flops_budgets=QWEN_BUDGETS,
        token_boxes=mfpruner_visualize.whole_image_boxes,
        demo_tiny=demo_tiny_qwen3_5_moe,
        demo_geometry="Qwen3.5 geometry: 32 px per visual token, up to 1,024",
        processor_stand_in=True,
    ),
)}


def by_model_type(model_type: str) -> Family | None:
    """The family of a stock or MFPruner config's model_type ("llava_next", "mfpruner_llava_next")."""
    stock = str(model_type).removeprefix("mfpruner_")
    return next((family for family in FAMILIES.values() if family.model_type == stock), None)
