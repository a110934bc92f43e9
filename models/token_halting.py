"""2-D token halting for AT-SNN (Kang et al., arXiv 2408.12293): A-ViT's adaptive computation
time (Yin et al., CVPR 2022) with the sequence of positions running over encoder blocks *and* time
steps, as small functions and the bookkeeping that orders them. The model code is in :mod:`atsnn`.

Every position (block l, time step t) gives each token k a halting score h_k^{l,t}; the token stops
being processed once its accumulated H_k reaches 1 − ε. Its weights are p = h before the halting
position and the remainder R = 1 − Σ_{earlier} h at it, and its ponder cost is ρ = (positions it
ran) + R. Three orders of accumulation ("readings"), L blocks and T steps:

- ``A`` raster: one sequence over the whole L × T raster, time-major (all blocks of t, then t + 1).
- ``B`` rectangular: H(l, t) = Σ_{t' ≤ t} Σ_{l' ≤ l} h; a row ends where block l + 1 would see
  H(l, t) ≥ 1 − ε, so the halted positions form an upper set; block 1 always runs.
- ``C`` per time step: a fresh sequence over the blocks at every t.

Shapes: [*] is any token shape, [B, N] in the model (N original patches per sample).
"""

from __future__ import annotations

import math

import torch

from spikeformers.models.token_merging import group_all, group_reduce

__all__ = ["READINGS", "halting_score", "reaches_halt", "act_position", "rectangular_prefix", "Halting",
           "halting_trace", "ponder_loss", "prior_positions", "distribution_target", "distribution_prior_kl"]

READINGS = ("A", "B", "C")


# --- one position ---------------------------------------------------------------------------------


def halting_score(z: torch.Tensor, gate_scale: float, gate_center: float) -> torch.Tensor:
    """h = σ(γ·z − c) per token [*], from one channel z of its features (A-ViT's gate)."""
    return torch.sigmoid(gate_scale * z - gate_center)


def reaches_halt(accumulated: torch.Tensor, eps: float) -> torch.Tensor:
    """ACT's stopping rule on H [*]: halt once H ≥ 1 − ε → bool [*]."""
    return accumulated >= 1 - eps


def act_position(acc: torch.Tensor, rho: torch.Tensor, h: torch.Tensor, active: torch.Tensor,
                 halts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and ponder cost at one position, tokens [*] → (p [*], ρ [*]).

    acc = Σ h of the earlier positions of this sequence, rho = ρ so far, h the scores (already 0
    on inactive tokens), active and halts bool (halts ⊆ active). p = h while a token runs and
    R = 1 − acc where it halts, 0 once halted; ρ grows by 1 per position run, plus R at halting.
    Only R carries gradient into ρ (ACT's ponder cost).
    """
    running = active.to(h.dtype)
    remainder = 1 - acc
    p = torch.where(halts, remainder, h) * running
    rho = rho + running + halts.to(h.dtype) * remainder
    return p, rho


def rectangular_prefix(prefix: torch.Tensor, row_h: list[torch.Tensor]) -> torch.Tensor:
    """Reading B after row t: prefix[l] += Σ_{l' < l} h^{l', t}. prefix [L + 1, *] (entry 0 stays
    0), row_h the row's L scores [*] → [L + 1, *], so that prefix[l + 1] + (this row's Σ_{l' ≤ l} h)
    = H(l, t)."""
    cumulative = torch.stack(row_h).cumsum(0)  # [L, *]
    return prefix + torch.cat([torch.zeros_like(cumulative[:1]), cumulative])


# --- the sequence over (block, time step) ---------------------------------------------------------


class Halting:
    """ACT state over the (block, time step) positions of one batch, per original token.

    Call :meth:`start_row` at each t, :meth:`active` before block l, :meth:`update` after it and
    :meth:`end_row` after the last block. State: ``acc`` = H (A: over the whole raster; C: this
    row; B: this row's part), ``prefix`` (B only, :func:`rectangular_prefix`), ``rho`` = ρ,
    ``open`` = still running (A: in the raster; B, C: in this row).
    """

    def __init__(self, reading: str, L: int, T: int, shape: tuple, eps: float, like: torch.Tensor):
        self.reading, self.L, self.T, self.eps = reading, L, T, eps
        self.acc = like.new_zeros(shape)
        self.rho = like.new_zeros(shape)
        self.open = torch.ones(shape, dtype=torch.bool, device=like.device)
        self.prefix = like.new_zeros((L + 1, *shape)) if reading == "B" else None
        self.row_h: list[torch.Tensor] = []

    def start_row(self, t: int) -> None:
        if self.reading in ("B", "C"):  # B: this row's part starts at 0, so block 1 runs; C: restart
            self.acc = torch.zeros_like(self.acc)
            self.open = torch.ones_like(self.open)
            self.row_h = []

    def active(self) -> torch.Tensor:
        return self.open.clone()

    def update(self, l: int, t: int, h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Scores h [*] at (l, t) for the tokens in ``active`` → weights p [*]. Halting is forced at
        the last position: (L, T) under A (h = 1), l = L under C (h = 1) and B (the remainder)."""
        last = l == self.L - 1 and (t == self.T - 1 or self.reading != "A")
        if last and self.reading != "B":
            h = torch.ones_like(h)
        h = h * active.to(h.dtype)
        acc = self.acc + h
        if self.reading == "B":
            self.row_h.append(h)
            halts = torch.ones_like(active) if last else reaches_halt(self.prefix[l + 1] + acc, self.eps)
        else:
            halts = reaches_halt(acc, self.eps)
        halts = halts & active
        p, self.rho = act_position(self.acc, self.rho, h, active, halts)
        self.acc, self.open = acc, self.open & ~halts
        return p

    def end_row(self, t: int) -> None:
        if self.reading == "B":
            self.prefix = rectangular_prefix(self.prefix, self.row_h)

    def merge(self, assign: torch.Tensor, n_slots: int, use_max: bool) -> None:
        """Tokens were merged (assign [B, N]: original patch → slot): the members of a group share
        its H (size-weighted mean, or max) and ρ. A group runs only while all its members run:
        after t = 1 a member may have halted in an earlier block, and its frozen features must not
        leak into a running token."""
        self.acc = group_reduce(self.acc, assign, n_slots, "amax" if use_max else "mean")
        self.rho = group_reduce(self.rho, assign, n_slots, "mean")
        self.open = group_all(self.open, assign, n_slots).gather(1, assign)


def halting_trace(h: torch.Tensor, reading: str = "A", eps: float = 0.01) -> dict:
    """Halting for given scores h [L, T, *], without a model → masks, weights p and H after each
    position (all [L, T, *]), and ρ [*]. The model runs the same :class:`Halting` step by step."""
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


# --- losses ---------------------------------------------------------------------------------------


def ponder_loss(rho: torch.Tensor, L: int, T: int) -> torch.Tensor:
    """Mean ρ over tokens [*], divided by the L·T positions so that α_p does not scale with depth."""
    return rho.mean() / (L * T)


def prior_positions(h_mean: torch.Tensor, reading: str) -> torch.Tensor:
    """Mean halting score per position h_mean [L, T] → the axis the prior is laid over: the
    time-major raster [L·T] under A, the blocks [L] (averaged over t) under B and C."""
    return h_mean.t().reshape(-1) if reading == "A" else h_mean.mean(1)


def distribution_target(length: int, position: float, std: float = 1.0, buffer: float = 0.02) -> torch.Tensor:
    """A-ViT's halting prior [length]: a Gaussian pdf over positions 0..length−1 centred at
    ``position``, scaled so that the first round(position) entries sum to 1 − buffer."""
    grid = torch.arange(length, dtype=torch.float64)
    pdf = torch.exp(-0.5 * ((grid - position) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    head = max(1, round(position))
    return (pdf * (1 - buffer) / pdf[:head].sum()).float()


def distribution_prior_kl(h_mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A-ViT's distributional prior loss KL(target ‖ H̄): H̄ = the mean h per position [P],
    normalised to 1 and clamped to [0.01, 0.99]. The target [P] is normalised too, so KL = 0 when
    H̄ ∝ target (up to the clamp)."""
    h_bar = (h_mean / h_mean.sum().clamp_min(1e-12)).clamp(0.01, 0.99)
    goal = target / target.sum()
    return (goal * (goal.clamp_min(1e-12).log() - h_bar.log())).sum()
