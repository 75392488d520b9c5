"""mfpruner_core against plain reference implementations written out in the tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mfpruner_core as core


# ----------------------------------------------------------------------------- references


def reference_vote(scores: list[list[float]], budget: int, min_votes: int = 2, fill=None) -> list[int]:
    """ALGORITHM.md's vote for one image, in plain Python."""
    n = len(scores[0])
    k = min(budget, n)

    def top_k(values):
        return set(sorted(range(n), key=lambda i: (-values[i], i))[:k])

    votes = [0] * n
    for cue in scores:
        for i in top_k(cue):
            votes[i] += 1
    fill = fill if fill is not None else [sum(cue[i] for cue in scores) for i in range(n)]
    consensus = [i for i in range(n) if votes[i] >= min_votes]
    consensus.sort(key=lambda i: (-votes[i], -fill[i], i))
    kept = consensus[:k]
    rest = sorted((i for i in range(n) if i not in kept), key=lambda i: (-fill[i], i))
    kept += rest[: k - len(kept)]
    return sorted(kept)


def reference_uniqueness(x: torch.Tensor) -> torch.Tensor:
    """(N, D) float64: 1 - mean over all N of the cosine similarity, diagonal zeroed."""
    unit = x / x.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(0)
    return 1 - similarity.sum(dim=-1) / x.shape[0]


# ----------------------------------------------------------------------------- vote

scores_strategy = st.integers(1, 3).flatmap(
    lambda cues: st.integers(1, 12).flatmap(
        lambda n: st.lists(
            st.lists(st.integers(0, 3).map(float), min_size=n, max_size=n), min_size=cues, max_size=cues
        )
    )
)


@settings(max_examples=300, deadline=None)
@given(scores=scores_strategy, budget=st.integers(1, 14), min_votes=st.integers(1, 3))
def test_vote_matches_reference_on_tied_scores(scores, budget, min_votes):
    # Scores drawn from {0, 1, 2, 3}: ties everywhere, in the top-k sets and in the fill.
    kept = core.vote([torch.tensor([s]) for s in scores], budget, min_votes)
    assert kept[0].tolist() == reference_vote(scores, budget, min_votes)


@pytest.mark.parametrize("seed", range(20))
def test_vote_matches_reference_on_random_scores(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, n, budget = 3, 40, 1 + seed
    scores = [torch.rand(batch, n, generator=generator) for _ in range(3)]
    kept = core.vote(scores, budget)
    assert kept.shape == (batch, min(budget, n))
    for b in range(batch):
        assert kept[b].tolist() == reference_vote([s[b].tolist() for s in scores], budget)


def test_vote_keeps_three_vote_tokens_before_two_vote_tokens():
    # k = 2. Token 0 is in all three top-2 sets; tokens 1, 2, 3 have two votes each.
    a = torch.tensor([[9.0, 8.0, 7.0, 0.0]])
    b = torch.tensor([[9.0, 0.0, 8.0, 7.0]])
    c = torch.tensor([[9.0, 8.0, 0.0, 7.5]])
    # Top-2 sets: A {0, 1}, B {0, 2}, C {0, 1}: votes 3, 2, 1, 0 -> keep 0 then 1.
    assert core.vote([a, b, c], 2).tolist() == [[0, 1]]



def test_vote_orders_surplus_consensus_by_fill_score():
    # k = 2 and three 2-vote tokens (top-2 sets {0, 1}, {1, 2}, {0, 2}): fill 17, 17, 17.5.
    a = torch.tensor([[9.0, 8.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 9.0, 8.5, 0.0]])
    c = torch.tensor([[8.0, 0.0, 9.0, 0.0]])
    assert core.vote([a, b, c], 2).tolist() == [[0, 2]]  # 2 by fill, then 0 before 1 by index


def test_vote_single_cue_is_its_top_k():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2]])
    assert core.vote([scores], 2).tolist() == [[1, 3]]


def test_vote_is_sorted_exact_and_keeps_all_when_budget_exceeds_n():
    scores = [torch.rand(2, 7) for _ in range(3)]
    assert core.vote(scores, 100).tolist() == [list(range(7))] * 2
    kept = core.vote(scores, 4)
    assert (kept.diff(dim=-1) > 0).all()


def test_vote_fill_score_override_is_the_qwen_release_variant():
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    relevance = torch.tensor([[0.0, 0.0, 0.2, 0.9]])
    # No consensus with k = 1 between a and b; relevance alone fills.
    assert core.select_tokens({"attention": a, "uniqueness": b, "relevance": relevance}, 1, 2, "relevance").tolist() == [[3]]
    assert core.vote([a, b], 1, 2, fill_score=relevance).tolist() == [[3]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scores=[], budget=1), "at least one"),
        (dict(scores=[torch.rand(1, 4)], budget=0), "budget"),
        (dict(scores=[torch.rand(1, 4)], budget=2.5), "budget"),
        (dict(scores=[torch.rand(1, 4), torch.rand(1, 5)], budget=2), r"\(B, N\)"),
        (dict(scores=[torch.tensor([[0.0, float("nan")]])], budget=1), "finite"),
        (dict(scores=[torch.rand(1, 4)], budget=1, min_votes=0), "min_votes"),
    ],
)
def test_vote_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        core.vote(**kwargs)


def test_select_tokens_rejects_unknown_fill_rule():
    with pytest.raises(ValueError, match="fill_by"):
        core.select_tokens({"attention": torch.rand(1, 3)}, 1, fill_by="max")


# ----------------------------------------------------------------------------- cues


@pytest.mark.parametrize("n, d", [(1, 4), (5, 3), (64, 16)])
def test_uniqueness_equals_the_n_by_n_definition(n, d):
    x = torch.randn(2, n, d, dtype=torch.float64)
    expected = torch.stack([reference_uniqueness(row) for row in x])
    torch.testing.assert_close(core.uniqueness(x).double(), expected, atol=1e-6, rtol=0)


def test_uniqueness_of_identical_tokens_is_finite():
    x = torch.ones(1, 10, 8)
    u = core.uniqueness(x)
    assert torch.isfinite(u).all()
    torch.testing.assert_close(u, torch.full((1, 10), 1 - 9 / 10))


def test_attention_from_query_is_the_softmax_row_mean_over_heads():
    q, k = torch.randn(2, 4, 8), torch.randn(2, 4, 10, 8)
    expected = torch.softmax((q[:, :, None] @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(8), dim=-1).mean(1)
    torch.testing.assert_close(core.attention_from_query(q, k, 8**-0.5), expected)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_attention_received_equals_materialised_column_sums(chunk):
    q, k = torch.randn(3, 20, 8), torch.randn(3, 20, 8)
    full = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1)  # (H, N, N)
    torch.testing.assert_close(core.attention_received(q, k, 8**-0.5, chunk), full.sum(1).mean(0))


def materialised_attention(q, k, v, scale):
    """The whole (B, H, S, S) softmax in float64: (output, column sums mean over heads)."""
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)
    return probs @ v.double(), probs.sum(dim=2).mean(dim=1)


TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@pytest.mark.parametrize("method", ["chunked", "fused", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, chunk", [((1, 4, 50, 16), 7), ((2, 3, 33, 12), 64), ((1, 2, 1, 8), 1)])
def test_attention_with_received_matches_sdpa_and_the_materialised_map(method, dtype, shape, chunk):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape).to(dtype) for _ in range(3))
    scale = shape[-1] ** -0.5
    out, received = core.attention_with_received(q, k, v, scale, query_chunk=chunk, method=method)
    assert out.shape == q.shape and out.dtype == dtype and received.shape == (shape[0], shape[2])
    assert received.dtype == torch.float32
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    exact_out, exact_received = materialised_attention(q, k, v, scale)
    torch.testing.assert_close(out.float(), sdpa.float(), **TOLERANCES[dtype])
    torch.testing.assert_close(out.double(), exact_out, **TOLERANCES[dtype], check_dtype=False)
    # the column sums are accumulated in float32 from the given (possibly 16-bit) q and k: near exact
    torch.testing.assert_close(received.double(), exact_received, atol=1e-4, rtol=1e-4)
    assert torch.allclose(received.sum(dim=-1), torch.full((shape[0],), float(shape[2])), rtol=1e-4)  # rows sum to 1


@pytest.mark.parametrize("heads_per_block", [None, 1, 2, 4, 6, 100])
def test_chunked_attention_is_exact_for_any_heads_per_block(heads_per_block):
    # None: the torch thread count on CPU; 4: a smaller last block (B * H = 6 = 4 + 2), which uses
    # part of the reused K^T buffer; 6 and more: all B * H heads in one block, as other devices run.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8) for _ in range(3))
    out, received = core.chunked_attention_with_received(q, k, v, 8**-0.5, 16, heads_per_block)
    exact_out, exact_received = materialised_attention(q, k, v, 8**-0.5)
    torch.testing.assert_close(out.double(), exact_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received.double(), exact_received, atol=1e-5, rtol=1e-5)


def test_queries_per_block_caps_only_cpu():
    assert core.queries_per_block(10_000, "cpu") == core.CPU_QUERY_CHUNK
    assert core.queries_per_block(7, torch.device("cpu")) == 7
    assert core.queries_per_block(10_000, "cuda") == 10_000  # a device name, no GPU needed


def test_chunked_attention_caps_cpu_chunks_and_stays_exact():
    # query_chunk above CPU_QUERY_CHUNK: several capped chunks, the last one ragged, each softmax
    # run in place in the one reused block.
    torch.manual_seed(0)
    length = 2 * core.CPU_QUERY_CHUNK + 5
    q, k, v = (torch.randn(1, 2, length, 8) for _ in range(3))
    out, received = core.chunked_attention_with_received(q, k, v, 8**-0.5, 10 * length)
    exact_out, exact_received = materialised_attention(q, k, v, 8**-0.5)
    torch.testing.assert_close(out.double(), exact_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received.double(), exact_received, atol=1e-5, rtol=1e-5)


def test_attention_received_is_attention_with_received_without_values():
    q, k = torch.randn(3, 40, 8), torch.randn(3, 40, 8)
    _, received = core.attention_with_received(q[None], k[None], torch.randn(1, 3, 40, 8), 0.3, 16, "chunked")
    torch.testing.assert_close(core.attention_received(q, k, 0.3, 16), received[0])


@pytest.mark.parametrize("method", ["chunked", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_cue_keeps_the_tokens_of_the_exact_map(method, dtype):
    # Structured keys (a few salient tokens draw attention) as in a vision tower, 144 tokens.
    generator = torch.Generator().manual_seed(1)
    heads, length, head_dim = 4, 144, 16
    k = torch.randn(1, heads, length, head_dim, generator=generator)
    k[:, :, ::9] *= 3.0
    q, v = (torch.randn(1, heads, length, head_dim, generator=generator) for _ in range(2))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    _, received = core.attention_with_received(q, k, v, head_dim**-0.5, query_chunk=32, method=method)
    _, exact = materialised_attention(q, k, v, head_dim**-0.5)
    others = {"uniqueness": torch.rand(1, length, generator=generator), "relevance": torch.rand(1, length, generator=generator)}
    for budget in (8, 32, 64):
        ours = core.select_tokens({"attention": core.min_max_normalize(received), **others}, budget)
        reference = core.select_tokens({"attention": core.min_max_normalize(exact.float()), **others}, budget)
        assert torch.equal(ours, reference)
        assert torch.equal(core.top_k_mask(received, budget), core.top_k_mask(exact.float(), budget))


@pytest.mark.parametrize("method", ["chunked", "fused"])
def test_attention_with_received_memory_grows_linearly_never_heads_x_s_x_s(method):
    from mfpruner_lib.bench_utils import peak_memory

    heads, head_dim, chunk = 4, 16, 64
    peaks = {}
    for length in (1024, 2048):
        q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))
        peaks[length], _ = peak_memory(lambda: core.attention_with_received(q, k, v, 0.25, chunk, method))
    full_map = heads * 2048 * 2048 * 4  # one float32 (H, S, S) map at S = 2048: 64 MiB
    assert 0 < peaks[2048] < full_map / 8
    assert peaks[2048] < 2.5 * peaks[1024]  # linear in S (an S x S temporary would make it 4x)
    if method == "chunked":  # one (h, chunk, S) float32 block (softmax in place), plus copies of q, k, v, out
        assert peaks[2048] < 2 * heads * chunk * 2048 * 4 + 6 * heads * 2048 * head_dim * 4


@pytest.mark.parametrize("method", ["chunked", "fused"])
def test_attention_with_received_on_strided_segments_as_the_vision_attention_holds_them(method):
    # Qwen2.5-VL's vision attention: qkv (S, 3, H, Dh) -> q, k, v (1, H, S, Dh) views, one call per
    # cu_seqlens segment (a slice of the S axis); out transposed back to (S_seg, H, Dh) and concatenated.
    torch.manual_seed(0)
    length, heads, head_dim, bounds = 90, 4, 16, [0, 50, 90]
    q, k, v = torch.randn(length, 3, heads, head_dim).permute(1, 0, 2, 3).unbind(0)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    assert not q.is_contiguous()
    outs, received = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        segment = [x[:, :, start:end] for x in (q, k, v)]
        out, rec = core.attention_with_received(*segment, head_dim**-0.5, 16, method)
        exact_out, exact_received = materialised_attention(*segment, head_dim**-0.5)
        outs.append(out[0].transpose(0, 1))
        received.append(rec[0])
        torch.testing.assert_close(out.double(), exact_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rec.double(), exact_received, atol=1e-5, rtol=1e-5)
    assert torch.cat(outs).reshape(length, -1).shape == (length, heads * head_dim) and torch.cat(received).shape == (length,)


def test_attention_with_received_rejects_bad_arguments():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="method"):
        core.attention_with_received(q, q, q, 0.5, method="flash")
    with pytest.raises(ValueError, match="query_chunk"):
        core.attention_with_received(q, q, q, 0.5, query_chunk=0, method="chunked")
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="heads_per_block"):
            core.chunked_attention_with_received(q, q, q, 0.5, 4, bad)


def test_min_max_normalize_formula_and_constant_guard():
    x = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    out = core.min_max_normalize(x)
    torch.testing.assert_close(out[0], (x[0] - 1 + 1e-6) / (2 + 1e-6))
    torch.testing.assert_close(out[1], torch.ones(3))


def test_clip_text_relevance_is_negated_mean_cosine_over_real_segments():
    v, t = torch.randn(2, 6, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = core.clip_text_relevance(v, t, mask)
    for b in range(2):
        segments = t[b][mask[b]]
        cos = torch.nn.functional.cosine_similarity(v[b][:, None], segments[None], dim=-1)
        raw = -cos.mean(dim=1)
        torch.testing.assert_close(out[b], (raw - raw.min() + 1e-6) / (raw.max() - raw.min() + 1e-6))


def test_llm_relevance_is_cosine_to_mean_text_embedding():
    v, text = torch.randn(1, 4, 6), torch.randn(1, 5, 6)
    mask = torch.tensor([[True, False, True, True, False]])
    instruction = text[0, mask[0]].mean(0)
    expected = torch.nn.functional.cosine_similarity(v[0], instruction[None], dim=-1)
    torch.testing.assert_close(core.llm_relevance(v, text, mask)[0], expected)


def test_image_cues_are_the_named_cue_functions_of_one_image():
    """The one loop every model (transformers and vLLM) computes an image's cues with."""
    attention, tokens, text = torch.rand(7), torch.randn(7, 6), torch.randn(4, 6)
    mask = torch.tensor([True, False, True, True])
    cues = core.image_cues(["uniqueness", "attention", "relevance"], attention, tokens, text, mask)
    assert list(cues) == ["uniqueness", "attention", "relevance"]  # the configured order (fill_by='sum' sums them)
    torch.testing.assert_close(cues["attention"], core.min_max_normalize(attention[None])[0])
    torch.testing.assert_close(cues["uniqueness"], core.uniqueness(tokens[None])[0])
    torch.testing.assert_close(cues["relevance"], core.llm_relevance(tokens[None], text[None], mask[None])[0])
    every_text_token = core.image_cues(["relevance"], None, tokens, text)["relevance"]  # no mask: all T tokens
    torch.testing.assert_close(every_text_token, core.llm_relevance(tokens[None], text[None], torch.ones(1, 4, dtype=torch.bool))[0])
    clip = torch.rand(7)  # an already computed relevance (the CLIP text tower's) replaces the LLM-space one
    assert core.image_cues(["relevance"], None, tokens, relevance=clip)["relevance"] is clip
    with pytest.raises(ValueError, match="unknown cue 'colour'"):
        core.image_cues(["colour"], attention, tokens, text)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cues_are_finite_in_half_precision_and_for_constant_inputs(dtype):
    x = torch.ones(1, 9, 8, dtype=dtype)
    assert torch.isfinite(core.uniqueness(x)).all()
    assert torch.isfinite(core.min_max_normalize(x[..., 0])).all()
    assert torch.isfinite(core.llm_relevance(x, x, torch.ones(1, 9, dtype=torch.bool))).all()
    assert torch.isfinite(core.clip_text_relevance(x, x[:, :2])).all()


# ----------------------------------------------------------------------------- budget


def test_resolve_budget():
    assert core.resolve_budget(576, budget=64) == 64
    assert core.resolve_budget(576, budget=1000) == 576
    assert core.resolve_budget(576, ratio=0.222) == 128
    assert core.resolve_budget(576, ratio=1.0) == 576
    assert core.resolve_budget(10, ratio=0.01) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=0), "visual_token_budget"),
        (dict(budget=-3), "visual_token_budget"),
        (dict(budget=2.0), "visual_token_budget"),
        (dict(budget=True), "visual_token_budget"),
        (dict(ratio=0.0), "visual_token_ratio"),
        (dict(ratio=1.5), "visual_token_ratio"),
        (dict(ratio="half"), "visual_token_ratio"),
        (dict(), "exactly one"),
        (dict(budget=3, ratio=0.5), "exactly one"),
    ],
)
def test_resolve_budget_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        core.resolve_budget(100, **kwargs)


def test_call_budget_overrides_config_and_rejects_both():
    assert core.call_budget(64, None) == (64, None)
    assert core.call_budget(64, None, ratio=0.5) == (None, 0.5)
    assert core.call_budget(None, 0.2, budget=8) == (8, None)
    with pytest.raises(ValueError, match="only one"):
        core.call_budget(64, None, budget=8, ratio=0.5)


# ----------------------------------------------------------------------------- splice


@pytest.mark.parametrize("left", [True, False])
def test_compact_rows_drops_positions_and_repads(left):
    values = torch.arange(12).view(2, 6)
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    out, real = core.compact_rows(keep, {"v": values}, {"v": -1}, left=left)
    rows = [[0, 2, 3, 5], [-1, -1, 8, 10]] if left else [[0, 2, 3, 5], [8, 10, -1, -1]]
    assert out["v"].tolist() == rows
    assert real.tolist() == [[v != -1 for v in row] for row in rows]


@pytest.mark.parametrize("left", [True, False])
def test_compact_rows_moves_whole_feature_rows_of_any_layout(left):
    # (B, L, D) embeddings and (B, L, P) positions as sequence_last gives them (a permuted,
    # non-contiguous view): each kept position keeps its whole trailing row.
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
    embeds = torch.randn(2, 5, 4)
    positions = torch.arange(30).view(3, 2, 5).permute(1, 2, 0)  # (B, L, P), non-contiguous
    out, real = core.compact_rows(keep, {"e": embeds, "p": positions}, {"e": 0.0, "p": -7}, left=left)
    for row in range(2):
        kept = keep[row].nonzero()[:, 0]
        slots = real[row].nonzero()[:, 0]
        assert torch.equal(out["e"][row, slots], embeds[row, kept])
        assert torch.equal(out["p"][row, slots], positions[row, kept])
        assert bool((out["e"][row, ~real[row]] == 0).all()) and bool((out["p"][row, ~real[row]] == -7).all())
    assert real[1].tolist() == ([False, True, True] if left else [True, True, False])


@pytest.mark.parametrize("shape", [(7,), (7, 5), (7, 2, 3)])
def test_candidate_rows_is_boolean_indexing(shape):
    x = torch.randn(shape)
    candidates = torch.tensor([True, False, True, True, False, False, True])
    assert torch.equal(core.candidate_rows(x, candidates), x[candidates])
    assert core.candidate_rows(x, torch.zeros(7, dtype=torch.bool)).shape == (0, *shape[1:])


def test_top_k_mask_takes_each_row_of_stacked_scores():
    torch.manual_seed(0)
    stacked = torch.randint(0, 4, (3, 2, 9)).float()  # many ties
    masks = core.top_k_mask(stacked, 4)
    for cue in range(3):
        assert torch.equal(masks[cue], core.top_k_mask(stacked[cue], 4))
    assert masks.sum(dim=-1).eq(4).all()
