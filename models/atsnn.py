"""AT-SNN: adaptive tokens for Spikformer (Kang et al., arXiv 2408.12293v1), and halting on SDT v1.

No official code exists; this follows the reconstruction in ``shared/spec/at_snn.md`` (cited as
§n). Two mechanisms on a CIFAR-layout Spikformer (:class:`ATSpikformer`); halting alone, beyond
the paper, on SDT v1 (:class:`ATSpikeDrivenTransformer`), both through :class:`AdaptiveTokens`:

- **2-D halting** (§3.1-3.5): A-ViT's ACT with the step sequence running over blocks *and* time
  steps. Every (block l, time step t) position emits h = σ(γ·x_{k,0} − c) per token; a token stops
  being processed once its accumulated H reaches 1 − ε. Three accumulation orders (§3.2): raster
  "A" (default, time-major), rectangular "B", per-time-step "C".
- **Token merging** (§3.6): ToMe bipartite soft matching after SSA on time-averaged keys (under
  "A": decided at the first time step and reused), size-weighted merge of the residual stream and
  proportional SSA, out_i = 0.125·Σ_j s_j (q_i·k_j) v_j.

Execution is time-major (all blocks of t, then t + 1), so every LIF runs one step at a time with
explicit state (:func:`lif_step`, bit-identical forward to the multi-step :class:`LIF`). Halted
tokens are masked after every LIF and on the residual update, and their LIF state is frozen, so
(eval mode) masking equals running only the active tokens: at batch 1 the model gathers them and
compute really shrinks (§3.7). With halting off and r = 0 the model *is* its backbone: the
forward is the base class's (Spikformer or SDT), bit for bit.

Halting state lives on the N original patches; a merged token is represented by all its members
holding the same (size-weighted mean) state, so size-weighted GAP, H and readout sums (§3.6) are
plain means over the original patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import partial

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from spikeformers.models import hub
from spikeformers.models.layers import checkpoint_filter_fn, time_sequence
from spikeformers.models.neurons import LIF, charge, fire, sigmoid_surrogate_grad
from spikeformers.models.sdt import _CIFAR as _SDT_CIFAR
from spikeformers.models.sdt import SpikeDrivenTransformer
from spikeformers.models.sdt import _cfg as _sdt_cfg
from spikeformers.models.spikformer import Spikformer, _cfg, _cifar_cfg, split_heads

__all__ = [
    "ATSNNConfig", "AdaptiveTokens", "ATSpikformer", "ATSpikeDrivenTransformer", "lif_step", "Halting",
    "halting_trace", "bipartite_merge_map", "merge_tokens", "proportional_ssa", "distribution_target",
    "distribution_prior_kl",
]

READINGS = ("A", "B", "C")
SCORE_SOURCES = ("residual", "membrane", "spike", "learned")
READOUTS = ("mean_field", "last", "time_mean")
BN_STATS = ("plain", "masked", "running")


@dataclass
class ATSNNConfig:
    """Every §6 ambiguity is an option; defaults are the spec's recommended readings."""

    halting: bool = True
    reading: str = "A"               # §6 #2: A raster | B rectangular | C per-time-step
    score_source: str = "residual"   # §6 #1: residual ch0 | membrane (pre-LIF fc2 ch0) | spike | learned
    gate_scale: float = 1.0          # γ (§3.1, §6 #16)
    gate_center: float = 3.0         # c: initial mean h ≈ 1/P* on integer residuals
    eps: float = 0.01
    readout: str = "mean_field"      # §6 #5: mean_field | last | time_mean
    ponder_alpha: float = 5e-4       # α_p, ponder ÷ (L·T) (§6 #8)
    distr_alpha: float = 1e-3        # α_d (§6 #9)
    distr_position: float = 2 / 3    # P* as a fraction of the prior axis
    distr_std: float = 1.0
    distr_buffer: float = 0.02
    merge_r: int | list = 0          # §6 #10: tokens merged per block (int or per-block list)
    merge_metric: str = "spikes"     # K spike rate | "membrane" (pre-LIF K)
    merge_state: str = "mean"        # §6 #12: merged H = size-weighted mean | "max"
    proportional_attn: bool = True   # §6 #14
    gather_at_batch1: bool = True    # eval, batch 1: run only active tokens (§3.7)
    bn_stats: str = "plain"          # §6 #7, training-mode BN in blocks: plain | masked | running

    @classmethod
    def from_any(cls, value) -> ATSNNConfig:
        if value is None:
            return cls(halting=False)
        if isinstance(value, cls):
            return value
        value = dict(value)
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown AT-SNN options {sorted(unknown)}")
        cfg = cls(**value)
        for name, allowed in (("reading", READINGS), ("score_source", SCORE_SOURCES), ("readout", READOUTS),
                              ("merge_metric", ("spikes", "membrane")), ("merge_state", ("mean", "max")),
                              ("bn_stats", BN_STATS)):
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"atsnn.{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
        return cfg


# --- a LIF driven one time step at a time -------------------------------------------------------


class _Spike(torch.autograd.Function):
    """Heaviside forward (neurons.fire), Sigmoid-surrogate backward: the multi-step LIF's."""

    @staticmethod
    def forward(ctx, h, v_threshold, alpha):
        ctx.save_for_backward(h)
        ctx.v_threshold, ctx.alpha = v_threshold, alpha
        return fire(h, v_threshold).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return grad * sigmoid_surrogate_grad(h - ctx.v_threshold, ctx.alpha), None, None


def lif_step(lif: LIF, x: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of ``lif`` from membrane ``v`` (None: V = 0): (spikes in x's dtype, new V).

    Same charge/fire/reset arithmetic as the multi-step loop, so a sequence of calls gives the
    multi-step spikes bit for bit; gradients via autograd (reset detached as configured).
    """
    if v is None:
        v = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
    h = charge(x, v, lif.tau, lif.v_reset)
    spike = _Spike.apply(h, lif.v_threshold, lif.alpha)
    s = spike.detach() if lif.detach_reset else spike
    v_new = s * lif.v_reset + (1 - s) * h  # = neurons.reset exactly: v_reset where fired, H elsewhere
    return spike.to(x.dtype), v_new


# --- halting (§3.2) -------------------------------------------------------------------------------


class Halting:
    """ACT bookkeeping over the (block, time step) positions for one batch, per original token.

    Call :meth:`start_row` at each t, :meth:`active` before block l, :meth:`update` after it.
    State: ``acc`` = H (A: whole raster; C: this row; B: this row's part), ``prefix[l]`` (B only)
    = Σ_{t'<t} Σ_{l'≤l} h, ``rho`` = ponder ρ, ``open`` = still running (A: in the raster; B, C:
    in this row). Only the remainders R carry gradient into ρ (§3.5).
    """

    def __init__(self, reading: str, L: int, T: int, shape: tuple, eps: float, like: torch.Tensor):
        self.reading, self.L, self.T, self.eps = reading, L, T, eps
        self.acc = like.new_zeros(shape)
        self.rho = like.new_zeros(shape)
        self.open = torch.ones(shape, dtype=torch.bool, device=like.device)
        self.prefix = like.new_zeros((L + 1, *shape)) if reading == "B" else None
        self.row_h: list[torch.Tensor] = []

    def start_row(self, t: int) -> None:
        if self.reading in ("B", "C"):  # B: H(0, t) = 0 ⇒ block 1 always runs; C: reset
            self.acc = torch.zeros_like(self.acc)
            self.open = torch.ones_like(self.open)
            self.row_h = []

    def active(self) -> torch.Tensor:
        return self.open.clone()

    def update(self, l: int, t: int, h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """h [...] at (l, t) for the tokens in ``active`` → weights p (§3.2). Forced halting at the
        last position: (L, T) under A, l = L under B (remainder) and C."""
        a = active.to(h.dtype)
        last = l == self.L - 1 and (t == self.T - 1 or self.reading != "A")
        if last and self.reading != "B":
            h = torch.ones_like(h)
        h = h * a
        acc_new = self.acc + h
        if self.reading == "B":  # row ends when block l+1 would see H(l, t) ≥ 1 − ε
            self.row_h.append(h)
            ends = torch.ones_like(active) if last else (self.prefix[l + 1] + acc_new >= 1 - self.eps)
        else:
            ends = acc_new >= 1 - self.eps
        ends = ends & active
        remainder = 1 - self.acc  # R = 1 − Σ_{before} h
        p = torch.where(ends, remainder, h) * a
        self.rho = self.rho + a + ends.to(h.dtype) * remainder
        self.acc = acc_new
        self.open = self.open & ~ends
        return p

    def end_row(self, t: int) -> None:
        if self.reading == "B":  # prefix[l] += Σ_{l'≤l} h^{l', t}
            cum = torch.stack(self.row_h).cumsum(0)
            self.prefix = self.prefix + torch.cat([torch.zeros_like(cum[:1]), cum])

    def merge(self, assign: torch.Tensor, n_slots: int, use_max: bool) -> None:
        """Tokens were merged (assign: original → slot): members share the group's state (§3.6)."""
        self.acc = group_reduce(self.acc, assign, n_slots, "amax" if use_max else "mean")
        self.rho = group_reduce(self.rho, assign, n_slots, "mean")
        # a group runs only while all members run: after t = 0 a member may have halted in an
        # earlier block, and its frozen features must not leak into an active token (§3.3)
        self.open = group_reduce(self.open.to(self.acc.dtype), assign, n_slots, "amin") > 0.5


def halting_trace(h: torch.Tensor, reading: str = "A", eps: float = 0.01) -> dict:
    """Offline halting for hand-set scores h [L, T, ...] (no model): masks, weights p, H after
    each position, ρ. The model uses the same :class:`Halting` step by step."""
    L, T = h.shape[:2]
    state = Halting(reading, L, T, h.shape[2:], eps, h)
    masks, weights, acc = (torch.zeros_like(h) for _ in range(3))
    for t in range(T):
        state.start_row(t)
        for l in range(L):
            active = state.active()
            masks[l, t] = active.to(h.dtype)
            weights[l, t] = state.update(l, t, h[l, t], active)
            acc[l, t] = state.acc + (state.prefix[l + 1] if reading == "B" else 0)
        state.end_row(t)
    return {"mask": masks, "p": weights, "H": acc, "rho": state.rho}


# --- merging (§3.6) -------------------------------------------------------------------------------


def group_reduce(values: torch.Tensor, assign: torch.Tensor, n_slots: int, how: str) -> torch.Tensor:
    """values [B, N, *] on original tokens → each token gets its group's mean (or max)."""
    B, N = assign.shape
    idx = assign.reshape(B, N, *([1] * (values.dim() - 2))).expand_as(values)
    out = values.new_zeros((B, n_slots, *values.shape[2:]))
    out = out.scatter_reduce(1, idx, values, reduce=how, include_self=False)
    return out.gather(1, idx)


def slot_sizes(assign: torch.Tensor, n_slots: int) -> torch.Tensor:
    """s [B, n]: original patches per slot."""
    ones = torch.ones_like(assign, dtype=torch.float32)
    return ones.new_zeros(assign.shape[0], n_slots).scatter_add(1, assign, ones)


def bipartite_merge_map(metric: torch.Tensor, active: torch.Tensor, r: int) -> torch.Tensor:
    """ToMe bipartite soft matching among **active** tokens (§3.6, §5.2).

    metric [B, n, d], active [B, n] bool → slot map [B, n] into [0, n − r). Active tokens come
    first and alternate into sets A′, B′; each A′ token takes its most similar B′ token; the best
    min(r, ⌊active/2⌋) active pairs merge. Rectangular batches need r merges per sample: samples
    with fewer active pairs merge halted tokens with halted tokens instead (invisible: both stay
    halted and their readout sums merge size-weighted). Never an active with a halted token.
    """
    B, n, _ = metric.shape
    r = min(r, (n - 1) // 2)  # leaves enough admissible rows in every sample (see the docs)
    if r <= 0:
        return torch.arange(n, device=metric.device).expand(B, n)
    order = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices  # active first
    a_idx, b_idx = order[:, 0::2], order[:, 1::2]  # [B, na], [B, nb]
    na, nb = a_idx.shape[1], b_idx.shape[1]
    unit = F.normalize(metric.float(), dim=-1)
    take = lambda idx, x: x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    scores = take(a_idx, unit) @ take(b_idx, unit).transpose(1, 2)  # cosine [B, na, nb]
    act_a, act_b = active.gather(1, a_idx), active.gather(1, b_idx)
    same = act_a[:, :, None] == act_b[:, None, :]
    scores = torch.where(same, scores - 1e4 * (~act_a[:, :, None]).float(), float("-inf"))
    best, partner = scores.max(-1)  # [B, na]
    # at most ⌊active/2⌋ active merges per sample (ToMe's bound); extra active rows rank last
    rank = best.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    too_many = act_a & (rank >= (active.sum(1, keepdim=True) // 2))
    priority = torch.where(too_many, best - 2e4, best)
    merged_rows = priority.argsort(dim=-1, descending=True, stable=True)[:, :r]  # [B, r]
    is_merged = torch.zeros_like(act_a).scatter(1, merged_rows, True)
    keep_rank = (~is_merged).long().cumsum(1) - 1  # slot of a kept A′ token: its order among kept
    a_slot = torch.where(is_merged, (na - r) + partner, keep_rank)
    b_slot = (na - r) + torch.arange(nb, device=metric.device).expand(B, nb)
    slot = torch.empty_like(order)
    slot.scatter_(1, a_idx, a_slot)
    slot.scatter_(1, b_idx, b_slot)
    return slot


def merge_tokens(x: torch.Tensor, sizes: torch.Tensor, slot: torch.Tensor, n_new: int) -> torch.Tensor:
    """Size-weighted merge x [B, n, D], s [B, n] → [B, n_new, D]: x = Σ s_i x_i / Σ s_i (§3.6)."""
    if n_new == x.shape[1]:  # r = 0: the identity
        return x
    idx = slot[..., None].expand_as(x)
    total = x.new_zeros(x.shape[0], n_new, x.shape[2]).scatter_add(1, idx, x * sizes[..., None].to(x.dtype))
    new_sizes = sizes.new_zeros(sizes.shape[0], n_new).scatter_add(1, slot, sizes)
    return total / new_sizes[..., None].to(x.dtype)


def proportional_ssa(q, k, v, sizes: torch.Tensor | None, scale: float) -> torch.Tensor:
    """SSA core with key j counted s_j times: out_i = scale·Σ_j s_j (q_i·k_j) v_j (§3.6).
    q, k, v [B, h, n, d]; sizes [B, n] or None (plain Spikformer order, (Q Kᵀ)·scale then V)."""
    attn = q @ k.transpose(-2, -1) * scale
    if sizes is not None:
        attn = attn * sizes[:, None, None, :].to(attn.dtype)
    return attn @ v


# --- losses (§3.5) --------------------------------------------------------------------------------


def distribution_target(length: int, position: float, std: float = 1.0, buffer: float = 0.02) -> torch.Tensor:
    """A-ViT's prior: Gaussian pdf over positions 0..length−1 at ``position``, scaled so the
    first round(position) entries sum to 1 − buffer (§5.1)."""
    grid = torch.arange(length, dtype=torch.float64)
    pdf = torch.exp(-0.5 * ((grid - position) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    head = max(1, round(position))
    return (pdf * (1 - buffer) / pdf[:head].sum()).float()


def distribution_prior_kl(h_mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ H̄): H̄ = mean h per position normalised to 1 and clamped to [0.01, 0.99]
    (A-ViT); the target is normalised too, so KL = 0 when H̄ ∝ target (up to the clamp)."""
    h_bar = (h_mean / h_mean.sum().clamp_min(1e-12)).clamp(0.01, 0.99)
    goal = target / target.sum()
    return (goal * (goal.clamp_min(1e-12).log() - h_bar.log())).sum()


# --- the model ------------------------------------------------------------------------------------


@dataclass
class _Pass:
    """Per-forward state shared by the block steps."""

    lif_v: dict = field(default_factory=dict)   # (block, neuron) → membrane [B, n, C] (slot space)
    merge_maps: dict = field(default_factory=dict)  # block → slot map decided at t = 0
    gather: bool = False
    bn_stats: str = "plain"   # training-mode BN statistics in the blocks (ATSNNConfig.bn_stats)


class AdaptiveTokens:
    """The AT-SNN machinery shared by the backbones: halting, the time-major pass, the token metric
    and the losses. A backbone class provides ``_embed_tokens`` (images → tokens [T, B, N, D]),
    ``_block_step`` (one block at one time step on token slots) and ``_adaptive_logits``. After each
    forward: ``token_stats`` (tokens per image, per position) and, in training, :meth:`aux_loss`."""

    def _setup_adaptive(self, atsnn: dict | ATSNNConfig | None) -> None:
        self.atsnn = ATSNNConfig.from_any(atsnn)
        if self.atsnn.score_source == "learned":  # §3.1 option: Linear(D→1), starts as channel 0
            self.halt_head = nn.Linear(self.embed_dim, 1)
            with torch.no_grad():
                self.halt_head.weight.zero_()
                self.halt_head.weight[0, 0] = 1.0
                self.halt_head.bias.zero_()
        self.token_stats: dict | None = None
        self._aux: torch.Tensor | None = None
        self._scramble_inactive = False  # test hook (spec test 8): random features for halted tokens

    @property
    def adaptive(self) -> bool:
        return self.atsnn.halting or any(r > 0 for r in self._merge_r())

    def _merge_r(self) -> list[int]:
        r = self.atsnn.merge_r
        rs = list(r) if isinstance(r, (list, tuple)) else [int(r)] * len(self.block)
        if len(rs) != len(self.block):
            raise ValueError(f"atsnn.merge_r has {len(rs)} entries for {len(self.block)} blocks")
        return rs

    def aux_loss(self) -> torch.Tensor | None:
        """α_p·L_ponder + α_d·L_distr of the last forward (None when halting is off)."""
        return self._aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adaptive:  # flags off: the plain backbone, bit for bit
            out = super().forward(x)
            B = out.shape[-2]
            N = self._tokens(x)
            full = N * len(self.block) * self.T
            self.token_stats = {"tokens": out.new_full((B,), float(full)), "baseline": full,
                                "per_position": out.new_full((len(self.block), self.T), float(N))}
            self._aux = None
            return out
        return self._adaptive_logits(x)

    def _tokens(self, x: torch.Tensor) -> int:
        h, w = x.shape[-2:]
        return (h // self.size_multiple) * (w // self.size_multiple)

    # -- the time-major pass -------------------------------------------------------------------

    def forward_adaptive(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images → (pooled readout features [B, D] (§3.2-3.4, §3.6), per-step features [T, B, D]:
        the token mean of each token's latest active x after every time step)."""
        cfg = self.atsnn
        # merging only: Spikformer's own readout, the time mean of the last block's output
        readout_kind = cfg.readout if cfg.halting else "time_mean"
        x_seq = time_sequence(images, self.T, self.in_chans, self.size_multiple, type(self).__name__)
        sps = self._embed_tokens(x_seq)  # [T, B, N, D]
        T, B, N, D = sps.shape
        L = len(self.block)
        if cfg.halting and cfg.reading != "A" and any(self._merge_r()):
            raise NotImplementedError("token merging is implemented with halting reading 'A' only")
        rs = self._merge_r()
        run = _Pass(gather=(not self.training) and B == 1 and cfg.gather_at_batch1, bn_stats=cfg.bn_stats)
        halt = Halting(cfg.reading if cfg.halting else "A", L, T, (B, N), cfg.eps, sps)
        readout = sps.new_zeros(B, N, D)  # y_k (§3.4), on original tokens
        last_x = sps.new_zeros(B, N, D)   # x at the token's latest active position
        counts = sps.new_zeros(B, L, T)
        h_mean = sps.new_zeros(L, T)
        target_h = sps.new_zeros(B, N)    # "no halting": h = 0, only the forced last position counts
        steps = []                        # per-step features for heads that run over T (SDT)
        for t in range(T):
            halt.start_row(t)
            x = sps[t]  # the residual restarts from SPS at every t; H and LIF state carry (§3.2)
            assign = torch.arange(N, device=x.device).expand(B, N)  # original token → slot
            for l, blk in enumerate(self.block):
                active = halt.active()
                slot_active = group_any(active, assign, x.shape[1])
                counts[:, l, t] = slot_active.sum(1)
                if self._scramble_inactive:
                    x = torch.where(slot_active[..., None], x, torch.randn_like(x))
                n_before = x.shape[1]
                x, assign, probes = self._block_step(l, blk, x, slot_active, assign, rs[l], t, run)
                if x.shape[1] != n_before:  # merged: members share the group's state (§3.6, §6 #12)
                    halt.merge(assign, x.shape[1], cfg.merge_state == "max")
                    readout = group_reduce(readout, assign, x.shape[1], "mean")
                    last_x = group_reduce(last_x, assign, x.shape[1], "mean")
                    active = halt.active()
                h = self._halting_score(x, probes) if cfg.halting else target_h
                h_orig = h.gather(1, assign)
                x_orig = x.gather(1, assign[..., None].expand(-1, -1, D))
                h_mean[l, t] = h_orig.mean()
                p = halt.update(l, t, h_orig, active)
                if readout_kind == "mean_field":
                    scale = 1.0 if (cfg.reading == "A" or not cfg.halting) else 1.0 / T
                    readout = readout + (p * scale)[..., None] * x_orig
                last_x = torch.where(active[..., None], x_orig, last_x)
            halt.end_row(t)
            steps.append(last_x.mean(1))
            if readout_kind == "time_mean":
                readout = readout + last_x / T
        if readout_kind == "last":
            readout = last_x
        full = N * L * T
        self.token_stats = {"tokens": counts.sum((1, 2)).detach(), "baseline": full,
                            "per_position": counts.mean(0).detach()}
        self._aux = self._losses(halt, h_mean, L, T) if (cfg.halting and self.training) else None
        return readout.mean(1), torch.stack(steps)  # mean over patches = size-weighted GAP over slots (§3.4)

    def _embed_tokens(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Patch embedding → tokens [T, B, N, D] (both backbones embed to [T, B, D, H', W'])."""
        return self.run_stage(self.patch_embed, x_seq).flatten(3).transpose(-1, -2)

    def _losses(self, halt: Halting, h_mean: torch.Tensor, L: int, T: int) -> torch.Tensor:
        cfg = self.atsnn
        ponder = halt.rho.mean() / (L * T)  # §6 #8
        axis = h_mean.t().reshape(-1) if cfg.reading == "A" else h_mean.mean(1)  # raster (t-major) | blocks
        target = distribution_target(axis.numel(), cfg.distr_position * axis.numel(), cfg.distr_std,
                                     cfg.distr_buffer).to(axis)
        self.token_stats["ponder"] = float(ponder.detach())
        return cfg.ponder_alpha * ponder + cfg.distr_alpha * distribution_prior_kl(axis, target)

    def _halting_score(self, x: torch.Tensor, probes: dict) -> torch.Tensor:
        """h = σ(γ·z − c) per slot (§3.1); z from the configured source."""
        cfg = self.atsnn
        z = {"residual": lambda: x[..., 0], "membrane": lambda: probes["membrane"],
             "spike": lambda: probes["spike"], "learned": lambda: self.halt_head(x)[..., 0]}[cfg.score_source]()
        return torch.sigmoid(cfg.gate_scale * z - cfg.gate_center)

    def _neuron(self, l: int, name: str, lif: LIF, inp, active, rows, run: _Pass) -> torch.Tensor:
        """One LIF step for the active slots; halted slots: spikes 0, membrane frozen (§3.3)."""
        key = (l, name)
        n = active.shape[1]
        v = run.lif_v.get(key)
        if v is None or v.shape[1] != n:
            v = inp.new_zeros((inp.shape[0], n, inp.shape[-1]), dtype=torch.promote_types(inp.dtype, torch.float32))
        if rows is not None:  # gathered: only the active rows exist
            spikes, v_rows = lif_step(lif, inp, v[:, rows])
            v = v.clone()
            v[:, rows] = v_rows
            run.lif_v[key] = v
            _report(lif, inp, spikes)
            return spikes
        spikes, v_new = lif_step(lif, inp, v)
        m = active[..., None]
        run.lif_v[key] = torch.where(m, v_new, v)
        _report(lif, inp, spikes[active])
        return spikes * m.to(spikes.dtype)


class ATSpikformer(AdaptiveTokens, Spikformer):
    """Spikformer (CIFAR layout) with AT-SNN halting and merging; ``atsnn`` = :class:`ATSNNConfig`
    fields. After each forward: ``token_stats`` (tokens per image, per position) and, in training,
    :meth:`aux_loss` (α_p·ponder + α_d·KL)."""

    def __init__(self, atsnn: dict | ATSNNConfig | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.kind != "cifar":
            raise ValueError("AT-SNN is implemented for the CIFAR-layout Spikformer (kind='cifar')")
        self._setup_adaptive(atsnn)

    def _adaptive_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_step_logits:
            raise ValueError("AT-SNN on Spikformer has one mean-field readout; per-step logits (TET) are not supported")
        return self.head(self.forward_adaptive(x)[0])

    def _block_step(self, l, blk, x, active, assign, r, t, run: _Pass):
        """One block at one time step on slots x [B, n, D] (only the active ones: masked, or
        gathered at batch 1). Returns (x, assign, probes); merging may shrink n (§3.6)."""
        attn, mlp = blk.attn, blk.mlp
        sizes = slot_sizes(assign, x.shape[1]) if any(self._merge_r()) else None
        proportional = sizes if (sizes is not None and self.atsnn.proportional_attn) else None

        # SSA on the active slots
        out, k_probe = self._ssa(l, attn, x, active, proportional, run)
        x = _add_update(x, out, active, run.gather)

        # merge between SSA and MLP, decided at t = 0 and reused (§3.6, §6 #11)
        if r > 0:
            if t == 0:
                run.merge_maps[l] = bipartite_merge_map(k_probe, active, r)
            slot = run.merge_maps[l]
            n_new = x.shape[1] - min(r, (x.shape[1] - 1) // 2)
            x = merge_tokens(x, sizes, slot, n_new)
            # a group runs only while all its members run (see Halting.merge)
            active = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device).scatter_reduce(
                1, slot, active, reduce="amin", include_self=False)
            assign = slot.gather(1, assign)

        # MLP on the active slots
        rows = _rows(active, run.gather)
        xa = x if rows is None else x[:, rows]
        hid = self._neuron(l, "fc1", mlp.fc1_lif, _linear_bn(mlp.fc1_linear, mlp.fc1_bn, xa, run, active), active, rows, run)
        pre = _linear_bn(mlp.fc2_linear, mlp.fc2_bn, hid, run, active)
        out = self._neuron(l, "fc2", mlp.fc2_lif, pre, active, rows, run)
        x = _add_update(x, out if rows is None else _scatter_rows(x, out, rows), active, run.gather)
        probes = {}
        if self.atsnn.score_source in ("membrane", "spike"):
            probes = {"membrane": _full(x, pre[..., 0], rows), "spike": _full(x, out[..., 0], rows)}
        return x, assign, probes

    def _ssa(self, l, attn, x, active, sizes, run: _Pass):
        """Masked/gathered SSA → (output [B, n, D] on all slots, merge metric [B, n, d])."""
        rows = _rows(active, run.gather)
        xa = x if rows is None else x[:, rows]
        sa = sizes if (sizes is None or rows is None) else sizes[:, rows]
        pre_k = _linear_bn(attn.k_linear, attn.k_bn, xa, run, active)
        q = self._neuron(l, "q", attn.q_lif, _linear_bn(attn.q_linear, attn.q_bn, xa, run, active), active, rows, run)
        k = self._neuron(l, "k", attn.k_lif, pre_k, active, rows, run)
        v = self._neuron(l, "v", attn.v_lif, _linear_bn(attn.v_linear, attn.v_bn, xa, run, active), active, rows, run)
        heads = attn.num_heads
        core = proportional_ssa(*(split_heads(s[None], heads)[0] for s in (q, k, v)), sa, attn.scale)
        B, n, C = q.shape
        core = core.transpose(1, 2).reshape(B, n, C)  # [B, n, C]
        s = self._neuron(l, "attn", attn.attn_lif, core, active, rows, run)
        out = self._neuron(l, "proj", attn.proj_lif, _linear_bn(attn.proj_linear, attn.proj_bn, s, run, active), active, rows, run)
        metric_src = k if self.atsnn.merge_metric == "spikes" else pre_k * (active[..., None] if rows is None else 1)
        metric = split_heads(metric_src[None], heads)[0].mean(1)  # head-averaged keys [B, n, d]
        if rows is not None:
            out = _scatter_rows(x, out, rows)
            metric = _full(x, metric, rows)
        return out, metric

class ATSpikeDrivenTransformer(AdaptiveTokens, SpikeDrivenTransformer):
    """SDT v1 (CIFAR layout) with AT-SNN halting, beyond the paper (docs/atsnn.md, "On SDT").

    SDT's blocks are token-wise (1×1 convs) apart from SDSA's token sum, so they run on token slots
    like Spikformer's. The residual stream is membrane-valued; halting reads its channel 0 (or the
    other score sources) as on Spikformer. SDSA's channel mask sums K ⊙ V over the active tokens
    only (halted tokens' spikes are masked) and keeps its LIF state per sample and channel. SDT's
    head runs an LIF over time, so the readout is per time step: each token's latest active x,
    averaged over tokens, through ``head_lif`` and the head (``readout=time_mean``). Per-step logits
    (TET) work. Merging is Spikformer-only."""

    def __init__(self, atsnn: dict | ATSNNConfig | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.dvs_mode:
            raise ValueError("AT-SNN on SDT is implemented without dvs_mode (its max-pools mix tokens)")
        self._setup_adaptive(atsnn)
        if any(self._merge_r()):
            raise ValueError("atsnn.merge_r: token merging is implemented on Spikformer only; use merge_r=0 on SDT")
        if self.atsnn.halting and self.atsnn.readout != "time_mean":
            raise ValueError(f"atsnn.readout={self.atsnn.readout!r}: AT-SNN on SDT reads every time step out through "
                             "SDT's head LIF; use atsnn.readout=time_mean")

    def _adaptive_logits(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.forward_adaptive(x)[1]  # [T, B, D]: token means of the latest active x
        logits = self.head(self.head_lif(steps))
        return logits if self.per_step_logits else logits.mean(0)

    def _block_step(self, l, blk, x, active, assign, r, t, run: _Pass):
        """One SDT block at one time step on slots x [B, n, D]: SDSA with its membrane shortcut,
        then the MLP, each on the active slots (masked, or gathered at batch 1)."""
        attn, mlp = blk.attn, blk.mlp
        rows = _rows(active, run.gather)
        scatter = (lambda out: out) if rows is None else (lambda out: _scatter_rows(x, out, rows))  # noqa: E731

        def conv_bn(conv, bn, inp):
            return _linear_bn(partial(_token_conv, conv), bn, inp, run, active)

        xa = x if rows is None else x[:, rows]
        s = self._neuron(l, "shortcut", attn.shortcut_lif, xa, active, rows, run)
        q, k, v = (self._neuron(l, name, lif, conv_bn(conv, bn, s), active, rows, run)
                   for name, lif, conv, bn in (("q", attn.q_lif, attn.q_conv, attn.q_bn),
                                               ("k", attn.k_lif, attn.k_conv, attn.k_bn),
                                               ("v", attn.v_lif, attn.v_conv, attn.v_bn)))
        token_sum = k.mul(v).sum(1, keepdim=True)  # [B, 1, D]: halted tokens' spikes are 0
        every_sample = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
        mask = self._neuron(l, "mask", attn.talking_heads_lif, token_sum, every_sample, None, run)
        x = _add_update(x, scatter(conv_bn(attn.proj_conv, attn.proj_bn, q * mask)), active, run.gather)

        xa = x if rows is None else x[:, rows]
        hidden = conv_bn(mlp.fc1_conv, mlp.fc1_bn, self._neuron(l, "fc1", mlp.fc1_lif, xa, active, rows, run))
        spikes = self._neuron(l, "fc2", mlp.fc2_lif, hidden, active, rows, run)
        x = _add_update(x, scatter(conv_bn(mlp.fc2_conv, mlp.fc2_bn, spikes)), active, run.gather)
        probes = {}
        if self.atsnn.score_source in ("membrane", "spike"):  # the block's last LIF: its input and spikes
            probes = {"membrane": _full(x, hidden[..., 0], rows), "spike": _full(x, spikes[..., 0], rows)}
        return x, assign, probes


def _report(lif: LIF, inp: torch.Tensor, processed: torch.Tensor) -> None:
    """Give ``lif``'s forward hooks (firing-rate monitors) the spikes of the neurons this step
    actually computed: the step-wise path never calls ``lif`` itself."""
    for hook_id, hook in lif._forward_hooks.items():
        if hook_id in lif._forward_hooks_with_kwargs:
            hook(lif, (inp,), {}, processed)
        else:
            hook(lif, (inp,), processed)


def group_any(active: torch.Tensor, assign: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Slot is active iff any member is (merged groups are all-active or all-halted)."""
    out = torch.zeros(active.shape[0], n_slots, dtype=torch.bool, device=active.device)
    return out.scatter_reduce(1, assign, active, reduce="amax", include_self=False)


def _token_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 Conv2d applied to token slots [B, n, C_in] → [B, n, C_out] (it is a Linear)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _linear_bn(linear, bn: nn.Module, x: torch.Tensor, run: _Pass, active: torch.Tensor) -> torch.Tensor:
    """Linear (or 1×1 conv) → BatchNorm over channels on [B, n, C] (one time step). In training, the batch
    statistics follow ``run.bn_stats`` (§6 #7): ``plain`` over every token of the step (halted ones
    included), ``masked`` over the active tokens only, ``running`` none (the running statistics
    normalise, as in eval: fine-tuning without a train/eval gap)."""
    y = linear(x)
    if not bn.training or run.bn_stats == "plain" or run.gather:
        z = y.transpose(1, 2)  # [B, C, n]; BatchNorm2d (SDT) wants [B, C, n, 1]
        return (bn(z.unsqueeze(-1)).squeeze(-1) if isinstance(bn, nn.BatchNorm2d) else bn(z)).transpose(1, 2)
    frozen = lambda: F.batch_norm(y.transpose(1, 2), bn.running_mean, bn.running_var, bn.weight, bn.bias,  # noqa: E731
                                  False, 0.0, bn.eps).transpose(1, 2)
    if run.bn_stats == "running":
        return frozen()
    # masked: statistics over the active tokens only, in at least fp32 (AMP-safe counts and sums)
    dtype = torch.promote_types(y.dtype, torch.float32)
    weight = active[..., None].to(dtype)  # [B, n, 1]
    count = float(weight.sum())
    if count < 2:  # no (unbiased) statistics: normalise with the running ones, update nothing
        return frozen()
    yf = y.to(dtype)
    mean = (yf * weight).sum((0, 1)) / count  # [C]
    var = ((yf - mean) ** 2 * weight).sum((0, 1)) / count
    with torch.no_grad():  # as nn.BatchNorm1d: momentum update, unbiased variance
        bn.num_batches_tracked += 1
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
        bn.running_var.lerp_((var * count / (count - 1)).to(bn.running_var.dtype), momentum)
    return ((yf - mean) * torch.rsqrt(var + bn.eps) * bn.weight + bn.bias).to(y.dtype)


def _rows(active: torch.Tensor, gather: bool) -> torch.Tensor | None:
    return active[0].nonzero().squeeze(1) if gather else None


def _scatter_rows(x: torch.Tensor, rows_value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape)
    out[:, rows] = rows_value
    return out


def _full(x: torch.Tensor, value: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    if rows is None:
        return value
    out = value.new_zeros((x.shape[0], x.shape[1], *value.shape[2:]))
    out[:, rows] = value
    return out


def _add_update(x: torch.Tensor, update: torch.Tensor, active: torch.Tensor, gather: bool) -> torch.Tensor:
    """Residual update, masked for halted slots (§3.3; update is already 0 there)."""
    return x + update * active[..., None].to(update.dtype)


# --- registry -------------------------------------------------------------------------------------


def _create(model_name: str, pretrained: bool = False, **kwargs) -> ATSpikformer:
    return hub.build_model(ATSpikformer, model_name, pretrained, checkpoint_filter_fn, **kwargs)


def _create_sdt(model_name: str, pretrained: bool = False, **kwargs) -> ATSpikeDrivenTransformer:
    return hub.build_model(ATSpikeDrivenTransformer, model_name, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    "atsnn_spikformer_tiny": _cfg(num_classes=10, input_size=(3, 32, 32), mean=(0.5,), std=(0.5,), paper_ids="arXiv:2408.12293"),
    "atsnn_spikformer_cifar_4_384": _cifar_cfg(paper_ids="arXiv:2408.12293"),
    "atsnn_sdt_tiny": _sdt_cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5,), std=(0.5,)),
})


@register_model
def atsnn_spikformer_tiny(pretrained: bool = False, **kwargs) -> ATSpikformer:
    """spikformer_tiny (2 blocks, D = 64) with AT-SNN: CPU-sized, for digits and tests."""
    args = dict(kind="cifar", depth=2, embed_dim=64, num_heads=4, img_size=32, num_classes=10)
    return _create("atsnn_spikformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def atsnn_spikformer_cifar_4_384(pretrained: bool = False, **kwargs) -> ATSpikformer:
    """Spikformer-4-384 with AT-SNN (CIFAR-10/100; TinyImageNet at img_size 64, N = 256)."""
    args = dict(kind="cifar", depth=4, embed_dim=384, num_heads=12, img_size=32, num_classes=10)
    return _create("atsnn_spikformer_cifar_4_384", pretrained, **dict(args, **kwargs))


@register_model
def atsnn_sdt_tiny(pretrained: bool = False, **kwargs) -> ATSpikeDrivenTransformer:
    """sdt_tiny (2 blocks, D = 64, CIFAR layout) with AT-SNN halting: beyond the paper, for digits and tests."""
    args = dict(_SDT_CIFAR, depth=2, embed_dim=64, num_heads=4)
    return _create_sdt("atsnn_sdt_tiny", pretrained, **dict(args, **kwargs))
