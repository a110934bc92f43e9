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
docs/architecture.md), a stateful product module ``attention_product = "at_neuron"`` (ECMT's
AtNeuron). A neuron driven step by step outside its forward (AT-SNN) reports its computed rows with
``module.step_membrane = (v_before, v_after, neurons per sample)``, and a layer or attention module
called on a subset of tokens carries ``step_tokens`` [B, n]. Layer input types (binary / integer / amplitude / real) are read from the
values each layer actually receives.

Beyond NeuroBench (which counts none of them), the pass also records what the memory-aware model
prices as rows of their own, again without naming a model family:

- residual adds: a ``+`` between two same-shaped feature tensors (3-D or more, no parameter)
  that a block executes in its own ``forward``, seen by a ``TorchFunctionMode`` while the pass runs
  (adds inside leaf modules, neurons, and helpers that hold no connection layer are their own
  business); spike + spike or real + real is read from the operands' values;
- pooling: ``nn.AvgPool*``/``nn.MaxPool*``/``nn.AdaptiveAvgPool*``/``nn.AdaptiveMaxPool*`` by type,
  and a ``mean`` over feature dimensions (not over time or batch) executed in a forward, which is
  how the heads average tokens;
- BatchNorm: a BN folds into the connection layer whose output it reads directly (a view of the
  same storage), or into a BN that does; any other BN (on spikes, after a nonlinearity) is
  *unfolded*, a per-element multiply-add at inference. Followed through the actual data flow,
  not module order;
- merged conv chains: a module's ``merged_conv()`` view (SDT v2's RepConv and SepConv) gives the
  one k×k conv its ANN counterpart is priced as.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ConnectionCounts", "NeuronCounts", "AttentionCounts", "ResidualCounts", "PoolCounts", "NormCounts",
           "Counts", "collect", "static_metrics", "neurobench_metrics", "NEUROBENCH_VERSION"]

NEUROBENCH_VERSION = "neurobench 2.3.0"
CONNECTIONS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
POOLS = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
         nn.modules.pooling._AdaptiveMaxPoolNd)
_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
         torch.Tensor.__iadd__}
_MEANS = {torch.mean, torch.Tensor.mean}
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
    bias: bool                 # a bias after BN folding (own bias, or a BatchNorm that reads its output)
    own_bias: bool = False     # the layer's own bias (what is left when BNs are priced unfolded)
    n_in: int = 0
    n_out: int = 0
    steps: int = 1
    types: set = field(default_factory=set)
    static_input: bool = True  # every step saw the same input (an image repeated over T)
    count_input: bool = False  # fed S/n by a spike-count neuron: S spikes per entry (an event-driven chip runs S ACs)
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
    model: str          # lif / if / multi_threshold / count / relu / sigmoid
    n: int = 0          # neurons per sample and step
    steps: int = 1
    samples: int = 0
    spikes: float = 0.0  # non-zero outputs (NeuroBench's activations)
    outputs: float = 0.0
    updates: float = 0.0
    spiking: bool = True
    batch: int = -1
    steps_in_batch: int = 0
    events: float | None = None  # spikes emitted, Σ S for a spike-count neuron; None: ``spikes``
    levels: int = 1              # the most spikes a neuron emits per step (D of a spike-count neuron)


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
    s_macs: float = 0.0  # the part of ``s`` with no spike-valued operand (ECMT's graded products): MACs
    batch: int = -1             # the batch of the last call (modules run one step per call)
    steps_in_batch: int = 0
    token_steps: float = 0.0    # Σ tokens present over the steps (AT-SNN's halting)


@dataclass(kw_only=True)
class _OpTally:
    """What every row outside the synapses keeps: steps per sample in a batch, samples, and the
    value types of its inputs (binary / integer / amplitude / real), read from the values seen."""

    steps: int = 1
    samples: int = 0
    types: set = field(default_factory=set)
    batch: int = -1
    steps_in_batch: int = 0

    @property
    def input_type(self) -> str:
        """"real" if any input was real (a membrane shortcut, a real map), else "spikes" (spike or
        integer spike-count tensors, taken event by event)."""
        return "real" if "real" in self.types else "spikes"


@dataclass
class ResidualCounts(_OpTally):
    """One residual add ``a + b`` a block executes, summed over calls: ``n`` elements per sample and
    step, ``z_a``/``z_b`` the non-zero entries of the operands, ``types`` their value types."""

    name: str
    n: int = 0
    z_a: float = 0.0
    z_b: float = 0.0


@dataclass
class PoolCounts(_OpTally):
    """One pooling: ``op`` avg / max / mean (a token or spatial average in a forward, e.g. a
    classifier head's), ``window`` inputs per output, ``z``/``z_out`` non-zero inputs/outputs."""

    name: str
    op: str
    window: int = 1
    n_in: int = 0
    n_out: int = 0
    z: float = 0.0
    z_out: float = 0.0


@dataclass
class NormCounts(_OpTally):
    """One BatchNorm: ``folded`` into connection layer ``into`` (its output read directly), else
    unfolded (applied to spikes or after a nonlinearity): a multiply-add per element at inference."""

    name: str
    channels: int
    folded: bool
    into: str | None = None
    n: int = 0

    @property
    def input_type(self) -> str:
        for kind in ("real", "integer", "amplitude"):
            if kind in self.types:
                return kind
        return "binary"


@dataclass
class Counts:
    """Everything one pass over the data recorded, in execution order."""

    rows: list = field(default_factory=list)   # Connection / Neuron / Attention / Residual / Pool / NormCounts
    samples: int = 0
    T: int = 1
    #: {module: {kernel, c_in, c_out, n_in, n_out, dense, weights, members}}: linear conv chains that
    #: re-parameterise into one k×k conv (``merged_conv()``), per sample and pass; ``members`` are
    #: the connection layers executed in its place
    merged: dict = field(default_factory=dict)

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
    fn = next(f for cls, f in _CONV_FN.items() if isinstance(module, cls))  # subclasses too (SpikingJelly's layer.Conv2d)
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
        # data flow: storage of the outputs of connection layers and of the BNs folded into them
        self.produced: dict[int, tuple[weakref.ref, str]] = {}
        # storage of tensors known to be real-valued streams (outputs of connection layers, BNs, real
        # adds and pools): a constant BN output reads as spikes by its values alone, its origin says real
        self.reals: dict[int, weakref.ref] = {}
        self.merged: dict[str, dict] = {}
        self._track_modules(model)
        for at, (shape, members) in _merged_chains(model).items():
            self.hooks.append(model.get_submodule(at).register_forward_hook(self._quiet(self._merged(at, shape, members))))
        for name, m in model.named_modules():
            if isinstance(m, CONNECTIONS):
                self.hooks.append(m.register_forward_hook(self._quiet(self._connection(name))))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.hooks.append(m.register_forward_hook(self._quiet(self._norm(name))))
            elif isinstance(m, POOLS):
                self.hooks.append(m.register_forward_hook(self._quiet(self._pool(name))))
            elif _neuron_model(m):
                self.hooks.append(m.register_forward_pre_hook(self._quiet(self._keep_input)))
                self.hooks.append(m.register_forward_hook(self._quiet(self._neuron(name, _neuron_model(m)))))
                if getattr(m, "neuron_model", None) == "count":  # the layers it feeds count Σ S spikes
                    self.hooks.append(m.register_forward_hook(tag_spike_counts))
            elif getattr(m, "attention_product", None):
                kind = m.attention_product
                parts = ("q_lif", "k_lif", "attn_lif") if kind == "qk_token" else ("q_lif", "k_lif", "v_lif")
                for part in parts:
                    self.hooks.append(getattr(m, part).register_forward_hook(self._quiet(self._keep_spikes(f"{name}.{part}"))))
                self.hooks.append(m.register_forward_hook(self._quiet(self._attention(name, kind))))

    # time layout of this batch
    def _model_input(self, model, args):
        x = args[0]
        T = self.T_fixed or getattr(model, "T", None) or 1
        sequence = self.time_first or x.dim() == 5
        self.batch += 1
        self.T = x.shape[0] if sequence else T
        self.B = x.shape[1] if sequence else x.shape[0]
        self.produced.clear()
        self.reals.clear()

    def _quiet(self, hook):
        """``hook`` with the operation watcher off: the counting arithmetic is not the model's."""
        def quiet(*args):
            self.internal += 1
            try:
                return hook(*args)
            finally:
                self.internal -= 1
        return quiet

    # --- where an operation runs: the module stack ---

    def _track_modules(self, model: nn.Module) -> None:
        """Pre/post hooks on every module keep the stack of running modules, so that the operation
        watcher knows which forward executes an add or a mean. Ops are watched only in modules
        that hold a connection layer (blocks, stages, the model), never inside a leaf module, a
        neuron, or a helper without connections (a neuron's or an accumulator's own arithmetic)."""
        self.stack: list[tuple[str, nn.Module]] = []
        self.opaque = self.internal = 0
        self.op_index: dict[str, int] = {}
        self.opaque_ids, self.block_ids = set(), set()
        for name, m in model.named_modules():
            if not any(m.children()) or _neuron_model(m):
                self.opaque_ids.add(id(m))
            if any(isinstance(c, CONNECTIONS) for c in m.modules()):
                self.block_ids.add(id(m))
            self.hooks.append(m.register_forward_pre_hook(self._enter(name)))
            self.hooks.append(m.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(module, args):
            self.stack.append((name, module))
            self.op_index[name] = 0  # the n-th add / mean of one call of this module
            if id(module) in self.opaque_ids:
                self.opaque += 1
        return hook

    def _leave(self, module, args, out):
        if self.stack and self.stack[-1][1] is module:
            self.stack.pop()
            if id(module) in self.opaque_ids:
                self.opaque -= 1

    def _op_site(self) -> str | None:
        """The name of the block whose own forward is executing, or None when ops are not watched."""
        if self.opaque or self.internal or not self.stack or id(self.stack[-1][1]) not in self.block_ids:
            return None
        return self.stack[-1][0]

    def _op_name(self, site: str, op: str) -> str:
        i = self.op_index.get(site, 0)
        self.op_index[site] = i + 1
        return f"{site}.{op}{i}" if site else f"{op}{i}"

    def mark_real(self, t: torch.Tensor) -> None:
        self.reals[t.untyped_storage().data_ptr()] = weakref.ref(t)

    def _type_of(self, t: torch.Tensor) -> str:
        """The value type of ``t``, "real" whatever its values if it comes from a layer or a real op."""
        ref = self.reals.get(t.untyped_storage().data_ptr())
        return "real" if ref is not None and ref() is not None else _value_type(t)

    def residual_add(self, a: torch.Tensor, b: torch.Tensor, out_shape) -> bool | None:
        """Record ``a + b`` (called by the watcher before the add runs: an in-place add changes a);
        returns whether the sum is a real stream (None: not a residual add)."""
        site = self._op_site()
        if site is None or len(out_shape) < 3 or a.shape != out_shape or b.shape != out_shape:
            return None
        if isinstance(a, nn.Parameter) or isinstance(b, nn.Parameter):  # a position embedding, not a shortcut
            return None
        a, b = a.detach(), b.detach()
        name = self._op_name(site, "add")
        row = self._row(name, lambda: ResidualCounts(name))
        view, steps = _layout(a, self.T, self.B)
        row.n, row.steps = view.shape[-1], _steps(row, self.batch, steps)
        types = (self._type_of(a), self._type_of(b))
        row.types.update(types)
        row.z_a += float((a != 0).sum())
        row.z_b += float((b != 0).sum())
        row.samples += self.B
        return "real" in types

    def mean(self, x: torch.Tensor, dims, out: torch.Tensor) -> None:
        """Record a mean over feature dimensions (a global average); means over time or batch
        (the readout's average of the logits over T) are not pooling."""
        site = self._op_site()
        if site is None or dims is None or x.dim() < 3:
            return
        lead = 2 if (x.shape[0] == self.T and x.shape[1] == self.B) else (1 if x.shape[0] in (self.T * self.B, self.B) else None)
        dims = [d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims)]
        if lead is None or not dims or min(dims) < lead:
            return
        name = self._op_name(site, "mean")
        row = self._row(name, lambda: PoolCounts(name, "mean"))
        view, steps = _layout(x, self.T, self.B)
        out_view, _ = _layout(out, self.T, self.B)
        if self._pooled(row, x, view, out_view, steps):
            self.mark_real(out)

    def _pooled(self, row, x, view, out_view, steps) -> bool:
        row.n_in, row.n_out, row.steps = view.shape[-1], out_view.shape[-1], _steps(row, self.batch, steps)
        row.window = max(row.n_in // max(row.n_out, 1), 1) if row.op == "mean" else row.window
        kind = self._type_of(x)
        row.types.add(kind)
        row.z += float((x != 0).sum())
        row.z_out += float((out_view != 0).sum())
        row.samples += self.B
        return kind == "real" or row.op != "max"  # an average is real-valued

    def _pool(self, name: str):
        def hook(module, args, out):
            x = args[0].detach()
            adaptive = isinstance(module, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd))
            op = "max" if isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)) else "avg"
            row = self._row(name, lambda: PoolCounts(name, op))
            if not adaptive:  # window volume: kernel_size is an int (every spatial dim) or a tuple
                k = module.kernel_size
                dims = {"1d": 1, "2d": 2, "3d": 3}[type(module).__name__[-2:].lower()]
                row.window = math.prod(k) if isinstance(k, (tuple, list)) else k ** dims
            view, steps = _layout(x, self.T, self.B)
            out_view, _ = _layout(out.detach(), self.T, self.B)
            if self._pooled(row, x, view, out_view, steps):
                self.mark_real(out)
            if adaptive:
                row.window = max(row.n_in // max(row.n_out, 1), 1)
        return hook

    # --- BatchNorm: folded into the layer whose output it reads, or not ---

    def _produce(self, out: torch.Tensor, into: str) -> None:
        self.produced[out.untyped_storage().data_ptr()] = (weakref.ref(out), into)

    def _norm(self, name: str):
        def hook(module, args, out):
            x = args[0]
            entry = self.produced.get(x.untyped_storage().data_ptr())
            # a live producer with the same storage: x is its output or a view of it (a dead one
            # means the memory was reused by another tensor)
            into = entry[1] if entry is not None and entry[0]() is not None else None
            row = self._row(name, lambda: NormCounts(name, module.num_features, into is not None, into))
            if into is None:
                row.folded, row.into = False, None
            else:
                self.rows[into].bias = True
                self._produce(out, into)
            view, steps = _layout(x.detach(), self.T, self.B)
            row.n, row.steps = view.shape[-1], _steps(row, self.batch, steps)
            row.types.add(self._type_of(x))
            self.mark_real(out)
            row.samples += self.B
        return hook

    def _merged(self, at: str, shape: tuple[int, int, int], members: list[str]):
        """The chain's input and output sizes, and the in-bounds taps of the one k×k conv (stride 1,
        padding k//2: the size-preserving conv these chains re-parameterise into)."""
        def hook(module, args, out):
            if at in self.merged:
                return
            x = args[0]
            kernel, c_in, c_out = shape
            spatial = tuple(x.shape[-2:])
            ones = torch.ones(1, 1, *spatial)
            taps = float(F.conv2d(ones, torch.ones(1, 1, kernel, kernel), padding=kernel // 2).sum())
            self.merged[at] = {"kernel": kernel, "c_in": c_in, "c_out": c_out, "n_in": c_in * math.prod(spatial),
                               "n_out": c_out * math.prod(out.shape[-2:]), "dense": taps * c_in * c_out,
                               "weights": kernel * kernel * c_in * c_out, "members": members}
        return hook

    def _row(self, name: str, make):
        if name not in self.rows:
            self.rows[name] = make()
            self.order.append(name)
        return self.rows[name]

    def _connection(self, name: str):
        def hook(module, args, out):
            self._produce(out, name)
            self.mark_real(out)
            x = args[0].detach()
            view, steps = _layout(x, self.T, self.B)
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            kernel = (1,) if kind == "linear" else tuple(module.kernel_size)
            stride = (1,) if kind == "linear" else tuple(module.stride)
            c_in = module.in_features if kind == "linear" else module.in_channels
            c_out = module.out_features if kind == "linear" else module.out_channels
            groups = 1 if kind == "linear" else module.groups
            own_bias = module.bias is not None
            row = self._row(name, lambda: ConnectionCounts(name, kind, kernel, stride, groups, c_in, c_out,
                                                           module.weight.numel(), own_bias, own_bias))
            out_view, _ = _layout(out.detach(), self.T, self.B)
            row.n_in, row.n_out, row.steps = view.shape[-1], out_view.shape[-1], _steps(row, self.batch, steps)
            tokens = getattr(module, "step_tokens", None)  # a step on the running rows only: [1, K, C] of [B, n] slots
            if tokens is not None:
                k = max(int(tokens.sum()), 1)
                row.n_in, row.n_out = x.numel() // k * tokens.shape[1], out.numel() // k * tokens.shape[1]
            value_type = event_type = _value_type(x)  # NeuroBench's reading of the values as they are
            unit = spike_count_unit(x)
            if unit is not None:  # S/n from a spike-count neuron: S spikes per entry (E-SpikeFormer)
                x = (x.plain().detach() * unit).round()
                event_type = "integer" if float(x.max()) > 1 else "binary"
                row.count_input = True
            row.types.add(event_type)
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
            if event_type == "integer":
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
        """Hook of a neuron. Two declared ways of running one time step per call are counted too:

        - a neuron driven step by step outside its own forward (AT-SNN's token halting) reports
          only the rows it computed, with ``module.step_membrane`` = (their membrane before the
          step, after it, the layer's neurons per sample) set during the call. Only those rows
          count: all of them at the layer's first step in the batch, later the ones whose stored
          membrane changed; ``steps`` is then the mean number of steps a neuron ran, so that
          n·steps is the neuron-steps actually computed;
        - a weightless product with state, called once per step with its two spiking operands
          (``attention_product = "at_neuron"``, ECMT's AtNeuron), is an attention row: the binarised
          products A_t·B_t, A_t·S_B(t) and S_A(t)·B_t (S the operand sums through step t, as the
          module keeps them), each an AC if one of its operands is spike-valued {−a, 0, a}, else a
          MAC (``s_macs``); Dense is the same three products with all-ones operands."""
        def at_neuron(module, args):
            from spikeformers.models.ecmt import binary_product_ops

            a, b = args[0].detach(), args[1].detach()  # [..., N, d] and [..., d, M]
            sum_a, sum_b = module.sum_a.detach(), module.sum_b.detach()
            # spike-valued: {0, ±1} or one amplitude {0, ±θ}
            spikes_a, spikes_b = (_value_type(t) in ("binary", "amplitude") for t in (a, b))
            terms = ((a, b, spikes_a or spikes_b), (a, sum_b, spikes_a), (sum_a, b, spikes_b))
            ops = [(float(binary_product_ops(x, y)), ac) for x, y, ac in terms]
            product = getattr(module, "product_kind", "qk")
            heads = a.shape[1] if a.dim() == 4 else 1
            d = a.shape[-1] if product == "qk" else b.shape[-1]
            row = self._row(name, lambda: AttentionCounts(name, product, a.shape[-2], heads * d, heads, 1))
            row.steps = _steps(row, self.batch, 1)  # the steps it ran in this batch
            row.s += sum(s for s, _ in ops)
            row.s_macs += sum(s for s, ac in ops if not ac)
            row.dense += 3.0 * a.numel() * b.shape[-1]
            row.z_a += float((a != 0).sum())
            row.z_b += float((b != 0).sum())
            row.samples += self.B

        def hook(module, args, out):
            if model_kind == "at_neuron":
                self.inputs.pop(id(module), None)
                at_neuron(module, args)
                return
            out = out[0] if isinstance(out, (tuple, list)) else out
            x, state_before = self.inputs.pop(id(module))
            stateful = model_kind in ("lif", "if", "multi_threshold")
            row = self._row(name, lambda: NeuronCounts(name, model_kind, spiking=stateful))
            step = getattr(module, "step_membrane", None)
            if step is not None:  # one step on the rows it computed (token halting)
                before, after, neurons = step
                if row.batch != self.batch:  # the layer's first step in this batch: every row is updated
                    row.batch, row.steps_in_batch = self.batch, 0
                    row.samples += self.B
                    row.updates += float(after.numel())
                else:
                    row.updates += float((after != before).sum())
                row.steps_in_batch += 1
                row.n = max(row.n, neurons)
                row.spikes += float((out != 0).sum())
                row.outputs += out.numel()
                row.steps = row.outputs / (row.samples * row.n)  # mean steps per neuron
                return
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
            if model_kind == "count":  # S/n out, S spikes each (n = D, or 1 for a raw-count head)
                unit = _count_unit(module)
                row.levels = module.max_spike_count
                row.events = (row.events or 0.0) + float((out.detach().double() * unit).round().sum())
            row.outputs += out.numel()
            row.samples += self.B
        return hook

    def _keep_spikes(self, name: str):
        def hook(module, args, out):
            self.spikes[name] = out.detach()
        return hook

    def _attention(self, name: str, kind: str):
        """Hook of an attention module, after its q/k/v (or q/k/attn) neurons ran. A module whose
        neurons ran one step on a subset of tokens (AT-SNN's halting) sets ``step_tokens`` [B, n]
        (bool) during the call; its neurons reported the computed rows in the order of
        ``step_tokens.nonzero()``. Then the products run over the tokens present: halted tokens
        are empty rows, Dense counts n_b present tokens per sample (n_b²·D for Q·Kᵀ and ·V), and
        ``steps`` is the mean number of steps a token ran."""
        def hook(module, args, out):
            if kind == "qk_token":
                q, k, _ = (self.spikes.pop(f"{name}.{p}") for p in ("q_lif", "k_lif", "attn_lif"))
                v = None
            else:
                q, k, v = (self.spikes.pop(f"{name}.{p}") for p in ("q_lif", "k_lif", "v_lif"))
            tokens = getattr(module, "step_tokens", None)
            if tokens is not None:
                def place(rows):  # the computed rows → [1, B, n, C], zero on the halted tokens
                    rows = rows.reshape(-1, rows.shape[-1])
                    full = rows.new_zeros((*tokens.shape, rows.shape[-1]))
                    full[tokens] = rows
                    return full[None]

                q, k, v = place(q), place(k), None if v is None else place(v)
                tokens_last, present = True, tokens.sum(1).double()  # [B] tokens present per sample
            else:
                tokens_last, present = q.dim() == 4 and getattr(module, "tokens_last", False), None
            heads = getattr(module, "num_heads", 1) or 1
            qh, kh = _heads(q, heads, tokens_last), _heads(k, heads, tokens_last)  # [T, B, h, N, d]
            steps, _, h, N, d = qh.shape
            D = h * d
            qb, kb = (qh != 0).double(), (kh != 0).double()

            def add(product, s, dense_of, z_a, z_b):
                """``dense_of(n)``: dense ops of one step of one sample with n tokens."""
                row = self._row(f"{name}.{product}", lambda: AttentionCounts(f"{name}.{product}", product, N, D, h, steps))
                row.s += s
                row.z_a += z_a
                row.z_b += z_b
                if present is None:
                    row.dense += dense_of(N) * steps * self.B
                    row.samples += self.B
                    return
                row.dense += float(dense_of(present).sum())
                if row.batch != self.batch:
                    row.batch = self.batch
                    row.samples += self.B
                row.token_steps += float(present.sum())
                row.steps = row.token_steps / (row.samples * N)

            if kind == "qk_token":  # Σ_d q per token: one add per q spike; mask ⊙ k is masking
                add("q_sum", float(qb.sum()), lambda n: n * D, float(qb.sum()), 0.0)
                return
            vb = (_heads(v, heads, tokens_last) != 0).double()
            if kind == "sdsa":  # Σ_N (K ⊙ V): one add per non-zero of K ⊙ V; the ANDs count 0
                add("sdsa_sum", float((kb * vb).sum()), lambda n: n * D, float(kb.sum() + vb.sum()), float(qb.sum()))
                return
            if kind == "ssa_q_kv" or getattr(module, "order", None) == "q_kv_scale":  # Q·(Kᵀ·V)
                s_kv = float((kb.sum(-1) * vb.sum(-1)).sum())        # Σ_n (Σ_c k_nc)(Σ_e v_ne)
                kv = (kb.transpose(-1, -2) @ vb) != 0                # [.., d, d]
                s_q = float((qb.sum(-2) * kv.double().sum(-1)).sum())  # Σ_c colsum(q)_c · rowsum(KV)_c
                add("kv", s_kv, lambda n: n * D * d, float(kb.sum()), float(vb.sum()))
                add("q_kv", s_q, lambda n: n * D * d, float(qb.sum()), 0.0)
                return
            s_qk = float((qb.sum(-2) * kb.sum(-2)).sum())            # Σ_c colsum(q)_c · colsum(k)_c
            scores = (qb @ kb.transpose(-1, -2)) != 0                # [.., N, N]
            s_av = float((scores.double().sum(-2) * vb.sum(-1)).sum())  # Σ_j (Σ_i 1[s_ij]) (Σ_c v_jc)
            add("qk", s_qk, lambda n: n * n * D, float(qb.sum()), float(kb.sum()))
            add("av", s_av, lambda n: n * n * D, float(vb.sum()), 0.0)
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


class _StreamOps(TorchFunctionMode):
    """Sees every torch call while the pass runs and hands the residual adds and the means to the
    collector (which decides whether the running forward is a block's own)."""

    def __init__(self, collector: _Collector) -> None:
        super().__init__()
        self.collector = collector

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADDS and len(args) >= 2 and isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor) \
                and "alpha" not in kwargs and self.collector._op_site() is not None:
            real = self.collector.residual_add(args[0], args[1], torch.broadcast_shapes(args[0].shape, args[1].shape))
        else:
            real = None
        out = func(*args, **kwargs)
        if real:
            self.collector.mark_real(out)
        if func in _MEANS and isinstance(out, torch.Tensor) and self.collector._op_site() is not None:
            dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
            self.collector.mean(args[0].detach(), dims, out.detach())
        return out


def _merged_chains(model: nn.Module) -> dict[str, tuple[tuple[int, int, int], list[str]]]:
    """{module recorded as the chain's input: ((kernel, C_in, C_out), [its connection layers])} from
    every module that declares a ``merged_conv()`` view (a linear conv chain that re-parameterises
    into one k×k conv, e.g. SDT v2's RepConv and SepConv)."""
    chains = {}
    for name, m in model.named_modules():
        if callable(getattr(m, "merged_conv", None)):
            at, shape, inner = m.merged_conv()
            prefix = f"{name}." if name else ""
            at_name = (prefix + at).rstrip(".")
            at_module = model.get_submodule(at_name)
            members = ([at_name] if isinstance(at_module, CONNECTIONS) else []) + [prefix + part for part in inner]
            chains[at_name] = (shape, members)
    return chains


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
    """"lif" / "if" for a spiking neuron, "relu" / "sigmoid" for NeuroBench's default activations,
    "at_neuron" for a product module with state run one step per call (its hook counts products)."""
    from spikeformers.models.neurons import LIF

    if getattr(m, "attention_product", None) == "at_neuron":
        return "at_neuron"  # a product with state, one call per step: hooked like a step-wise neuron
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
        with torch.no_grad(), _StreamOps(collector):
            for x in batches:
                model(x)
                samples += collector.B
    finally:
        collector.remove()
        model.train(was_training)
    return Counts([collector.rows[n] for n in collector.order], samples, collector.T, dict(collector.merged))


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
        elif isinstance(r, AttentionCounts):  # residual adds, pooling and BN are not NeuroBench layers
            layers.append({"name": r.name, "kind": "attention", "call_type": "MAC" if r.s_macs else "AC",
                           "Effective_MACs": per(r.s_macs), "Effective_ACs": per(r.s - r.s_macs), "Dense": per(r.dense),
                           "sparsity": None, "membrane_updates": None})
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
            "attention_synops": {"Effective_MACs": per(sum(r.s_macs for r in attention)),
                                 "Effective_ACs": per(sum(r.s - r.s_macs for r in attention)),
                                 "Dense": per(sum(r.dense for r in attention))},
            "effective_acs_amplitude": per(sum(r.effective_amplitude_acs for r in conns)),
            "connection_sparsity_exact": static["connection_sparsity_exact"],
            "deploy_footprint_bytes": static["deploy_footprint_bytes"],
        },
        "layers": layers,
    }


def tag_spike_counts(module: nn.Module, args, out):
    """Forward hook of an integer spike-count neuron (``neuron_model = "count"``): its output S/n
    tagged with n and D, values and graph unchanged, as spike-driven mode tags it, so the layers the
    counts reach count S spikes per entry."""
    from spikeformers.models.spike_driven import SpikeCounts

    if module.training or not isinstance(out, torch.Tensor) or isinstance(out, SpikeCounts):
        return None
    return SpikeCounts.tag(out, _count_unit(module), module.max_spike_count)


def _count_unit(module: nn.Module) -> int:
    """n of a spike-count neuron's output S/n: D when it normalises (hidden neurons), else 1."""
    return module.max_spike_count if module.normalize else 1


def spike_count_unit(x) -> int | None:
    """n of a tagged spike-count input S/n (D for hidden neurons, 1 for a raw-count head), else None."""
    per_unit = getattr(x, "per_unit", None)
    return per_unit if isinstance(per_unit, int) and isinstance(getattr(x, "max_spike_count", None), int) else None
