"""Neurons of converted models (QCFS IF, ECMT multi-threshold) on CUDA through ``kernels/convert.cu``,
for inference. Used automatically by :class:`spikeformers.models.qcfs.IFNeuron` and
:class:`spikeformers.models.ecmt.MultiThresholdNeuron` on CUDA tensors when CuPy works
(``kernels.cupy_lif.available()``); otherwise they run their torch code. Numerics are tested on
the CPU against those torch references through a host build of the same source (tests/test_kernels.py).
"""

from __future__ import annotations

import numpy as np
import torch

from spikeformers.kernels.cupy_lif import _arg, _launch, available

__all__ = ["usable", "if_forward", "multi_threshold_step"]

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def usable(x: torch.Tensor) -> bool:
    """True when ``x`` can go through the CUDA kernels (a float32/float64 CUDA tensor, CuPy working)."""
    return x.is_cuda and x.dtype in _SUFFIX and available()[0]


def if_forward(z: torch.Tensor, theta: float) -> torch.Tensor:
    """IF spikes for z [T, ...]: v(0) = θ/2, soft reset, amplitude θ."""
    z = z.detach().contiguous()
    T, M = z.shape[0], z[0].numel()
    spikes = torch.empty_like(z)
    _launch(f"if_forward_{_SUFFIX[z.dtype]}", M, z.device, _arg(z), _arg(spikes), np.int64(T), np.int64(M),
            np.float64(theta), file="convert.cu")
    return spikes


def multi_threshold_step(x: torch.Tensor, v: torch.Tensor, theta_p: float, theta_n: float, levels: int) -> torch.Tensor:
    """One step of the multi-threshold neuron; ``v`` (contiguous, x's shape) is updated in place."""
    x = x.detach().contiguous()
    spikes = torch.empty_like(x)
    _launch(f"multi_threshold_step_{_SUFFIX[x.dtype]}", x.numel(), x.device, _arg(x), _arg(v), _arg(spikes),
            np.int64(x.numel()), np.float64(theta_p), np.float64(theta_n), np.int32(levels), file="convert.cu")
    return spikes
