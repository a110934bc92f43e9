"""Multi-step LIF neurons for spiking transformers.

One neuron, three phases per time step t (input ``x_seq`` is ``[T, B, ...]``, time first):

    charge:  H[t] = V[t-1] + (X[t] - (V[t-1] - v_reset)) / tau
    fire:    S[t] = 1 if H[t] >= v_threshold else 0
    reset:   V[t] = S[t] * v_reset + (1 - S[t]) * H[t]        (hard reset; V[-1] = 0)

and a Sigmoid surrogate for dS/dH = alpha * sig(alpha*x) * (1 - sig(alpha*x)), x = H - v_threshold.
With ``detach_reset`` the reset is cut from the graph, so dV/dH = 1 - S.

The arithmetic is written in the same order as SpikingJelly 2.0, so every backend produces the
same spikes bit for bit. Backends (``LIF(backend=...)``):

- ``"torch"``: our CPU/GPU path, :class:`LIFFunction`: a forward loop over T that saves only H
  and a hand-written reverse-time backward loop, each compiled into one fused kernel by
  ``torch.compile`` (Inductor) on first use, or run eagerly where compiling is not possible.
- ``"spikingjelly"``: the library's ``activation_based.neuron.LIFNode`` (``step_mode='m'``).
- ``"cupy"``: our CUDA kernels (``kernels/lif.cu``) through CuPy, for CUDA tensors.
- ``"auto"``: the best available one for the input's device (logged once).

Neurons are stateless between calls: every forward starts from V = 0, because our models always
pass the whole time sequence at once. Users cannot forget ``reset_net``. Code that must drive
time itself (AT-SNN's time-major pass) calls :meth:`LIF.step` with an explicit membrane instead.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

__all__ = ["LIF", "LIFFunction", "CompiledFunctions", "BACKENDS", "set_backend", "resolve_backend", "memory_order"]

_logger = logging.getLogger(__name__)

#: Backends a user may ask for. ``"auto"`` resolves to one of the others.
BACKENDS = ("auto", "torch", "spikingjelly", "cupy")


# --- the three phases (shared reference semantics) -------------------------------------------


def charge(x: torch.Tensor, v: torch.Tensor, tau: float, v_reset: float) -> torch.Tensor:
    """H = V + (X - (V - v_reset)) / tau (decay_input=True), SpikingJelly's operation order."""
    return v + (x - (v - v_reset)) / tau


def fire(h: torch.Tensor, v_threshold: float) -> torch.Tensor:
    """Heaviside with Θ(0) = 1: a membrane exactly at threshold spikes. Returns a bool mask."""
    return h >= v_threshold


def reset(h: torch.Tensor, spike: torch.Tensor, v_reset: float) -> torch.Tensor:
    """Hard reset: V = v_reset where the neuron fired, H elsewhere."""
    return torch.where(spike, torch.as_tensor(v_reset, dtype=h.dtype, device=h.device), h)


def sigmoid_surrogate_grad(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """dS/dH of the Sigmoid surrogate, alpha * sig(alpha x) * (1 - sig(alpha x))."""
    sig = torch.sigmoid(alpha * x)
    return (1 - sig) * sig * alpha


# --- torch backend: fused forward/backward ----------------------------------------------------
# Both loops work on a flattened [T, M] view and are built only from the phase functions above,
# so the eager and compiled versions are the same code. Under Inductor each loop becomes one
# pointwise kernel over M (reads x or (grad, H) once, writes once): ~7x faster than an eager
# loop on 2 CPU cores, with identical results (docs/neurons.md has the numbers).


def lif_forward_loop(x_seq: torch.Tensor, tau: float, v_threshold: float, v_reset: float):
    """[T, M] input -> (spikes [T, M] in the input dtype, H [T, M] in fp32)."""
    v = torch.zeros_like(x_seq[0], dtype=torch.promote_types(x_seq.dtype, torch.float32))
    charged = []
    for t in range(x_seq.shape[0]):
        h = charge(x_seq[t], v, tau, v_reset)
        v = reset(h, fire(h, v_threshold), v_reset)
        charged.append(h)
    h_seq = torch.stack(charged)
    return fire(h_seq, v_threshold).to(x_seq.dtype), h_seq


def lif_backward_loop(
    grad_spikes: torch.Tensor, h_seq: torch.Tensor, tau: float, v_threshold: float,
    v_reset: float, detach_reset: bool, alpha: float,
) -> torch.Tensor:
    """BPTT through T steps from the saved H alone; returns dL/dX [T, M] (fp32).

    dL/dH[t] = dL/dS[t] dS/dH[t] + dL/dH[t+1] (1 - 1/tau) dV[t]/dH[t],   dL/dX[t] = dL/dH[t] / tau
    with dV/dH = 1 - S (detached reset) or 1 - S + (v_reset - H) dS/dH.
    """
    grads = [None] * h_seq.shape[0]
    grad_h_next = torch.zeros_like(h_seq[0])
    for t in range(h_seq.shape[0] - 1, -1, -1):
        h = h_seq[t]
        surrogate = sigmoid_surrogate_grad(h - v_threshold, alpha)
        dv_dh = torch.where(fire(h, v_threshold), 0.0, 1.0)
        if not detach_reset:
            dv_dh = dv_dh + (v_reset - h) * surrogate
        # (g - g / tau) rather than g * (1 - 1/tau): SpikingJelly's rounding, bit-identical for every tau
        carried = grad_h_next * dv_dh
        grad_h = grad_spikes[t] * surrogate + (carried - carried / tau)
        grads[t] = grad_h / tau
        grad_h_next = grad_h
    return torch.stack(grads)


class CompiledFunctions:
    """Functions compiled by ``torch.compile`` on first use when possible, else run eagerly
    (same results). ``run(i, *args)`` calls the i-th one."""

    def __init__(self, *functions) -> None:
        self.eager = functions
        self.compiled: tuple | None = None
        self.failed = False

    def get(self) -> tuple:
        if self.failed or not _compile_enabled():
            return self.eager
        if self.compiled is None:
            # dynamic=True: one compile per (T, dtype, device), not per tensor size.
            self.compiled = tuple(torch.compile(fn, dynamic=True, fullgraph=True) for fn in self.eager)
        return self.compiled

    def run(self, which: int, *args):
        fn = self.get()[which]
        try:
            return fn(*args)
        except Exception as err:  # no C++ compiler, unsupported platform, ...
            if fn is self.eager[which]:
                raise
            self.failed = True
            _logger.warning("torch.compile of %s failed (%s); running it eagerly", self.eager[which].__name__, err)
            return self.eager[which](*args)


#: The two LIF loops, compiled on first use when possible, else eager (same results).
_Loops = CompiledFunctions(lif_forward_loop, lif_backward_loop)


def _compile_enabled() -> bool:
    """``SPIKEFORMERS_LIF_COMPILE=0`` forces the eager loops (e.g. for debugging)."""
    return os.environ.get("SPIKEFORMERS_LIF_COMPILE", "1") != "0"


class LIFFunction(torch.autograd.Function):
    """Multi-step LIF with a hand-written BPTT backward.

    Saves only the charged membrane H ([T, ...], fp32): spikes, the surrogate and the reset
    derivative are all functions of H, so nothing else is kept between forward and backward.
    The membrane stays fp32 under autocast (bf16/fp16 inputs), as in SpikingJelly.
    """

    @staticmethod
    def forward(ctx, x_seq, tau, v_threshold, v_reset, detach_reset, alpha):
        # The loops run on the memory order of x_seq (time outermost), so a channels-last input
        # gives channels-last spikes without a layout copy either way; the neuron is pointwise,
        # so the values do not depend on the order. detach() drops the view's link to its base,
        # which torch.compile would otherwise guard on (one recompile per base layout).
        order = memory_order(x_seq)
        dense = x_seq.permute(order)
        flat = dense.reshape(x_seq.shape[0], -1).detach()  # [T, M]; copies only if x_seq overlaps or has gaps
        spikes, h_seq = _Loops.run(0, flat, tau, v_threshold, v_reset)
        ctx.save_for_backward(h_seq)
        ctx.params = (tau, v_threshold, v_reset, detach_reset, alpha)
        ctx.order, ctx.dense_shape, ctx.x_dtype = order, dense.shape, x_seq.dtype
        return _unpermute(spikes.reshape(dense.shape), order)

    @staticmethod
    def backward(ctx, grad_spikes):
        (h_seq,) = ctx.saved_tensors
        grad = grad_spikes.permute(ctx.order).reshape(h_seq.shape).detach()
        grad_x = _Loops.run(1, grad, h_seq, *ctx.params)
        grad_x = _unpermute(grad_x.reshape(ctx.dense_shape), ctx.order)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None


def memory_order(x: torch.Tensor) -> list[int]:
    """The dims of ``x`` [T, ...] from outermost to innermost in memory, time first, when
    ``x.permute(order)`` is contiguous (e.g. [T, B, C, H, W] made of channels-last maps:
    T, B, H, W, C); else the identity order (a strided input is then copied once)."""
    identity = list(range(x.dim()))
    if x.is_contiguous():
        return identity
    order = [0] + sorted(range(1, x.dim()), key=lambda d: -x.stride(d))  # stable for equal strides
    return order if x.permute(order).is_contiguous() else identity


def _unpermute(x: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Inverse of ``x.permute(order)``: a view with the dims back in their original positions."""
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return x.permute(inverse)


class _FireSigmoid(torch.autograd.Function):
    """S = fire(H) forward, the Sigmoid surrogate dS/dH backward: one step of the spike
    nonlinearity for :meth:`LIF.step` (the multi-step path differentiates H in its own loop)."""

    @staticmethod
    def forward(ctx, h, v_threshold, alpha):
        ctx.save_for_backward(h)
        ctx.v_threshold, ctx.alpha = v_threshold, alpha
        return fire(h, v_threshold).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_spike):
        (h,) = ctx.saved_tensors
        return grad_spike * sigmoid_surrogate_grad(h - ctx.v_threshold, ctx.alpha), None, None


# --- backend selection ------------------------------------------------------------------------

_announced: set[str] = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to a concrete backend for ``device``; validate explicit names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown LIF backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    # CUDA with CuPy: our kernels (kernels/lif.cu). Otherwise our fused torch path, the fastest
    # available one on the CPU (SpikingJelly's eager CPU path records every op).
    chosen = "torch"
    if device.type == "cuda":
        from spikeformers.kernels.cupy_lif import available

        chosen = "cupy" if available()[0] else "torch"
    key = f"{device.type}:{chosen}"
    if key not in _announced:
        _announced.add(key)
        _logger.info("LIF backend 'auto' on %s uses %r", device.type, chosen)
    return chosen


class LIF(nn.Module):
    """Multi-step LIF neuron (tau 2, hard reset to 0, detached reset, Sigmoid surrogate alpha 4).

    Input and output are ``[T, B, ...]``; the output is a {0, 1} spike tensor of the input's dtype.
    The neuron holds no parameters and no buffers, so it adds nothing to a ``state_dict``.
    """

    def __init__(
        self,
        v_threshold: float = 1.0,
        tau: float = 2.0,
        v_reset: float = 0.0,
        detach_reset: bool = True,
        alpha: float = 4.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not tau > 1.0:
            raise ValueError(f"LIF tau must be > 1, got {tau}")
        resolve_backend(backend, torch.device("cpu"))  # validates the name early
        self.v_threshold = float(v_threshold)
        self.tau = float(tau)
        self.v_reset = float(v_reset)
        self.detach_reset = bool(detach_reset)
        self.alpha = float(alpha)
        self.backend = backend
        self._sj_node = None  # SpikingJelly LIFNode, built on first use (not a submodule)

    def extra_repr(self) -> str:
        return (
            f"v_threshold={self.v_threshold}, tau={self.tau}, v_reset={self.v_reset}, "
            f"detach_reset={self.detach_reset}, alpha={self.alpha}, backend={self.backend!r}"
        )

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if x_seq.dim() < 2:
            raise ValueError(f"LIF expects a [T, B, ...] sequence, got shape {tuple(x_seq.shape)}")
        backend = resolve_backend(self.backend, x_seq.device)
        if backend == "spikingjelly":
            return self._spikingjelly_forward(x_seq)
        if backend == "cupy":
            from spikeformers.kernels.cupy_lif import LIFCupyFunction, available

            ok, missing = available()
            if not ok or x_seq.device.type != "cuda":
                raise RuntimeError(f"LIF backend 'cupy' needs CUDA tensors and CuPy: "
                                   f"{missing or f'the input is on {x_seq.device.type}'}")
            return LIFCupyFunction.apply(
                x_seq, self.tau, self.v_threshold, self.v_reset, self.detach_reset, self.alpha
            )
        return LIFFunction.apply(
            x_seq, self.tau, self.v_threshold, self.v_reset, self.detach_reset, self.alpha
        )

    def step(self, x: torch.Tensor, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step for callers that drive time themselves: input X[t] ``x`` [B, ...] and
        membrane V[t-1] ``v`` (None: V = 0) -> (spikes S[t] in x's dtype, V[t] in at least fp32).

        Built from the same charge/fire/reset functions and surrogate as the multi-step path, so
        T calls reproduce :meth:`forward`'s spikes bit for bit on every backend. Gradients flow by
        autograd: dS/dH is the surrogate and dV/dH = 1 - S, plus (v_reset - H) dS/dH when the
        reset is not detached, as in the multi-step backward.
        """
        if v is None:
            v = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
        h = charge(x, v, self.tau, self.v_reset)
        spike = _FireSigmoid.apply(h, self.v_threshold, self.alpha)
        v_next = reset(h, fire(h, self.v_threshold), self.v_reset)  # dV/dH = 1 - S
        if not self.detach_reset:  # + (v_reset - H) dS/dH; the added term is 0 in the forward
            v_next = v_next + (spike - spike.detach()) * (self.v_reset - h)
        return spike.to(x.dtype), v_next

    def _spikingjelly_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if self._sj_node is None:
            from spikingjelly.activation_based import neuron, surrogate

            self._sj_node = neuron.LIFNode(
                tau=self.tau,
                decay_input=True,
                v_threshold=self.v_threshold,
                v_reset=self.v_reset,
                surrogate_function=surrogate.Sigmoid(alpha=self.alpha),
                detach_reset=self.detach_reset,
                step_mode="m",
            )
        self._sj_node.reset()  # stateless between calls, like the torch backend
        out = self._sj_node(x_seq)
        self._sj_node.reset()  # do not keep the last membrane (and its graph) alive
        return out


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every :class:`LIF` in ``model`` to ``backend``; returns the model."""
    resolve_backend(backend, torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, LIF):
            module.backend = backend
    return model
