"""Configs of the real models from their published sizes (no weights, no download), and the
config builders the FLOPs calculator and the benchmarks share.

Sizes are copied from the published `config.json` files:
  llava-hf/llava-1.5-7b-hf, llava-hf/llava-1.5-13b-hf      CLIP ViT-L/14-336 + Vicuna-7B / -13B v1.5
  llava-hf/llava-v1.6-vicuna-7b-hf                         same tower and LLM as 1.5-7B, anyres tiles
  Qwen/Qwen2.5-VL-7B-Instruct                              window-attention ViT + Qwen2.5-7B
  Qwen/Qwen3-VL-8B-Instruct                                full-attention ViT with DeepStack + Qwen3-8B
  Qwen/Qwen3-VL-30B-A3B-Instruct                           the same ViT + Qwen3-30B-A3B (MoE, 8 of 128 experts)
  Qwen/Qwen3.5-27B                                         the same ViT without DeepStack + a hybrid LLM
                                                           (48 Gated DeltaNet layers, 16 full-attention layers)
  Qwen/Qwen3.5-35B-A3B                                     the same ViT + a hybrid MoE LLM (8 of 256 experts + a
                                                           shared expert; 30 Gated DeltaNet, 10 full-attention layers)
  openai/clip-vit-large-patch14-336 (text tower)           the paper's relevance cue for LLaVA
"""

from __future__ import annotations

from transformers import (
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    Qwen2_5_VLConfig,
    Qwen3_5Config,
    Qwen3_5MoeConfig,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
)

# CLIP ViT-L/14 at 336 px: 24 x 24 = 576 patch tokens + [CLS].
CLIP_VIT_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768,
)
CLIP_TEXT_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, vocab_size=49408,
)
VICUNA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
)
VICUNA_13B = dict(
    hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
    num_key_value_heads=40, vocab_size=32064, max_position_embeddings=4096,
)
QWEN2_5_VL_7B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu",
)
QWEN2_5_VL_7B_TEXT = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
)
QWEN3_VL_VISION = dict(
    depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
    hidden_act="gelu_pytorch_tanh",
)
QWEN3_VL_8B_TEXT = dict(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
)
QWEN3_VL_30B_A3B_TEXT = dict(
    hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
)
# Qwen3.5-27B: the config.json of Qwen/Qwen3.5-27B as copied in public repositories (not read from the hub
# here: no network); the language model's numbers agree across three independent copies.
QWEN3_5_27B_VISION = dict(
    depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=5120, patch_size=16,
    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh",
)
QWEN3_5_27B_TEXT = dict(
    hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24, num_key_value_heads=4,
    head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320, max_position_embeddings=262144,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 16,
)
# Qwen3.5-35B-A3B: likewise from copies of its config.json (four agree on the language model); the
# tower is taken to be the 27B's with the output width of this language model.
QWEN3_5_35B_A3B_TEXT = dict(
    hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, vocab_size=248320, max_position_embeddings=262144,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 10,
)
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_config(vision: dict, text: dict, *, config_class=LlavaConfig, image_token_id: int = 32000, **extra):
    """LLaVA-1.5-style config (CLIP tower, 2-layer GELU projector, Llama LLM) from size dicts.
    config_class: LlavaConfig, LlavaNextConfig or an MFPruner subclass; extra: its other fields."""
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    return config_class(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_index=image_token_id,
        image_seq_length=tokens,
        **extra,
    )


def qwen2_5_vl_config(vision: dict, text: dict, *, config_class=Qwen2_5_VLConfig, **extra):
    """A Qwen-VL config from size dicts; config_class: Qwen2_5_VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig or an
    MFPruner subclass."""
    return config_class(vision_config=dict(vision), text_config=dict(text), **extra)


def llava_1_5_7b():
    return llava_config(CLIP_VIT_L_336, VICUNA_7B)


def llava_1_5_13b():
    return llava_config(CLIP_VIT_L_336, VICUNA_13B)


def llava_1_6_vicuna_7b():
    return llava_config(CLIP_VIT_L_336, VICUNA_7B, config_class=LlavaNextConfig, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)


def qwen2_5_vl_7b():
    return qwen2_5_vl_config(QWEN2_5_VL_7B_VISION, QWEN2_5_VL_7B_TEXT)


def qwen3_vl_8b():
    return qwen2_5_vl_config(QWEN3_VL_VISION, QWEN3_VL_8B_TEXT, config_class=Qwen3VLConfig)


def qwen3_vl_30b_a3b():
    vision = dict(QWEN3_VL_VISION, out_hidden_size=QWEN3_VL_30B_A3B_TEXT["hidden_size"])
    return qwen2_5_vl_config(vision, QWEN3_VL_30B_A3B_TEXT, config_class=Qwen3VLMoeConfig)


def qwen3_5_27b():
    return qwen2_5_vl_config(QWEN3_5_27B_VISION, QWEN3_5_27B_TEXT, config_class=Qwen3_5Config)


def qwen3_5_35b_a3b():
    vision = dict(QWEN3_5_27B_VISION, out_hidden_size=QWEN3_5_35B_A3B_TEXT["hidden_size"])
    return qwen2_5_vl_config(vision, QWEN3_5_35B_A3B_TEXT, config_class=Qwen3_5MoeConfig)


def clip_text_l():
    return CLIPTextConfig(**CLIP_TEXT_L)
