"""The SDSA operator of the Spike-driven Transformer (SDT v1), fused.

    O = Q ⊙ LIF(Σ_N K ⊙ V)        Q, K, V spikes [T, B, C, N]; the LIF runs over T per (b, c)

The unfused form (:func:`sdsa_reference`, the official code's op order) makes a [T, B, C, N]
product K ⊙ V, sums it over the tokens, runs the channel-mask LIF (v_th 0.5) and multiplies Q by
the broadcast mask: four passes and two head-layout copies. :class:`SDSAFunction` runs each
direction as one function that ``torch.compile`` fuses (like the LIF loops; eager where compiling
is not possible or ``SPIKEFORMERS_LIF_COMPILE=0``) and keeps only Q, K, V (which autograd holds
anyway) and the mask LIF's H [T, B, C]. The heads do not matter: the sum runs over tokens per channel, and a channel belongs
to one head.

Backends follow the mask LIF's: ``"torch"`` (this file, CPU and CUDA), ``"cupy"`` (``kernels/sdsa.cu``),
``"spikingjelly"`` (the unfused reference through SpikingJelly's LIF). The unfused path also runs
whenever a hook watches the mask LIF (firing-rate and energy monitors), so that they see its spikes.
"""

from __future__ import annotations

import torch
from torch import nn

from spikeformers.models.neurons import (
    LIF, CompiledFunctions, fire, lif_backward_loop, lif_forward_loop, resolve_backend,
)

__all__ = ["sdsa", "sdsa_reference", "SDSAFunction", "sdsa_forward_fused", "sdsa_backward_fused"]


def sdsa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_lif: nn.Module) -> torch.Tensor:
    """Unfused SDSA on [T, B, C, N]: the official order (k ⊙ v, token sum, LIF, q ⊙ mask)."""
    return q.mul(mask_lif(k.mul(v).sum(dim=-1, keepdim=True)))


def sdsa_forward_fused(q, k, v, tau: float, v_threshold: float, v_reset: float):
    """[T, R, N] spikes -> (O [T, R, N], H [T, R] fp32). Inductor fuses it into two loops."""
    token_sum = k.mul(v).sum(dim=-1, dtype=torch.promote_types(k.dtype, torch.float32))  # [T, R] counts, as sdsa.cu
    mask, h_seq = lif_forward_loop(token_sum, tau, v_threshold, v_reset)
    return q.mul(mask.to(q.dtype).unsqueeze(-1)), h_seq


def sdsa_backward_fused(grad_out, q, k, v, h_seq, tau: float, v_threshold: float, v_reset: float,
                        detach_reset: bool, alpha: float):
    """dQ = dO ⊙ M;  dM = Σ_n dO ⊙ Q;  dS = LIF BPTT of dM from H;  dK = dS ⊙ V;  dV = dS ⊙ K."""
    mask = fire(h_seq, v_threshold).to(q.dtype).unsqueeze(-1)
    grad_mask = grad_out.mul(q).sum(dim=-1, dtype=h_seq.dtype)  # fp32 (fp64 for fp64 inputs)
    grad_sum = lif_backward_loop(grad_mask, h_seq, tau, v_threshold, v_reset, detach_reset, alpha).unsqueeze(-1)
    return grad_out.mul(mask), grad_sum.mul(v).to(k.dtype), grad_sum.mul(k).to(v.dtype)


#: Both directions compiled on first use (one fused kernel each way on the CPU), else eager.
_Fused = CompiledFunctions(sdsa_forward_fused, sdsa_backward_fused)


class SDSAFunction(torch.autograd.Function):
    """Fused SDSA on [T, B, C, N] spikes; saves Q, K, V (autograd holds them anyway) and H [T, B·C].

    Forward:  S = Σ_n K ⊙ V;  M, H = LIF(S);  O = Q ⊙ M
    Backward: dQ = dO ⊙ M;  dM = Σ_n dO ⊙ Q;  dS = BPTT(dM, H);  dK = dS ⊙ V;  dV = dS ⊙ K
    """

    @staticmethod
    def forward(ctx, q, k, v, tau, v_threshold, v_reset, detach_reset, alpha):
        rows = (q.shape[0], -1, q.shape[-1])  # [T, R, N]
        out, h_seq = _Fused.run(0, *(t.detach().reshape(rows) for t in (q, k, v)), tau, v_threshold, v_reset)
        ctx.save_for_backward(q, k, v, h_seq)
        ctx.params = (tau, v_threshold, v_reset, detach_reset, alpha)
        return out.reshape(q.shape)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, h_seq = ctx.saved_tensors
        rows = (q.shape[0], -1, q.shape[-1])
        grads = _Fused.run(1, grad_out.detach().reshape(rows), *(t.reshape(rows) for t in (q, k, v)), h_seq, *ctx.params)
        return (*(g.reshape(q.shape) for g in grads), None, None, None, None, None)


def _watched(module: nn.Module) -> bool:
    """True when forward hooks (the module's own or global ones) would expect ``module`` to be called."""
    from torch.nn.modules import module as module_globals

    return bool(module._forward_hooks or module._forward_pre_hooks or module_globals._global_forward_hooks
                or module_globals._global_forward_pre_hooks)


def sdsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_lif: LIF) -> torch.Tensor:
    """Q ⊙ LIF(Σ_N K ⊙ V) on spikes [T, B, C, N] with ``mask_lif``'s parameters and backend."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"sdsa expects q, k, v of one shape [T, B, C, N], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    backend = resolve_backend(mask_lif.backend, q.device)
    if backend == "spikingjelly" or _watched(mask_lif):
        return sdsa_reference(q, k, v, mask_lif)
    params = (mask_lif.tau, mask_lif.v_threshold, mask_lif.v_reset, mask_lif.detach_reset, mask_lif.alpha)
    if backend == "cupy":
        from spikeformers.kernels.cupy_lif import available
        from spikeformers.kernels.cupy_sdsa import SDSACupyFunction

        ok, missing = available()
        if not ok or not q.is_cuda:
            raise RuntimeError(f"LIF backend 'cupy' needs CUDA tensors and CuPy: {missing or f'the input is on {q.device.type}'}")
        return SDSACupyFunction.apply(q, k, v, *params)
    return SDSAFunction.apply(q, k, v, *params)
