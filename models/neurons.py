"""Multi-step LIF neurons for spiking transformers (spec: architectures.md §1).

One neuron, three phases per time step t (input ``x_seq`` is ``[T, B, ...]``, time first):

    charge:  H[t] = V[t-1] + (X[t] - (V[t-1] - v_reset)) / tau
    fire:    S[t] = 1 if H[t] >= v_threshold else 0
    reset:   V[t] = S[t] * v_reset + (1 - S[t]) * H[t]        (hard reset; V[-1] = 0)

and a Sigmoid surrogate for dS/dH = alpha * sig(alpha*x) * (1 - sig(alpha*x)), x = H - v_threshold.
With ``detach_reset`` the reset is cut from the graph, so dV/dH = 1 - S.

The arithmetic is written in the same order as SpikingJelly 2.0, so every backend produces the
same spikes bit for bit. Backends (``LIF(backend=...)``):

- ``"torch"``: our CPU/GPU path, :class:`LIFFunction`. The forward runs one loop over T and saves
  only H; the backward computes all surrogate terms for the whole sequence at once and then runs
  one reverse loop of a single fused multiply-add per step.
- ``"spikingjelly"``: the library's ``activation_based.neuron.LIFNode`` (``step_mode='m'``).
- ``"auto"``: the best available one for the input's device (logged once).

Neurons are stateless between calls: every forward starts from V = 0, because our models always
pass the whole time sequence at once. Users cannot forget ``reset_net``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["LIF", "LIFFunction", "BACKENDS", "set_backend", "resolve_backend"]

_logger = logging.getLogger(__name__)

#: Backends a user may ask for. ``"auto"`` resolves to one of the others.
BACKENDS = ("auto", "torch", "spikingjelly")


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


class LIFFunction(torch.autograd.Function):
    """Multi-step LIF with a hand-written BPTT backward.

    Saves only the charged membrane H ([T, ...], fp32): spikes, the surrogate and the reset
    derivative are all functions of H, so nothing else is kept between forward and backward.
    """

    @staticmethod
    def forward(ctx, x_seq, tau, v_threshold, v_reset, detach_reset, alpha):
        # The membrane is kept in fp32 even under autocast (bf16/fp16 inputs), as SpikingJelly does.
        state_dtype = torch.promote_types(x_seq.dtype, torch.float32)
        h_seq = torch.empty(x_seq.shape, dtype=state_dtype, device=x_seq.device)
        v = torch.zeros(x_seq.shape[1:], dtype=state_dtype, device=x_seq.device)
        for t in range(x_seq.shape[0]):
            h = h_seq[t]
            # charge, in place and in SpikingJelly's order: h = v + (x - (v - v_reset)) / tau
            torch.sub(x_seq[t], v - v_reset if v_reset != 0.0 else v, out=h)
            h.div_(tau).add_(v)
            v = reset(h, fire(h, v_threshold), v_reset)
        ctx.save_for_backward(h_seq)
        ctx.params = (tau, v_threshold, v_reset, detach_reset, alpha)
        return fire(h_seq, v_threshold).to(x_seq.dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        (h_seq,) = ctx.saved_tensors
        tau, v_threshold, v_reset, detach_reset, alpha = ctx.params
        surrogate = sigmoid_surrogate_grad(h_seq - v_threshold, alpha)  # dS/dH, [T, ...]
        # dV[t]/dH[t]: 1 - S with a detached reset, plus (v_reset - H) * dS/dH otherwise.
        dv_dh = (~fire(h_seq, v_threshold)).to(h_seq.dtype)
        if not detach_reset:
            dv_dh.addcmul_(v_reset - h_seq, surrogate)
        # dL/dH[t] = dL/dS[t] * dS/dH[t] + dL/dH[t+1] * dH[t+1]/dV[t] * dV[t]/dH[t],
        # with dH[t+1]/dV[t] = 1 - 1/tau: a linear recurrence, one fused multiply-add per step.
        grad_h = grad_spikes.to(h_seq.dtype) * surrogate
        carry = dv_dh.mul_(1.0 - 1.0 / tau)
        for t in range(h_seq.shape[0] - 2, -1, -1):
            grad_h[t].addcmul_(carry[t], grad_h[t + 1])
        grad_x = grad_h.div_(tau)  # dH[t]/dX[t] = 1/tau
        return grad_x.to(grad_spikes.dtype), None, None, None, None, None


# --- backend selection ------------------------------------------------------------------------

_announced: set[str] = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to a concrete backend for ``device``; validate explicit names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown LIF backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    # Our fused torch path is the fastest available one on the CPU and on CUDA until the CuPy
    # kernels land (kernels issue); SpikingJelly's eager CPU path records every op.
    chosen = "torch"
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
        return LIFFunction.apply(
            x_seq, self.tau, self.v_threshold, self.v_reset, self.detach_reset, self.alpha
        )

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
