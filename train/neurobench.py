"""NeuroBench metrics (the definitions of NeuroBench 2.3.0) and the per-layer counts the
memory-aware energy model prices.

NeuroBench (Yik et al., "The neurobench framework for benchmarking neuromorphic computing
algorithms and systems", Nat. Commun. 2025) is not a dependency: its metrics are re-implemented
here with its keys, character for character, and its counting rules:

- ``SynapticOperations``: on every call of a connection layer (``nn.Linear``, ``nn.Conv1d/2d/3d``)
  the call is *spiking* iff every input entry is in {−1, 0, 1}. The layer is re-run with the input
  and the weights binarised (x̂ = 1[x ≠ 0], Ŵ = 1[W ≠ 0]) and no bias: the sum of that output,
  the number of (non-zero input, non-zero weight, in-bounds tap) triples, is an effective AC of a
  spiking call and an effective MAC otherwise. ``Dense`` is the same with all-ones input and
  weights, so the zero padding of a conv is not counted. Bias adds, pooling, normalisation and
  weightless products are not synaptic operations.
- ``ActivationSparsity``: 1 − non-zero outputs / outputs of every activation module (the spiking
  neurons, ``nn.ReLU``, ``nn.Sigmoid``), every call.
- ``MembraneUpdates``: step 0 counts every neuron, a later step the neurons whose stored membrane
  changed. Our neurons are multi-step and keep no per-step state, so the recurrence is recomputed
  in float64 from the recorded input with the neuron's own charge / fire / reset functions.
  The stored state is the post-reset membrane; snnTorch stores the pre-reset one, so a neuron that
  fires and returns to the same stored value counts differently there (a convention difference).
- Every count is per sample (divided by the batch size, never by T·B).

Extensions (``ext``, never mixed into those keys): the weightless attention products under the same
binarised-product rule (an operand that is spikes plays the weight), the ACs of single-amplitude
spikes {0, θ} (converted networks), the unrounded connection sparsity, dense membrane updates and
the deployed weight footprint at a chosen bit width.

How a model is read: connection layers and activations are found by type; a neuron is our
:class:`~spikeformers.models.neurons.LIF`, a SpikingJelly ``LIFNode``/``IFNode``, or any module that
declares ``neuron_model`` (``"if"``: integrate-and-fire with soft reset by its ``threshold``, input
``[T·B, …]`` with T in ``module.T``; ``"multi_threshold"``: one call per time step, the membrane
kept in ``module.v``); attention modules declare ``attention_product`` (see
docs/architecture.md). Layer input types (binary / integer / amplitude / real) are read from the
values each layer actually receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConnectionCounts", "NeuronCounts", "AttentionCounts", "Counts", "collect", "static_metrics",
           "neurobench_metrics", "NEUROBENCH_VERSION"]

NEUROBENCH_VERSION = "neurobench 2.3.0"
CONNECTIONS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
#: NeuroBench 2.3's cost in ops of one update of a neuron type ("Leaky": subtract and zero reset).
NEURON_OPS = {"lif": 4}


# --- static metrics ---------------------------------------------------------------------------


def static_metrics(model: nn.Module, deploy_bits: int = 8) -> dict:
    """ParameterCount, Footprint (bytes of parameters and buffers), ConnectionSparsity (zero
    entries of the connection layers' weights, rounded to 4 decimals as NeuroBench's code does) and
    the deployed footprint: weights at ``deploy_bits`` plus one bias per output channel after BN
    folding (32 bit)."""
    params = sum(p.numel() for p in model.parameters())
    footprint = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    zeros = total = 0
    deploy_bits_total = 0
    for m in model.modules():
        if isinstance(m, CONNECTIONS):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
            deploy_bits_total += m.weight.numel() * deploy_bits + m.weight.shape[0] * 32
    exact = zeros / total if total else 0.0
    return {"ParameterCount": params, "Footprint": footprint, "ConnectionSparsity": round(exact, 4),
            "connection_sparsity_exact": exact, "deploy_footprint_bytes": deploy_bits_total // 8}


# --- per-layer records --------------------------------------------------------------------------


@dataclass
class ConnectionCounts:
    """One connection layer, summed over calls and samples (divide by ``samples`` for per sample).

    ``n_in``/``n_out`` are elements per sample and step; ``steps`` how many steps the layer runs."""

    name: str
    kind: str                  # linear / conv
    kernel: tuple[int, ...]    # (1,) for linear
    stride: tuple[int, ...]
    groups: int
    c_in: int
    c_out: int
    params: int                # weight numel
    bias: bool                 # a bias after BN folding (own bias, or a BatchNorm right after)
    n_in: int = 0
    n_out: int = 0
    steps: int = 1
    types: set = field(default_factory=set)
    static_input: bool = True  # every step saw the same input (an image repeated over T)
    samples: int = 0
    effective_macs: float = 0.0
    effective_acs: float = 0.0
    effective_amplitude_acs: float = 0.0
    dense: float = 0.0
    z: float = 0.0             # input events: non-zero entries
    z_sum: float = 0.0         # Σ |x| (integer spike sums: one event per spike)
    s_eff: float = 0.0         # non-zero input × non-zero weight × in-bounds
    s_fan: float = 0.0         # non-zero input × in-bounds (every weight read before it is known zero)
    s_eff_sum: float = 0.0     # the same, each input weighted by its value
    s_fan_sum: float = 0.0
    dense_nonzero_w: float = 0.0  # all-ones input × non-zero weights: S_eff at rate 1
    max_value: float = 1.0
    batch: int = -1            # the batch being recorded, and the steps it has run so far: a model that
    steps_in_batch: int = 0    # calls a layer once per time step (ECMT's step-wise pass) adds them up

    @property
    def input_type(self) -> str:
        for kind in ("real", "integer", "amplitude"):
            if kind in self.types:
                return kind
        return "binary"

    @property
    def fan_in(self) -> int:
        return (self.c_in // self.groups) * math.prod(self.kernel)


@dataclass
class NeuronCounts:
    name: str
    model: str          # lif / if / relu / sigmoid
    n: int = 0          # neurons per sample and step
    steps: int = 1
    samples: int = 0
    spikes: float = 0.0
    outputs: float = 0.0
    updates: float = 0.0
    spiking: bool = True
    batch: int = -1
    steps_in_batch: int = 0


@dataclass
class AttentionCounts:
    """One weightless product of an attention module: ``s`` effective operations, events of the
    operand that is read per event (``z_a``) and of the other one (``z_b``)."""

    name: str
    product: str        # qk / av / kv / q_kv / sdsa_sum / q_sum
    tokens: int         # N
    dim: int            # D
    heads: int
    steps: int
    samples: int = 0
    s: float = 0.0
    dense: float = 0.0
    z_a: float = 0.0
    z_b: float = 0.0


@dataclass
class Counts:
    """Everything one pass over the data recorded, in execution order."""

    rows: list = field(default_factory=list)   # ConnectionCounts / NeuronCounts / AttentionCounts
    samples: int = 0
    T: int = 1

    def per_sample(self, value: float) -> float:
        return value / max(self.samples, 1)


# --- counting ---------------------------------------------------------------------------------


def _layout(x: torch.Tensor, T: int, B: int) -> tuple[torch.Tensor, int]:
    """[steps, B, -1] view of a layer input: T folded into the batch, time first, or no time."""
    if x.shape[0] == T * B:
        return x.reshape(T, B, -1), T
    if x.dim() >= 2 and x.shape[0] == T and x.shape[1] == B:
        return x.reshape(T, B, -1), T
    return x.reshape(1, x.shape[0], -1), 1


def _value_type(x: torch.Tensor) -> str:
    if bool(((x == 0) | (x == 1) | (x == -1)).all()):
        return "binary"
    nonzero = x[x != 0].abs()
    if nonzero.numel() and bool((nonzero == nonzero[0]).all()):
        return "amplitude"  # single-amplitude spikes {0, ±θ}: converted IF networks
    if bool((x == x.round()).all()) and bool((x >= 0).all()):
        return "integer"
    return "real"


def _conv_images(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The conv input as [images, C, *spatial] (a Conv1d may also see [C, L])."""
    spatial = module.weight.dim() - 2
    return x.reshape(-1, *x.shape[-(spatial + 1):])


def _binary_sum(module: nn.Module, x: torch.Tensor, w: torch.Tensor) -> float:
    """Σ of the layer applied, without bias, to input ``x`` and weights ``w``: with 0/1 operands the
    count of (input, weight, in-bounds tap) triples. Each conv output is a count ≤ fan-in · max|x|,
    exact in float32 (< 2**24), so the conv runs in float32 (several times faster on CPU than
    float64) and only the sum over outputs, which can exceed 2**24, is taken in float64."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, module.in_features).double().sum(0)  # [in]
        return float(rows @ w.double().sum(0))                      # Σ_i Σ_rows x_i · Σ_o w_oi
    fn = _CONV_FN[type(module)]
    out = fn(_conv_images(module, x).float(), w.float(), None, module.stride, module.padding, module.dilation, module.groups)
    return float(out.sum(dtype=torch.float64))


def _ones_per_group(module: nn.Module) -> tuple[torch.Tensor, int]:
    """All-ones weights with one output channel per group, and the factor C_out/g to scale by."""
    w = torch.ones(module.groups, *module.weight.shape[1:], dtype=torch.float32, device=module.weight.device)
    return w, module.out_channels // module.groups


class _Collector:
    def __init__(self, model: nn.Module, T: int | None, time_first: bool) -> None:
        self.model, self.T_fixed, self.time_first = model, T, time_first
        self.T, self.B, self.batch = T or 1, 1, -1
        self.rows: dict[str, object] = {}
        self.order: list[str] = []
        self.inputs: dict[int, torch.Tensor] = {}
        self.spikes: dict[str, torch.Tensor] = {}
        self.dense_cache: dict[tuple, tuple[float, float]] = {}
        self.hooks = [model.register_forward_pre_hook(self._model_input)]
        leaves = [(n, m) for n, m in model.named_modules() if not any(m.children())]
        follows_bn = {leaves[i][0] for i in range(len(leaves) - 1)
                      if isinstance(leaves[i + 1][1], nn.modules.batchnorm._BatchNorm)}
        for name, m in model.named_modules():
            if isinstance(m, CONNECTIONS):
                self.hooks.append(m.register_forward_hook(self._connection(name, name in follows_bn)))
            elif _neuron_model(m):
                self.hooks.append(m.register_forward_pre_hook(self._keep_input))
                self.hooks.append(m.register_forward_hook(self._neuron(name, _neuron_model(m))))
            elif getattr(m, "attention_product", None):
                kind = m.attention_product
                parts = ("q_lif", "k_lif", "attn_lif") if kind == "qk_token" else ("q_lif", "k_lif", "v_lif")
                for part in parts:
                    self.hooks.append(getattr(m, part).register_forward_hook(self._keep_spikes(f"{name}.{part}")))
                self.hooks.append(m.register_forward_hook(self._attention(name, kind)))

    # time layout of this batch
    def _model_input(self, model, args):
        x = args[0]
        T = self.T_fixed or getattr(model, "T", None) or 1
        sequence = self.time_first or x.dim() == 5
        self.batch += 1
        self.T = x.shape[0] if sequence else T
        self.B = x.shape[1] if sequence else x.shape[0]

    def _row(self, name: str, make):
        if name not in self.rows:
            self.rows[name] = make()
            self.order.append(name)
        return self.rows[name]

    def _connection(self, name: str, bn_after: bool):
        def hook(module, args, out):
            x = args[0].detach()
            view, steps = _layout(x, self.T, self.B)
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            kernel = (1,) if kind == "linear" else tuple(module.kernel_size)
            stride = (1,) if kind == "linear" else tuple(module.stride)
            c_in = module.in_features if kind == "linear" else module.in_channels
            c_out = module.out_features if kind == "linear" else module.out_channels
            groups = 1 if kind == "linear" else module.groups
            row = self._row(name, lambda: ConnectionCounts(name, kind, kernel, stride, groups, c_in, c_out,
                                                           module.weight.numel(), module.bias is not None or bn_after))
            out_view, _ = _layout(out.detach(), self.T, self.B)
            row.n_in, row.n_out, row.steps = view.shape[-1], out_view.shape[-1], _steps(row, self.batch, steps)
            value_type = _value_type(x)
            row.types.add(value_type)
            if steps > 1 and not bool((view == view[:1]).all()):
                row.static_input = False
            xd = x.double()
            xb = (x != 0).float()
            wb = (module.weight.detach() != 0).float()
            ones_w, per_group = (torch.ones_like(wb), 1) if kind == "linear" else _ones_per_group(module)
            eff = _binary_sum(module, xb, wb)
            fan = _binary_sum(module, xb, ones_w) * per_group
            # all-ones input: the same for every image, so computed on one and scaled
            images = xb.numel() // module.in_features if kind == "linear" else _conv_images(module, xb).shape[0]
            key = (id(module), tuple(xb.shape[-(wb.dim() - 1):]) if kind == "conv" else module.in_features)
            if key not in self.dense_cache:
                one = torch.ones(1, *key[1], dtype=torch.float32, device=xb.device) if kind == "conv" \
                    else torch.ones(1, module.in_features, dtype=torch.float32, device=xb.device)
                self.dense_cache[key] = (_binary_sum(module, one, ones_w) * per_group, _binary_sum(module, one, wb))
            dense, dense_nzw = (v * images for v in self.dense_cache[key])
            if value_type == "binary":
                row.effective_acs += eff
            else:
                row.effective_macs += eff
            if value_type in ("binary", "amplitude"):
                row.effective_amplitude_acs += eff
            row.dense += dense
            row.dense_nonzero_w += dense_nzw
            row.z += float(xb.sum(dtype=torch.float64))
            row.s_eff += eff
            row.s_fan += fan
            if value_type == "integer":
                xa = xd.abs()
                row.z_sum += float(xa.sum())
                row.s_eff_sum += _binary_sum(module, xa, wb)
                row.s_fan_sum += _binary_sum(module, xa, ones_w) * per_group
                row.max_value = max(row.max_value, float(xa.max()))
            else:
                row.z_sum += float(xb.sum(dtype=torch.float64))
                row.s_eff_sum += eff
                row.s_fan_sum += fan
            row.samples += self.B
        return hook

    def _keep_input(self, module, args):
        state = getattr(module, "v", None) if getattr(module, "neuron_model", None) == "multi_threshold" else None
        self.inputs[id(module)] = (args[0].detach(), None if state is None else state.clone())

    def _neuron(self, name: str, model_kind: str):
        def hook(module, args, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            x, state_before = self.inputs.pop(id(module))
            stateful = model_kind in ("lif", "if", "multi_threshold")
            row = self._row(name, lambda: NeuronCounts(name, model_kind, spiking=stateful))
            if model_kind == "multi_threshold":  # one call per time step, membrane kept in ``module.v``
                row.n = out[0].numel() if out.dim() > 1 else out.numel()
                first = row.batch != self.batch
                row.steps = _steps(row, self.batch, 1)
                row.updates += float(module.v.numel()) if first or state_before is None \
                    else float((module.v != state_before).sum())
            elif not stateful:  # an activation without membrane state (ReLU, a stateless count)
                view, steps = _layout(out.detach(), self.T, self.B)
                row.n, row.steps = view.shape[-1], _steps(row, self.batch, steps)
            else:
                seq = _time_first(module, x, self.T)
                row.n, row.steps = seq[0, 0].numel() if seq.dim() > 2 else seq.shape[-1], seq.shape[0]
                row.updates += _membrane_updates(module, model_kind, seq)
            row.spikes += float((out != 0).sum())
            row.outputs += out.numel()
            row.samples += self.B
        return hook

    def _keep_spikes(self, name: str):
        def hook(module, args, out):
            self.spikes[name] = out.detach()
        return hook

    def _attention(self, name: str, kind: str):
        def hook(module, args, out):
            if kind == "qk_token":
                q, k, _ = (self.spikes.pop(f"{name}.{p}") for p in ("q_lif", "k_lif", "attn_lif"))
                v = None
            else:
                q, k, v = (self.spikes.pop(f"{name}.{p}") for p in ("q_lif", "k_lif", "v_lif"))
            tokens_last = q.dim() == 4 and getattr(module, "tokens_last", False)
            heads = getattr(module, "num_heads", 1) or 1
            qh, kh = _heads(q, heads, tokens_last), _heads(k, heads, tokens_last)  # [T, B, h, N, d]
            steps, _, h, N, d = qh.shape
            D = h * d
            qb, kb = (qh != 0).double(), (kh != 0).double()

            def add(product, s, dense, z_a, z_b):
                row = self._row(f"{name}.{product}", lambda: AttentionCounts(f"{name}.{product}", product, N, D, h, steps))
                row.s += s
                row.dense += dense * self.B
                row.z_a += z_a
                row.z_b += z_b
                row.samples += self.B

            if kind == "qk_token":  # Σ_d q per token: one add per q spike; mask ⊙ k is masking
                add("q_sum", float(qb.sum()), steps * N * D, float(qb.sum()), 0.0)
                return
            vb = (_heads(v, heads, tokens_last) != 0).double()
            if kind == "sdsa":  # Σ_N (K ⊙ V): one add per non-zero of K ⊙ V; the ANDs count 0
                add("sdsa_sum", float((kb * vb).sum()), steps * N * D, float(kb.sum() + vb.sum()), float(qb.sum()))
                return
            if kind == "ssa_q_kv" or getattr(module, "order", None) == "q_kv_scale":  # Q·(Kᵀ·V)
                s_kv = float((kb.sum(-1) * vb.sum(-1)).sum())        # Σ_n (Σ_c k_nc)(Σ_e v_ne)
                kv = (kb.transpose(-1, -2) @ vb) != 0                # [.., d, d]
                s_q = float((qb.sum(-2) * kv.double().sum(-1)).sum())  # Σ_c colsum(q)_c · rowsum(KV)_c
                add("kv", s_kv, steps * N * D * d, float(kb.sum()), float(vb.sum()))
                add("q_kv", s_q, steps * N * D * d, float(qb.sum()), 0.0)
                return
            s_qk = float((qb.sum(-2) * kb.sum(-2)).sum())            # Σ_c colsum(q)_c · colsum(k)_c
            scores = (qb @ kb.transpose(-1, -2)) != 0                # [.., N, N]
            s_av = float((scores.double().sum(-2) * vb.sum(-1)).sum())  # Σ_j (Σ_i 1[s_ij]) (Σ_c v_jc)
            add("qk", s_qk, steps * N * N * D, float(qb.sum()), float(kb.sum()))
            add("av", s_av, steps * N * N * D, float(vb.sum()), 0.0)
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def _steps(row, batch: int, steps: int) -> int:
    """The steps ``row`` has run in this batch, this call's ``steps`` included."""
    if row.batch != batch:
        row.batch, row.steps_in_batch = batch, 0
    row.steps_in_batch += steps
    return row.steps_in_batch


def _heads(x: torch.Tensor, heads: int, tokens_last: bool) -> torch.Tensor:
    """Spikes [T, B, N, C] (tokens last) or [T, B, C, *spatial] -> [T, B, h, N, d]."""
    T, B = x.shape[:2]
    if tokens_last:
        N, C = x.shape[2], x.shape[3]
        return x.reshape(T, B, N, heads, C // heads).permute(0, 1, 3, 2, 4)
    C = x.shape[2]
    tokens = x.reshape(T, B, C, -1)
    return tokens.reshape(T, B, heads, C // heads, -1).transpose(-1, -2)


def _neuron_model(m: nn.Module) -> str | None:
    """"lif" / "if" for a spiking neuron, "relu" / "sigmoid" for NeuroBench's default activations."""
    from spikeformers.models.neurons import LIF

    declared = getattr(m, "neuron_model", None)
    if isinstance(declared, str):
        return declared
    if isinstance(m, LIF):
        return "lif"
    try:
        from spikingjelly.activation_based.neuron import IFNode, LIFNode
    except ImportError:  # pragma: no cover - a pinned dependency
        IFNode = LIFNode = ()
    if isinstance(m, LIFNode):
        return "lif"
    if isinstance(m, IFNode):
        return "if"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.Sigmoid):
        return "sigmoid"
    return None


def _time_first(module: nn.Module, x: torch.Tensor, T: int) -> torch.Tensor:
    """The neuron's input as [T, B, ...]: multi-step neurons get it time first; a neuron that
    declares its own ``T`` (converted IF layers) gets it folded [T·B, ...]."""
    own_T = getattr(module, "T", None)
    if getattr(module, "neuron_model", None) and isinstance(own_T, int):
        return x.reshape(own_T, -1, *x.shape[1:])
    if getattr(module, "step_mode", "m") == "s":
        return x.unsqueeze(0)
    return x


def _membrane_updates(module: nn.Module, kind: str, x_seq: torch.Tensor) -> float:
    """numel(V_0) + Σ_{t≥1} count(V_t ≠ V_{t−1}), V the stored (post-reset) membrane, recomputed in
    float64 with the neuron's own phase functions."""
    from spikeformers.models import neurons

    x = x_seq.double()
    v_th = float(getattr(module, "v_threshold", 0.0) or 0.0)
    if kind == "lif":
        tau = float(module.tau)
        v_reset = getattr(module, "v_reset", 0.0)
        v = torch.zeros_like(x[0]) if v_reset is None else torch.full_like(x[0], float(v_reset))
        charge = (lambda x_t, v: neurons.charge(x_t, v, tau, float(v_reset or 0.0))) if getattr(module, "decay_input", True) \
            else (lambda x_t, v: v - (v - float(v_reset or 0.0)) / tau + x_t)
    else:
        theta = getattr(module, "threshold", None)
        if theta is not None:  # converted IF (QCFS): v(0) = θ/2, spikes of amplitude θ, soft reset
            v_th = float(theta)
            v = torch.full_like(x[0], v_th / 2)
            v_reset = None
        else:
            v_reset = getattr(module, "v_reset", 0.0)
            v = torch.zeros_like(x[0]) if v_reset is None else torch.full_like(x[0], float(v_reset))
        charge = lambda x_t, v: v + x_t  # noqa: E731
    updates = 0.0
    for t in range(x.shape[0]):
        h = charge(x[t], v)
        spike = neurons.fire(h, v_th)
        new = h - spike.double() * v_th if v_reset is None else neurons.reset(h, spike, float(v_reset))
        updates += float(new.numel()) if t == 0 else float((new != v).sum())
        v = new
    return updates


def collect(model: nn.Module, batches, T: int | None = None, time_first: bool = False) -> Counts:
    """Run ``model`` (eval mode, no grad) over ``batches`` and record every layer's counts.

    ``T``: time steps (default ``model.T``); ``time_first``: inputs are [T, B, ...] sequences
    (5-D inputs are always read as sequences)."""
    collector = _Collector(model, T, time_first)
    was_training = model.training
    model.eval()
    samples = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                samples += collector.B
    finally:
        collector.remove()
        model.train(was_training)
    return Counts([collector.rows[n] for n in collector.order], samples, collector.T)


def neurobench_metrics(model: nn.Module, counts: Counts) -> dict:
    """The NeuroBench keys (per sample) plus ``ext`` and one entry per recorded layer."""
    per = counts.per_sample
    conns = [r for r in counts.rows if isinstance(r, ConnectionCounts)]
    neurons = [r for r in counts.rows if isinstance(r, NeuronCounts)]
    attention = [r for r in counts.rows if isinstance(r, AttentionCounts)]
    static = static_metrics(model)
    outputs = sum(r.outputs for r in neurons)
    nonzero = sum(r.spikes for r in neurons)
    spiking = [r for r in neurons if r.spiking]
    updates = per(sum(r.updates for r in spiking))
    lif_only = spiking and all(r.model in NEURON_OPS for r in spiking)
    layers = []
    for r in counts.rows:
        if isinstance(r, ConnectionCounts):
            layers.append({"name": r.name, "kind": "connection", "call_type": "AC" if r.input_type == "binary" else "MAC",
                           "Effective_MACs": per(r.effective_macs), "Effective_ACs": per(r.effective_acs),
                           "Dense": per(r.dense), "sparsity": None, "membrane_updates": None})
        elif isinstance(r, NeuronCounts):
            layers.append({"name": r.name, "kind": "neuron", "call_type": None, "Effective_MACs": None,
                           "Effective_ACs": None, "Dense": None, "sparsity": 1 - r.spikes / max(r.outputs, 1),
                           "membrane_updates": per(r.updates) if r.spiking else None})
        else:
            layers.append({"name": r.name, "kind": "attention", "call_type": "AC", "Effective_MACs": 0.0,
                           "Effective_ACs": per(r.s), "Dense": per(r.dense), "sparsity": None, "membrane_updates": None})
    return {
        "version_reference": NEUROBENCH_VERSION,
        "ParameterCount": static["ParameterCount"],
        "Footprint": static["Footprint"],
        "ConnectionSparsity": static["ConnectionSparsity"],
        "ActivationSparsity": 1 - nonzero / outputs if outputs else 0.0,
        "ActivationSparsityByLayer": {r.name: 1 - r.spikes / max(r.outputs, 1) for r in neurons},
        "SynapticOperations": {"Effective_MACs": per(sum(r.effective_macs for r in conns)),
                               "Effective_ACs": per(sum(r.effective_acs for r in conns)),
                               "Dense": per(sum(r.dense for r in conns))},
        "MembraneUpdates": updates,
        "NeuronOperations": ({"Effective Neuron Ops": updates * 4,
                              "Neuron Dense Ops": sum(r.n * r.steps for r in spiking) * 4}
                             if lif_only else None),
        "ext": {
            "MembraneUpdates_dense": sum(r.n * r.steps for r in spiking),
            "attention_synops": {"Effective_MACs": 0.0, "Effective_ACs": per(sum(r.s for r in attention)),
                                 "Dense": per(sum(r.dense for r in attention))},
            "effective_acs_amplitude": per(sum(r.effective_amplitude_acs for r in conns)),
            "connection_sparsity_exact": static["connection_sparsity_exact"],
            "deploy_footprint_bytes": static["deploy_footprint_bytes"],
        },
        "layers": layers,
    }
