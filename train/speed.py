"""CPU speed options for the training step, applied to a built model.

Where the CPU train step of a spiking transformer spends its time (torch.profiler, batch 8, T = 4,
32×32, docs/performance.md has the tables): the GEMMs of the Linear layers, the convolutions and
their backward, and BatchNorm; the fused LIF loops are a tenth. Each option below attacks one of
these and keeps fp32 arithmetic (fp32 weights, fp32 activations, fp32 accumulation): results
differ from the plain model only in the order of fp32 sums inside a GEMM, a convolution or a
BatchNorm statistic (relative 1e-7 per sum). A spiking network turns such a difference into a
different spike wherever a membrane lies within that distance of the threshold, so on full-size
models a few spikes (and through them the logits) can differ, as between two thread counts or two
BLAS libraries; tests/test_speed.py bounds each option on models where no spike flips.

Options (``apply_cpu_speed(model, options)``):

- ``"onednn_linear"``: every ``nn.Linear`` runs forward and backward on oneDNN's fp32 matmul
  instead of the BLAS GEMM (``torch.mm``, MKL in the official wheels): on the AMD EPYC (AVX-512)
  these options were measured on, oneDNN ran the transformer shapes ([T·B·N, C] × [C, C']) about
  2× faster than MKL. On other CPUs, measure first (benchmarks/bench_train_step.py ``--options``).
- ``"bn_rows"``: a ``BatchNorm1d`` given a channels-in-the-middle view of token rows
  ([T·B, C, N] made by transposing [T·B, N, C], as the CIFAR Spikformer does after each Linear)
  normalises the rows [T·B·N, C] directly: the same statistics over the same T·B·N values per
  channel, without the strided BatchNorm kernel and the two layout copies around it.
- ``"channels_last"``: convolution weights and activations in channels-last (NHWC) memory, the
  layout oneDNN's convolutions use natively; the LIF keeps the layout it is given, so no layer
  between two convolutions converts back.

``DEFAULT_OPTIONS`` is all three: each was faster on its own, and together fastest, in the
side-by-side runs of benchmarks/bench_train_step.py ``--options`` (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MethodType

import torch
from torch import nn

from spikeformers.models.errors import UserError

__all__ = ["OPTIONS", "DEFAULT_OPTIONS", "apply_cpu_speed", "onednn_available", "OneDNNLinearFunction",
           "onednn_linear", "rows_batch_norm"]

#: Every option, in the order they are applied.
OPTIONS = ("onednn_linear", "bn_rows", "channels_last")
#: What the trainer applies on the CPU unless told otherwise.
DEFAULT_OPTIONS = ("onednn_linear", "bn_rows", "channels_last")


def onednn_available() -> bool:
    """True when this torch build has oneDNN (mkldnn) and its linear operator."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_matmul(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b_t [N, K]ᵀ (+ bias [N]) -> [M, N] on oneDNN; any strides, fp32 accumulation."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class OneDNNLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with all three GEMMs on oneDNN: forward x Wᵀ, backward dX = dY W and
    dW = dYᵀ X (dY and X passed transposed as strided views, no copies); db = Σ_rows dY."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        ctx.save_for_backward(rows, weight)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        return _onednn_matmul(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, weight.shape[0])  # [M, N]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_matmul(grad, weight.t()).reshape(ctx.x_shape)  # [M, N] @ [N, K]
        if ctx.needs_input_grad[1]:
            grad_w = _onednn_matmul(grad.t(), rows.t())  # [N, M] @ [M, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def onednn_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through :class:`OneDNNLinearFunction` for fp32 CPU tensors outside autocast;
    the stock ``nn.Linear`` forward for anything else (CUDA, bf16, autocast, 1-D input)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or module.weight.dtype != torch.float32
            or x.dim() < 2 or torch.is_autocast_enabled("cpu")):
        return nn.Linear.forward(module, x)
    return OneDNNLinearFunction.apply(x, module.weight, module.bias)


def rows_batch_norm(module: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` on [R, C, N] that is a transposed view of rows [R, N, C]: normalised as
    [R·N, C] (the same per-channel statistics over R·N values, the same running-stat update,
    which BatchNorm1d's unbiased variance counts with n = R·N either way) and returned as the
    same transposed view; other inputs take the stock forward."""
    if x.dim() == 3 and x.shape[1] > 1 and x.shape[2] > 1 and x.transpose(1, 2).is_contiguous():
        R, C, N = x.shape
        out = nn.BatchNorm1d.forward(module, x.transpose(1, 2).reshape(R * N, C))
        return out.reshape(R, N, C).transpose(1, 2)
    return nn.BatchNorm1d.forward(module, x)


def _patch_forward(module: nn.Module, fn) -> None:
    """Bind ``fn(module, x)`` as this instance's forward (the class and other instances keep theirs)."""
    module.forward = MethodType(fn, module)


def apply_cpu_speed(model: nn.Module, options: Iterable[str] | str | None = DEFAULT_OPTIONS) -> nn.Module:
    """Apply CPU speed ``options`` (names from :data:`OPTIONS`, a list or a comma string; ``None``
    or empty: nothing) to ``model`` in place; returns the model. The parameters, their names and
    the state_dict are unchanged, so checkpoints, optimizers and EMA see the same model."""
    if options is None:
        return model
    names = [o.strip() for o in options.split(",")] if isinstance(options, str) else list(options)
    names = [o for o in names if o]
    unknown = [o for o in names if o not in OPTIONS]
    if unknown:
        raise UserError(f"unknown CPU speed option {unknown[0]!r}; expected some of {', '.join(OPTIONS)}")
    if "onednn_linear" in names and onednn_available():
        for module in model.modules():
            if type(module) is nn.Linear:
                _patch_forward(module, onednn_linear)
    if "bn_rows" in names:
        for module in model.modules():
            if type(module) is nn.BatchNorm1d:
                _patch_forward(module, rows_batch_norm)
    if "channels_last" in names:
        model.to(memory_format=torch.channels_last)
    return model
