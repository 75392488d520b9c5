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
    (H, query_chunk, N), never (H, N, N).
    """
    received = torch.zeros(k.shape[1], dtype=torch.float32, device=k.device)
    k = k.float()
    for start in range(0, q.shape[1], query_chunk):
        q_chunk = q[:, start : start + query_chunk].float()  # (H, C, Dh)
        probs = (torch.einsum("hcd,hnd->hcn", q_chunk, k) * scale).softmax(dim=-1)  # (H, C, N)
        received += probs.sum(dim=1).mean(dim=0)
    return received


def uniqueness(features: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N): u_i = 1 - m_i, m_i = mean cosine similarity to all N tokens, self-pair as 0.

    Closed form with unit rows x_i and s = sum_j x_j: m_i = (x_i . s - x_i . x_i) / N.
    No N x N matrix; x_i . x_i is 1, or 0 for an all-zero token.
    """
    x = F.normalize(features.float(), dim=-1)
    total = x.sum(dim=1, keepdim=True)  # (B, 1, D)
    self_sim = (x * x).sum(dim=-1)  # (B, N)
    mean_sim = ((x * total).sum(dim=-1) - self_sim) / features.shape[1]
    return 1.0 - mean_sim


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
    """
    weights = text_mask.float() / text_mask.float().sum(dim=-1, keepdim=True).clamp(min=1.0)  # (B, T)
    instruction = torch.einsum("btd,bt->bd", text_embeds.float(), weights)  # (B, D)
    return F.cosine_similarity(visual_tokens.float(), instruction[:, None, :], dim=-1, eps=EPS)


# ----------------------------------------------------------------------------- vote


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N) token indices, highest score first, ties by lower index (deterministic)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) -> (B, N) bool, the k best tokens with deterministic ties."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter(-1, rank_descending(scores)[:, :k], True)


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
    if isinstance(min_votes, bool) or not isinstance(min_votes, int) or min_votes < 1:
        raise ValueError(f"`min_votes` must be a positive int, got {min_votes!r}")
    fill = torch.stack(scores).sum(dim=0) if fill_score is None else fill_score.float()
    if any(not torch.isfinite(s).all() for s in [*scores, fill]):
        raise ValueError("cue scores must be finite (found NaN or inf)")

    k = min(budget, shape[1])
    votes = torch.stack([top_k_mask(s, k) for s in scores]).sum(dim=0)  # (B, N)
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
    out = {}
    for name, tensor in tensors.items():
        compact = torch.full(
            (keep.shape[0], new_len, *tensor.shape[2:]), pad[name], dtype=tensor.dtype, device=tensor.device
        )
        compact[real] = tensor[keep]
        out[name] = compact
    return out, real
