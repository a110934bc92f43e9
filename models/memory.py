"""Packed spike storage for BPTT: spikes that autograd keeps for backward are stored as bits.

A layer fed by spikes (conv, linear, matmul, the SDSA operator) saves its input for the weight
gradient: {0, 1} tensors in float32/bf16/fp16, 16–32 bits per spike. Inside :func:`packed_spikes`
every floating tensor autograd saves is checked, and one whose values are all 0 or 1 is kept as
1 bit per element (8 per byte; on CUDA with CuPy and float32, 32 per word through
``kernels/lif.cu``'s pack kernels) and unpacked when backward needs it. The check is by value,
so packing is lossless by construction (values and shape; channels_last tensors keep their
layout; a -0.0 comes back as 0.0) and gradients are bit-identical to the plain run.

Cost: a 1,024-element sample rules out most non-spike tensors (BatchNorm inputs, membranes) at
once; a spike tensor costs one checking pass and one packing pass in forward, one unpacking
pass in backward. Parameters and tensors without a graph (a neuron's saved membrane) are skipped.
On CUDA each check reads its result back to the host (one synchronisation per saved tensor).

Activation checkpointing (``set_grad_checkpointing``) keeps stage inputs only and recomputes the
rest; inside a checkpointed stage its own hooks decide what is stored, so the two options are
used one at a time (``trainer.memory``: ``plain | checkpoint | packed``).
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["packed_spikes", "pack_bits", "unpack_bits", "is_binary"]

_MIN_ELEMENTS = 4096  # smaller tensors are not worth a pack/unpack pass
_SAMPLE = 1024
_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _all_binary(t: torch.Tensor) -> bool:
    return bool(t.eq(t.ne(0)).all())  # x == (x != 0) holds exactly for x in {0, 1}


def is_binary(t: torch.Tensor) -> bool:
    """True when every element of the floating tensor ``t`` is exactly 0 or 1."""
    if not t.is_floating_point():
        return False
    flat = t.reshape(-1) if t.is_contiguous() else t.flatten()
    return _all_binary(flat[:_SAMPLE]) and _all_binary(flat)


def pack_bits(spikes: torch.Tensor) -> torch.Tensor:
    """{0, 1} tensor -> uint8 [ceil(n / 8)], element 8i + j in bit j of byte i."""
    flat = spikes.reshape(-1).ne(0)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    bits = flat.view(-1, 8).view(torch.uint8)
    packed = bits[:, 0].clone()
    for j in range(1, 8):
        packed |= bits[:, j] << j
    return packed


def unpack_bits(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a contiguous tensor of ``shape`` and ``dtype``."""
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_VALUES.to(packed.device)).ne(0)
    return bits.reshape(-1)[: math.prod(shape)].to(dtype).view(shape)


def _cuda_words(t: torch.Tensor) -> bool:
    if not (t.is_cuda and t.dtype == torch.float32):
        return False
    from spikeformers.kernels.cupy_lif import available

    return available()[0]


def _pack(t: torch.Tensor):
    if t.grad_fn is None or t.numel() < _MIN_ELEMENTS or not is_binary(t):
        return t
    # channels_last conv inputs come back channels_last, so backward picks the same kernels
    layout = torch.channels_last if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    if layout == torch.channels_last:
        t = t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # packed in memory order
    if _cuda_words(t):
        from spikeformers.kernels.cupy_lif import pack_spikes

        return ("words", pack_spikes(t), t.shape, t.dtype, layout)
    return ("bytes", pack_bits(t), t.shape, t.dtype, layout)


def _unpack(saved):
    if isinstance(saved, torch.Tensor):
        return saved
    kind, packed, shape, dtype, layout = saved
    if kind == "words":
        from spikeformers.kernels.cupy_lif import unpack_spikes

        spikes = unpack_spikes(packed, shape)
    else:
        spikes = unpack_bits(packed, shape, dtype)
    return spikes.permute(0, 3, 1, 2) if layout == torch.channels_last else spikes  # NHWC memory, NCHW view


@contextlib.contextmanager
def packed_spikes():
    """Within this context, {0, 1} tensors saved for backward are stored as bits (run the forward in it)."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
