"""The fused SDSA operator (``kernels/sdsa.cu``) on CUDA through CuPy; same contract as
:class:`spikeformers.models.sdsa.SDSAFunction`, which ``sdsa()`` uses everywhere else. Numerics are
tested on the CPU through a host build of the same source (tests/test_kernels.py)."""

from __future__ import annotations

import numpy as np
import torch

from spikeformers.kernels.cupy_lif import _SUFFIX, _arg, _launch

__all__ = ["SDSACupyFunction"]


def _contiguous(q, k, v):
    return tuple(t.detach().to(q.dtype).contiguous() for t in (q, k, v))


class SDSACupyFunction(torch.autograd.Function):
    """O = Q ⊙ LIF(Σ_N K ⊙ V) on CUDA spikes [T, B, C, N] (float32/float16/bfloat16)."""

    @staticmethod
    def forward(ctx, q, k, v, tau, v_threshold, v_reset, detach_reset, alpha):
        if q.dtype not in _SUFFIX:
            raise TypeError(f"SDSA backend 'cupy' supports float32/float16/bfloat16, got {q.dtype}")
        # save the inputs themselves (not contiguous copies): packed storage can then store them as bits
        ctx.save_for_backward(q, k, v)
        q, k, v = _contiguous(q, k, v)
        T, N = q.shape[0], q.shape[-1]
        R = q[0].numel() // N
        out = torch.empty_like(q)
        h_seq = torch.empty((T, R), dtype=torch.float32, device=q.device)
        _launch(f"sdsa_forward_{_SUFFIX[q.dtype]}", R, q.device, _arg(q), _arg(k), _arg(v), _arg(out), _arg(h_seq),
                np.int64(T), np.int64(R), np.int64(N), np.float32(tau), np.float32(v_threshold), np.float32(v_reset),
                file="sdsa.cu")
        ctx.h_seq = h_seq  # float32 [T, B·C], never spikes
        ctx.params = (tau, v_threshold, v_reset, detach_reset, alpha)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = _contiguous(*ctx.saved_tensors)
        h_seq = ctx.h_seq
        tau, v_threshold, v_reset, detach_reset, alpha = ctx.params
        grad = grad_out.detach().to(q.dtype).contiguous()
        grads = [torch.empty_like(q) for _ in range(3)]
        T, R = h_seq.shape
        _launch(f"sdsa_backward_{_SUFFIX[q.dtype]}", R, q.device, _arg(grad), _arg(q), _arg(k), _arg(v), _arg(h_seq),
                *(_arg(g) for g in grads), np.int64(T), np.int64(R), np.int64(q.shape[-1]), np.float32(tau),
                np.float32(v_threshold), np.float32(v_reset), np.int32(detach_reset), np.float32(alpha), file="sdsa.cu")
        return (*grads, None, None, None, None, None)
