"""AT-SNN: adaptive tokens for Spikformer (Kang et al., arXiv 2408.12293v1), and halting on SDT v1.

No official code exists; this follows a reconstruction of the paper (docs/atsnn.md lists the
readings it had to choose). The algorithms are small functions in :mod:`token_halting` (2-D
halting: A-ViT's ACT over blocks *and* time steps) and :mod:`token_merging` (ToMe's bipartite
matching among the running tokens, size-weighted merging, proportional attention). This module
patches them into two backbones through :class:`AdaptiveTokens`: a CIFAR-layout Spikformer with
halting and merging (:class:`ATSpikformer`, the paper's model) and, beyond the paper, SDT v1 with
halting (:class:`ATSpikeDrivenTransformer`); the registry is at the end.

Execution is time-major (all blocks of t, then t + 1), because under reading A the mask at (l, t)
depends on (L, t − 1); so every LIF runs one step at a time with explicit state
(:meth:`LIF.step`, bit-identical to the multi-step neuron). Halted tokens are masked after every
LIF and on the residual update, and their LIF state is frozen, so (eval mode) masking equals
running only the active tokens: at batch 1 the model gathers them and compute really shrinks; in a
batch, the eval pass runs the Linear and 1×1 conv layers on the active rows. What each step
computed is handed to analysis hooks (firing rates, energy): the neurons report their computed
rows and membranes (``step_membrane``), the layers and attention modules the active tokens
(``step_tokens``), so the energy analysis counts only the tokens processed.
With halting off and r = 0 the model *is* its backbone: the forward is the base class's
(Spikformer or SDT), bit for bit.

Halting state lives on the N original patches; a merged token is represented by all its members
holding the same (size-weighted mean) state, so AT-SNN's size-weighted GAP, H and readout sums are
plain means over the original patches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from spikeformers.models.base import build_spiking_model
from spikeformers.models.layers import checkpoint_filter_fn, split_heads
from spikeformers.models.neurons import LIF
from spikeformers.models.sdt import SpikeDrivenTransformer
from spikeformers.models.spikformer import Spikformer
from spikeformers.models.token_halting import (
    READINGS, Halting, distribution_prior_kl, distribution_target, halting_score, halting_trace, ponder_loss,
    prior_positions,
)
from spikeformers.models.token_merging import (
    bipartite_merge_map, group_all, group_any, group_reduce, merge_tokens, merged_away, proportional_ssa, slot_sizes,
)

__all__ = [
    "ATSNNConfig", "AdaptiveTokens", "ATSpikformer", "ATSpikeDrivenTransformer",
    # the algorithms, re-exported from token_halting and token_merging
    "Halting", "halting_trace", "distribution_target", "distribution_prior_kl",
    "bipartite_merge_map", "merge_tokens", "proportional_ssa", "slot_sizes", "group_any",
]

SCORE_SOURCES = ("residual", "membrane", "spike", "learned")
READOUTS = ("mean_field", "last", "time_mean")
BN_STATS = ("plain", "masked", "running")


@dataclass
class ATSNNConfig:
    """Every reading the paper leaves open is an option (docs/atsnn.md); the defaults are the
    recommended ones."""

    halting: bool = True
    reading: str = "A"               # order of the halting sum: A raster | B rectangular | C per time step
    score_source: str = "residual"   # z in h = σ(γz − c): residual ch0 | membrane (pre-LIF fc2) | spike | learned
    gate_scale: float = 1.0          # γ
    gate_center: float = 3.0         # c: initial mean h ≈ 1/P* on integer residuals
    eps: float = 0.01
    readout: str = "mean_field"      # mean_field Σ p·x | last (x at halting) | time_mean
    ponder_alpha: float = 5e-4       # α_p, on ρ ÷ (L·T)
    distr_alpha: float = 1e-3        # α_d
    distr_position: float = 2 / 3    # P* as a fraction of the prior axis
    distr_std: float = 1.0
    distr_buffer: float = 0.02
    merge_r: int | list = 0          # tokens merged per block (int or per-block list)
    merge_metric: str = "spikes"     # K spike rate | "membrane" (pre-LIF K)
    merge_state: str = "mean"        # merged H = size-weighted mean | "max"
    proportional_attn: bool = True
    gather_at_batch1: bool = True    # eval, batch 1: run only the active tokens
    bn_stats: str = "plain"          # training-mode BN in blocks: plain | masked | running

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


# --- the time-major pass, shared by the backbones ------------------------------------------------


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
    forward: ``token_stats`` (tokens per image, per position) and, in training, :meth:`aux_loss`.

    ``halted_token_fill`` is an extension point: None (default), or a function
    (x [B, n, D], active [B, n] bool) → x applied to the residual stream before every block, to set
    what the halted slots hold. Halted slots cannot reach the output (in eval mode, or in training
    with ``bn_stats`` masked or running), so any fill leaves the logits unchanged: the tests fill
    them with noise to check exactly that.
    """

    halted_token_fill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def _setup_adaptive(self, atsnn: dict | ATSNNConfig | None) -> None:
        self.atsnn = ATSNNConfig.from_any(atsnn)
        if self.atsnn.score_source == "learned":  # Linear(D→1), starts as channel 0
            self.halt_head = nn.Linear(self.embed_dim, 1)
            with torch.no_grad():
                self.halt_head.weight.zero_()
                self.halt_head.weight[0, 0] = 1.0
                self.halt_head.bias.zero_()
        self.token_stats: dict | None = None
        self._aux: torch.Tensor | None = None

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

    def forward_adaptive(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images → (pooled readout features [B, D], per-step features [T, B, D]: the token mean of
        each token's latest active x after every time step)."""
        cfg = self.atsnn
        # merging only: Spikformer's own readout, the time mean of the last block's output
        readout_kind = cfg.readout if cfg.halting else "time_mean"
        x_seq = self.to_time_sequence(images)
        sps = self._embed_tokens(x_seq)  # [T, B, N, D]
        T, B, N, D = sps.shape
        L = len(self.block)
        if cfg.halting and cfg.reading != "A" and any(self._merge_r()):
            raise NotImplementedError("token merging is implemented with halting reading 'A' only")
        rs = self._merge_r()
        run = _Pass(gather=(not self.training) and B == 1 and cfg.gather_at_batch1, bn_stats=cfg.bn_stats)
        halt = Halting(cfg.reading if cfg.halting else "A", L, T, (B, N), cfg.eps, sps)
        readout = sps.new_zeros(B, N, D)  # y_k, on original tokens
        last_x = sps.new_zeros(B, N, D)   # x at the token's latest active position
        counts = sps.new_zeros(B, L, T)
        h_mean = sps.new_zeros(L, T)
        target_h = sps.new_zeros(B, N)    # "no halting": h = 0, only the forced last position counts
        steps = []                        # per-step features for heads that run over T (SDT)
        for t in range(T):
            halt.start_row(t)
            x = sps[t]  # the residual restarts from SPS at every t; H and LIF state carry over
            assign = torch.arange(N, device=x.device).expand(B, N)  # original token → slot
            for l, blk in enumerate(self.block):
                active = halt.active()
                slot_active = group_any(active, assign, x.shape[1])
                counts[:, l, t] = slot_active.sum(1)
                if self.halted_token_fill is not None:
                    x = self.halted_token_fill(x, slot_active)
                n_before = x.shape[1]
                x, assign, probes = self._block_step(l, blk, x, slot_active, assign, rs[l], t, run)
                if x.shape[1] != n_before:  # merged: members share the group's state
                    halt.merge(assign, x.shape[1], cfg.merge_state == "max")
                    readout = group_reduce(readout, assign, x.shape[1], "mean")
                    last_x = group_reduce(last_x, assign, x.shape[1], "mean")
                    active = halt.active()
                h = self._halting_score(x, probes) if cfg.halting else target_h
                h_orig = h.gather(1, assign)
                x_orig = x.gather(1, assign[..., None].expand(-1, -1, D))
                h_mean[l, t] = h_orig.mean()
                p = halt.update(l, t, h_orig, active)
                if readout_kind == "mean_field":  # y = Σ p·x over the positions (B, C: each row sums to 1)
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
        return readout.mean(1), torch.stack(steps)  # mean over patches = size-weighted GAP over slots

    def _embed_tokens(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Patch embedding → tokens [T, B, N, D] (both backbones embed to [T, B, D, H', W'])."""
        return self.run_stage(self.patch_embed, x_seq).flatten(3).transpose(-1, -2)

    def _losses(self, halt: Halting, h_mean: torch.Tensor, L: int, T: int) -> torch.Tensor:
        """L_overall's halting terms: α_p·ponder + α_d·KL(prior ‖ H̄) (A-ViT's losses, over the
        reading's positions)."""
        cfg = self.atsnn
        ponder = ponder_loss(halt.rho, L, T)
        positions = prior_positions(h_mean, cfg.reading)
        target = distribution_target(positions.numel(), cfg.distr_position * positions.numel(), cfg.distr_std,
                                     cfg.distr_buffer).to(positions)
        self.token_stats["ponder"] = float(ponder.detach())
        return cfg.ponder_alpha * ponder + cfg.distr_alpha * distribution_prior_kl(positions, target)

    def _halting_score(self, x: torch.Tensor, probes: dict) -> torch.Tensor:
        """h = σ(γ·z − c) per slot; z from the configured source."""
        cfg = self.atsnn
        z = {"residual": lambda: x[..., 0], "membrane": lambda: probes["membrane"],
             "spike": lambda: probes["spike"], "learned": lambda: self.halt_head(x)[..., 0]}[cfg.score_source]()
        return halting_score(z, cfg.gate_scale, cfg.gate_center)

    def _neuron(self, l: int, name: str, lif: LIF, inp, active, rows, run: _Pass) -> torch.Tensor:
        """One LIF step for the active slots; halted slots: spikes 0, membrane frozen."""
        key = (l, name)
        n = active.shape[1]
        v = run.lif_v.get(key)
        if v is None or v.shape[1] != n:
            v = inp.new_zeros((inp.shape[0], n, inp.shape[-1]), dtype=torch.promote_types(inp.dtype, torch.float32))
        neurons = n * inp.shape[-1]  # the layer's neurons per sample (slots × channels)
        if rows is not None:  # gathered: only the active rows exist
            v_before = v[:, rows]
            spikes, v_rows = lif.step(inp, v_before)
            v = v.clone()
            v[:, rows] = v_rows
            run.lif_v[key] = v
            if _hooked(lif):
                _report(lif, inp, spikes, v_before, v_rows, neurons)
            return spikes
        spikes, v_next = lif.step(inp, v)
        m = active[..., None]
        run.lif_v[key] = torch.where(m, v_next, v)
        if _hooked(lif):
            _report(lif, inp[active], spikes[active], v[active], v_next[active], neurons)
        return spikes * m.to(spikes.dtype)


# --- token-slot layers (masked, or gathered at batch 1) -------------------------------------------


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _report(lif: LIF, inp: torch.Tensor, spikes: torch.Tensor, v_before: torch.Tensor, v_after: torch.Tensor,
            neurons: int) -> None:
    """Run ``lif``'s hooks (firing-rate monitors, energy counters) on the neurons this step actually
    computed, rows [K, C] (or [1, k, C] gathered): the step-wise path never calls ``lif`` itself.
    During the call ``lif.step_membrane`` = (membrane of those neurons before the step, after it,
    the layer's neurons per sample), so that a counter can tell the updated membranes apart
    (NeuroBench's membrane updates) from the rows alone."""
    lif.step_membrane = (v_before.detach(), v_after.detach(), neurons)
    try:
        _run_hooks(lif._forward_pre_hooks, lif._forward_pre_hooks_with_kwargs, lif, (inp,))
        _run_hooks(lif._forward_hooks, lif._forward_hooks_with_kwargs, lif, (inp,), spikes)
    finally:
        del lif.step_membrane


def _run_hooks(hooks: dict, with_kwargs: dict, module: nn.Module, args: tuple, *out) -> None:
    """Call ``module``'s registered forward (pre-)hooks as its ``__call__`` would, with ``args``
    (and ``out`` for forward hooks), for a call the step-wise pass made without ``__call__``."""
    for hook_id, hook in list(hooks.items()):
        if hook_id in with_kwargs:
            hook(module, args, {}, *out)
        else:
            hook(module, args, *out)


def _report_attention(attn: nn.Module, active: torch.Tensor) -> None:
    """Run the forward hooks of the attention module ``attn`` (whose ``attention_product``
    analysis tools count from its q/k/v neurons' spikes) after its neurons' step on the tokens
    ``active`` [B, n]: the neurons reported their computed rows in the order of
    ``active.nonzero()``, and ``attn.step_tokens`` = ``active`` says where they sit."""
    if not attn._forward_hooks:
        return
    attn.step_tokens = active
    try:
        _run_hooks(attn._forward_hooks, attn._forward_hooks_with_kwargs, attn, (), None)
    finally:
        del attn.step_tokens


def _token_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 Conv2d applied to token slots [B, n, C_in] (or rows [K, C_in]) → [..., C_out]: the
    module itself runs (its hooks see the call) on the slots laid out as an image [B, C_in, n, 1]."""
    slots = x if x.dim() == 3 else x[None]
    out = conv(slots.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)  # [B, n, C_out]
    return out if x.dim() == 3 else out[0]


def _linear_bn(linear, bn: nn.Module, x: torch.Tensor, run: _Pass, active: torch.Tensor) -> torch.Tensor:
    """Linear (or 1×1 conv) → BatchNorm over channels on [B, n, C] (one time step). In training, the batch
    statistics follow ``run.bn_stats``: ``plain`` over every token of the step (halted ones
    included), ``masked`` over the active tokens only, ``running`` none (the running statistics
    normalise, as in eval: fine-tuning without a train/eval gap)."""
    if not bn.training and not run.gather and not bool(active.all()):
        # eval, masked: the layer runs on the active rows only (a halted row's output is never
        # read), so that it computes, and analysis hooks count, the tokens actually processed
        rows = x[active][None]  # [1, K, C_in]
        out = _on_rows(linear, rows, active)[0] if rows.shape[1] else rows.new_zeros((0, _out_width(linear)))
        y = out.new_zeros((*x.shape[:-1], out.shape[-1]))
        y[active] = out
    elif not bn.training and x.numel() == 0:  # gathered, no token running: nothing to compute
        y = x.new_zeros((*x.shape[:-1], _out_width(linear)))
    elif run.gather:
        y = _on_rows(linear, x, active)
    else:
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


def _layer_of(linear) -> nn.Module:
    """The module behind a Linear, or the 1×1 conv in ``partial(_token_conv, conv)``."""
    return linear.args[0] if isinstance(linear, partial) else linear


def _out_width(linear) -> int:
    layer = _layer_of(linear)
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _on_rows(linear, rows: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``linear`` on the computed rows [1, K, C_in] of one time step. For analysis hooks, the layer
    carries ``step_tokens`` = ``active`` [B, n] during the call: the rows are the tokens
    ``active.nonzero()`` of B samples with n token slots each."""
    layer = _layer_of(linear)
    layer.step_tokens = active
    try:
        return linear(rows)
    finally:
        del layer.step_tokens


def _rows(active: torch.Tensor, gather: bool) -> torch.Tensor | None:
    """The active slots [k] of the single sample when gathering, else None (masking)."""
    return active[0].nonzero().squeeze(1) if gather else None


def _full(x: torch.Tensor, value: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """value [B, k, *] on the gathered rows → [B, n, *] on every slot of x, 0 on the others."""
    if rows is None:
        return value
    out = value.new_zeros((x.shape[0], x.shape[1], *value.shape[2:]))
    out[:, rows] = value
    return out


def _add_update(x: torch.Tensor, update: torch.Tensor, active: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Residual update x [B, n, D] ← x + update on the active slots only; halted slots keep x.

    Masked (rows None): update [B, n, D] covers every slot and is multiplied by the mask (a BN
    shift makes it nonzero on halted slots). Gathered (rows [k]): update [B, k, D] holds the active
    rows only and is added there, so nothing is computed for the halted ones."""
    if rows is None:
        return x + update * active[..., None].to(update.dtype)
    dtype = torch.promote_types(x.dtype, update.dtype)
    return x.to(dtype).index_add(1, rows, update.to(dtype))


# --- the backbones ----------------------------------------------------------------------------------


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
        gathered at batch 1). Returns (x, assign, probes); merging may shrink n."""
        attn, mlp = blk.attn, blk.mlp
        sizes = slot_sizes(assign, x.shape[1]) if any(self._merge_r()) else None
        proportional = sizes if (sizes is not None and self.atsnn.proportional_attn) else None

        # SSA on the active slots
        rows = _rows(active, run.gather)
        out, k_probe = self._ssa(l, attn, x, active, rows, proportional, run)
        x = _add_update(x, out, active, rows)

        # merge between SSA and MLP, decided at t = 0 and reused for t > 0
        if r > 0:
            if t == 0:
                run.merge_maps[l] = bipartite_merge_map(k_probe, active, r)
            slot = run.merge_maps[l]
            x = merge_tokens(x, sizes, slot, x.shape[1] - merged_away(x.shape[1], r))
            active = group_all(active, slot, x.shape[1])  # a group runs only while all members run
            assign = slot.gather(1, assign)

        # MLP on the active slots
        rows = _rows(active, run.gather)
        xa = x if rows is None else x[:, rows]
        pre_hid = _linear_bn(mlp.fc1_linear, mlp.fc1_bn, xa, run, active)
        hid = self._neuron(l, "fc1", mlp.fc1_lif, pre_hid, active, rows, run)
        pre = _linear_bn(mlp.fc2_linear, mlp.fc2_bn, hid, run, active)
        out = self._neuron(l, "fc2", mlp.fc2_lif, pre, active, rows, run)
        x = _add_update(x, out, active, rows)
        probes = {}
        if self.atsnn.score_source in ("membrane", "spike"):
            probes = {"membrane": _full(x, pre[..., 0], rows), "spike": _full(x, out[..., 0], rows)}
        return x, assign, probes

    def _ssa(self, l, attn, x, active, rows, sizes, run: _Pass):
        """Masked/gathered SSA → (output on the computed slots: [B, n, D], or [B, k, D] at the
        gathered rows; merge metric [B, n, d] on every slot)."""
        xa = x if rows is None else x[:, rows]
        sa = sizes if (sizes is None or rows is None) else sizes[:, rows]
        pre_k = _linear_bn(attn.k_linear, attn.k_bn, xa, run, active)
        q = self._neuron(l, "q", attn.q_lif, _linear_bn(attn.q_linear, attn.q_bn, xa, run, active), active, rows, run)
        k = self._neuron(l, "k", attn.k_lif, pre_k, active, rows, run)
        v = self._neuron(l, "v", attn.v_lif, _linear_bn(attn.v_linear, attn.v_bn, xa, run, active), active, rows, run)
        _report_attention(attn, active)  # Q·Kᵀ·V over the tokens present
        heads = attn.num_heads
        core = proportional_ssa(*(split_heads(s[None], heads)[0] for s in (q, k, v)), sa, attn.scale)
        B, n, C = q.shape
        core = core.transpose(1, 2).reshape(B, n, C)  # [B, n, C]
        s = self._neuron(l, "attn", attn.attn_lif, core, active, rows, run)
        pre_out = _linear_bn(attn.proj_linear, attn.proj_bn, s, run, active)
        out = self._neuron(l, "proj", attn.proj_lif, pre_out, active, rows, run)
        metric_src = k if self.atsnn.merge_metric == "spikes" else pre_k * (active[..., None] if rows is None else 1)
        metric = split_heads(metric_src[None], heads)[0].mean(1)  # head-averaged keys [B, n, d]
        return out, _full(x, metric, rows)


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

        def conv_bn(conv, bn, inp):
            return _linear_bn(partial(_token_conv, conv), bn, inp, run, active)

        xa = x if rows is None else x[:, rows]
        s = self._neuron(l, "shortcut", attn.shortcut_lif, xa, active, rows, run)
        q, k, v = (self._neuron(l, name, lif, conv_bn(conv, bn, s), active, rows, run)
                   for name, lif, conv, bn in (("q", attn.q_lif, attn.q_conv, attn.q_bn),
                                               ("k", attn.k_lif, attn.k_conv, attn.k_bn),
                                               ("v", attn.v_lif, attn.v_conv, attn.v_bn)))
        _report_attention(attn, active)  # SDSA's token sum over the tokens present
        token_sum = k.mul(v).sum(1, keepdim=True)  # [B, 1, D]: halted tokens' spikes are 0
        every_sample = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
        mask = self._neuron(l, "mask", attn.talking_heads_lif, token_sum, every_sample, None, run)
        x = _add_update(x, conv_bn(attn.proj_conv, attn.proj_bn, q * mask), active, rows)

        xa = x if rows is None else x[:, rows]
        hidden = conv_bn(mlp.fc1_conv, mlp.fc1_bn, self._neuron(l, "fc1", mlp.fc1_lif, xa, active, rows, run))
        spikes = self._neuron(l, "fc2", mlp.fc2_lif, hidden, active, rows, run)
        x = _add_update(x, conv_bn(mlp.fc2_conv, mlp.fc2_bn, spikes), active, rows)
        probes = {}
        if self.atsnn.score_source in ("membrane", "spike"):  # the block's last LIF: its input and spikes
            probes = {"membrane": _full(x, hidden[..., 0], rows), "spike": _full(x, spikes[..., 0], rows)}
        return x, assign, probes


# --- registry -------------------------------------------------------------------------------------


def _create(model_cls, model_name: str, pretrained: bool = False, **kwargs):
    return build_spiking_model(model_cls, model_name, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    """CIFAR-size cfg: 32×32 RGB, 10 classes, no crop; the backbone's first conv and head."""
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None, "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "patch_embed.proj_conv", "classifier": "head", "paper_ids": "arXiv:2408.12293", **kwargs,
    }


_HALF = (0.5, 0.5, 0.5)  # the tiny models' digits normalisation, per input channel

default_cfgs = generate_default_cfgs({
    "atsnn_spikformer_tiny": _cfg(mean=_HALF, std=_HALF),
    "atsnn_spikformer_cifar_4_384": _cfg(),
    "atsnn_sdt_tiny": _cfg(mean=_HALF, std=_HALF, paper_ids="arXiv:2307.01694"),
})


@register_model
def atsnn_spikformer_tiny(pretrained: bool = False, **kwargs) -> ATSpikformer:
    """spikformer_tiny (2 blocks, D = 64) with AT-SNN: CPU-sized, for digits and tests."""
    args = dict(kind="cifar", depth=2, embed_dim=64, num_heads=4, img_size=32, num_classes=10)
    return _create(ATSpikformer, "atsnn_spikformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def atsnn_spikformer_cifar_4_384(pretrained: bool = False, **kwargs) -> ATSpikformer:
    """Spikformer-4-384 with AT-SNN (CIFAR-10/100; TinyImageNet at img_size 64, N = 256)."""
    args = dict(kind="cifar", depth=4, embed_dim=384, num_heads=12, img_size=32, num_classes=10)
    return _create(ATSpikformer, "atsnn_spikformer_cifar_4_384", pretrained, **dict(args, **kwargs))


@register_model
def atsnn_sdt_tiny(pretrained: bool = False, **kwargs) -> ATSpikeDrivenTransformer:
    """sdt_tiny (2 blocks, D = 64, CIFAR layout) with AT-SNN halting: beyond the paper, for digits and tests."""
    args = dict(img_size=32, num_classes=10, pooling_stat="0011", T=4, depth=2, embed_dim=64, num_heads=4)
    return _create(ATSpikeDrivenTransformer, "atsnn_sdt_tiny", pretrained, **dict(args, **kwargs))
