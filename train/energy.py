"""Energy, SOP and firing-rate analysis (``spikeformers-energy``), as the papers estimate it.

Spec: architectures.md §8. For every conv/linear layer the tool records, from forward hooks and
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
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


__all__ = ["EnergyConfig", "LayerRecord", "EnergyReport", "analyze", "layer_flops", "attention_energy_ratio", "main"]

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


def input_type(x: torch.Tensor) -> str:
    if bool(((x == 0) | (x == 1)).all()):
        return "binary"
    nonzero = x[x != 0]
    if bool((nonzero == nonzero[0]).all()) and nonzero[0] > 0:
        return "binary"  # spikes of one amplitude θ (IF neurons of a converted ANN, conversion.md §1.3)
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
    """Hooks that accumulate per-layer statistics over batches (sums, later divided)."""

    def __init__(self, model: nn.Module, cfg: EnergyConfig) -> None:
        self.cfg, self.T, self.B = cfg, 1, 1
        self.stats: dict[str, dict] = {}
        self.order: list[str] = []
        self.spikes: dict[str, torch.Tensor] = {}
        self.attention_blocks: list[tuple[int, int]] = []  # (N, D) of each attention call in a batch
        self.hooks = [model.register_forward_pre_hook(self._model_input)]
        merged = _merged_chains(model)
        skipped = {part for chain in merged.values() for part in chain[1]}
        for name, m in model.named_modules():
            if name in merged:
                self.hooks.append(m.register_forward_hook(self._layer(f"{name} (merged)", merged[name][0])))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and name not in skipped:
                self.hooks.append(m.register_forward_hook(self._layer(name)))
            elif getattr(m, "attention_product", None):
                # Declared by the model: "ssa" (Q·Kᵀ·V in the module's ``order``), "ssa_q_kv"
                # (always Q·(Kᵀ·V)), "sdsa" (mask-and-add) or "qk_token"; counted from q/k/v spikes.
                kind = m.attention_product
                parts = ("q_lif", "k_lif", "attn_lif") if kind == "qk_token" else ("q_lif", "k_lif", "v_lif")
                for part in parts:
                    self.hooks.append(getattr(m, part).register_forward_hook(self._spike(f"{name}.{part}")))
                self.hooks.append(m.register_forward_hook(self._attention(name, kind)))

    def _model_input(self, model, args):
        x = args[0]
        self.T = x.shape[0] if x.dim() == 5 else model.T
        self.B = x.shape[1] if x.dim() == 5 else x.shape[0]

    def _add(self, name: str, op: str, shape, flops: int, steps: int, kind: str, rates: torch.Tensor):
        s = self.stats.get(name)
        if s is None:
            s = self.stats[name] = dict(op=op, shape=list(shape), flops=flops, steps=steps, types=set(),
                                        rate_sum=torch.zeros(steps, dtype=torch.float64), samples=0)
            self.order.append(name)
        s["types"].add(kind)
        s["rate_sum"] += rates.double() * self.B  # per-sample weighting across batches of any size
        s["samples"] += self.B

    def _layer(self, name, merged: tuple[int, int, int] | None = None):
        """Record a conv/linear call. ``merged`` = (kernel, C_in, C_out): the module is a linear conv
        chain counted as the one k×k conv it re-parameterises into, on the chain's (spike) input
        (more_families.md §4: SDT v2's RepConv and SepConv)."""
        def hook(module, args, out):
            x = args[0].detach()
            view, steps, shape = _per_step(x, self.T, self.B)
            kind = input_type(view)
            if self.cfg.integer_inputs == "sum" and kind == "integer":
                rates = view.float().mean(dim=(1, 2))  # spikes per entry: one AC per spike
            else:
                rates = (view != 0).float().mean(dim=(1, 2))  # one AC per non-zero entry
            if merged is None:
                flops, op = layer_flops(module, x, out), type(module).__name__.lower()
            else:
                kernel, in_channels, out_channels = merged
                flops, op = out.shape[0] * out.shape[-2] * out.shape[-1] * kernel * kernel * in_channels * out_channels, "conv2d"
            self._add(name, op, shape, flops // (steps * self.B), steps, kind, rates)  # per sample and time step
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
    if getattr(model, "adaptive", False):  # AT-SNN's step-wise pass bypasses the attention modules
        raise ValueError(f"energy analysis does not support AT-SNN models with halting or merging active "
                         f"({type(model).__name__}); analyse the backbone (atsnn=off)")
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
        rates = (s["rate_sum"] / s["samples"]).tolist()
        kind = "real" if "real" in s["types"] else ("integer" if "integer" in s["types"] else "binary")
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
    """Vanilla self-attention energy over the SDSA operator's (architectures.md §8):
    E_MAC·2N²D / (E_AC·T·R̃·N·D) = 2·N·E_MAC / (T·R̃·E_AC)."""
    return (e_mac_pj * 2 * N * N * D) / (e_ac_pj * T * rate * N * D)


# --- charts ------------------------------------------------------------------------------------


def plot_report(report: EnergyReport, out_dir: str | Path) -> list[Path]:
    """firing_rates.png (input rate per layer and time step) and energy.png (by block and op)."""
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
    fig, ax = plt.subplots(figsize=(2 + 0.6 * steps, 1 + 0.22 * len(report.layers)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(report.layers)), [r.name for r in report.layers], fontsize=6)
    ax.set_xticks(range(steps), [str(t) for t in range(steps)])
    ax.set(xlabel="time step", title=f"{report.model}: input firing rate")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths.append(atomic_write(out_dir / "firing_rates.png", lambda p: fig.savefig(p, dpi=110, format="png")))
    plt.close(fig)

    by_block: dict[str, dict[str, float]] = {}
    for r in report.layers:
        parts = r.name.split(".")
        block = ".".join(parts[:2]) if parts[0] == "block" else parts[0]
        by_block.setdefault(block, {}).setdefault(r.op, 0.0)
        by_block[block][r.op] += r.energy_mJ
    ops = sorted({op for d in by_block.values() for op in d})
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(by_block), 3.5))
    bottom = [0.0] * len(by_block)
    for op in ops:
        values = [by_block[b].get(op, 0.0) for b in by_block]
        ax.bar(list(by_block), values, bottom=bottom, label=op)
        bottom = [a + b for a, b in zip(bottom, values)]
    ax.set(ylabel="energy per sample (mJ)", title=f"energy by block and op (total {report.total_energy_mJ:.4f} mJ)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(atomic_write(out_dir / "energy.png", lambda p: fig.savefig(p, dpi=110, format="png")))
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
    parser.add_argument("--plots", help="folder for firing_rates.png and energy.png")
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
    from spikeformers.train.checkpoint import atomic_write
    from spikeformers.train.cli import user_errors
    from spikeformers.train.evaluate import to_model_input

    parser = _parser()
    args = parser.parse_args(argv)
    with user_errors(parser.prog, args.debug):
        model, test_set, info, name = _model_and_data(args)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, range(min(args.n, len(test_set)))),
                                             batch_size=args.batch_size)
        report = analyze(model, (to_model_input(x, info, torch.device("cpu")) for x, _ in loader),
                         EnergyConfig(args.e_mac, args.e_ac, args.first_layer_times_T, args.integer_inputs, args.real_inputs),
                         model_name=name)
        print(report.table())
        warning = silent_network_warning(report)
        if warning:
            print(f"{parser.prog}: {warning}", file=sys.stderr)
        if args.json:
            atomic_write(args.json, lambda p: p.write_text(json.dumps(report.to_json(), indent=2) + "\n"))
        if args.csv:
            atomic_write(args.csv, lambda p: p.write_text(report.csv()))
        if args.plots:
            for path in plot_report(report, args.plots):
                print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
