"""Energy, SOP and firing-rate analysis (``spikeformers-energy``), as the papers estimate it.

As in the Spikformer and Spike-driven Transformer papers: for every conv/linear layer the tool records, from forward hooks and
without changing the model, the **input**'s firing rate per time step (fraction of non-zero
entries), its value type (binary spikes, integer spike sums, or real), the layer's ANN FLOPs per
sample and time step, and

    SOPs = rate × steps × FLOPs          (steps = T for per-step layers, 1 for a layer run once)
    E    = E_MAC × FLOPs                 for the first layer (real-valued image input)
           E_AC  × SOPs                  for every other layer

plus the attention products, which have no weights:

- Spikformer SSA: Q·Kᵀ and (·)·V, or Kᵀ·V and Q·(·) (N²·D or N·D·d FLOPs each); each product's
  SOPs use the rate of its spike operand (Q, V, K, Q respectively).
- SDT SDSA: the mask-and-add operator, E_AC × T × R̃ × N × D with R̃ the non-zero rate of K⊙V
  (the additions of the token sum).

The ANN-equivalent energy is E_MAC × (Σ FLOPs + 2·N²·D per attention block): the same network
with real-valued activations and vanilla self-attention, no softmax or scaling counted.
Readings the spec leaves open are options (:class:`EnergyConfig`), defaults as documented.

Version 2 (:func:`analyze_v2`) adds three views to the same run, under ``"v2"`` in the JSON (every
legacy key is kept): NeuroBench's metrics (:mod:`spikeformers.train.neurobench`), a memory-aware
model of the SNN and of int8/fp32 ANNs with break-even firing rates
(:mod:`spikeformers.train.energy_ma`), and published chips' energies with a fits-on-chip report
(:mod:`spikeformers.train.energy_hw`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from spikeformers.train.neurobench import spike_count_unit, tag_spike_counts

__all__ = ["EnergyConfig", "LayerRecord", "EnergyReport", "analyze", "analyze_v2", "v2_tables", "layer_flops",
           "attention_energy_ratio", "main"]

PJ_TO_MJ = 1e-9


@dataclass
class EnergyConfig:
    e_mac_pj: float = 4.6
    e_ac_pj: float = 0.9
    first_layer_times_T: bool = False  # is the first layer's MAC energy multiplied by T? (unconfirmed; papers' formulas: no)
    integer_inputs: str = "nonzero"    # integer spike sums: "nonzero" (one AC per non-zero entry) or "sum" (one per spike)
    real_inputs: str = "ac"            # real-valued inputs after the first layer: "ac" (papers' formulas) or "mac"


@dataclass
class LayerRecord:
    name: str
    op: str                 # conv2d / conv1d / linear / ssa_qk / ssa_av / ssa_kv / ssa_q_kv / sdsa
    input_shape: list[int]  # per sample and time step
    flops: int              # ANN FLOPs (MACs) per sample and time step
    steps: int              # time steps the layer runs (T, or 1 for a layer applied once)
    input_type: str         # binary / integer / real
    rate_per_step: list[float]
    input_rate: float = 0.0
    sops: float = 0.0
    unit: str = "AC"        # MAC or AC
    energy_mJ: float = 0.0

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "rate_per_step"}


@dataclass
class EnergyReport:
    model: str
    T: int
    n_samples: int
    layers: list[LayerRecord]
    config: EnergyConfig
    ann_energy_mJ: float = 0.0
    total_energy_mJ: float = field(init=False, default=0.0)

    def __post_init__(self):
        self.total_energy_mJ = sum(r.energy_mJ for r in self.layers)

    def to_json(self) -> dict:
        return {"model": self.model, "T": self.T, "n_samples": self.n_samples,
                "total_energy_mJ": self.total_energy_mJ, "ann_energy_mJ": self.ann_energy_mJ,
                "layers": [{"name": r.name, "op": r.op, "flops": r.flops, "input_rate": r.input_rate, "sops": r.sops,
                            "energy_mJ": r.energy_mJ, "input_type": r.input_type, "unit": r.unit, "steps": r.steps,
                            "rate_per_step": r.rate_per_step} for r in self.layers],
                "config": asdict(self.config)}

    def table(self) -> str:
        head = f"{'layer':<34} {'op':<8} {'input':<16} {'FLOPs':>12} {'type':<7} {'rate':>6} {'SOPs':>12} {'unit':<4} {'mJ':>10}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = "x".join(map(str, r.input_shape))
            lines.append(f"{r.name[:34]:<34} {r.op:<8} {shape[:16]:<16} {r.flops:>12,} {r.input_type:<7} {r.input_rate:>6.3f} "
                         f"{r.sops:>12,.0f} {r.unit:<4} {r.energy_mJ:>10.5f}")
        lines.append(f"total {self.total_energy_mJ:.5f} mJ per sample (T={self.T}); ANN equivalent {self.ann_energy_mJ:.5f} mJ "
                     f"({self.ann_energy_mJ / max(self.total_energy_mJ, 1e-30):.1f}x)")
        return "\n".join(lines)

    def csv(self) -> str:
        buffer = io.StringIO()
        rows = [r.row() for r in self.layers]
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()


# --- counting ----------------------------------------------------------------------------------


def layer_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """ANN FLOPs (multiply-accumulates) of one whole conv/linear call (all samples and steps):
    conv k²·H_out·W_out·C_in·C_out (per image), linear tokens·C_in·C_out."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_image = out.shape[2] * out.shape[3] * (module.in_channels // module.groups) * kh * kw * module.out_channels
        return out.shape[0] * per_image
    if isinstance(module, nn.Conv1d):
        return out.shape[0] * out.shape[2] * (module.in_channels // module.groups) * module.kernel_size[0] * module.out_channels
    if isinstance(module, nn.Linear):
        return inp.numel() // module.in_features * module.in_features * module.out_features
    raise TypeError(f"no FLOP rule for {type(module).__name__}")


def _op_name(module: nn.Module) -> str:
    """"conv1d" / "conv2d" / "linear" for every subclass too (spike-driven mode swaps in subclasses)."""
    for cls in (nn.Conv1d, nn.Conv2d, nn.Linear):
        if isinstance(module, cls):
            return cls.__name__.lower()
    return type(module).__name__.lower()


def input_type(x: torch.Tensor) -> str:
    if bool(((x == 0) | (x == 1)).all()):
        return "binary"
    nonzero = x[x != 0]
    if bool((nonzero == nonzero[0]).all()) and nonzero[0] > 0:
        return "binary"  # spikes of one amplitude θ (IF neurons of a converted ANN, QCFS)
    if bool((x == x.round()).all()) and bool((x >= 0).all()):
        return "integer"
    return "real"


def _per_step(x: torch.Tensor, T: int, B: int) -> tuple[torch.Tensor, int, list[int]]:
    """View ``x`` as [steps, B, -1] and give the per-sample, per-step shape. Layers see T folded
    into the batch [T*B, ...], time-first [T, B, ...] (SDT head), or no time at all [B, ...]."""
    if x.shape[0] == T * B:
        return x.reshape(T, B, -1), T, list(x.shape[1:])
    if x.dim() >= 2 and x.shape[0] == T and x.shape[1] == B:
        return x.reshape(T, B, -1), T, list(x.shape[2:])
    return x.reshape(1, x.shape[0], -1), 1, list(x.shape[1:])


class _Recorder:
    """Hooks that accumulate per-layer statistics over batches (sums, later divided).

    A layer called several times in one batch (a network run one time step per call: ECMT, or
    AT-SNN's halting, which calls each layer once per step on the tokens still running) fills
    consecutive time steps, each with its own FLOPs; its record then gives the mean FLOPs per
    step and SOPs = Σ_t rate_t · FLOPs_t."""

    def __init__(self, model: nn.Module, cfg: EnergyConfig) -> None:
        self.cfg, self.T, self.B, self.batch = cfg, 1, 1, -1
        self.stats: dict[str, dict] = {}
        self.order: list[str] = []
        self.spikes: dict[str, torch.Tensor] = {}
        self.attention_blocks: list[tuple[int, int]] = []  # (N, D) of each attention block in a batch
        self.blocks_seen: dict[str, int] = {}  # attention run step by step: the batch it was last seen in
        self.hooks = [model.register_forward_pre_hook(self._model_input)]
        merged = _merged_chains(model)
        skipped = {part for chain in merged.values() for part in chain[1]}
        for name, m in model.named_modules():
            if name in merged:
                self.hooks.append(m.register_forward_hook(self._layer(f"{name} (merged)", merged[name][0])))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and name not in skipped:
                self.hooks.append(m.register_forward_hook(self._layer(name)))
            elif getattr(m, "attention_product", None) == "at_neuron":
                # a product of two spiking operands with state, one call per step (ECMT's AtNeuron)
                self.hooks.append(m.register_forward_hook(self._product(name)))
            elif getattr(m, "attention_product", None):
                # Declared by the model: "ssa" (Q·Kᵀ·V in the module's ``order``), "ssa_q_kv"
                # (always Q·(Kᵀ·V)), "sdsa" (mask-and-add) or "qk_token"; counted from q/k/v spikes.
                kind = m.attention_product
                parts = ("q_lif", "k_lif", "attn_lif") if kind == "qk_token" else ("q_lif", "k_lif", "v_lif")
                for part in parts:
                    self.hooks.append(getattr(m, part).register_forward_hook(self._spike(f"{name}.{part}")))
                self.hooks.append(m.register_forward_hook(self._attention(name, kind)))
            elif getattr(m, "neuron_model", None) == "count":
                # integer spike-count neurons: their output S/n is tagged, as spike-driven mode does,
                # so that the layers it reaches count Σ S spikes over D virtual steps
                self.hooks.append(m.register_forward_hook(tag_spike_counts))

    def _model_input(self, model, args):
        x = args[0]
        self.T = x.shape[0] if x.dim() == 5 else model.T
        self.B = x.shape[1] if x.dim() == 5 else x.shape[0]
        self.batch += 1

    def _add(self, name: str, op: str, shape, flops: float, steps: int, kind: str, rates: torch.Tensor):
        """Record one call: ``flops`` per sample and step, ``rates`` [steps] (SOPs = rate·FLOPs)."""
        s = self.stats.get(name)
        if s is None:
            s = self.stats[name] = dict(op=op, shape=list(shape), flops=flops, steps=steps, types=set(),
                                        rate_sum=torch.zeros(steps, dtype=torch.float64), samples=0,
                                        batch=-1, calls=0, max_calls=0, step_flops=[], step_sops=[])
            self.order.append(name)
        if s["batch"] != self.batch:
            s["batch"], s["calls"], s["first_step"] = self.batch, 0, 0
        s["calls"] += 1
        s["max_calls"] = max(s["max_calls"], s["calls"])
        s["types"].add(kind)
        if s["calls"] == 1:
            s["rate_sum"] += rates.double() * self.B  # per-sample weighting across batches of any size
            s["samples"] += self.B
        t0 = s["first_step"]  # this call's steps in the batch: after the earlier calls' steps
        s["first_step"] = t0 + steps
        for t, rate in enumerate(rates.double().tolist(), start=t0):
            while len(s["step_flops"]) <= t:
                s["step_flops"].append(0.0)
                s["step_sops"].append(0.0)
            s["step_flops"][t] += flops * self.B
            s["step_sops"][t] += rate * flops * self.B

    def _layer(self, name, merged: tuple[int, int, int] | None = None):
        """Record a conv/linear call. ``merged`` = (kernel, C_in, C_out): the module is a linear conv
        chain counted as the one k×k conv it re-parameterises into, on the chain's (spike) input
        (SDT v2's RepConv and SepConv, whose re-parameterised form is one conv)."""
        def hook(module, args, out):
            x = args[0].detach()
            view, steps, shape = _per_step(x, self.T, self.B)
            per_unit = spike_count_unit(args[0])
            if per_unit is not None:  # integer counts S/n: S spikes per entry (S binary events over
                # the D virtual steps, as spike-driven mode runs them), whatever integer_inputs says
                view = torch.round(view.double() * per_unit)
            elif getattr(module, "_bias_left_out", False):  # spike-driven mode: a call on D binary planes
                steps = module.virtual_steps  # the planes are virtual time steps, plane-major
                view, shape = x.reshape(steps, 1, -1), list(x.shape[1:])
            divisor = steps * self.B
            kind = input_type(view)
            if (self.cfg.integer_inputs == "sum" or per_unit is not None) and kind == "integer":
                rates = view.float().mean(dim=(1, 2))  # spikes per entry: one AC per spike
            else:
                rates = (view != 0).float().mean(dim=(1, 2))  # one AC per non-zero entry
            if merged is None:
                flops, op = layer_flops(module, x, out), _op_name(module)
            else:
                kernel, in_channels, out_channels = merged
                flops, op = out.shape[0] * out.shape[-2] * out.shape[-1] * kernel * kernel * in_channels * out_channels, "conv2d"
            per_step = flops // divisor if flops % divisor == 0 else flops / divisor  # a step on some tokens
            self._add(name, op, shape, per_step, steps, kind, rates)  # per sample and time step
        return hook

    def _spike(self, name):
        def hook(module, args, out):
            self.spikes[name] = out.detach()
        return hook

    def _attention(self, name, kind: str):
        def hook(module, args, out):
            if kind == "qk_token":
                q, k, mask = (self.spikes.pop(f"{name}.{p}") for p in ("q_lif", "k_lif", "attn_lif"))
            else:
                q, k, v = (self.spikes.pop(f"{name}.{p}") for p in ("q_lif", "k_lif", "v_lif"))
            tokens = getattr(module, "step_tokens", None)
            if tokens is not None:  # one step of the tokens still running (AT-SNN's halting)
                self._attention_step(name, kind, module, tokens, q, k, mask if kind == "qk_token" else v)
                return
            T, B = q.shape[:2]
            if q.dim() == 4 and getattr(module, "tokens_last", False):  # [T, B, N, C]
                N, D = q.shape[2], q.shape[3]
            else:  # [T, B, C, N] or [T, B, C, H, W]
                D, N = q.shape[2], q[0, 0, 0].numel()
            rate = lambda s: (s != 0).float().reshape(T, B, -1).mean(dim=(1, 2))  # noqa: E731
            if kind == "qk_token":  # QKFormer: Σ_d q per (head, token), then mask ⊙ k (both O(N·D))
                self._add(f"{name}.q_sum", "qk_sum", [N, D], N * D, T, "binary", rate(q))
                self._add(f"{name}.mask_k", "qk_mask", [N, D], N * D, T, "binary", rate(mask))
                self.attention_blocks.append((N, D))
                return
            if kind == "sdsa":
                self._add(f"{name}.sdsa", "sdsa", [N, D], N * D, T, "binary", rate(k * v))
                self.attention_blocks.append((N, D))
                return
            d = D // module.num_heads
            if kind == "ssa_q_kv" or getattr(module, "order", None) == "q_kv_scale":  # Q·(Kᵀ·V)
                self._add(f"{name}.k_v", "ssa_kv", [N, D], N * D * d, T, "binary", rate(k))
                self._add(f"{name}.q_kv", "ssa_q_kv", [N, D], N * D * d, T, "binary", rate(q))
            else:
                self._add(f"{name}.q_k", "ssa_qk", [N, D], N * N * D, T, "binary", rate(q))
                self._add(f"{name}.attn_v", "ssa_av", [N, D], N * N * D, T, "binary", rate(v))
            self.attention_blocks.append((N, D))
        return hook

    def _attention_step(self, name, kind, module, tokens, q, k, third):
        """One time step of an attention block over the tokens ``tokens`` [B, n] (bool) present:
        q/k/v are the computed rows (in the order of ``tokens.nonzero()``). Each spike fans out to
        the tokens present in its sample (a Q spike reaches n_b keys), so SOPs = Σ_b nnz_b·n_b·…;
        the record's rate is SOPs / (FLOPs of all n slots)."""
        B, n = tokens.shape
        present = tokens.sum(1).double()  # [B]

        def per_sample(rows):  # non-zero entries of each sample's computed rows → [B]
            full = rows.new_zeros((B, n, rows.shape[-1]))
            full[tokens] = rows.reshape(-1, rows.shape[-1])
            return (full != 0).reshape(B, -1).sum(1).double()

        D = q.shape[-1]
        if self.blocks_seen.get(name) != self.batch:  # the ANN counterpart runs the block once
            self.blocks_seen[name] = self.batch
            self.attention_blocks.append((n, D))

        def add(suffix, op, flops, sops):
            self._add(f"{name}.{suffix}", op, [n, D], flops, 1, "binary", torch.tensor([sops / (flops * B)], dtype=torch.float64))

        if kind == "qk_token":
            add("q_sum", "qk_sum", n * D, float(per_sample(q).sum()))
            add("mask_k", "qk_mask", n * D, float(per_sample(third).sum()))
            return
        if kind == "sdsa":
            kv = per_sample(k.reshape(-1, D) * third.reshape(-1, D))
            add("sdsa", "sdsa", n * D, float(kv.sum()))
            return
        d = D // module.num_heads
        if kind == "ssa_q_kv" or getattr(module, "order", None) == "q_kv_scale":
            add("k_v", "ssa_kv", n * D * d, float((per_sample(k) * d).sum()))
            add("q_kv", "ssa_q_kv", n * D * d, float((per_sample(q) * d).sum()))
        else:
            add("q_k", "ssa_qk", n * n * D, float((per_sample(q) * present).sum()))
            add("attn_v", "ssa_av", n * n * D, float((per_sample(third) * present).sum()))

    def _product(self, name):
        """A product of two spiking operands with state (ECMT's AtNeuron), one call per step: its
        SOPs are the module's own count, the binarised products A_t·B_t, A_t·S_B and S_A·B_t (S the
        operand sums through step t); its FLOPs one dense product."""
        def hook(module, args, out):
            from spikeformers.models.ecmt import product_ops

            a, b = args[0].detach(), args[1].detach()
            sops, dense = product_ops(a, b, module.sum_a, module.sum_b)
            flops = dense / self.B  # per sample
            product = getattr(module, "product_kind", "qk")
            N, D = a.shape[-2], (a.shape[-1] if product == "qk" else b.shape[-1]) * (a.shape[1] if a.dim() == 4 else 1)
            if product == "qk" and self.stats.get(name, {}).get("batch") != self.batch:
                self.attention_blocks.append((N, D))  # the ANN's Q·Kᵀ and ·V, once
            self._add(name, f"ecmt_{product}", [N, D], flops, 1, "binary", torch.tensor([sops / (flops * self.B)], dtype=torch.float64))
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def _merged_chains(model: nn.Module) -> dict[str, tuple[tuple[int, int, int], list[str]]]:
    """{module whose forward is recorded as one conv: ((kernel, C_in, C_out), [convs not recorded])},
    from every module that declares a ``merged_conv()`` view (e.g. SDT v2's RepConv and SepConv:
    a linear conv chain counted as the one k×k conv it re-parameterises into)."""
    chains = {}
    for name, m in model.named_modules():
        if callable(getattr(m, "merged_conv", None)):
            at, shape, inner = m.merged_conv()
            prefix = f"{name}." if name else ""
            chains[(prefix + at).rstrip(".")] = (shape, [prefix + part for part in inner])
    return chains


def analyze(model: nn.Module, batches, cfg: EnergyConfig | None = None, model_name: str = "") -> EnergyReport:
    """Run ``model`` (eval mode, no grad) over ``batches`` of inputs and build the report.

    ``batches`` yields model inputs (images [B, C, H, W] or sequences [T, B, C, H, W]).
    """
    cfg = cfg or EnergyConfig()
    rec = _Recorder(model, cfg)
    was_training = model.training
    model.eval()
    n_samples, per_batch_blocks = 0, []
    try:
        with torch.no_grad():
            for x in batches:
                rec.attention_blocks = []
                model(x)
                per_batch_blocks = rec.attention_blocks
                n_samples += rec.B
    finally:
        rec.remove()
        model.train(was_training)
    if n_samples == 0:
        raise ValueError("energy analysis needs at least one batch")
    layers, first_done, ann_flops = [], False, 0
    for name in rec.order:
        s = rec.stats[name]
        kind = "real" if "real" in s["types"] else ("integer" if "integer" in s["types"] else "binary")
        if s["max_calls"] > 1:  # one call per time step: each step its own FLOPs (tokens still running)
            steps = len(s["step_flops"])
            flops = sum(s["step_flops"]) / (s["samples"] * steps)
            rates = [sop / max(f, 1e-300) for sop, f in zip(s["step_sops"], s["step_flops"])]
            r = LayerRecord(name, s["op"], s["shape"], round(flops), steps, kind, [round(x, 6) for x in rates])
            r.sops = sum(s["step_sops"]) / s["samples"]
            r.input_rate = r.sops / (steps * flops) if flops else 0.0
        else:
            rates = (s["rate_sum"] / s["samples"]).tolist()
            r = LayerRecord(name, s["op"], s["shape"], int(s["flops"]), s["steps"], kind, [round(x, 6) for x in rates])
            r.input_rate = sum(rates) / len(rates)
            r.sops = r.input_rate * r.steps * r.flops
        weighted = r.op in ("conv1d", "conv2d", "linear")
        if weighted:
            ann_flops += r.flops
        if weighted and kind == "real" and (not first_done or cfg.real_inputs == "mac"):
            r.unit = "MAC"
            r.energy_mJ = cfg.e_mac_pj * r.flops * (r.steps if cfg.first_layer_times_T else 1) * PJ_TO_MJ
        else:
            r.energy_mJ = cfg.e_ac_pj * r.sops * PJ_TO_MJ
        first_done = first_done or (weighted and kind == "real")
        layers.append(r)
    ann_flops += sum(2 * N * N * D for N, D in per_batch_blocks)
    T = max((r.steps for r in layers), default=1)
    return EnergyReport(model_name or type(model).__name__, T, n_samples, layers, cfg, ann_energy_mJ=cfg.e_mac_pj * ann_flops * PJ_TO_MJ)


def attention_energy_ratio(N: int, D: int, T: int, rate: float, e_mac_pj: float = 4.6, e_ac_pj: float = 0.9) -> float:
    """Vanilla self-attention energy over the SDSA operator's (Spike-driven Transformer, Yao et al. 2023):
    E_MAC·2N²D / (E_AC·T·R̃·N·D) = 2·N·E_MAC / (T·R̃·E_AC)."""
    return (e_mac_pj * 2 * N * N * D) / (e_ac_pj * T * rate * N * D)


# --- version 2: NeuroBench metrics, memory-aware model, hardware ---------------------------------

V2_SCHEMA = "spikeformers-energy/2"
PROFILE_NAMES = ("mem45-int8", "mem45-fp32", "lemaire", "legacy45")


def analyze_v2(model: nn.Module, batches, report: EnergyReport | None = None, profiles=("mem45-int8",),
               options: dict | None = None, neurobench: bool = True, memory: bool = True, chips: dict | None = None,
               T: int | None = None, time_first: bool = False) -> dict:
    """The ``"v2"`` block of the report: NeuroBench metrics, the memory-aware model for each of
    ``profiles`` (``options`` replace profile options, e.g. ``{"dataflow": "reuse"}``; the legacy
    ``report`` is needed for ``legacy45``) and the hardware profiles (``chips``; default the
    built-in table). ``batches`` must be re-iterable (a list): the model runs once more."""
    from spikeformers.train import energy_hw, energy_ma
    from spikeformers.train.neurobench import collect, neurobench_metrics

    counts = collect(model, batches, T=T, time_first=time_first)
    nb = neurobench_metrics(model, counts)
    out: dict = {"schema": V2_SCHEMA, "n_samples": counts.samples, "T": counts.T}
    if neurobench:
        out["neurobench"] = nb
        if report is not None:  # how the NeuroBench counts relate to the legacy ones
            weighted = [r for r in report.layers if r.op in ("conv1d", "conv2d", "linear")]
            out["reconciliation"] = {
                "Effective_ACs": nb["SynapticOperations"]["Effective_ACs"],
                "legacy_SOPs_of_connection_layers": sum(r.sops for r in weighted if r.unit == "AC"),
                "Effective_MACs": nb["SynapticOperations"]["Effective_MACs"],
                "legacy_first_layer_FLOPs_times_steps": sum(r.flops * r.steps for r in weighted if r.unit == "MAC"),
                "why": "NeuroBench skips zero weights and padded taps, counts integer and θ-amplitude inputs as MACs, "
                       "runs the first layer at every step and skips its zero pixels",
            }
    warnings = []
    if memory:
        blocks = {}
        for name in profiles:
            if name == "legacy45":
                if report is None:
                    raise ValueError("the legacy45 profile needs the legacy report")
                blocks[name] = energy_ma.legacy45(report)
            else:
                blocks[name] = energy_ma.price(counts, energy_ma.profile(name, **(options or {})))
        out["memory"] = {"profiles": blocks}
        weight_bytes = sum(r.params for r in counts.rows if hasattr(r, "params"))  # at 8 bit
        if weight_bytes > 1 << 20:
            warnings.append(f"the weights take {weight_bytes / 2**20:.1f} MB at 8 bit, beyond the SRAM curve's 1 MB "
                            f"clamp: per-layer SRAMs that large are optimistic (--weights-in dram prices DRAM reads)")
    out["hardware"] = energy_hw.hardware_report(counts, nb, chips)
    out["not_modelled"] = list(energy_ma.NOT_MODELLED)
    out["warnings"] = warnings
    out["_counts"] = counts  # for plots; dropped from the JSON
    return out


def _fmt(x, spec=",.1f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def v2_tables(v2: dict) -> str:
    """The NeuroBench block, the memory-aware table of the first profile and the hardware block."""
    lines = []
    nb = v2.get("neurobench")
    if nb:
        syn = nb["SynapticOperations"]
        lines += ["", f"NeuroBench metrics ({nb['version_reference']} definitions, per sample)",
                  f"  ParameterCount {nb['ParameterCount']:,}   Footprint {nb['Footprint']:,} B   "
                  f"ConnectionSparsity {nb['ConnectionSparsity']}   ActivationSparsity {nb['ActivationSparsity']:.4f}",
                  f"  SynapticOperations  Effective_MACs {syn['Effective_MACs']:,.0f}   Effective_ACs {syn['Effective_ACs']:,.0f}   "
                  f"Dense {syn['Dense']:,.0f}",
                  f"  MembraneUpdates {nb['MembraneUpdates']:,.0f} (dense {nb['ext']['MembraneUpdates_dense']:,.0f})   "
                  f"ext attention ACs {nb['ext']['attention_synops']['Effective_ACs']:,.0f}"]
        rec = v2.get("reconciliation")
        if rec:
            lines.append(f"  vs legacy: Effective_ACs {rec['Effective_ACs']:,.0f} vs SOPs {rec['legacy_SOPs_of_connection_layers']:,.0f}; "
                         f"Effective_MACs {rec['Effective_MACs']:,.0f} vs first-layer FLOPs×steps "
                         f"{rec['legacy_first_layer_FLOPs_times_steps']:,.0f} ({rec['why']})")
        head = f"  {'layer':<34} {'call':<4} {'Eff_MACs':>12} {'Eff_ACs':>12} {'Dense':>12} {'sparsity':>8} {'updates':>10}"
        lines += [head]
        for r in nb["layers"]:
            lines.append(f"  {r['name'][:34]:<34} {r['call_type'] or '-':<4} {_fmt(r['Effective_MACs'], ',.0f'):>12} "
                         f"{_fmt(r['Effective_ACs'], ',.0f'):>12} {_fmt(r['Dense'], ',.0f'):>12} {_fmt(r['sparsity'], '.3f'):>8} "
                         f"{_fmt(r['membrane_updates'], ',.0f'):>10}")
    memory = v2.get("memory", {}).get("profiles", {})
    first = next((n for n in memory if n != "legacy45"), None)
    if first:
        block = memory[first]
        lines += ["", f"memory-aware energy, profile {first} (pJ per sample; dataflow {block['params']['options']['dataflow']}, "
                      f"first layer {block['params']['options']['first_layer']})"]
        head = (f"  {'layer':<30} {'role':<9} {'in':<9} {'rate':>6} {'S_eff':>11} {'compute':>10} {'weights':>10} {'io':>10} "
                f"{'membrane':>10} {'addr':>9} {'total':>11} {'ANN int8':>10} {'ANN fp32':>10} {'r*':>7}")
        lines += [head]
        for r in block["rows"]:
            e = r["E_pJ"]
            lines.append(f"  {r['name'][:30]:<30} {r['role']:<9} {r['input_type'][:9]:<9} {_fmt(r['rate'], '.3f'):>6} "
                         f"{_fmt(r['counts'].get('S_eff'), ',.0f'):>11} {e['compute']:>10,.1f} {e['weights']:>10,.1f} {e['io']:>10,.1f} "
                         f"{e['membrane']:>10,.1f} {e['addressing']:>9,.1f} {e['total']:>11,.1f} "
                         f"{r['ann_pJ'].get('int8_naive', 0):>10,.1f} {r['ann_pJ'].get('fp32_naive', 0):>10,.1f} "
                         f"{_fmt(r['r_star'].get('int8_naive'), '.3f'):>7}")
    for name, block in memory.items():
        snn, ann, be = block["snn"]["total_pJ"], block["ann"], block["break_even"]
        if name == "legacy45":
            lines.append(f"  {name}: SNN {snn:,.1f} pJ, ANN fp32 {ann['fp32_legacy_pJ']:,.1f} pJ; break-even r* "
                         f"{_fmt(be['uniform_rate'], '.4f')} ({be['status']})")
            continue
        ratios = "  ".join(f"ANN {k[:-3].replace('_', ' ')} {v:,.1f} pJ ({snn / v:.3g}x)" for k, v in ann.items()
                           if v and k in ("int8_naive_pJ", "int8_reuse_pJ", "fp32_naive_pJ", "fp32_reuse_pJ"))
        lines.append(f"  {name}: SNN {snn:,.1f} pJ;  {ratios}")
        all_be = block["break_even_all"]
        lines.append("    break-even uniform rate r* (ρ* = r*·T spikes per synapse):  " + "  ".join(
            f"{k.replace('_', ' ')} {_fmt(all_be[k]['uniform_rate'], '.4f')} ({all_be[k]['status']})"
            for k in ("int8_naive", "int8_reuse", "fp32_naive", "fp32_reuse", "qnn_equiv_naive") if k in all_be))
        lines.append(f"    measured rates scaled by s* to break even with int8 naive: {_fmt(be['scale_margin'], '.3f')} "
                     f"({'the SNN wins with that margin' if (be['scale_margin'] or 0) > 1 else 'the SNN loses at its measured rates'})")
    hw = v2.get("hardware")
    if hw:
        lines += ["", "hardware profiles (per sample; ✘ = value not confirmed in a primary source)",
                  f"  {'chip':<11} {'energy pJ':>12} {'unmapped':<36} {'neurons':>10} {'synapses':>14} {'chips':>6} {'fits':>5}"]
        for name, h in hw.items():
            mark = "✘" if any("unverified" in str(v) for v in h["status"].values()) else ""
            f = h["fits"]
            lines.append(f"  {name + mark:<11} {_fmt(h['energy_pJ']):>12} {','.join(h['unmapped']) or '-':<36} "
                         f"{f['neurons_required']:>10,} {f['synapses_required']:>14,.0f} {_fmt(f['chips_needed'], 'd'):>6} "
                         f"{_fmt(f['fits_one_chip'], ''):>5}")
    if v2.get("memory"):
        lines += ["", "not modelled: " + ", ".join(v2["not_modelled"])]
    return "\n".join(lines)


def v2_json(v2: dict) -> dict:
    return {k: v for k, v in v2.items() if not k.startswith("_")}


def v2_csv(v2: dict) -> str:
    """The memory-aware rows of every profile, one line per (profile, row)."""
    buffer = io.StringIO()
    fields = ["profile", "name", "role", "input_type", "T", "rate", *("E_" + t for t in
              ("compute", "weights", "io", "membrane", "addressing", "bias", "total")), "ANN_int8_naive", "ANN_fp32_naive",
              "r_star_int8_naive"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for name, block in v2.get("memory", {}).get("profiles", {}).items():
        for r in block["rows"]:
            writer.writerow({"profile": name, "name": r["name"], "role": r["role"], "input_type": r.get("input_type"),
                             "T": r.get("T"), "rate": r.get("rate"),
                             **{"E_" + t: r["E_pJ"].get(t, 0.0) for t in ("compute", "weights", "io", "membrane", "addressing",
                                                                          "bias", "total")},
                             "ANN_int8_naive": r.get("ann_pJ", {}).get("int8_naive"),
                             "ANN_fp32_naive": r.get("ann_pJ", {}).get("fp32_naive"),
                             "r_star_int8_naive": r.get("r_star", {}).get("int8_naive")})
    return buffer.getvalue()


# --- charts ------------------------------------------------------------------------------------


def _block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("block", "stage1", "stage2", "stage3", "stage4") and len(parts) > 1 else parts[0]


def plot_report(report: EnergyReport, out_dir: str | Path, v2: dict | None = None) -> list[Path]:
    """firing_rates.png (input rate per layer and time step), energy.png (by block and op, next to
    the ANN), and with ``v2``: energy_vs_rate.png and energy_ma.png (see :func:`plot_v2`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spikeformers.train.checkpoint import atomic_write

    out_dir = Path(out_dir)
    paths = []
    steps = max(len(r.rate_per_step) for r in report.layers)
    grid = torch.full((len(report.layers), steps), float("nan"))
    for i, r in enumerate(report.layers):
        grid[i, : len(r.rate_per_step)] = torch.tensor(r.rate_per_step)
    n = len(report.layers)
    names = [f"{r.name} ({r.input_type})" for r in report.layers]
    width = 3.5 + 0.055 * max(len(s) for s in names) + 0.5 * steps
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.24 * n))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, float(grid.nan_to_num(0).max())))
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xticks(range(steps), [str(t) for t in range(steps)])
    ax.set(xlabel="time step", title=f"{report.model}: input firing rate per layer")
    fig.colorbar(im, ax=ax, label="input firing rate (fraction of non-zero entries)")
    fig.tight_layout()
    paths.append(atomic_write(out_dir / "firing_rates.png", lambda p: fig.savefig(p, dpi=110, format="png")))
    plt.close(fig)

    by_block: dict[str, dict[str, float]] = {}
    for r in report.layers:
        by_block.setdefault(_block_of(r.name), {}).setdefault(r.op, 0.0)
        by_block[_block_of(r.name)][r.op] += r.energy_mJ * 1e6  # nJ
    ops = sorted({op for d in by_block.values() for op in d})
    fig, (ax, ax_total) = plt.subplots(1, 2, figsize=(3.5 + 0.7 * len(by_block), 4.2),
                                       gridspec_kw={"width_ratios": [max(len(by_block), 2), 1.2]})
    bottom = [0.0] * len(by_block)
    for op in ops:
        values = [by_block[b].get(op, 0.0) for b in by_block]
        ax.bar(list(by_block), values, bottom=bottom, label=op)
        bottom = [a + b for a, b in zip(bottom, values)]
    ax.set(ylabel="energy per sample (nJ)", title="SNN energy by block and op")
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.legend(fontsize=7)
    snn, ann = report.total_energy_mJ * 1e6, report.ann_energy_mJ * 1e6
    ax_total.bar(["SNN", "ANN"], [snn, ann], color=["tab:blue", "tab:gray"])
    ax_total.set(ylabel="nJ per sample", title=f"ANN / SNN = {ann / max(snn, 1e-30):.1f}x")
    fig.suptitle(f"{report.model}: legacy estimate (E_AC {report.config.e_ac_pj} pJ, E_MAC {report.config.e_mac_pj} pJ)", fontsize=9)
    fig.tight_layout()
    paths.append(atomic_write(out_dir / "energy.png", lambda p: fig.savefig(p, dpi=110, format="png")))
    plt.close(fig)
    if v2 is not None and v2.get("memory"):
        paths += plot_v2(report, v2, out_dir)
    return paths


def plot_v2(report: EnergyReport, v2: dict, out_dir: str | Path) -> list[Path]:
    """energy_vs_rate.png: energy per sample against a uniform firing rate (top axis ρ = r·T) for
    the legacy estimate and each memory-aware profile (dashed: dense execution), the ANN
    baselines as horizontal lines, the model's measured mean rate, the break-even crossings and
    Dampfhoffer et al.'s break-even range ρ ∈ [0.15, 1.38]; a second panel puts each layer's
    measured rate against its break-even rate. energy_ma.png: the first profile's energy by block
    and term."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from spikeformers.train import energy_ma
    from spikeformers.train.checkpoint import atomic_write

    out_dir = Path(out_dir)
    T = report.T
    profiles = v2["memory"]["profiles"]
    r = np.linspace(0, 1, 201)
    fig, (ax, ax_layers) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [1.6, 1]})
    legacy = energy_ma.legacy45(report)
    curves = [("SNN legacy (compute only)", legacy["curve"], "k", "-")]
    colours = iter(["tab:blue", "tab:orange", "tab:green", "tab:purple"])
    for name, block in profiles.items():
        if name == "legacy45":
            continue
        colour = next(colours)
        curves.append((f"SNN {name}", block["curve"], colour, "-"))
        used = {k: v for k, v in block["params"].items() if k in energy_ma.Profile.__dataclass_fields__ and k != "status"}
        dense = energy_ma.price(v2["_counts"], energy_ma.profile(name, **{**used, "execution": "dense"}))
        curves.append((f"SNN {name}, dense execution", dense["curve"], colour, "--"))
    for label, c, colour, style in curves:
        ax.plot(r, (c["A"] + c["L"] * r + c["Q"] * r ** 2) / 1e6, color=colour, linestyle=style, label=label)
    first = next((n for n in profiles if n != "legacy45"), None)
    lines = [("ANN fp32 legacy (4.6 pJ/MAC)", report.ann_energy_mJ * 1e9, "k", ":")]
    if first:
        ann = profiles[first]["ann"]
        lines += [(f"ANN int8 naive ({first})", ann["int8_naive_pJ"], "tab:red", "-."),
                  (f"ANN int8 reuse ({first})", ann["int8_reuse_pJ"], "tab:red", ":"),
                  (f"ANN fp32 naive ({first})", ann["fp32_naive_pJ"], "tab:brown", "-."),
                  (f"ANN fp32 reuse ({first})", ann["fp32_reuse_pJ"], "tab:brown", ":")]
    for label, value, colour, style in lines:
        ax.axhline(value / 1e6, color=colour, linestyle=style, linewidth=1, label=label)
    for label, c, colour, style in curves[:2]:  # label the crossings of the legacy and the first profile's curve
        for _, value, _, _ in (lines[:1] if label.startswith("SNN legacy") else lines[1:]):
            x = energy_ma.solve_break_even(c["A"], c["L"], c["Q"], value)
            if x is not None and 0 <= x <= 1:
                ax.plot([x], [value / 1e6], "o", color=colour, markersize=4)
                ax.annotate(f"r*={x:.3f}", (x, value / 1e6), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axvspan(min(0.15 / T, 1), min(1.38 / T, 1), color="0.9", label="[D23] break-even range ρ ∈ [0.15, 1.38]")
    if first:
        rows = [row for row in profiles[first]["rows"] if row["role"] == "synaptic" and row["rate"]]
        weights = [row["rate_scaling_pJ"]["lin"] / row["rate"] for row in rows]
        if sum(weights) > 0:
            mean_rate = sum(w * row["rate"] for w, row in zip(weights, rows)) / sum(weights)
            ax.axvline(mean_rate, color="tab:blue", linestyle="--", linewidth=1, label=f"measured mean rate {mean_rate:.3f}")
    ax.set_yscale("log")
    ax.set(xlabel="uniform input firing rate r", ylabel="energy per sample (µJ)", title=f"{report.model}: energy vs firing rate")
    top = ax.secondary_xaxis("top", functions=(lambda x: x * T, lambda x: x / T))
    top.set_xlabel(f"ρ = r·T spikes per synapse (T = {T})")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if first:
        pts = [(row["rate"], row["r_star"].get("int8_naive"), row["name"]) for row in profiles[first]["rows"]
               if row["role"] in ("synaptic", "attention") and row["rate"] and row["r_star"].get("int8_naive")]
        if pts:
            xs, ys = [p[0] for p in pts], [min(p[1], 1e3) for p in pts]
            ax_layers.scatter(xs, ys, s=12)
            lo, hi = min(xs + ys) / 2, max(xs + ys) * 2
            ax_layers.plot([lo, hi], [lo, hi], color="0.5", linewidth=1)
            ax_layers.set_xscale("log")
            ax_layers.set_yscale("log")
        ax_layers.set(xlabel="measured input rate r_ℓ", ylabel="break-even rate r*_ℓ (vs ANN int8 naive)",
                      title="per layer: below the diagonal loses to the ANN")
    fig.tight_layout()
    paths = [atomic_write(out_dir / "energy_vs_rate.png", lambda p: fig.savefig(p, dpi=110, format="png"))]
    plt.close(fig)
    if first:
        by_block: dict[str, dict[str, float]] = {}
        for row in profiles[first]["rows"]:
            for term in energy_ma.TERMS:
                by_block.setdefault(_block_of(row["name"]), {}).setdefault(term, 0.0)
                by_block[_block_of(row["name"])][term] += row["E_pJ"][term] / 1e3  # nJ
        fig, ax = plt.subplots(figsize=(3.5 + 0.7 * len(by_block), 4.2))
        bottom = [0.0] * len(by_block)
        for term in energy_ma.TERMS:
            values = [by_block[b][term] for b in by_block]
            ax.bar(list(by_block), values, bottom=bottom, label=term)
            bottom = [a + b for a, b in zip(bottom, values)]
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        snn, ann = profiles[first]["snn"]["total_pJ"], profiles[first]["ann"]["int8_naive_pJ"]
        ax.set(ylabel="energy per sample (nJ)", title=f"{report.model}, {first}: SNN {snn / 1e3:,.1f} nJ, "
                                                      f"ANN int8 {ann / 1e3:,.1f} nJ (naive)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(atomic_write(out_dir / "energy_ma.png", lambda p: fig.savefig(p, dpi=110, format="png")))
        plt.close(fig)
    return paths


# --- command line ------------------------------------------------------------------------------


def _parser():
    from spikeformers.train.cli import ArgumentParser, positive_int

    parser = ArgumentParser(prog="spikeformers-energy", description="Energy / SOP / firing-rate analysis")
    parser.add_argument("model", nargs="?", default=None,
                        help="registered name (ARCH or ARCH.TAG; default sdt_tiny.digits, or the checkpoint's model)")
    parser.add_argument("--checkpoint", help="a spikeformers-train checkpoint (model and data come from its config)")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="load registered weights when MODEL has them (default on)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="analyse a checkpoint's raw weights, not its EMA weights (used when present, as eval does)")
    parser.add_argument("--data", default=None, help="data config name (digits, cifar10, ...): default the checkpoint's, else digits")
    parser.add_argument("--data-root", default=None, help="folder of the data set (--data's, or the checkpoint's)")
    parser.add_argument("--n", type=positive_int, default=256, help="number of test samples")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="samples per forward pass")
    parser.add_argument("--T", type=positive_int, default=None, help="time steps, a positive integer (default: the model's)")
    parser.add_argument("--e-mac", type=float, default=4.6, help="pJ per MAC")
    parser.add_argument("--e-ac", type=float, default=0.9, help="pJ per AC")
    parser.add_argument("--first-layer-times-T", action="store_true", help="multiply the first layer's MACs by T")
    parser.add_argument("--integer-inputs", choices=["nonzero", "sum"], default="nonzero",
                        help="integer spike sums: one AC per non-zero entry, or one per spike")
    parser.add_argument("--real-inputs", choices=["ac", "mac"], default="ac",
                        help="real-valued inputs after the first layer: counted as ACs (papers) or MACs")
    parser.add_argument("--json", help="write the report as JSON")
    parser.add_argument("--csv", help="write the per-layer table as CSV")
    parser.add_argument("--plots", help="folder for firing_rates.png, energy.png, energy_vs_rate.png and energy_ma.png")
    v2 = parser.add_argument_group("version 2: NeuroBench metrics, memory-aware model, hardware (docs/energy.md)")
    v2.add_argument("--profile", action="append", choices=PROFILE_NAMES, default=None,
                    help="memory-aware profile, repeatable (default mem45-int8; the first one is tabled, all go to JSON)")
    v2.add_argument("--dataflow", choices=["naive", "reuse"], default=None, help="SNN weight reads per event (naive) or ideal reuse")
    v2.add_argument("--execution", choices=["event", "dense"], default=None, help="event-driven or dense (every synapse every step)")
    v2.add_argument("--first-layer", choices=["auto", "executed", "once_cached"], default=None,
                    help="the real-valued first layer runs every step, or once with its output cached (auto: once for images)")
    v2.add_argument("--weights-in", choices=["per_layer_sram", "dram"], default=None, help="where the weights are read from")
    v2.add_argument("--ma-params", help="JSON file of memory-aware parameters replacing the profile's, e.g. "
                    '{"e_ac": 0.03, "bits_w": 4, "integer_inputs": "graded"} (every value used is echoed in the JSON)')
    v2.add_argument("--hw-file", help="JSON file of extra or replaced hardware profiles {chip: {field: value}}")
    v2.add_argument("--no-neurobench", dest="neurobench", action="store_false", help="skip the NeuroBench block")
    v2.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory-aware model")
    v2.add_argument("--no-v2", dest="v2", action="store_false", help="the legacy table only (no second pass over the data)")
    v2.add_argument("--csv-v2", help="write the memory-aware rows of every profile as CSV")
    return parser


def _model_and_data(args):
    """(model with its weights, test set, data info, model name) for the command line ``args``;
    options that cannot apply are refused rather than ignored."""
    from omegaconf import OmegaConf

    import spikeformers  # noqa: F401
    from spikeformers.models.errors import UserError
    from spikeformers.models.factory import build_model, check_same_model, load_model_weights, training_checkpoint
    from spikeformers.train.cli import compose_config
    from spikeformers.train.data import build_datasets
    from spikeformers.train.evaluate import trained_configs

    if args.data_root and not args.data and not args.checkpoint:
        raise UserError("--data-root needs --data (the default digits set is embedded and has no root)",
                        hint="e.g. --data cifar10 --data-root /data")
    if not args.use_ema and not args.checkpoint:
        raise UserError("--no-ema applies only with --checkpoint (registered weights have no EMA copy)", hint="drop --no-ema")
    state = None
    if args.checkpoint:
        state = training_checkpoint(args.checkpoint)
        if args.model:
            check_same_model(state, args.model, args.checkpoint, hint="drop MODEL: a checkpoint's model comes from the checkpoint")
        model_cfg, data_cfg = trained_configs(state)
        if model_cfg.get("T") is None:
            raise _ann_error(model_cfg.name, args.checkpoint)
    else:
        model_cfg = compose_config("train", []).model
        model_cfg.name = args.model or "sdt_tiny.digits"
        model_cfg.pretrained = bool(args.pretrained and "." in model_cfg.name)
        model_cfg.T = None  # the registered model's own T (sdtv3_tiny: 1), not the training config's 4
        data_cfg = None
    if args.data or data_cfg is None:
        data_cfg = compose_config("train", [f"data={args.data or 'digits'}"]).data
    data_cfg = OmegaConf.create(OmegaConf.to_container(data_cfg))
    if args.data_root:
        if data_cfg.name == "digits":
            raise UserError("--data-root cannot apply to digits (embedded, no root)", hint="drop --data-root")
        data_cfg.root = args.data_root
    if args.T:
        model_cfg.T = args.T
    _, test_set, info = build_datasets(data_cfg)
    model = build_model(model_cfg, info)
    if getattr(model, "T", None) is None:
        raise _ann_error(model_cfg.name, args.checkpoint)
    if state is not None:
        weights = state["ema"] if (args.use_ema and state.get("ema")) else state["model"]
        load_model_weights(model, weights, args.checkpoint, model_cfg.name)
    return model, test_set, info, model_cfg.name


def _ann_error(name: str, checkpoint: str | None):
    """An ANN (QCFS CNN, ViT for ECMT) has no spikes to count: point to its converted SNN."""
    from spikeformers.models.errors import UserError

    method = "qcfs" if name.startswith("qcfs") else "ecmt"
    source = f"--checkpoint {checkpoint}" if checkpoint else f"--model {name}"
    return UserError(f"{name} is an ANN: it has no spikes to count",
                     hint=f"its converted SNN's energy per T: spikeformers-convert {method} {source} --energy (docs/conversion.md)")


def silent_network_warning(report: EnergyReport) -> str | None:
    """A warning when no layer after the first receives a spike: the energy "saving" of a network
    that never fires is not a result (an untrained or dead network)."""
    later = [r for r in report.layers if r.input_type != "real"]
    if later and all(r.input_rate == 0 for r in later):
        return (f"warning: no spike reached any of the {len(later)} spiking layers of {report.model}; "
                f"the {report.ann_energy_mJ / max(report.total_energy_mJ, 1e-30):.0f}x saving of a network that never fires is not a result")
    return None


def main(argv: list[str] | None = None) -> int:
    """Console script ``spikeformers-energy``; the user's mistakes end as one line (docs/errors.md)."""
    from spikeformers.models.errors import UserError
    from spikeformers.train.checkpoint import atomic_write
    from spikeformers.train.cli import user_errors
    from spikeformers.train.evaluate import to_model_input

    parser = _parser()
    args = parser.parse_args(argv)
    with user_errors(parser.prog, args.debug):
        options = {}
        if args.v2:  # bad parameters are refused before the model runs
            from spikeformers.train import energy_ma

            options = _ma_params(args.ma_params)
            options.update({k: v for k, v in (("dataflow", args.dataflow), ("execution", args.execution),
                                              ("first_layer", args.first_layer), ("weights_in", args.weights_in)) if v})
            for profile in args.profile or ["mem45-int8"]:
                if profile != "legacy45":
                    energy_ma.profile(profile, **options)
        model, test_set, info, name = _model_and_data(args)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, range(min(args.n, len(test_set)))),
                                             batch_size=args.batch_size)
        batches = [to_model_input(x, info, torch.device("cpu")) for x, _ in loader]
        report = analyze(model, batches,
                         EnergyConfig(args.e_mac, args.e_ac, args.first_layer_times_T, args.integer_inputs, args.real_inputs),
                         model_name=name)
        print(report.table())
        warning = silent_network_warning(report)
        if warning:
            print(f"{parser.prog}: {warning}", file=sys.stderr)
        v2 = None
        if args.v2:
            from spikeformers.train.energy_hw import load_chips

            v2 = analyze_v2(model, batches, report, profiles=tuple(args.profile or ["mem45-int8"]), options=options,
                            neurobench=args.neurobench, memory=args.memory, chips=load_chips(args.hw_file))
            print(v2_tables(v2))
            for line in v2["warnings"]:
                print(f"{parser.prog}: warning: {line}", file=sys.stderr)
        elif args.csv_v2 or args.profile or args.ma_params or args.hw_file:
            raise UserError("--csv-v2, --profile, --ma-params and --hw-file need the version-2 pass", hint="drop --no-v2")
        if args.json:
            payload = report.to_json()
            if v2 is not None:
                payload["v2"] = v2_json(v2)
            atomic_write(args.json, lambda p: p.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n"))
        if args.csv:
            atomic_write(args.csv, lambda p: p.write_text(report.csv()))
        if args.csv_v2:
            atomic_write(args.csv_v2, lambda p: p.write_text(v2_csv(v2)))
        if args.plots:
            for path in plot_report(report, args.plots, v2):
                print(f"wrote {path}", file=sys.stderr)
    return 0


def _ma_params(path: str | None) -> dict:
    from spikeformers.models.errors import UserError

    if not path:
        return {}
    try:
        params = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the parameter file {path}: {err}") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must hold one JSON object of parameters", hint='e.g. {"e_ac": 0.03}')
    return params


def _json_default(value):
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
