"""Token merging for AT-SNN (Kang et al., arXiv 2408.12293, Sec. 3.6): ToMe's bipartite soft
matching (Bolya et al., ICLR 2023) restricted to the tokens that still run, size-weighted merging
and proportional attention, as functions on slot maps. The model code is in :mod:`atsnn`.

Shapes: B samples, n token slots in the stream, N original patches, D channels, h heads.
A slot map ``slot`` [B, n] sends every slot to its slot after merging, in [0, n_new); an
assignment ``assign`` [B, N] sends every original patch to the slot that now holds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["merged_away", "bipartite_merge_map", "merge_tokens", "slot_sizes", "group_reduce", "group_any",
           "group_all", "proportional_ssa"]


def merged_away(n: int, r: int) -> int:
    """Tokens a merge of r removes from n: capped at ⌊(n − 1)/2⌋, so that every sample keeps
    enough admissible pairs in set A′ however many of its tokens have halted."""
    return max(0, min(r, (n - 1) // 2))


def _alternate_active_first(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """active [B, n] bool → slot indices of sets A′ [B, ⌈n/2⌉] and B′ [B, ⌊n/2⌋]: the active
    tokens first (stable), then alternating, as ToMe alternates the whole sequence."""
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices  # [B, n]
    return order[:, 0::2], order[:, 1::2]


def _best_partners(metric: torch.Tensor, active: torch.Tensor, a_idx: torch.Tensor,
                   b_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A′ token's most similar B′ token of the same kind (active with active, halted with
    halted) → (cosine similarity [B, na], partner [B, na] as an index into B′). Halted rows score
    1e4 lower, so that active pairs always rank first."""
    unit = F.normalize(metric.float(), dim=-1)  # [B, n, d]
    take = lambda idx: unit.gather(1, idx[..., None].expand(-1, -1, unit.shape[-1]))  # noqa: E731
    scores = take(a_idx) @ take(b_idx).transpose(1, 2)  # [B, na, nb]
    act_a, act_b = active.gather(1, a_idx), active.gather(1, b_idx)
    same_kind = act_a[:, :, None] == act_b[:, None, :]
    scores = torch.where(same_kind, scores - 1e4 * (~act_a[:, :, None]).float(), float("-inf"))
    return scores.max(-1)


def _rows_to_merge(best: torch.Tensor, act_a: torch.Tensor, n_active: torch.Tensor, r: int) -> torch.Tensor:
    """The r A′ rows [B, r] that merge: the best pairs, with at most ⌊active/2⌋ active merges per
    sample (ToMe's bound); active rows beyond it rank after every halted row. best [B, na] as
    from :func:`_best_partners`, act_a [B, na] bool, n_active [B, 1]."""
    rank = best.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # [B, na]
    too_many = act_a & (rank >= n_active // 2)
    priority = torch.where(too_many, best - 2e4, best)
    return priority.argsort(dim=-1, descending=True, stable=True)[:, :r]


def bipartite_merge_map(metric: torch.Tensor, active: torch.Tensor, r: int) -> torch.Tensor:
    """ToMe's bipartite soft matching among the active tokens → slot map [B, n] into [0, n − r′),
    r′ = :func:`merged_away` (n, r). metric [B, n, d] (head-averaged keys), active [B, n] bool.

    Sets A′ and B′ alternate over the active-first order; each A′ token picks its most similar
    B′ token and the best r′ pairs merge, at most ⌊active/2⌋ of them active. A rectangular batch
    needs r′ merges in every sample: one with fewer active pairs merges halted tokens with halted
    ones (invisible: both stay halted, their readout sums merge size-weighted). An active token is
    never merged with a halted one. Kept A′ tokens take slots [0, na − r′) in order, B′ the rest.
    """
    B, n, _ = metric.shape
    r = merged_away(n, r)
    if r == 0:
        return torch.arange(n, device=metric.device).expand(B, n)
    a_idx, b_idx = _alternate_active_first(active)  # [B, na], [B, nb]
    na, nb = a_idx.shape[1], b_idx.shape[1]
    best, partner = _best_partners(metric, active, a_idx, b_idx)  # [B, na]
    act_a = active.gather(1, a_idx)
    merged_rows = _rows_to_merge(best, act_a, active.sum(1, keepdim=True), r)  # [B, r]
    is_merged = torch.zeros_like(act_a).scatter(1, merged_rows, True)  # [B, na]
    kept_slot = (~is_merged).long().cumsum(1) - 1  # a kept A′ token's rank among the kept ones
    a_slot = torch.where(is_merged, (na - r) + partner, kept_slot)
    b_slot = (na - r) + torch.arange(nb, device=metric.device).expand(B, nb)
    slot = a_idx.new_empty(B, n)
    slot.scatter_(1, a_idx, a_slot)
    slot.scatter_(1, b_idx, b_slot)
    return slot


def merge_tokens(x: torch.Tensor, sizes: torch.Tensor, slot: torch.Tensor, n_new: int) -> torch.Tensor:
    """Size-weighted merge, ToMe's weighted average: x_new = Σ s_i x_i / Σ s_i over the tokens
    of each slot. x [B, n, D], sizes s [B, n], slot [B, n] → [B, n_new, D]."""
    if n_new == x.shape[1]:  # nothing merged: the identity
        return x
    idx = slot[..., None].expand_as(x)
    total = x.new_zeros(x.shape[0], n_new, x.shape[2]).scatter_add(1, idx, x * sizes[..., None].to(x.dtype))
    new_sizes = sizes.new_zeros(sizes.shape[0], n_new).scatter_add(1, slot, sizes)
    return total / new_sizes[..., None].to(x.dtype)


def slot_sizes(assign: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Token sizes s [B, n_slots]: the original patches each slot holds. assign [B, N]."""
    ones = torch.ones_like(assign, dtype=torch.float32)
    return ones.new_zeros(assign.shape[0], n_slots).scatter_add(1, assign, ones)


def group_reduce(values: torch.Tensor, assign: torch.Tensor, n_slots: int, how: str) -> torch.Tensor:
    """Per-patch state shared within groups: values [B, N, *] on the original patches, grouped by
    assign [B, N] → [B, N, *] with every patch holding its group's ``how`` ("mean", "amax",
    "amin"). A merged token is represented by all its members holding the same state."""
    B, N = assign.shape
    idx = assign.reshape(B, N, *([1] * (values.dim() - 2))).expand_as(values)
    out = values.new_zeros((B, n_slots, *values.shape[2:]))
    out = out.scatter_reduce(1, idx, values, reduce=how, include_self=False)
    return out.gather(1, idx)


def group_any(flags: torch.Tensor, assign: torch.Tensor, n_slots: int) -> torch.Tensor:
    """flags [B, N] bool on members → [B, n_slots]: a slot is set when any member is."""
    out = torch.zeros(flags.shape[0], n_slots, dtype=torch.bool, device=flags.device)
    return out.scatter_reduce(1, assign, flags, reduce="amax", include_self=False)


def group_all(flags: torch.Tensor, assign: torch.Tensor, n_slots: int) -> torch.Tensor:
    """flags [B, N] bool on members → [B, n_slots]: a slot is set when every member is."""
    out = torch.ones(flags.shape[0], n_slots, dtype=torch.bool, device=flags.device)
    return out.scatter_reduce(1, assign, flags, reduce="amin", include_self=False)


def proportional_ssa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Spiking self-attention with key j counted s_j times (ToMe's proportional attention, without
    a softmax): out_i = scale · Σ_j s_j (q_i · k_j) v_j. q, k, v [B, h, n, d], sizes [B, n] or
    None (plain SSA, Spikformer's order: (Q Kᵀ)·scale, then V) → [B, h, n, d]."""
    attn = q @ k.transpose(-2, -1) * scale  # [B, h, n, n]
    if sizes is not None:
        attn = attn * sizes[:, None, None, :].to(attn.dtype)
    return attn @ v
