"""mfpruner_lib.flops and tools.flops: the paper's FastV figure, the whole-prefill count, the token geometry, the CLI."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig

from mfpruner_lib import flops, model_sizes
from tools import flops as flops_cli

from conftest import refused


def test_fastv_reproduces_the_seed_figure():
    # LLaVA-1.5-7B: d = 4096, m = 11008, 32 of 576 visual tokens -> 94.6% (ALGORITHM.md).
    assert round(100 * flops.fastv_reduction(576, 32, 4096, 11008), 1) == 94.6


@pytest.mark.parametrize(
    "kept, by_hand, percent",
    [
        # F(n) / n = d (4d + 2n + 2m) with 4d + 2m = 16384 + 22016 = 38400, so
        # 1 - F(k) / F(576) = 1 - k (38400 + 2k) / (576 (38400 + 1152)).
        (192, 1 - 192 * 38784 / (576 * 39552), 67.3),
        (128, 1 - 128 * 38656 / (576 * 39552), 78.3),
        (64, 1 - 64 * 38528 / (576 * 39552), 89.2),
        (32, 1 - 32 * 38464 / (576 * 39552), 94.6),
    ],
)
def test_fastv_other_budgets_by_hand(kept, by_hand, percent):
    reduction = flops.fastv_reduction(576, kept, 4096, 11008)
    assert reduction == pytest.approx(by_hand, rel=1e-12)
    assert round(100 * reduction, 1) == percent


def test_fastv_per_layer_formula():
    # 4 n d^2 + 2 n^2 d + 2 n d m with n=3, d=2, m=5: 48 + 36 + 60 = 144, times 2 layers.
    assert flops.fastv_flops(3, 2, 5, layers=2) == 2 * 144


def tiny_llava():
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=10)
    return model_sizes.llava_config(vision, text, image_token_id=9)


def test_whole_prefill_of_a_tiny_llava_equals_a_count_by_hand():
    # Vision: 28 px / 14 = 2 x 2 = 4 patches, 5 tokens with [CLS], width 8, MLP 16, one layer.
    patch_embed = 2 * 4 * (3 * 14 * 14) * 8  # 37632
    vision_layer = 4 * (2 * 5 * 8 * 8) + 2 * (2 * 5 * 8 * 5) + 2 * (2 * 5 * 8 * 16)  # qkvo 2560 + attn 800 + mlp 2560
    vision = patch_embed + vision_layer  # 43552
    projector = 2 * 4 * 8 * 16 + 2 * 4 * 16 * 16  # 1024 + 2048
    # LLM: width 16, 2 heads of 8, 1 kv head (k, v width 8), gated MLP 32, vocab 10; 3 text + 4 image tokens.
    length = 7
    llm = (
        2 * length * 16 * 16  # q
        + 2 * (2 * length * 16 * 8)  # k, v
        + 2 * length * 16 * 16  # o
        + 2 * (2 * length * 16 * length)  # Q K^T, probs V
        + 3 * (2 * length * 16 * 32)  # gate, up, down
        + 2 * 1 * 16 * 10  # LM head, last position
    )
    assert (vision, projector, llm) == (43552, 3072, 35712)

    full = flops.prefill_flops(tiny_llava(), text_tokens=3)
    assert (full.vision, full.projector, full.text_tower, full.cues, full.llm) == (vision, projector, 0, 0, llm)
    assert full.total == 82336 and full.lm_length == 7

    # Keep 2 of 4: LLM over 5 tokens; cues: [CLS] row over 5 keys of width 8, uniqueness and LLM-space
    # relevance over 4 tokens of width 16.
    pruned_llm = (
        2 * (2 * 5 * 16 * 16) + 2 * (2 * 5 * 16 * 8) + 2 * (2 * 5 * 16 * 5) + 3 * (2 * 5 * 16 * 32) + 2 * 16 * 10
    )
    cues = 2 * 5 * 8 + 2 * 4 * 16 + 2 * 4 * 16
    pruned = flops.prefill_flops(tiny_llava(), text_tokens=3, kept=2)
    assert (pruned.llm, pruned.cues, pruned.lm_length) == (pruned_llm, cues, 5)
    assert pruned.total == vision + projector + cues + pruned_llm == 71920


def test_clip_text_tower_is_counted_when_used():
    text = CLIPTextConfig(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                          max_position_embeddings=3, projection_dim=2)
    pruned = flops.prefill_flops(tiny_llava(), text_tokens=3, kept=2, clip_text_config=text)
    # 1 segment of 3 tokens: qkvo 4*(2*3*4*4) + attn 2*(2*3*4*3) + mlp 2*(2*3*4*8); text projection 2*1*4*2;
    # CLIP visual projection of the 4 patches (width 8) to 2.
    tower = 4 * (2 * 3 * 4 * 4) + 2 * (2 * 3 * 4 * 3) + 2 * (2 * 3 * 4 * 8) + 2 * 1 * 4 * 2 + 2 * 4 * 8 * 2
    assert pruned.text_tower == tower
    assert pruned.cues == 2 * 5 * 8 + 2 * 4 * 16 + 2 * 4 * 2  # relevance now in CLIP space (width 2, 1 segment)


def test_real_geometries():
    llava = flops.geometry(model_sizes.llava_1_5_7b())
    assert (llava.visual_tokens, llava.tiles) == (576, 1)
    # 672 x 672 -> 2 x 2 crops + base: 5 tiles of 576 patches; packed 576 + 48 x 48 + 48 newlines.
    nxt = flops.geometry(model_sizes.llava_1_6_vicuna_7b(), (672, 672))
    assert (nxt.tiles, nxt.projected_tokens, nxt.visual_tokens) == (5, 2880, 576 + 48 * 48 + 48)
    # 1024 px -> 1036 px (multiple of 28) -> 74 x 74 patches -> 37 x 37 merged tokens.
    qwen = flops.geometry(model_sizes.qwen2_5_vl_7b(), (1024, 1024))
    assert (qwen.vision_patches, qwen.visual_tokens) == (74 * 74, 37 * 37)
    assert sum(qwen.vision_windows) == 74 * 74 and max(qwen.vision_windows) == 64  # 112 px windows: 8 x 8 patches
    # Qwen3-VL: 1024 px is a multiple of 32 -> 64 x 64 patches of 16 px -> 32 x 32 merged tokens, no windows.
    for config in (model_sizes.qwen3_vl_8b(), model_sizes.qwen3_vl_30b_a3b(), model_sizes.qwen3_5_27b(),
                   model_sizes.qwen3_5_35b_a3b()):
        qwen3 = flops.geometry(config, (1024, 1024))
        assert (qwen3.vision_patches, qwen3.visual_tokens, qwen3.vision_windows) == (64 * 64, 32 * 32, ())


def test_qwen3_vl_tower_is_full_attention_with_deepstack_mergers():
    """Every Qwen3-VL block attends over the whole image with a two-matrix MLP, and each DeepStack
    level has its own merger beside the final one."""
    config = model_sizes.qwen3_vl_8b()
    v, geo = config.vision_config, flops.geometry(config, (1024, 1024))
    patches, width = geo.vision_patches, v.hidden_size
    block = flops.transformer_layer(patches, [patches], width, width, width, v.intermediate_size, gated=False)
    embed = flops.matmul(patches, 3 * 2 * 16 * 16, width)
    assert flops.qwen_vision_tower(v, geo) == embed + 27 * block
    merged = 4 * width
    one_merger = flops.matmul(1024, merged, merged) + flops.matmul(1024, merged, 4096)
    assert flops.prefill_flops(config, 60, image_hw=(1024, 1024)).projector == (1 + 3) * one_merger


def test_moe_language_model_counts_the_active_experts_and_the_router():
    text = model_sizes.qwen3_vl_30b_a3b().text_config
    dense_equivalent = model_sizes.qwen3_vl_8b().text_config
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"):
        setattr(dense_equivalent, name, getattr(text, name))
    dense_equivalent.intermediate_size = 8 * 768  # 8 of 128 experts per token, each 768 wide
    router = 48 * flops.matmul(100, 2048, 128)
    assert flops.language_model(text, 100) == flops.language_model(dense_equivalent, 100) + router


def test_qwen3_5_hybrid_language_model_counts_each_layer_kind_from_the_stock_modules():
    """Qwen3.5-27B: the Gated DeltaNet layers' projections and convolution are 2 x tokens x the stock
    module's weights (a meta-device copy), the delta rule 3 state-sized products per token and value
    head; the full-attention layers' q_proj writes queries and the output gate. All of it linear in
    the tokens except the full-attention layers' scores."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Attention, Qwen3_5GatedDeltaNet, Qwen3_5MLP

    text = model_sizes.qwen3_5_27b().text_config
    assert text.layer_types.count("linear_attention") == 48 and text.layer_types.count("full_attention") == 16
    with torch.device("meta"):
        deltanet, attention, mlp = Qwen3_5GatedDeltaNet(text, 0), Qwen3_5Attention(text, 3), Qwen3_5MLP(text, text.intermediate_size)
    n = 100
    weights = lambda module: sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight") and p.dim() >= 2)
    delta_rule = 3 * 2 * n * 48 * 128 * 128
    assert flops.gated_deltanet(n, text) == 2 * n * weights(deltanet) + delta_rule  # projections + depthwise conv
    assert flops.gated_deltanet(2 * n, text) == 2 * flops.gated_deltanet(n, text)  # linear in the tokens
    scores = flops.attention_core([n], 24 * 256)
    expected = 48 * (flops.gated_deltanet(n, text) + 2 * n * weights(mlp)) + 16 * (2 * n * weights(attention) + scores
                                                                                   + 2 * n * weights(mlp))
    assert flops.language_model(text, n) == expected + flops.matmul(1, 5120, 248320)


def test_qwen3_5_moe_counts_the_active_and_shared_experts_and_both_gates():
    """Qwen3.5-35B-A3B: each token goes through 8 of 256 experts and the shared expert (each 512 wide),
    plus the router and the shared expert's one-output gate, in all 40 layers."""
    text = model_sizes.qwen3_5_35b_a3b().text_config
    dense_equivalent = model_sizes.qwen3_5_35b_a3b().text_config
    dense_equivalent.num_experts, dense_equivalent.shared_expert_intermediate_size = 0, 0
    dense_equivalent.intermediate_size = 8 * 512 + 512
    gates = 40 * (flops.matmul(100, 2048, 256) + flops.matmul(100, 2048, 1))
    assert flops.language_model(text, 100) == flops.language_model(dense_equivalent, 100) + gates


def test_unknown_model_type_is_refused():
    config = model_sizes.llava_1_5_7b()
    config.model_type = "bert"
    with pytest.raises(ValueError, match="model_type"):
        flops.geometry(config)


def test_cli_table(capsys, tmp_path):
    flops_cli.main(["--output", str(tmp_path / "flops.md")])
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 3 * 5 + 5 * (1 + 3)  # 3 LLaVA models x (unpruned + 4 budgets), 5 Qwen models: unpruned + 3
    assert [r for r in rows if r.startswith("| LLaVA-1.5-7B | 32 |")][0].split(" | ")[3] == "94.6%"
    assert any(r.startswith("| LLaVA-1.6-vicuna-7B") and "2928 / 2928" in r for r in rows)
    assert (tmp_path / "flops.md").read_text().count("\n| ") == len(rows) + 1
    assert "`--text-tokens` must be >= 0" in refused(flops_cli.main, ["--text-tokens", "-1"], capsys)
