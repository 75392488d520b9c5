"""MFPruner: the algorithm, in plain torch.

Three cues rank the N visual tokens of one image (higher = more worth keeping):
  A. vision attention  - how much the vision tower attends to each token,
  B. uniqueness        - 1 - mean cosine similarity to the other tokens,
  C. relevance         - similarity to the user's instruction.
Each cue votes for its top-k tokens; tokens with >= `min_votes` votes are kept first and the
rest of the budget k is filled by the summed score. See ALGORITHM.md for the exact rules.

Every function is pure, batched over images, and shape-commented: B images, N visual tokens,
H heads, D feature size, M instruction segments / text tokens. No transformers import: the
model files capture the inputs and splice the kept tokens, the decisions happen here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

EPS = 1e-6
CUE_NAMES = ("attention", "uniqueness", "relevance")


# ----------------------------------------------------------------------------- budget


def check_budget(budget, name: str = "visual_token_budget") -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"`{name}` must be a positive int (visual tokens kept per image), got {budget!r}")


def check_ratio(ratio, name: str = "visual_token_ratio") -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"`{name}` must be a float in (0, 1] (fraction of visual tokens kept), got {ratio!r}")


def check_min_votes(min_votes, name: str = "min_votes") -> None:
    if isinstance(min_votes, bool) or not isinstance(min_votes, int) or min_votes < 1:
        raise ValueError(
            f"`{name}` must be a positive int (votes that make a consensus token, capped at the number of cues), "
            f"got {min_votes!r}"
        )


def call_min_votes(config_min_votes: int, min_votes: int | None = None) -> int:
    """Per-call override of the config's vote threshold (None: the config's)."""
    if min_votes is None:
        return config_min_votes
    check_min_votes(min_votes)
    return min_votes


def resolve_budget(num_tokens: int, budget: int | None = None, ratio: float | None = None) -> int:
    """Tokens to keep for one image of `num_tokens` visual tokens: min(budget, N) or round(ratio * N), >= 1."""
    if (budget is None) == (ratio is None):
        raise ValueError(
            "give exactly one of `visual_token_budget` (an int) and `visual_token_ratio` (a float in (0, 1]), "
            f"got visual_token_budget={budget!r}, visual_token_ratio={ratio!r}"
        )
    if budget is not None:
        check_budget(budget)
        return min(budget, num_tokens)
    check_ratio(ratio)
    return max(1, min(num_tokens, int(math.floor(float(ratio) * num_tokens + 0.5))))


# ----------------------------------------------------------------------------- cues


def min_max_normalize(scores: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(B, N) -> (B, N) in float32: (s - min + eps) / (max - min + eps); a constant row becomes all ones."""
    scores = scores.float()
    low = scores.amin(dim=-1, keepdim=True)
    high = scores.amax(dim=-1, keepdim=True)
    return (scores - low + eps) / (high - low + eps)


def attention_from_query(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention row of one query over all keys, averaged over heads.

    q: (B, H, Dh) the query of one token (the [CLS]); k: (B, H, N, Dh) -> (B, N), rows sum to 1.
    O(N * D): only the query's row of softmax(Q K^T * scale) is ever formed.
    """
    logits = torch.einsum("bhd,bhnd->bhn", q.float(), k.float()) * scale  # (B, H, N)
    return logits.softmax(dim=-1).mean(dim=1)


def attention_received(
    q: torch.Tensor, k: torch.Tensor, scale: float, query_chunk: int = 1024
) -> torch.Tensor:
    """Attention each key receives, summed over all queries, averaged over heads.

    q, k: (H, N, Dh) of one attention segment -> (N,): column sums of softmax(Q K^T * scale), the
    mean over heads. Queries are processed `query_chunk` at a time, so the largest temporary is
    (H, query_chunk, N), never (H, N, N). When the attention output is needed too, use
    `attention_with_received`: it computes both in one pass.
    """
    return chunked_attention_with_received(q[None], k[None], None, scale, query_chunk)[1][0]


def attention_with_received(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, query_chunk: int = 256, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output AND the attention each key receives, for unmasked (full) attention.

    q, k, v: (B, H, S, Dh), one attention segment per row (e.g. Qwen2.5-VL's vision attention per
    `cu_seqlens` segment, after rotary) -> out: (B, H, S, Dh) in v's dtype, what
    scaled_dot_product_attention(q, k, v, scale=scale) returns; received: (B, S) float32, the
    column sums of softmax(Q K^T * scale) over the queries, mean over heads (cue A).
    Memory stays O(S * Dh) plus one (B * H, query_chunk, S) block: never H x S x S.

    method: "chunked" - one pass over query chunks: each block of probabilities gives its rows of
        the output and its part of the column sums, so QK^T is computed once (best on CPU).
      "fused" - the fused attention kernel returns the output and each query's log-sum-exp; the
        column sums come from one more fused kernel call, the same attention read backwards
        (`received_from_logsumexp`): no S x S block is ever written (best on GPU).
      "auto" - "fused" on CUDA, "chunked" elsewhere.
    """
    if method == "auto":
        method = "fused" if q.device.type == "cuda" else "chunked"
    if method == "chunked":
        return chunked_attention_with_received(q, k, v, scale, query_chunk)
    if method == "fused":
        out, logsumexp = attention_with_logsumexp(q, k, v, scale)
        return out, received_from_logsumexp(q, k, logsumexp, scale)
    raise ValueError(f"`method` must be 'auto', 'chunked' or 'fused', got {method!r}")


# Queries per head block on CPU. Measured on a 2-core Xeon (2 MiB L2 per core): 64-256 rows were
# within noise of each other at 5,476 patches, 383 cost 1.8x the extra time of 96, and 24 (short
# matmuls) 1.6x at 21,316 patches. On a 2-core AMD EPYC (AVX2, 512 KiB L2 per core) 96 was again
# the fastest of 16-128 at 5,476 patches (16: 1.9x the extra time), within noise of 48 at 21,316
# patches, and 24 cost 1.6x there.
CPU_QUERY_CHUNK = 96


def queries_per_block(query_chunk: int, device) -> int:
    """The queries per block chunked_attention_with_received uses: query_chunk, at most
    CPU_QUERY_CHUNK on CPU."""
    return min(query_chunk, CPU_QUERY_CHUNK) if torch.device(device).type == "cpu" else query_chunk


def chunked_attention_with_received(q, k, v, scale: float, query_chunk: int, heads_per_block: int | None = None):
    """The "chunked" method of `attention_with_received` (v=None: the column sums only, out=None).

    Per block of h heads x C queries: p = softmax(logits) (h, C, S), then the output rows p @ v and
    the column sums 1^T @ p: one QK^T. The softmax is torch's fused kernel (max, exp, sum and
    divide row by row while the row is in cache), run in place on the logits (each element is
    written after it is read: bit-identical, tested). The logits and probabilities (which decide
    the cue) are float32: q and k are converted once, not per chunk. The p @ v matmul runs in v's
    dtype (float32 accumulation), in float32 on CPU (no fast 16-bit matmuls there). The block is
    allocated once per call and reused: fresh multi-MiB blocks per chunk cost page faults on CPU.
    Each head block's K^T is copied row-major into a reused (h, Dh, S) buffer: QK^T on it ran
    faster on CPU than on the transposed view of k.

    heads_per_block (h): None = torch's CPU thread count on CPU (each thread multiplies one head's
    block: fewer, taller matmuls ran much faster there than all heads' short ones), all B * H
    elsewhere. On CPU C is also capped at CPU_QUERY_CHUNK.
    """
    if isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"`query_chunk` must be a positive int (queries per step), got {query_chunk!r}")
    if heads_per_block is not None and (
        isinstance(heads_per_block, bool) or not isinstance(heads_per_block, int) or heads_per_block < 1
    ):
        raise ValueError(f"`heads_per_block` must be a positive int or None, got {heads_per_block!r}")
    batch, heads, length, head_dim = q.shape
    on_cpu = q.device.type == "cpu"
    if heads_per_block is None:
        heads_per_block = torch.get_num_threads() if on_cpu else batch * heads
    heads_per_block = min(heads_per_block, batch * heads)
    query_chunk = min(queries_per_block(query_chunk, q.device), length)
    queries = q.reshape(batch * heads, length, head_dim).float() * scale  # (BH, S, Dh), scaled once
    keys = k.reshape(batch * heads, length, head_dim)  # (BH, S, Dh)
    values, out = None, None
    if v is not None:
        work = torch.float32 if v.device.type == "cpu" else v.dtype
        values = v.reshape(batch * heads, length, v.shape[-1]).to(work)
        out = torch.empty_like(values)
    received = torch.zeros(batch * heads, 1, length, dtype=torch.float32, device=q.device)
    ones = torch.ones(heads_per_block, 1, query_chunk, dtype=torch.float32, device=q.device)
    buffer = torch.empty(heads_per_block * query_chunk * length, dtype=torch.float32, device=q.device)
    keys_t_buffer = torch.empty(heads_per_block, head_dim, length, dtype=torch.float32, device=q.device)
    for first in range(0, batch * heads, heads_per_block):
        h = slice(first, first + heads_per_block)
        block_keys_t = keys[h].transpose(1, 2)  # (h, Dh, S), a strided view
        keys_t = keys_t_buffer[: block_keys_t.shape[0]].copy_(block_keys_t)  # row-major float32 copy
        for start in range(0, length, query_chunk):
            rows = slice(start, start + query_chunk)
            chunk = queries[h, rows]  # (h, C, Dh); the last block of either loop may be smaller
            shape = (chunk.shape[0], chunk.shape[1], length)
            block = buffer[: shape[0] * shape[1] * length].view(shape)
            logits = torch.bmm(chunk, keys_t, out=block)  # (h, C, S)
            probs = torch.ops.aten._softmax.out(logits, -1, False, out=block)  # in place
            received[h].baddbmm_(ones[: shape[0], :, : shape[1]], probs)  # += column sums (a matmul: one fast pass)
            if values is not None:
                out[h, rows] = torch.bmm(probs.to(values.dtype), values[h])  # (h, C, Dv)
    received = received.view(batch, heads, length).mean(dim=1)
    if out is None:
        return None, received
    return out.view(batch, heads, length, -1).to(v.dtype), received


def pad_head_dim(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """(..., Dh) -> (..., Dh') zero-padded to a multiple of `multiple` (fused kernels need it)."""
    extra = -x.shape[-1] % multiple
    return F.pad(x, (0, extra)) if extra else x


def attention_with_logsumexp(q, k, v, scale: float):
    """Fused attention that also returns each query's log-sum-exp of its scaled logits.

    q, k, v: (B, H, S, Dh) -> (out (B, H, S, Dh) in q's dtype, logsumexp (B, H, S) float32). The
    kernels scaled_dot_product_attention dispatches to (torch's flash attention on CPU and for
    16-bit CUDA, memory-efficient attention for float32 CUDA), called directly for their
    log-sum-exp. Head dims are zero-padded to a multiple of 8 (the logits do not change).
    """
    length, head_dim = q.shape[2], v.shape[-1]
    qp, kp, vp = pad_head_dim(q), pad_head_dim(k), pad_head_dim(v)
    if qp.shape[-1] != vp.shape[-1]:
        raise ValueError(f"q and v must have the same head dim, got {q.shape[-1]} and {head_dim}")
    if q.device.type == "cpu":
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qp, kp, vp, 0.0, False, scale=scale)[:2]
    elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention(qp, kp, vp, 0.0, False, False, scale=scale)[:2]
    elif q.device.type == "cuda":
        out, logsumexp = torch.ops.aten._scaled_dot_product_efficient_attention(
            qp, kp, vp, None, True, 0.0, False, scale=scale
        )[:2]
    else:
        raise ValueError(f"fused attention with log-sum-exp runs on CPU or CUDA, got device {q.device}")
    return out[..., :head_dim], logsumexp[..., :length].float()  # efficient attention pads the lse to 32


def received_from_logsumexp(q, k, logsumexp, scale: float) -> torch.Tensor:
    """Column sums of softmax(Q K^T * scale), mean over heads, from the queries' log-sum-exp.

    q, k: (B, H, S, Dh); logsumexp: (B, H, S) float32 -> (B, S) float32. Column j sums
    exp(l_ij - lse_i) over queries i: that is one attention pass with the roles swapped (key j
    asks, query i answers) and -lse_i added to each logit, whose own log-sum-exp is
    log(column sum j). The bias rides in two extra head dims (hi + lo parts, so it stays exact to
    ~2^-16 in 16-bit inputs), centred per head so that it stays small.
    """
    shift = logsumexp.mean(dim=-1, keepdim=True)  # (B, H, 1)
    bias = ((shift - logsumexp) / scale)[..., None]  # (B, H, S, 1): scale * bias = shift - lse_i
    hi = bias.to(q.dtype)
    lo = (bias - hi.float()).to(q.dtype)
    ones = torch.ones_like(hi)
    asking = torch.cat([k, ones, ones], dim=-1)  # (B, H, S, Dh + 2): the keys ask
    answering = torch.cat([q, hi, lo], dim=-1)  # the queries answer, carrying -lse_i
    _, column_lse = attention_with_logsumexp(asking, answering, torch.zeros_like(asking), scale)
    return (column_lse - shift).exp().mean(dim=1)  # log column sum = column_lse - shift


def uniqueness(features: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N): u_i = 1 - m_i, m_i = mean cosine similarity to all N tokens, self-pair as 0.

    Closed form with unit rows x_i = f_i / |f_i| and s = sum_j x_j: m_i = (x_i . s - x_i . x_i) / N.
    No N x N matrix, and no normalised (B, N, D) copy either: s = (1 / |f|)^T F and
    x_i . s = (f_i . s) / |f_i| are two matrix-vector products over the features. x_i . x_i is 1,
    or 0 for an all-zero token (norms are clamped at 1e-12, as F.normalize does).
    """
    f = features.float()
    norms = f.norm(dim=-1)  # (B, N)
    inverse = 1.0 / norms.clamp(min=1e-12)
    total = torch.bmm(inverse[:, None, :], f)  # (B, 1, D): sum of the unit rows
    dot_total = torch.bmm(f, total.transpose(1, 2))[..., 0] * inverse  # (B, N): x_i . s
    self_sim = (norms * inverse) ** 2
    return 1.0 - (dot_total - self_sim) / features.shape[1]


def clip_text_relevance(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's cue C (CDPruner style), min-max normalised.

    image_embeds: (B, N, E) patch features in CLIP's joint space; text_embeds: (B, M, E), one
    embedding per instruction segment; text_mask: (B, M) bool, which segments are real.
    r_i = mean_m(-cos(v_i, t_m)) (the minus sign is the authors').
    """
    v = F.normalize(image_embeds.float(), dim=-1)
    t = F.normalize(text_embeds.float(), dim=-1)
    if text_mask is None:
        text_mask = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    weights = text_mask.float() / text_mask.float().sum(dim=-1, keepdim=True).clamp(min=1.0)  # (B, M)
    relevance = -torch.einsum("bne,bme,bm->bn", v, t, weights)
    return min_max_normalize(relevance)


def llm_relevance(
    visual_tokens: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """LLM-space cue C (the Qwen release; the fallback without a CLIP text tower).

    visual_tokens: (B, N, D) projected visual tokens; text_embeds: (B, T, D) LLM input
    embeddings of the prompt; text_mask: (B, T) bool, the prompt's real non-image tokens.
    r_i = cos(visual token i, mean of the masked text embeddings), positive sign, not normalised.
    Cosine as torch.cosine_similarity computes it (v . t / (max(|v|, eps) max(|t|, eps))), from one
    matrix-vector product and the norms: no normalised (B, N, D) copy.
    """
    weights = text_mask.float() / text_mask.float().sum(dim=-1, keepdim=True).clamp(min=1.0)  # (B, T)
    instruction = torch.bmm(weights[:, None, :], text_embeds.float())  # (B, 1, D)
    v = visual_tokens.float()
    dots = torch.bmm(v, instruction.transpose(1, 2))[..., 0]  # (B, N)
    return dots / (v.norm(dim=-1).clamp(min=EPS) * instruction.norm(dim=-1).clamp(min=EPS))


def image_cues(
    cue_names: Sequence[str],
    attention: torch.Tensor | None,
    tokens: torch.Tensor,
    text_embeds: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    relevance: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The named cues of one image (or video) over its n candidate tokens: {name: (n,)} float32.

    attention: (n,) raw vision attention (cue A, None when not configured); tokens: (n, D)
    projected visual tokens; text_embeds: (T, D) LLM input embeddings of the prompt, text_mask:
    (T,) bool its real non-image tokens (None: all T). relevance: (n,) an already computed cue C
    (the CLIP text tower's), used instead of the LLM-space one. Scores are on the tokens' device.
    """
    cues = {}
    for name in cue_names:
        if name == "attention":
            cues[name] = min_max_normalize(attention[None])[0]
        elif name == "uniqueness":
            cues[name] = uniqueness(tokens[None])[0]
        elif name == "relevance" and relevance is not None:
            cues[name] = relevance.to(tokens.device)
        elif name == "relevance":
            if text_mask is None:
                text_mask = torch.ones(text_embeds.shape[0], dtype=torch.bool, device=tokens.device)
            cues[name] = llm_relevance(tokens[None], text_embeds[None].to(tokens.device), text_mask[None].to(tokens.device))[0]
        else:
            raise ValueError(f"unknown cue {name!r}; the cues are {CUE_NAMES}")
    return cues


# ----------------------------------------------------------------------------- vote


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (..., N) token indices, highest score first, ties by lower index (deterministic)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., N) -> (..., N) bool, the k best tokens of each row with deterministic ties."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter(-1, rank_descending(scores)[..., :k], True)


def vote(
    scores: Sequence[torch.Tensor],
    budget: int,
    min_votes: int = 2,
    fill_score: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-cue vote: a sequence of (B, N) cue scores -> (B, min(budget, N)) kept indices, ascending.

    1. each cue's top-k set votes; 2. tokens with >= min_votes votes are kept first, more votes
    first, then by fill score; 3. the rest of the budget goes to the highest fill score
    (default: the sum of the cues); ties go to the lower index. One cue = its own top-k.
    `fill_score` (B, N) replaces the sum (the Qwen release fills by relevance alone).
    """
    scores = [s.float() for s in scores]
    if not scores:
        raise ValueError("`scores` must hold at least one (B, N) cue score")
    shape = scores[0].shape
    if len(shape) != 2 or any(s.shape != shape for s in scores):
        raise ValueError(f"every cue score must be (B, N) with one shape, got {[tuple(s.shape) for s in scores]}")
    check_budget(budget, "budget")
    check_min_votes(min_votes)
    stacked = torch.stack(scores)  # (C, B, N)
    fill = stacked.sum(dim=0) if fill_score is None else fill_score.float()
    if not bool(torch.isfinite(stacked).all() & torch.isfinite(fill).all()):  # one check (one device sync)
        raise ValueError("cue scores must be finite (found NaN or inf)")

    k = min(budget, shape[1])
    votes = top_k_mask(stacked, k).sum(dim=0)  # (B, N): every cue's top-k in one sort
    consensus_votes = torch.where(votes >= min_votes, votes, torch.zeros_like(votes))
    # Sort key (consensus votes, fill score, -index), all descending: two stable sorts.
    by_fill = rank_descending(fill)  # (B, N)
    by_votes = torch.sort(consensus_votes.gather(-1, by_fill), dim=-1, descending=True, stable=True).indices
    kept = by_fill.gather(-1, by_votes)[:, :k]
    return kept.sort(dim=-1).values


def select_tokens(
    cue_scores: dict[str, torch.Tensor], budget: int, min_votes: int = 2, fill_by: str = "sum"
) -> torch.Tensor:
    """Named cues -> kept indices. fill_by="sum" is the paper's rule; "relevance" is the Qwen
    release's variant, where attention and uniqueness vote and relevance alone fills."""
    if fill_by == "sum":
        return vote(list(cue_scores.values()), budget, min_votes)
    if fill_by == "relevance":
        voters = [score for name, score in cue_scores.items() if name != "relevance"]
        if "relevance" not in cue_scores or not voters:
            raise ValueError("fill_by='relevance' needs the relevance cue and at least one other cue")
        return vote(voters, budget, min(min_votes, len(voters)), fill_score=cue_scores["relevance"])
    raise ValueError(f"`fill_by` must be 'sum' or 'relevance', got {fill_by!r}")


def call_budget(config_budget, config_ratio, budget=None, ratio=None) -> tuple[int | None, float | None]:
    """Per-call override of the config's (budget, ratio): a call may give one of them, not both."""
    if budget is not None and ratio is not None:
        raise ValueError(
            "give only one of `visual_token_budget` and `visual_token_ratio` per call, "
            f"got visual_token_budget={budget!r}, visual_token_ratio={ratio!r}"
        )
    if budget is not None:
        check_budget(budget)
        return budget, None
    if ratio is not None:
        check_ratio(ratio)
        return None, ratio
    return config_budget, config_ratio


# ----------------------------------------------------------------------------- splice


def compact_rows(keep: torch.Tensor, tensors: dict[str, torch.Tensor], pad: dict[str, object], left: bool):
    """Drop the positions where keep is False from every (B, L, ...) tensor, re-padding rows.

    keep: (B, L) bool. Rows may keep different counts; the shorter ones are padded with
    pad[name] on the left (generation) or the right. Returns (tensors of length L', the
    (B, L') bool mask of real positions).
    """
    lengths = keep.sum(dim=-1)  # (B,)
    new_len = int(lengths.max())
    slot = torch.arange(new_len, device=keep.device)[None, :]  # (1, L')
    offset = (new_len - lengths)[:, None] if left else torch.zeros_like(lengths)[:, None]
    real = (slot >= offset) & (slot < offset + lengths[:, None])  # (B, L')
    # Flat (row * length + position) indices, found once: every tensor is then one index_select
    # and one index_copy_ over its first two dims flattened, with no further mask-to-index
    # conversion (each is a device sync on a GPU) and no element-wise advanced indexing (slow on CPU).
    source = keep.flatten().nonzero()[:, 0]  # (kept,) into B * L
    target = real.flatten().nonzero()[:, 0]  # (kept,) into B * L'
    out = {}
    for name, tensor in tensors.items():
        compact = torch.full(
            (keep.shape[0], new_len, *tensor.shape[2:]), pad[name], dtype=tensor.dtype, device=tensor.device
        )
        device = tensor.device
        rows = tensor.flatten(0, 1).index_select(0, source.to(device))  # (kept, ...)
        compact.view(-1, *tensor.shape[2:]).index_copy_(0, target.to(device), rows)
        out[name] = compact
    return out, real


# ----------------------------------------------------------------------------- bookkeeping shared by the models


@dataclass
class MFPrunerResult:
    """What the last pruning call decided, one entry per image (or video) in prompt order.

    keep_indices[i]: (k_i,) kept indices into item i's visual tokens (its placeholder tokens in
        the prompt, in order), ascending. For LLaVA-NeXT this includes every `image_newline`.
    cue_scores[name][i]: (N_i,) that cue's score per visual token (higher = keep); positions that
        do not compete for the budget (LLaVA-NeXT's newline tokens) hold 0.
    num_visual_tokens[i]: N_i, item i's visual tokens before pruning.
    image_to_row[i]: the batch row item i belongs to.
    lm_input_length: the language model's prefill length (pruned, re-padded).
    grids[i]: (rows, cols) of item i's main token map: LLaVA-1.5's single map; LLaVA-NeXT's
        unpadded high-res grid over all tiles; Qwen2.5-VL's merged grid (videos: the frame-pair
        maps stacked top to bottom).
    kinds[i]: "image" or "video" (models that take videos list images first, then videos).
    base_grids[i]: (rows, cols) of LLaVA-NeXT's base tile map (the whole image at one tile's size).
    layouts[i]: (N_i, 3) long, where each visual token comes from, as (part, row, col):
        part 0 (LAYOUT_BASE): the base (or only) map, (row, col) in base_grids[i] (or grids[i]);
        part 1 (LAYOUT_GRID): LLaVA-NeXT's unpadded high-res grid, (row, col) in grids[i];
        part 2 (LAYOUT_NEWLINE): an `image_newline` token closing grid row `row` (col = -1).
        A token at (row, col) of an (R, C) map covers about [row / R, (row + 1) / R) x
        [col / C, (col + 1) / C) of the image the processor saw (LLaVA-1.5: its center crop;
        LLaVA-NeXT's grid: the unpadded high-res image, whose unpadding can cut thin edges;
        app.py replays the processors' geometry exactly).
    relevance_source: "clip_text" or "llm", the source cue C used (None without that cue).
    visual_token_budget / visual_token_ratio: the budget rule the call used (one is None).
    min_votes, fill_by: the vote threshold and fill rule the call used.
    timings: wall seconds per stage of the call: "vision" (tower incl. cue capture), "cues",
        "vote", "splice" (no device syncs: approximate on CUDA).
    keep_mask: (B, L) bool over the original prompt, True where the language model got the position.
    """

    keep_indices: list[torch.Tensor]
    cue_scores: dict[str, list[torch.Tensor]]
    num_visual_tokens: list[int]
    image_to_row: list[int]
    lm_input_length: int
    grids: list[tuple[int, int]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    base_grids: list[tuple[int, int]] = field(default_factory=list)
    layouts: list[torch.Tensor] = field(default_factory=list)
    relevance_source: str | None = None
    visual_token_budget: int | None = None
    visual_token_ratio: float | None = None
    min_votes: int | None = None
    fill_by: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    keep_mask: torch.Tensor | None = None


LAYOUT_BASE, LAYOUT_GRID, LAYOUT_NEWLINE = 0, 1, 2


# Copied from transformers.image_processing_utils.select_best_resolution (v5.24)
def select_best_resolution(original_size: tuple, possible_resolutions: list) -> tuple:
    """(height, width) of the grid pinpoint that keeps the most of the image and wastes the least."""
    original_height, original_width = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (height, width)
    return best_fit


def last_full_attention_block(visual) -> int | None:
    """Index of the last full-attention (not windowed) block of a Qwen2.5-VL vision tower (transformers'
    or vLLM's), where cue A is read; None when `fullatt_block_indexes` names no block of the tower (a
    valid stock config: every block windowed)."""
    full = [i for i in visual.fullatt_block_indexes if 0 <= i < len(visual.blocks)]
    return max(full) if full else None


def grid_layout(rows: int, cols: int, part: int = LAYOUT_BASE, device=None) -> torch.Tensor:
    """(rows * cols, 3) long: (part, row, col) of a raster-ordered token map."""
    index = torch.arange(rows * cols, device=device)
    return torch.stack([torch.full_like(index, part), index // cols, index % cols], dim=-1)


def candidate_rows(x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """x[candidates] for (N, ...) x and an (N,) bool mask, as one index_select: a boolean index
    of a (576, 1024) CPU tensor took several times longer (its gather runs element by element)."""
    return x.index_select(0, candidates.nonzero()[:, 0].to(x.device))


def vote_candidates(cues: dict[str, torch.Tensor], candidates: torch.Tensor, budget, ratio, min_votes, fill_by):
    """One item's vote over its candidate tokens under its own budget.

    cues: {name: (n,)} scores of the n candidates; candidates: (N,) bool. Returns the (k',) kept
    indices into all N tokens, ascending: the k voted candidates plus every non-candidate.
    """
    candidates = candidates.to(next(iter(cues.values())).device)
    positions = candidates.nonzero()[:, 0]  # (n,)
    k = resolve_budget(len(positions), budget, ratio)
    kept = select_tokens({name: score[None] for name, score in cues.items()}, k, min(min_votes, len(cues)), fill_by)[0]
    always = (~candidates).nonzero()[:, 0]
    return torch.cat([positions[kept], always]).sort().values


def check_image_tokens(
    input_ids, image_token_id, num_images: int, tokens_per_image: list[int], name: str = "image", pixels="pixel_values"
):
    """Placeholders must match the images (or videos); returns (I,) the batch row of each one.

    input_ids: (B, L); tokens_per_image: visual tokens of each item, in prompt order."""
    if input_ids is None:
        raise ValueError(f"MFPruner needs `input_ids` (not only `inputs_embeds`) to locate the {name} tokens")
    is_image = input_ids == image_token_id
    per_row = is_image.sum(dim=-1).tolist()
    if sum(per_row) == 0:
        raise ValueError(
            f"`{pixels}` were given but `input_ids` hold no {name} token (id {image_token_id}); "
            f"build the prompt with the processor so each {name} has its placeholder tokens"
        )
    if sum(per_row) != sum(tokens_per_image):
        raise ValueError(
            f"`input_ids` hold {sum(per_row)} {name} tokens but the {num_images} {name}(s) give "
            f"{sum(tokens_per_image)} visual tokens ({tokens_per_image}); prompt and {name}s do not match"
        )
    image_to_row, image, filled = [], 0, 0
    for row, count in enumerate(per_row):
        while count > 0:
            if image >= num_images or tokens_per_image[image] - filled > count:
                raise ValueError(f"row {row} of `input_ids` splits an {name}'s tokens with another row")
            count -= tokens_per_image[image] - filled
            image_to_row.append(row)
            image, filled = image + 1, 0
    return image_to_row


def keep_mask_for_images(is_image, keep_indices, tokens_per_image, keep=None):
    """(B, L) bool: True for the kept positions of every image, and elsewhere `keep` (default:
    every non-image position). keep_indices[i]: (k_i,) into image i's tokens_per_image[i] tokens."""
    flat_keep = torch.cat(
        [torch.zeros(n, dtype=torch.bool, device=is_image.device).index_fill_(0, idx.to(is_image.device), True)
         for idx, n in zip(keep_indices, tokens_per_image)]
    )
    keep = ~is_image if keep is None else keep.to(is_image.device, copy=True)
    keep[is_image] = flat_keep
    return keep


def restore_prompt(output, input_ids, pruned_length: int):
    """Replaces the pruned prompt at the head of the generated sequences by the original one.

    output: (B * n, pruned_length + new) tensor or a generate output with `.sequences`."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    restored = torch.cat([prompt.to(sequences.device), sequences[:, pruned_length:]], dim=-1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    return output

