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
- ``"malloc_retain"`` (process-wide, not a model patch): glibc's malloc keeps the memory a step
  frees for the next step instead of returning it to the kernel, see :func:`retain_freed_memory`.
  The arithmetic is untouched.

``DEFAULT_OPTIONS`` is all four: each was faster on its own, and together fastest, in the
side-by-side runs of benchmarks/bench_train_step.py ``--options`` (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MethodType

import ctypes
import ctypes.util
import logging

import torch
from torch import nn

from spikeformers.models.errors import UserError

__all__ = ["OPTIONS", "DEFAULT_OPTIONS", "apply_cpu_speed", "onednn_available", "OneDNNLinearFunction",
           "onednn_linear", "rows_batch_norm", "retain_freed_memory"]

_logger = logging.getLogger(__name__)

#: Every option, in the order they are applied.
OPTIONS = ("onednn_linear", "bn_rows", "channels_last", "malloc_retain")
#: What the trainer applies on the CPU unless told otherwise.
DEFAULT_OPTIONS = ("onednn_linear", "bn_rows", "channels_last", "malloc_retain")

# glibc mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger blocks are always mapped.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
#: glibc's defaults, restored by ``retain_freed_memory(False)``.
_DEFAULT_TRIM, _DEFAULT_MMAP = 128 * 1024, 128 * 1024


def _glibc():
    """The C library when it is glibc (it has ``gnu_get_libc_version``), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain_freed_memory(enable: bool = True) -> bool:
    """Make glibc's malloc keep freed memory in the process (``enable``) or restore its defaults.

    A CPU train step allocates and frees the same large activation buffers (megabytes each) every
    step. With glibc's defaults each of them is returned to the kernel when freed (``munmap``, or a
    heap trim), and the next step's allocation faults every page in again: on the digits default
    that was about 25,000 page faults, a tenth of the step, per step. Raising the mmap threshold to
    glibc's maximum (32 MiB) and the trim threshold to 1 GiB keeps those pages mapped for reuse.
    PyTorch's CPU tuning guide reaches the same with jemalloc or tcmalloc through ``LD_PRELOAD``,
    which must be set before the process starts; ``mallopt`` works from inside it and needs no
    other library. Returns False (and changes nothing) where the C library is not glibc.
    The cost: the process keeps its peak heap until it exits.
    """
    libc = _glibc()
    if libc is None:
        _logger.debug("malloc_retain: the C library is not glibc; nothing changed")
        return False
    trim, mmap = (1 << 30, _MMAP_THRESHOLD_MAX) if enable else (_DEFAULT_TRIM, _DEFAULT_MMAP)
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))
    if not enable and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return ok


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
    the state_dict are unchanged, so checkpoints, optimizers and EMA see the same model.
    ``malloc_retain`` acts on the whole process, not on ``model``."""
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
    if "malloc_retain" in names:
        retain_freed_memory()
    return model
