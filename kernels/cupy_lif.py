"""LIF on CUDA through our own kernels (``kernels/lif.cu``), compiled by CuPy (NVRTC) on first use
and launched on torch's current stream. ``LIF(backend="cupy")`` uses it; ``"auto"`` does when CuPy
and a CUDA device are present. The kernels' numerics are tested on the CPU (host build of the same
source, tests/test_kernels.py) and compile-checked with nvcc for sm_80 and sm_90.
"""

from __future__ import annotations

import importlib.resources
import re
from functools import lru_cache

import torch

__all__ = ["available", "LIFCupyFunction", "pack_spikes", "unpack_spikes"]

_BLOCK = 256
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
INSTALL_HINT = "pip install 'spikeformers[cuda]' (cupy-cuda13x; use cupy-cuda12x for CUDA 12)"


@lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """(True, "") when CuPy can compile and launch our kernels here, else (False, what is
    missing). The kernels are compiled once here, so ``"auto"`` falls back to the torch backend
    when NVRTC or the CUDA headers are unusable instead of failing at the first forward."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is available to torch"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False, f"CuPy is not installed: {INSTALL_HINT}"
    try:
        _module("lif.cu").get_function("lif_forward_f32")  # compiles the module (the cache key _launch uses)
    except Exception as err:  # CuPy compile / driver errors
        return False, f"CuPy cannot compile the kernels ({type(err).__name__}: {err}); check that the CuPy wheel matches torch's CUDA ({INSTALL_HINT})"
    return True, ""


_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+)"$', re.MULTILINE)


def kernel_source(file: str, _seen: set | None = None) -> str:
    """The source of ``kernels/<file>`` with our own headers (``#include "x.cuh"``) inlined, each
    once: NVRTC compiles a string and cannot open files next to it."""
    seen = set() if _seen is None else _seen
    seen.add(file)
    text = importlib.resources.files("spikeformers.kernels").joinpath(file).read_text().replace("#pragma once\n", "")

    def inline(match: re.Match) -> str:
        header = match.group(1)
        return "" if header in seen else kernel_source(header, seen)

    return _LOCAL_INCLUDE.sub(inline, text)


@lru_cache(maxsize=None)
def _module(file: str):
    import cupy

    # --fmad=false: no fused multiply-add contraction, so results match the CPU reference bit for bit.
    return cupy.RawModule(code=kernel_source(file), options=("--std=c++17", "--fmad=false"))


def _arg(t: torch.Tensor):
    """A zero-copy CuPy view (bfloat16 travels as int16 bits: CuPy has no bfloat16 dtype).
    Detached: torch refuses ``__cuda_array_interface__`` on tensors that require grad."""
    import cupy

    t = t.detach()
    return cupy.asarray(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)


def _launch(name: str, n: int, device: torch.device, *args, file: str = "lif.cu") -> None:
    """Launch kernel ``name`` of ``file`` on ``device`` and on torch's current stream for that device."""
    import cupy

    if n == 0:
        return
    kernel = _module(file).get_function(name)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        kernel(((n + _BLOCK - 1) // _BLOCK,), (_BLOCK,), args)


class LIFCupyFunction(torch.autograd.Function):
    """Same contract as :class:`spikeformers.models.neurons.LIFFunction`, on CUDA kernels."""

    @staticmethod
    def forward(ctx, x_seq, tau, v_threshold, v_reset, detach_reset, alpha):
        import numpy as np

        if x_seq.dtype not in _SUFFIX:
            raise TypeError(f"LIF backend 'cupy' supports float32/float16/bfloat16, got {x_seq.dtype}")
        x = x_seq.detach().contiguous()
        T, M = x.shape[0], x[0].numel()
        spikes = torch.empty_like(x)
        h_seq = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        _launch(f"lif_forward_{_SUFFIX[x.dtype]}", M, x.device, _arg(x), _arg(spikes), _arg(h_seq), np.int64(T), np.int64(M),
                np.float32(tau), np.float32(v_threshold), np.float32(v_reset))
        ctx.save_for_backward(h_seq)
        ctx.params = (tau, v_threshold, v_reset, detach_reset, alpha)
        ctx.dtype = x.dtype
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        import numpy as np

        (h_seq,) = ctx.saved_tensors
        tau, v_threshold, v_reset, detach_reset, alpha = ctx.params
        grad = grad_spikes.detach().to(ctx.dtype).contiguous()
        grad_x = torch.empty_like(grad)
        T, M = h_seq.shape[0], h_seq[0].numel()
        _launch(f"lif_backward_{_SUFFIX[ctx.dtype]}", M, grad.device, _arg(grad), _arg(h_seq), _arg(grad_x), np.int64(T), np.int64(M),
                np.float32(tau), np.float32(v_threshold), np.float32(v_reset), np.int32(detach_reset), np.float32(alpha))
        return grad_x, None, None, None, None, None


def pack_spikes(spikes: torch.Tensor) -> torch.Tensor:
    """float32 CUDA spikes -> int32 words, 32 spikes per word (``pack_spikes_f32``)."""
    import numpy as np

    flat = spikes.detach().reshape(-1).contiguous()
    words = torch.empty((flat.numel() + 31) // 32, dtype=torch.int32, device=flat.device)
    _launch("pack_spikes_f32", words.numel(), flat.device, _arg(flat), _arg(words), np.int64(flat.numel()))
    return words


def unpack_spikes(words: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_spikes`: float32 spikes of ``shape``."""
    import numpy as np

    spikes = torch.empty(shape, dtype=torch.float32, device=words.device)
    _launch("unpack_spikes_f32", spikes.numel(), words.device, _arg(words), _arg(spikes), np.int64(spikes.numel()))
    return spikes
