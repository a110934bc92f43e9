"""A memory-aware energy model for the SNN and for equivalent int8 / fp32 ANNs, with break-even
firing rates.

The papers' estimate (0.9 pJ per accumulate, 4.6 pJ per MAC) prices arithmetic only. This model
adds what it leaves out, following the structure of Lemaire et al., "An analytical estimation of
spiking neural networks energy efficiency" (ICONIP 2022, arXiv 2210.13107), as SpikingJelly 2.0
implements it (``op_counter.estimate_lemaire_energy``): synaptic accumulates, address generation,
and SRAM reads and writes of weights, membrane potentials and input/output events, with an
access cost that grows with the memory's capacity. Unit costs are the 45 nm figures of
M. Horowitz, "Computing's energy problem" (ISSCC 2014); bit widths, a border-exact fan-out, an ANN
side and break-even rates are added.

Every row keeps its energy split by term (compute, weights, io, membrane, addressing, bias) and by
how it scales with the firing rate: ``const`` (the first layer, neuron-step state and leak, bias),
``lin`` (per input event or per spike) and ``quad`` (spike × spike products). So

    E_SNN(r) = A + L·r + Q·r²

for a uniform rate r, where L and Q are the row terms priced at rate 1 (every input entry a spike),
and E_SNN(s·measured rates) = A + s·L_measured + s²·Q_measured. The break-even rate r* solves
E_SNN(r*) = E_ANN (Dampfhoffer et al., "Are SNNs really more energy-efficient than ANNs?", IEEE
TETCI 2023, report it as ρ* = r*·T spikes per synapse per inference).

Rows: connection layers (spike or real input), neurons, attention products, and the work outside
the synapses that the counting pass finds without naming a model family: residual adds (spike +
spike event by event, or a real membrane shortcut), pooling (max / average modules and the heads'
token means) and BatchNorms that cannot fold into a layer. On the ANN side a residual add is n
accumulator adds, pooling runs on reals, every BN folds, and a linear conv chain with a
``merged_conv()`` view (SDT v2's RepConv / SepConv) is the one k×k conv it re-parameterises into.
The formulas per row type are in docs/energy.md ("The memory-aware model").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from spikeformers.train.neurobench import (AttentionCounts, ConnectionCounts, Counts, NeuronCounts, NormCounts, PoolCounts,
                                           ResidualCounts)

__all__ = ["Profile", "AnnCost", "PROFILES", "profile", "price", "curve64", "solve_break_even", "bisect_break_even",
           "legacy45", "TERMS", "NOT_MODELLED"]

TERMS = ("compute", "weights", "io", "membrane", "addressing", "bias")

#: Horowitz 2014, 45 nm, 0.9 V, pJ per operation ("derived": not in the table, see ``SOURCES``).
E_ADD = {"int8": 0.03, "int16": 0.05, "int32": 0.1, "fp16": 0.4, "fp32": 0.9}
E_MUL = {"int8": 0.2, "int16": 0.8, "int32": 3.1, "fp16": 1.1, "fp32": 3.7}
SOURCES = {
    "e_add_pJ.int8": "H14 (transcribed)", "e_add_pJ.int16": "H14 (transcribed)", "e_add_pJ.int32": "H14 (transcribed)",
    "e_add_pJ.fp16": "H14 (transcribed)", "e_add_pJ.fp32": "H14 (transcribed)", "e_mul_pJ.int8": "H14 (transcribed)",
    "e_mul_pJ.int16": "derived: 0.2·(16/8)², the quadratic rule that gives H14's own 8→32 bit ratio",
    "e_mul_pJ.int32": "H14 (transcribed)", "e_mul_pJ.fp16": "H14 (transcribed)", "e_mul_pJ.fp32": "H14 (transcribed)",
    "mem_curve_pJ_per_64b": "H14 (transcribed): 8 KB 10 pJ, 32 KB 20 pJ, 1 MB 100 pJ per 64-bit access; "
                            "piecewise linear from 0 and clamped at 1 MB as Lemaire 2022 via SpikingJelly 2.0",
    "dram_pJ_per_64b": "H14 (transcribed): 1.3–2.6 nJ per 64-bit access (low end used)",
    "fifo_entries": "Lemaire 2022 via SpikingJelly 2.0 (the paper's experiments)",
    "e_mul_pJ.qnn": "derived: 0.2·b_w·b_a/64 (array-multiplier scaling)",
}
#: (capacity bytes, pJ per 64-bit access): the SRAM curve, clamped at the last point.
CURVE64 = ((0.0, 0.0), (8192.0, 10.0), (32768.0, 20.0), (1048576.0, 100.0))
DRAM_PJ_PER_64B = 1300.0

NOT_MODELLED = ["static/leakage power", "clocking and control", "off-chip I/O (except weights_in=dram)",
                "network-on-chip hops", "softmax, LayerNorm and scaling (layer scales, the attention scale)",
                "pooling-window borders (every window counted whole)",
                "adds and means inside neurons and other leaf modules (their own arithmetic)",
                "threshold compares (Lemaire 2022 does not charge them)",
                "power-of-two leak as a shift (the leak is priced as one MAC)", "data loading", "training"]


def curve64(capacity_bytes: float) -> float:
    """pJ per 64-bit SRAM access at ``capacity_bytes``: SpikingJelly's Lemaire interpolation (its
    per-byte curve is this one over 4, the 32-bit word convention), so we reuse it."""
    from spikingjelly.activation_based.op_counter.analytical_energy import LemaireEnergyCostConfig

    return 4.0 * LemaireEnergyCostConfig().memory_cost_pj(float(capacity_bytes))


@dataclass(frozen=True)
class AnnCost:
    """An ANN baseline: weight and activation bits, pJ per MAC and per accumulator add (bias)."""

    bits_w: int
    bits_a: int
    e_mac: float
    e_add_acc: float


@dataclass(frozen=True)
class Profile:
    name: str
    e_ac: float                 # synaptic accumulate at the membrane width
    e_mac_real: float           # real-input MAC (first layer): mul(max(b_w, b_in)) + add(b_v)
    e_mul_v: float              # graded integer inputs: the multiply of a MAC at b_v
    e_leak: float               # LIF leak, one MAC per neuron-step (Lemaire 2022)
    e_reset: float              # reset per spike
    e_bias_add: float
    e_addr_add: float = 0.1     # address arithmetic is 32-bit integer (Lemaire 2022)
    e_addr_mul: float = 3.1
    bits_w: int = 8
    bits_v: int = 16
    bits_e: int = 32
    bits_x: int = 8
    memory: str = "curve64"     # curve64 (per bit: /64) | lemaire (SpikingJelly's /32) | flat | none
    mem_flat_pj_per_bit: float = 0.0
    fifo_entries: int = 1000
    counts: str = "exact"       # exact | lemaire (border-free fan-out, parity with SpikingJelly)
    dataflow: str = "naive"     # naive | reuse
    execution: str = "event"    # event | dense
    first_layer: str = "auto"   # auto | executed | once_cached
    weights_in: str = "per_layer_sram"  # | dram
    integer_inputs: str = "sum"  # sum | graded
    bn: str = "folded"          # folded (a BN reading a conv's output is its bias) | unfolded (every BN per element)
    e_add_v: float | None = None  # adds outside synapses at b_v (residual adds, pooling, BN shift); None: e_ac
    ann: tuple = ()             # ((name, AnnCost), ...)
    status: str = ""

    def m(self, capacity_bytes: float) -> float:
        """pJ per bit of one access to a memory of ``capacity_bytes``."""
        if self.memory == "none":
            return 0.0
        if self.memory == "flat":
            return self.mem_flat_pj_per_bit
        return curve64(capacity_bytes) / (32.0 if self.memory == "lemaire" else 64.0)

    @property
    def add_v(self) -> float:
        """One add at the membrane width outside a synapse (residual, pooling, BN shift)."""
        return self.e_ac if self.e_add_v is None else self.e_add_v

    def m_weights(self, capacity_bytes: float) -> float:
        if self.weights_in == "dram" and self.memory != "none":
            return DRAM_PJ_PER_64B / 64.0
        return self.m(capacity_bytes)

    def params(self) -> dict:
        """Every value the report used, with its source."""
        out = {k: v for k, v in asdict(self).items() if k not in ("ann", "name")}
        out["e_add_pJ"], out["e_mul_pJ"] = dict(E_ADD), dict(E_MUL)
        out["mem_curve_pJ_per_64b"] = [list(p) for p in CURVE64]
        out["bits"] = {"w": self.bits_w, "v": self.bits_v, "e": self.bits_e, "x": self.bits_x}
        out["options"] = {"dataflow": self.dataflow, "execution": self.execution, "first_layer": self.first_layer,
                          "weights_in": self.weights_in, "integer_inputs": self.integer_inputs, "counts": self.counts,
                          "bn": self.bn}
        out["e_add_v"] = self.add_v
        out["ann_baselines"] = {n: asdict(c) for n, c in self.ann}
        out["sources"] = dict(SOURCES)
        return out


_ANN = (("int8", AnnCost(8, 8, E_MUL["int8"] + E_ADD["int32"], E_ADD["int32"])),
        ("fp32", AnnCost(32, 32, E_MUL["fp32"] + E_ADD["fp32"], E_ADD["fp32"])))

PROFILES = {
    # int8 weights, 16-bit membranes, 32-bit events, 8-bit image; the ANN accumulates in int32
    "mem45-int8": Profile("mem45-int8", e_ac=E_ADD["int16"], e_mac_real=E_MUL["int8"] + E_ADD["int16"],
                          e_mul_v=E_MUL["int16"], e_leak=E_MUL["int16"] + E_ADD["int16"], e_reset=E_ADD["int16"],
                          e_bias_add=E_ADD["int16"], ann=_ANN),
    # the legacy precision (fp32 everywhere) with memory priced
    "mem45-fp32": Profile("mem45-fp32", e_ac=E_ADD["fp32"], e_mac_real=E_MUL["fp32"] + E_ADD["fp32"],
                          e_mul_v=E_MUL["fp32"], e_leak=E_MUL["fp32"] + E_ADD["fp32"], e_reset=E_ADD["fp32"],
                          e_bias_add=E_ADD["fp32"], bits_w=32, bits_v=32, bits_e=32, bits_x=32, ann=_ANN),
    # SpikingJelly 2.0's estimate_lemaire_energy, digit for digit: 32-bit integers, 32-bit words
    "lemaire": Profile("lemaire", e_ac=E_ADD["int32"], e_mac_real=E_MUL["int32"] + E_ADD["int32"],
                       e_mul_v=E_MUL["int32"], e_leak=E_MUL["int32"] + E_ADD["int32"], e_reset=E_ADD["int32"],
                       e_bias_add=E_ADD["int32"], bits_w=32, bits_v=32, bits_e=32, bits_x=32, memory="lemaire",
                       counts="lemaire", first_layer="executed",
                       ann=(("int8", AnnCost(32, 32, E_MUL["int32"] + E_ADD["int32"], E_ADD["int32"])),
                            ("fp32", AnnCost(32, 32, E_MUL["fp32"] + E_ADD["fp32"], E_ADD["fp32"])))),
}


CHOICES = {"memory": ("curve64", "lemaire", "flat", "none"), "counts": ("exact", "lemaire"), "dataflow": ("naive", "reuse"),
           "execution": ("event", "dense"), "first_layer": ("auto", "executed", "once_cached"),
           "weights_in": ("per_layer_sram", "dram"), "integer_inputs": ("sum", "graded"), "bn": ("folded", "unfolded")}


def profile(name: str, **options) -> Profile:
    """A named profile with fields replaced: options (``dataflow="reuse"``, ``first_layer="executed"``
    ...) or any unit cost or bit width (``e_ac=0.03``, ``bits_w=4``); unknown names and values are
    the user's mistake."""
    from spikeformers.models.errors import UserError

    if name not in PROFILES:
        raise UserError(f"unknown energy profile {name!r}", hint=f"one of: legacy45, {', '.join(PROFILES)}")
    fields = {f for f in Profile.__dataclass_fields__ if f not in ("name", "ann", "status")}
    for key, value in options.items():
        if key not in fields:
            raise UserError(f"unknown energy model parameter {key!r}", hint=f"one of: {', '.join(sorted(fields))}")
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        if key == "e_add_v" and value is None:  # None: the synaptic add's cost
            continue
        if key not in CHOICES and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise UserError(f"{key} must be a non-negative number, got {value!r}")
    return replace(PROFILES[name], **options)


def qnn_equiv(T: int) -> AnnCost:
    """The quantised ANN with ⌈log2(T+1)⌉-bit activations that a rate-coded SNN of T steps is
    compared with by Yan et al., "Reconsidering the energy efficiency of spiking neural networks"
    (arXiv 2409.08290); its multiply scales as 0.2·b_w·b_a/64 pJ (derived)."""
    bits_a = math.ceil(math.log2(T + 1))
    return AnnCost(8, bits_a, 0.2 * 8 * bits_a / 64 + E_ADD["int32"], E_ADD["int32"])


# --- one row -----------------------------------------------------------------------------------


def _zero() -> dict:
    return {t: 0.0 for t in TERMS}


@dataclass
class Priced:
    """A row's energy per sample: ``const``/``lin``/``quad`` at the measured rates, ``lin1``/
    ``quad1`` at rate 1, and the ANN counterpart per baseline (pJ)."""

    name: str
    role: str
    input_type: str
    T: int
    rate: float | None
    counts: dict
    const: dict = field(default_factory=_zero)
    lin: dict = field(default_factory=_zero)
    quad: dict = field(default_factory=_zero)
    lin1: dict = field(default_factory=_zero)
    quad1: dict = field(default_factory=_zero)
    ann: dict = field(default_factory=dict)
    r_star: dict = field(default_factory=dict)

    def terms(self) -> dict:
        return {t: self.const[t] + self.lin[t] + self.quad[t] for t in TERMS}

    @property
    def total(self) -> float:
        return sum(self.terms().values())


def _connection(row: ConnectionCounts, p: Profile, per, first_real: bool) -> Priced:
    T, n_in, n_out = row.steps, row.n_in, row.n_out
    k = math.prod(row.kernel)
    n_bias = row.c_out if (row.bias if p.bn == "folded" else row.own_bias) else 0
    c_w = (row.params + n_bias) * p.bits_w / 8
    mw = p.m_weights(c_w)
    d1 = per(row.dense) / T
    pointwise = row.kind == "linear" or k == 1
    kind = row.input_type
    spikes = kind in ("binary", "amplitude") or (kind == "integer" and p.integer_inputs == "sum")
    graded = kind == "integer" and p.integer_inputs == "graded"
    out = Priced(row.name, "synaptic", kind, T, None, {})
    bias = T * n_out * (p.e_bias_add + p.bits_w * mw) if n_bias else 0.0
    if spikes or graded:
        z, s_eff, s_fan = ((per(row.z_sum), per(row.s_eff_sum), per(row.s_fan_sum)) if not graded
                           else (per(row.z), per(row.s_eff), per(row.s_fan)))
        z1, s_eff1, s_fan1 = T * n_in, per(row.dense_nonzero_w), per(row.dense)  # rate 1: every entry a spike
        if p.counts == "lemaire":  # border-free fan-out of Lemaire 2022 (as SpikingJelly implements it)
            per_out = row.c_out // row.groups
            s_op = per_out * math.prod(math.ceil(kk / ss) for kk, ss in zip(row.kernel, row.stride))
            s_eff, s_fan, s_eff1, s_fan1 = z * s_op, z * per_out * k, z1 * s_op, z1 * per_out * k
        out.rate = z / (T * n_in) if n_in else 0.0
        out.counts = {"Z": z, "S_eff": s_eff, "S_fan": s_fan, "D": per(row.dense), "N_spk": None}
        out.const["bias"] = bias
        if p.execution == "dense":
            out.const["compute"] = T * d1 * p.e_ac
            out.const["weights"] = T * (d1 if p.dataflow == "naive" else row.params) * p.bits_w * mw
            out.const["io"] = T * n_in * p.m(n_in / 8)
            return out
        c_v, c_e = n_out * p.bits_v / 8, p.fifo_entries * p.bits_e / 8
        e_syn = p.e_ac + (p.e_mul_v if graded else 0.0)
        for target, (zz, se, sf) in ((out.lin, (z, s_eff, s_fan)), (out.lin1, (z1, s_eff1, s_fan1))):
            target["compute"] = se * e_syn
            target["weights"] = sf * p.bits_w * mw
            target["membrane"] = 0.0 if p.dataflow == "reuse" else 2 * sf * p.bits_v * p.m(c_v)
            target["addressing"] = sf * p.e_addr_add + (2 * zz * (p.e_addr_mul + p.e_addr_add) if row.kind == "conv" else 0.0)
            target["io"] = zz * p.bits_e * p.m(c_e)
        return out
    # real-valued input: dense MACs, rate-independent
    out.role = "first" if first_real else "real"
    if p.counts == "lemaire":  # Lemaire et al. 2022 as SpikingJelly counts a dense layer: every tap, the zero padding too
        d1 = row.n_out * row.fan_in
    mode = p.first_layer
    if mode == "auto":
        mode = "once_cached" if (row.static_input and T > 1) else "executed"
    K = T if mode == "executed" else 1
    b_in = p.bits_x if first_real else p.bits_v
    c_x = n_in * b_in / 8
    out.counts = {"Z": None, "S_eff": per(row.s_eff), "S_fan": per(row.s_fan), "D": per(row.dense), "N_spk": None, "passes": K}
    out.const["compute"] = K * d1 * p.e_mac_real
    out.const["weights"] = K * (d1 if p.dataflow == "naive" else row.params) * p.bits_w * mw
    out.const["io"] = K * (n_in if (pointwise or p.dataflow == "reuse") else d1) * b_in * p.m(c_x)
    out.const["addressing"] = K * (n_in + n_out + (row.c_out * k if row.kind == "conv" else 0)) * p.e_addr_add
    out.const["bias"] = K * n_out * (p.e_bias_add + p.bits_w * mw) if n_bias else 0.0
    if mode == "once_cached":  # write the input current once, read it every step
        c_v = n_out * p.bits_v / 8
        out.const["membrane"] = (1 + T) * n_out * p.bits_v * p.m(c_v)
    return out


def _ann_connection(row: ConnectionCounts, a: AnnCost, p: Profile, per, reuse: bool) -> float:
    return _ann_layer(per(row.dense) / row.steps, row.params, row.n_in, row.n_out, row.c_out, math.prod(row.kernel),
                      row.kind == "conv", row.bias, a, p, reuse)


def _ann_layer(d1: float, weights: int, n_in: int, n_out: int, c_out: int, k: int, conv: bool, bias: bool, a: AnnCost,
               p: Profile, reuse: bool) -> float:
    """One ANN conv / linear pass: D₁ MACs, weight reads per MAC (naive) or once (reuse), input
    reads (per MAC for a k>1 conv in naive, as Lemaire 2022), output writes, dense addressing, bias."""
    n_bias = c_out if bias else 0
    mw = p.m_weights((weights + n_bias) * a.bits_w / 8)
    pointwise = not conv or k == 1
    c_x, c_o = n_in * a.bits_a / 8, n_out * a.bits_a / 8
    e = d1 * a.e_mac
    e += (weights if reuse else d1) * a.bits_w * mw
    e += (n_in if (pointwise or reuse) else d1) * a.bits_a * p.m(c_x) + n_out * a.bits_a * p.m(c_o)
    e += (n_in + n_out + (c_out * k if conv else 0)) * p.e_addr_add
    if n_bias:
        e += n_out * (a.e_add_acc + a.bits_w * mw)
    return e


def _ann_merged(chain: dict, a: AnnCost, p: Profile, reuse: bool) -> float:
    """The ANN counterpart of a linear conv chain is the one k×k conv (with bias) it
    re-parameterises into, run once on the chain's input (SDT v2's RepConv / SepConv)."""
    k = chain["kernel"] ** 2
    return _ann_layer(chain["dense"], chain["weights"], chain["n_in"], chain["n_out"], chain["c_out"], k, True, True, a, p, reuse)


# --- rows outside the synapses: residual adds, pooling, unfolded BatchNorm ---------------------


def _residual(row: ResidualCounts, p: Profile, per) -> Priced:
    """Spike + spike (a spike-count stream): one add per non-zero operand entry, the SpikingJelly
    ACCounter rule for two binary tensors, each entry read as an event, the sum written once per
    element and step at b_v. Real + real (a membrane shortcut): T·n adds, two reads and one write
    of b_v words per element and step. Mixed operands count as real."""
    T, n = row.steps, row.n
    z = per(row.z_a) + per(row.z_b)
    c_v, c_e = n * p.bits_v / 8, p.fifo_entries * p.bits_e / 8
    out = Priced(row.name, "residual", row.input_type, T, None, {"Z": None, "S_eff": None, "S_fan": None, "D": None,
                                                                  "N_spk": None, "adds": None, "n": n})
    if row.input_type == "spikes":
        out.rate = z / (2 * T * n) if n else 0.0
        out.counts["adds"] = z
        out.const["membrane"] = T * n * p.bits_v * p.m(c_v)
        for target, zz in ((out.lin, z), (out.lin1, 2 * T * n)):
            target["compute"] = zz * p.add_v
            target["io"] = zz * p.bits_e * p.m(c_e)
        return out
    out.counts["adds"] = T * n
    out.const["compute"] = T * n * p.add_v
    out.const["membrane"] = 3 * T * n * p.bits_v * p.m(c_v)
    return out


def _ann_residual(row: ResidualCounts, a: AnnCost, p: Profile) -> float:
    """n adds at the accumulator width, two activation reads and one write."""
    return row.n * a.e_add_acc + 3 * row.n * a.bits_a * p.m(row.n * a.bits_a / 8)


def _pool(row: PoolCounts, p: Profile, per) -> Priced:
    """Average pooling (and a mean over tokens) on spikes: one add per input event (the 1/k scale
    folds into the next weights), the averaged value written at b_v. On reals: k−1 adds per
    output. Max pooling on spikes is an OR (no arithmetic, an output event per output spike); on
    reals k−1 compares per output, priced as adds. Inputs are read once (events, or b_v words)."""
    T, n_in, n_out, w = row.steps, row.n_in, row.n_out, row.window
    z, z_out = per(row.z), per(row.z_out)
    c_e = p.fifo_entries * p.bits_e / 8
    c_in, c_out = n_in * p.bits_v / 8, n_out * p.bits_v / 8
    out = Priced(row.name, "pool", row.input_type, T, None, {"Z": None, "S_eff": None, "S_fan": None, "D": None,
                                                              "N_spk": None, "op": row.op, "window": w})
    if row.input_type == "spikes":
        out.rate = z / (T * n_in) if n_in else 0.0
        out.counts["Z"] = z
        for target, zz, zo in ((out.lin, z, z_out), (out.lin1, T * n_in, T * n_out)):
            target["io"] = zz * p.bits_e * p.m(c_e)
            if row.op == "max":
                target["io"] += zo * p.bits_e * p.m(c_e)
            else:
                target["compute"] = zz * p.add_v
        if row.op != "max":
            out.const["membrane"] = T * n_out * p.bits_v * p.m(c_out)
        return out
    out.const["compute"] = T * n_out * (w - 1) * p.add_v
    out.const["membrane"] = T * (n_in * p.bits_v * p.m(c_in) + n_out * p.bits_v * p.m(c_out))
    return out


def _ann_pool(row: PoolCounts, a: AnnCost, p: Profile) -> float:
    """One pass on reals: k−1 adds (or compares) per output at the accumulator width, input reads
    and output writes."""
    n_in, n_out = row.n_in, row.n_out
    return (n_out * (row.window - 1) * a.e_add_acc + n_in * a.bits_a * p.m(n_in * a.bits_a / 8)
            + n_out * a.bits_a * p.m(n_out * a.bits_a / 8))


def _norm(row: NormCounts, p: Profile, per) -> Priced:
    """An unfolded BN: a multiply and an add per element and step at b_v, and its scale and shift
    read per element from a memory of 2·C weights. A folded BN is the bias of its layer (priced
    there), so it costs nothing here unless the profile prices every BN unfolded."""
    T, n, C = row.steps, row.n, row.channels
    out = Priced(row.name, "bn", row.input_type, T, None, {"Z": None, "S_eff": None, "S_fan": None, "D": None, "N_spk": None,
                                                            "folded": row.folded and p.bn == "folded", "n": n})
    if row.folded and p.bn == "folded":
        return out
    out.const["compute"] = T * n * (p.e_mul_v + p.add_v)
    out.const["weights"] = 2 * T * n * p.bits_w * p.m_weights(2 * C * p.bits_w / 8)
    return out


def _neuron(row: NeuronCounts, p: Profile, per) -> Priced:
    T, n, levels = row.steps, row.n, row.levels
    spikes = per(row.spikes if row.events is None else row.events)
    out = Priced(row.name, "neuron", row.model, T, spikes / (T * n * levels) if n else 0.0,
                 {"Z": None, "S_eff": None, "S_fan": None, "D": None, "N_spk": spikes})
    c_v, c_e = n * p.bits_v / 8, p.fifo_entries * p.bits_e / 8
    if row.model == "count":  # a stateless spike-count neuron (E-SpikeFormer's I-LIF at inference):
        # no membrane kept between steps; each of its S ≤ D spikes is written as an event (its
        # rounding is a threshold compare, not charged, as for every neuron here)
        for target, s in ((out.lin, spikes), (out.lin1, T * n * levels)):
            target["io"] = s * p.bits_e * p.m(c_e)
        return out
    if not row.spiking:  # ReLU / Sigmoid of a hybrid network: not priced (as the ANN's ReLU)
        return out
    out.const["membrane"] = 2 * T * n * p.bits_v * p.m(c_v)
    if row.model == "lif":
        out.const["compute"] = T * n * p.e_leak
    for target, s in ((out.lin, spikes), (out.lin1, T * n)):
        target["compute"] = s * p.e_reset
        target["io"] = s * p.bits_e * p.m(c_e)
    return out


def _attention(row: AttentionCounts, p: Profile, per) -> Priced:
    T, N, D, h = row.steps, row.tokens, row.dim, row.heads
    d = D // h
    s, z_a, z_b = per(row.s), per(row.z_a), per(row.z_b)
    c_e = p.fifo_entries * p.bits_e / 8
    out = Priced(row.name, "attention", "binary", T, z_a / (T * N * D) if N * D else 0.0,
                 {"Z": z_a, "S_eff": s, "S_fan": s, "D": per(row.dense), "N_spk": None})
    full = T * N * D  # operand events at rate 1

    def fill(target_lin, target_quad, s, z_a, z_b, macs=0.0):  # macs: the part of s with graded operands
        if row.product in ("q_sum",):
            target_lin["compute"] = s * p.e_ac
            target_lin["io"] = z_a * p.bits_e * p.m(c_e)
            return
        if row.product == "sdsa_sum":
            target_quad["compute"] = s * p.e_ac
            target_lin["io"] = (z_a + z_b) * p.bits_e * p.m(c_e)
            return
        if row.product == "qk":    # each Q event reads a K column (N bits); scores h·N² at b_v
            read = z_a * N * p.m(N * d / 8)
            c_acc = h * N * N * p.bits_v / 8
        elif row.product == "av":  # each V event reads a score column (N words); outputs N·d at b_v
            read = z_a * N * p.bits_v * p.m(h * N * N * p.bits_v / 8)
            c_acc = N * d * p.bits_v / 8
        elif row.product == "kv":  # each K event reads a V row (d bits); the d×d block at b_v
            read = z_a * d * p.m(N * d / 8)
            c_acc = h * d * d * p.bits_v / 8
        else:                      # q_kv: each Q event reads a KᵀV row (d words)
            read = z_a * d * p.bits_v * p.m(h * d * d * p.bits_v / 8)
            c_acc = N * d * p.bits_v / 8
        target_quad["compute"] = s * p.e_ac + macs * p.e_mul_v  # a MAC is a multiply more than an AC
        target_quad["membrane"] = 2 * s * p.bits_v * p.m(c_acc)
        target_lin["weights"] = read
        target_lin["io"] = z_a * p.bits_e * p.m(c_e)

    mac_share = row.s_macs / row.s if row.s else 0.0  # ECMT's products: graded scores are MACs
    fill(out.lin, out.quad, s, z_a, z_b, per(row.s_macs))
    fill(out.lin1, out.quad1, per(row.dense), full if row.product != "sdsa_sum" else 2 * full, full,
         per(row.dense) * mac_share)
    return out


def _ann_attention(row: AttentionCounts, a: AnnCost, p: Profile) -> float:
    """The vanilla-attention counterpart, one pass: N²·D MACs per product plus operand reads and
    the score write (Q·Kᵀ side) or read (·V side); SDSA and token attention stand for both."""
    N, D, h = row.tokens, row.dim, row.heads
    c_x, c_s = N * D * a.bits_a / 8, h * N * N * a.bits_a / 8
    qk = N * N * D * a.e_mac + 2 * N * D * a.bits_a * p.m(c_x) + h * N * N * a.bits_a * p.m(c_s)
    av = N * N * D * a.e_mac + N * D * a.bits_a * p.m(c_x) + h * N * N * a.bits_a * p.m(c_s)
    return {"qk": qk, "kv": qk, "av": av, "q_kv": av}.get(row.product, qk + av)


# --- the whole model -----------------------------------------------------------------------------


def solve_break_even(A: float, L: float, Q: float, target: float) -> float | None:
    """The smallest r ≥ 0 with A + L·r + Q·r² = target (all coefficients ≥ 0), None if none."""
    if A >= target:
        return None if A > target or (L == 0 and Q == 0) else 0.0
    if Q == 0:
        return math.inf if L == 0 else (target - A) / L
    return (-L + math.sqrt(L * L + 4 * Q * (target - A))) / (2 * Q)


def bisect_break_even(energy, target: float, hi: float, tol: float = 1e-12) -> float | None:
    """r* of a non-decreasing ``energy(r)`` on [0, hi] by bisection (None: never; hi: not reached)."""
    if energy(0.0) >= target:
        return None
    if energy(hi) <= target:
        return hi
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if energy(mid) < target else (lo, mid)
    return (lo + hi) / 2


def _status(value: float | None, r_max: float) -> str:
    return "never" if value is None else ("always" if value >= r_max else "value")


def price(counts: Counts, p: Profile) -> dict:
    """The profile's report block: params, SNN total and breakdown, ANN baselines, break-even rates
    and rows (pJ per sample)."""
    per = counts.per_sample
    baselines = dict(p.ann)
    baselines["qnn_equiv"] = qnn_equiv(counts.T)
    # a merged conv chain's ANN counterpart goes to the first of its layers that ran, 0 to the others
    chain_of = {member: at for at, chain in counts.merged.items() for member in chain["members"]}
    priced_chains: set[str] = set()
    rows, first_seen = [], False
    for r in counts.rows:
        if isinstance(r, ConnectionCounts):
            real = r.input_type == "real"
            pr = _connection(r, p, per, real and not first_seen)
            first_seen = first_seen or real
            chain = chain_of.get(r.name)
            for name, a in baselines.items():
                for flow in ("naive", "reuse"):
                    if chain is None:
                        pr.ann[f"{name}_{flow}"] = _ann_connection(r, a, p, per, reuse=flow == "reuse")
                    else:
                        pr.ann[f"{name}_{flow}"] = (0.0 if chain in priced_chains else
                                                    _ann_merged(counts.merged[chain], a, p, reuse=flow == "reuse"))
            if chain is not None:
                pr.counts["merged_into"] = chain
                priced_chains.add(chain)
        elif isinstance(r, NeuronCounts):
            pr = _neuron(r, p, per)
            pr.ann = {f"{n}_{f}": 0.0 for n in baselines for f in ("naive", "reuse")}
        elif isinstance(r, ResidualCounts):
            pr = _residual(r, p, per)
            pr.ann = {f"{n}_{f}": _ann_residual(r, a, p) for n, a in baselines.items() for f in ("naive", "reuse")}
        elif isinstance(r, PoolCounts):
            pr = _pool(r, p, per)
            pr.ann = {f"{n}_{f}": _ann_pool(r, a, p) for n, a in baselines.items() for f in ("naive", "reuse")}
        elif isinstance(r, NormCounts):
            if r.folded and p.bn == "folded":  # the bias of its layer: no row of its own
                continue
            pr = _norm(r, p, per)
            pr.ann = {f"{n}_{f}": 0.0 for n in baselines for f in ("naive", "reuse")}  # the ANN folds every BN
        else:
            pr = _attention(r, p, per)
            ann = {n: _ann_attention(r, a, p) for n, a in baselines.items()}
            pr.ann = {f"{n}_{f}": v for n, v in ann.items() for f in ("naive", "reuse")}
        rows.append(pr)
    totals = {t: sum(r.terms()[t] for r in rows) for t in TERMS}
    total = sum(totals.values())
    A = sum(sum(r.const.values()) for r in rows)
    L1, Q1 = sum(sum(r.lin1.values()) for r in rows), sum(sum(r.quad1.values()) for r in rows)
    Lm, Qm = sum(sum(r.lin.values()) for r in rows), sum(sum(r.quad.values()) for r in rows)
    ann = {key: sum(r.ann.get(key, 0.0) for r in rows) for key in rows[0].ann} if rows else {}
    rates = [r.rate for r in rows if r.rate and r.role in ("synaptic", "neuron", "attention", "residual", "pool")]
    s_max = 1.0 / max(rates) if rates else math.inf
    break_even = {}
    for key, e_ann in ann.items():
        r_star = solve_break_even(A, L1, Q1, e_ann)
        s_star = solve_break_even(A, Lm, Qm, e_ann)
        break_even[key] = {"vs": key, "uniform_rate": r_star, "spikes_per_synapse": None if r_star is None else r_star * counts.T,
                           "scale_margin": s_star, "status": _status(r_star, 1.0), "scale_status": _status(s_star, s_max)}
    for r in rows:  # per layer: r*_ℓ = E_ANN,ℓ / B_ℓ, B_ℓ the consumer-side energy per unit rate
        lin, quad = sum(r.lin.values()), sum(r.quad.values())
        for key in ann:
            if r.role == "synaptic" and r.rate is not None:
                b = lin / r.rate if r.rate else sum(r.lin1.values())
                r.r_star[key] = r.ann[key] / b if b else math.inf
            elif r.role == "attention" and r.rate is not None:
                c = quad / r.rate ** 2 if r.rate else sum(r.quad1.values())
                r.r_star[key] = math.sqrt(r.ann[key] / c) if c else math.inf
    if "int8_naive" in ann:
        headline = break_even["int8_naive"]
    else:
        headline = next(iter(break_even.values()), None)
    return {
        "params": p.params(),
        "snn": {"total_pJ": total, "breakdown_pJ": totals, "rate_independent_pJ": A, "per_unit_rate_pJ": L1,
                "per_unit_rate_squared_pJ": Q1},
        "ann": {"int8_naive_pJ": ann.get("int8_naive"), "int8_reuse_pJ": ann.get("int8_reuse"),
                "fp32_naive_pJ": ann.get("fp32_naive"), "fp32_reuse_pJ": ann.get("fp32_reuse"),
                "qnn_equiv_pJ": ann.get("qnn_equiv_naive"), "qnn_equiv_reuse_pJ": ann.get("qnn_equiv_reuse")},
        "break_even": headline,
        "break_even_all": break_even,
        "rows": [{"name": r.name, "role": r.role, "input_type": r.input_type, "T": r.T, "rate": r.rate, "counts": r.counts,
                  "E_pJ": {**r.terms(), "total": r.total}, "rate_scaling_pJ": {"const": sum(r.const.values()),
                  "lin": sum(r.lin.values()), "quad": sum(r.quad.values())},
                  "ann_pJ": dict(r.ann), "r_star": dict(r.r_star)} for r in rows],
        "curve": {"A": A, "L": L1, "Q": Q1},
    }


def legacy45(report) -> dict:
    """The papers' estimate re-expressed as a profile: e_ac 0.9 and e_mac 4.6 (the report's own
    values), no memory, legacy counts (SOPs = rate·steps·FLOPs, first layer once). Its totals equal
    the legacy report's; it adds the uniform break-even rate E_MAC-rows + e_ac·r·Σ steps·FLOPs = ANN."""
    cfg = report.config
    rows, A, L = [], 0.0, 0.0
    for r in report.layers:
        if r.unit == "MAC":
            e = cfg.e_mac_pj * r.flops * (r.steps if cfg.first_layer_times_T else 1)
            A += e
            rows.append({"name": r.name, "role": "first", "E_pJ": {"compute": e, "total": e}})
        else:
            e = cfg.e_ac_pj * r.sops
            L += cfg.e_ac_pj * r.steps * r.flops
            rows.append({"name": r.name, "role": "synaptic", "rate": r.input_rate, "E_pJ": {"compute": e, "total": e}})
    total = sum(row["E_pJ"]["total"] for row in rows)
    ann = report.ann_energy_mJ * 1e9
    r_star = solve_break_even(A, L, 0.0, ann)
    return {"params": {"e_ac_pJ": cfg.e_ac_pj, "e_mac_pJ": cfg.e_mac_pj, "memory": "none", "counts": "legacy",
                       "first_layer_times_T": cfg.first_layer_times_T, "sources": {"e_ac_pJ": "H14 fp32 add",
                                                                                   "e_mac_pJ": "H14 fp32 mult + add"}},
            "snn": {"total_pJ": total, "breakdown_pJ": {"compute": total}},
            "ann": {"fp32_legacy_pJ": ann},
            "break_even": {"vs": "fp32_legacy", "uniform_rate": r_star,
                           "spikes_per_synapse": None if r_star is None else r_star * report.T,
                           "scale_margin": None, "status": _status(r_star, 1.0)},
            "rows": rows, "curve": {"A": A, "L": L, "Q": 0.0}}
