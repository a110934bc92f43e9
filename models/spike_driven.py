"""Spike-driven inference for integer spike-count networks (E-SpikeFormer).

Yao, Qiu et al., "Scaling Spike-driven Transformer with Efficient Spike Firing Approximation
Training", IEEE TPAMI 2025 (arXiv 2411.16061): a network trained with integer neurons, each
emitting a count S ∈ {0, …, D} per time step, is meant to run at inference with every count
expanded into D binary spikes over D virtual time steps, so that every synaptic operation is an
accumulate. The official code has no such path (accuracy and firing statistics are computed on the
integer network); this module is one. With s_d = [S ≥ d] (fire on the first S virtual steps):

    S = Σ_{d=1..D} s_d,  s_d ∈ {0, 1}
    W·(S/n) + b = (1/n)·Σ_d W·s_d + b           a weight layer: bias (and the BN after it) once
    (Σ_d q_d)(Σ_e k_e)ᵀ = Σ_{d,e} q_d k_eᵀ       a product of two spike operands: all pairs of planes

(n = D for hidden neurons, whose output is S/D, and n = 1 for a head neuron passing the raw count;
the 1/n is the scale a deployment folds into W.) The two networks compute the same function: the
binary one only reorders the sums.

The algorithm is the pure functions below (:func:`count_planes`, :func:`spike_planes`,
:func:`binary_layer_call`, :func:`expanded_matmul`). :func:`set_spike_mode` patches a model, as
token merging patches ViT blocks: in ``"binary"`` mode and eval mode every
:class:`~spikeformers.models.sdt_v3.SpikeCountNeuron` tags its output as :class:`SpikeCounts`
(same values, plus n and D); the tag survives layout changes (flatten, reshape, transpose, …);
every ``nn.Conv1d/2d/3d`` or ``nn.Linear`` called on a tagged tensor is called instead on its D
binary planes (folded into the batch, bias left out) and adds the bias once to the sum; a matmul
with a tagged operand is expanded into binary planes. Nothing is dispatched on family classes, so
a new block built from these neurons and layers runs spike-driven without changes. Layers fed by
real values (the image stem, a conv fed by a BN, a head on a real mean) keep their MACs.

Each binary layer counts what it processed (:func:`binary_event_counts`): the binary input events
(ones in its planes = Σ S over its integer input), the plane entries, and the synaptic operations
events × average fan-out (= FLOPs × binary firing rate), for energy estimates.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from spikeformers.models.errors import UserError
from spikeformers.models.sdt_v3 import SpikeCountNeuron

__all__ = [
    "SPIKE_MODES", "count_planes", "spike_planes", "binary_layer_call", "expanded_matmul", "SpikeCounts",
    "set_spike_mode", "get_spike_mode", "binary_event_counts", "reset_binary_event_counts",
    "BinarySpikeCountNeuron", "BinaryConv1d", "BinaryConv2d", "BinaryConv3d", "BinaryLinear",
]

SPIKE_MODES = ("integer", "binary")


# --- the algorithm ----------------------------------------------------------------------------------


def count_planes(counts: torch.Tensor, max_spike_count: int) -> torch.Tensor:
    """Counts S ∈ {0, …, D} [*] -> D binary planes [D, *], plane d (1-based) = [S ≥ d]: a neuron
    fires on its first S virtual steps. Σ over the planes gives S back. Keeps ``counts``' dtype."""
    d = torch.arange(1, max_spike_count + 1, device=counts.device, dtype=counts.dtype)
    return (counts.unsqueeze(0) >= d.view(-1, *([1] * counts.dim()))).to(counts.dtype)


def spike_planes(values: torch.Tensor, per_unit: int, max_spike_count: int) -> torch.Tensor:
    """Neuron outputs S/n [*] -> binary planes [D, *] with values {0, 1} and Σ_d planes / n = values.

    When ``values`` needs a gradient, the planes carry a straight-through one: each plane gets
    (n/D)·(values − values.detach()), which is exactly 0 in the forward pass (so the planes stay
    {0, 1}) and gives Σ_d planes / n the gradient 1 with respect to ``values``, as in integer mode.
    """
    counts = torch.round(values.detach() * per_unit)  # S, exact: values are S/n
    planes = count_planes(counts, max_spike_count)
    if values.requires_grad and torch.is_grad_enabled():
        planes = planes + (values - values.detach()) * (per_unit / max_spike_count)
    return planes


def _conv_batched_rank(layer: nn.modules.conv._ConvNd) -> int:
    return len(layer.kernel_size) + 2  # Conv2d: [N, C, H, W]


def binary_layer_call(layer: nn.Module, values: torch.Tensor, per_unit: int, max_spike_count: int) -> torch.Tensor:
    """W·values + b of a conv/linear ``layer`` on its binary planes: (1/n)·Σ_d W·s_d + b.

    values: S/n of a neuron, [N, C, *spatial] for a conv (or unbatched [C, *spatial]), [*, C] for a
    linear layer. The module itself is called once on the D planes folded into the batch
    ([D·N, C, *spatial], or [D, *, C] for a linear layer), values {0, 1}, with its bias left out
    (forward hooks see exactly that call); the bias is added once, after the sum over the planes.
    Returns the layer's output shape.
    """
    planes = spike_planes(values, per_unit, max_spike_count)  # [D, *values.shape]
    conv = isinstance(layer, nn.modules.conv._ConvNd)
    folded = conv and values.dim() == _conv_batched_rank(layer)
    inp = planes.flatten(0, 1) if folded else planes
    layer.virtual_steps = max_spike_count  # for analysis hooks: the call's input is D planes, plane-major
    out = call_without_bias(layer, inp)
    if folded:
        out = out.unflatten(0, (max_spike_count, values.shape[0]))  # [D, N, C_out, *spatial]
    y = out.sum(0)
    if per_unit != 1:
        y = y / per_unit
    if layer.bias is not None:
        # conv: bias over the channel axis of [N, C, *spatial] (or [C, *spatial]); linear: the last axis
        y = y + (layer.bias.view(-1, *([1] * (y.dim() - 1 - int(folded)))) if conv else layer.bias)
    _count(layer, planes.detach(), out)
    return y


def expanded_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with every spike-count operand (:class:`SpikeCounts`) run as its binary planes:
    Σ_{d,e} a_d @ b_e / (n_a·n_b) over all pairs of planes (a real operand is its own single plane,
    n = 1). The products of {0, 1} planes are exact integers, so the result equals the integer
    product wherever n is a power of two."""
    pa, na = _operand_planes(a)  # [D_a, *a.shape]
    pb, nb = _operand_planes(b)
    out = None
    for plane_a in pa:
        for plane_b in pb:
            term = torch.matmul(plane_a, plane_b)
            out = term if out is None else out + term
    return out / (na * nb) if na * nb != 1 else out


def _operand_planes(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    if isinstance(x, SpikeCounts) and x.per_unit is not None:
        return spike_planes(x.plain(), x.per_unit, x.max_spike_count), x.per_unit
    plain = x.plain() if isinstance(x, SpikeCounts) else x
    return plain.unsqueeze(0), 1


# --- the tagged neuron output ----------------------------------------------------------------------

_T = torch.Tensor
# layout changes keep the values on the count grid (and the tag); any other op returns a plain tensor
_LAYOUT_OPS = {
    _T.flatten, _T.unflatten, _T.reshape, _T.reshape_as, _T.view, _T.view_as, _T.transpose, _T.permute,
    _T.movedim, _T.swapaxes, _T.swapdims, _T.contiguous, _T.unsqueeze, _T.squeeze, _T.expand, _T.expand_as,
    _T.repeat, _T.__getitem__, _T.clone, _T.detach, _T.to, _T.split, _T.chunk, _T.unbind, _T.mT.__get__,
    _T.T.__get__, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.movedim, torch.unsqueeze,
    torch.squeeze, torch.split, torch.chunk, torch.unbind, torch.cat, torch.stack,
}
_MATMULS = {torch.matmul, _T.matmul, _T.__matmul__, torch.bmm, _T.bmm}


class SpikeCounts(torch.Tensor):
    """A spike-count neuron's output S/n (same values, same autograd graph), tagged with n
    (``per_unit``: D for hidden neurons, 1 for a raw-count head neuron) and D
    (``max_spike_count``), so that the layers it reaches can run it as binary planes.

    The tag survives layout changes (flatten, reshape, transpose, indexing, cat, …); a matmul with a
    tagged operand is expanded (:func:`expanded_matmul`); every other op gives a plain tensor of the
    same values as in integer mode. An in-place op drops the tag (``per_unit`` None)."""

    per_unit: int | None
    max_spike_count: int

    @staticmethod
    def tag(values: torch.Tensor, per_unit: int, max_spike_count: int) -> SpikeCounts:
        out = values.as_subclass(SpikeCounts)
        out.per_unit, out.max_spike_count = per_unit, max_spike_count
        return out

    def plain(self) -> torch.Tensor:
        """The same tensor as a plain ``torch.Tensor`` (shares storage and autograd graph)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and not kwargs and len(args) == 2:
            return expanded_matmul(*args)
        if func is _T.__rmatmul__ and not kwargs and len(args) == 2:
            return expanded_matmul(args[1], args[0])
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and isinstance(out, SpikeCounts):
            out.per_unit = None  # modified in place: no longer S/n
            return out
        if func in _LAYOUT_OPS:
            tag = _common_tag(args)
            if tag is not None:
                return _retag(out, tag)
        return out

    def __repr__(self, **kwargs) -> str:
        return f"SpikeCounts(per_unit={self.per_unit}, max_spike_count={self.max_spike_count}, {self.plain()!r})"


def _common_tag(args) -> tuple[int, int] | None:
    """(n, D) when every tensor among ``args`` (and in a list/tuple argument) is validly tagged
    with the same (n, D), else None."""
    tags = set()
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, SpikeCounts) and t.per_unit is not None:
                tags.add((t.per_unit, t.max_spike_count))
            elif isinstance(t, torch.Tensor):
                return None
    return tags.pop() if len(tags) == 1 else None


def _retag(out, tag: tuple[int, int]):
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        return SpikeCounts.tag(out, *tag)
    if isinstance(out, (list, tuple)):
        return type(out)(_retag(o, tag) for o in out)
    return out


# --- binary versions of the neuron and of the weight layers (swapped in by set_spike_mode) ----------


class _TaggedOutput:
    """Mixin for a spike-count neuron: its eval-mode output is tagged :class:`SpikeCounts` (values
    unchanged); train mode is the integer neuron's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            return out
        d = self.max_spike_count
        return SpikeCounts.tag(out, d if self.normalize else 1, d)


class BinarySpikeCountNeuron(_TaggedOutput, SpikeCountNeuron):
    """:class:`SpikeCountNeuron` whose eval-mode output is tagged :class:`SpikeCounts`."""


class _BinaryInput:
    """Mixin for a conv/linear layer: a call on a :class:`SpikeCounts` input runs on its binary
    planes (:func:`binary_layer_call`); any other input is the layer's own call."""

    _bias_left_out = False

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], SpikeCounts) and args[0].per_unit is not None:
            x = args[0]
            return binary_layer_call(self, x.plain(), x.per_unit, x.max_spike_count)
        if args and isinstance(args[0], SpikeCounts):
            args = (args[0].plain(), *args[1:])
        return super().__call__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bias_left_out:
            if isinstance(self, nn.Linear):
                return F.linear(x, self.weight)
            return self._conv_forward(x, self.weight, None)
        return super().forward(x)


class BinaryConv1d(_BinaryInput, nn.Conv1d):
    """``nn.Conv1d`` that runs spike-count input as binary planes (same parameters and keys)."""


class BinaryConv2d(_BinaryInput, nn.Conv2d):
    """``nn.Conv2d`` that runs spike-count input as binary planes (same parameters and keys)."""


class BinaryConv3d(_BinaryInput, nn.Conv3d):
    """``nn.Conv3d`` that runs spike-count input as binary planes (same parameters and keys)."""


class BinaryLinear(_BinaryInput, nn.Linear):
    """``nn.Linear`` that runs spike-count input as binary planes (same parameters and keys)."""


_BINARY_CLASSES: dict[type, type] = {
    SpikeCountNeuron: BinarySpikeCountNeuron, nn.Conv1d: BinaryConv1d, nn.Conv2d: BinaryConv2d,
    nn.Conv3d: BinaryConv3d, nn.Linear: BinaryLinear,
}
_INTEGER_CLASSES: dict[type, type] = {v: k for k, v in _BINARY_CLASSES.items()}
_SWAPPABLE = (SpikeCountNeuron, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _binary_class(cls: type) -> type:
    """The binary version of ``cls``: a fixed class for the torch layers and the neuron, a
    subclass made once for any subclass of them (e.g. a family's own neuron or conv)."""
    if cls not in _BINARY_CLASSES:
        mixin = _TaggedOutput if issubclass(cls, SpikeCountNeuron) else _BinaryInput
        doc = f"{cls.__name__} in spike-driven (binary) mode."
        binary = type(f"Binary{cls.__name__}", (mixin, cls), {"__module__": __name__, "__doc__": doc})
        _BINARY_CLASSES[cls], _INTEGER_CLASSES[binary] = binary, cls
    return _BINARY_CLASSES[cls]


def _is_binary(module: nn.Module) -> bool:
    return type(module) in _INTEGER_CLASSES


# --- patching a model --------------------------------------------------------------------------------


def _swappable(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, _SWAPPABLE) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            yield name, m


def set_spike_mode(model: nn.Module, mode: str) -> nn.Module:
    """Run ``model``'s spike-count network as integers (``"integer"``, the trained network) or
    spike-driven (``"binary"``): in eval mode every conv/linear layer fed by a spike-count neuron
    is called on D binary planes with its bias added once, and products of spike counts are
    expanded into binary planes. Train mode is the same in both modes. Parameters, buffers and
    state_dict keys are untouched; switching back restores the integer modules exactly. Sets
    ``model.spike_mode``; returns ``model``.

    Raises UserError for an unknown mode or a model without spike-count neurons."""
    if mode not in SPIKE_MODES:
        raise UserError(f"spike_mode must be one of {', '.join(map(repr, SPIKE_MODES))}, got {mode!r}")
    modules = list(_swappable(model))
    if not any(isinstance(m, SpikeCountNeuron) for _, m in modules):
        raise UserError(f"spike_mode={mode!r} needs a network of integer spike-count neurons (E-SpikeFormer, "
                        f"sdtv3_*); {type(model).__name__} has none")
    for _, m in modules:
        if mode == "binary" and not _is_binary(m):
            m.__class__ = _binary_class(type(m))
        elif mode == "integer" and _is_binary(m):
            m.__class__ = _INTEGER_CLASSES[type(m)]
            for attr in ("_bias_left_out", "binary_events", "binary_slots", "binary_sops"):
                m.__dict__.pop(attr, None)
    model.spike_mode = mode
    return model


def get_spike_mode(model: nn.Module) -> str:
    """``"binary"`` if :func:`set_spike_mode` switched ``model`` to binary, else ``"integer"``."""
    return "binary" if any(_is_binary(m) for _, m in _swappable(model)) else "integer"


def call_without_bias(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call ``layer`` (hooks included) on ``x`` with its bias left out, for a binary layer; a plain
    layer's bias is passed as None through the functional form (no hooks)."""
    if isinstance(layer, _BinaryInput):
        layer._bias_left_out = True
        try:
            return nn.Module.__call__(layer, x)
        finally:
            del layer._bias_left_out
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight)
    return layer._conv_forward(x, layer.weight, None)


def _count(layer: nn.Module, planes: torch.Tensor, out: torch.Tensor) -> None:
    """Accumulate on ``layer``: binary events (ones in the planes), plane entries, and synaptic
    operations = events × average fan-out, fan-out = the call's multiply-accumulates / entries."""
    if not isinstance(layer, _BinaryInput):
        return
    fan_in = layer.in_features if isinstance(layer, nn.Linear) else layer.weight[0].numel()
    macs = out.numel() * fan_in  # every output entry is one weighted sum over fan_in inputs
    events = torch.count_nonzero(planes)
    layer.binary_events = layer.__dict__.get("binary_events", 0) + events
    layer.binary_slots = layer.__dict__.get("binary_slots", 0) + planes.numel()
    layer.binary_sops = layer.__dict__.get("binary_sops", 0) + events.double() * (macs / planes.numel())


def binary_event_counts(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per binary layer that has run on spike input since the last reset, by module name:
    ``events`` (binary spikes processed = Σ S of its integer input), ``slots`` (plane entries =
    D × input entries), ``rate`` (events / slots, the binary firing rate over the D virtual steps)
    and ``sops`` (synaptic operations = events × average fan-out = FLOPs × rate)."""
    counts = {}
    for name, m in model.named_modules():
        if isinstance(m, _BinaryInput) and "binary_events" in m.__dict__:
            events, slots = int(m.binary_events), int(m.binary_slots)
            counts[name] = dict(events=events, slots=slots, rate=events / slots, sops=float(m.binary_sops))
    return counts


def reset_binary_event_counts(model: nn.Module) -> None:
    """Zero the counters of :func:`binary_event_counts`."""
    for m in model.modules():
        if isinstance(m, _BinaryInput):
            for attr in ("binary_events", "binary_slots", "binary_sops"):
                m.__dict__.pop(attr, None)
