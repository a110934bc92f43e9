"""Packed spike storage (models/memory.py): lossless bits, smaller saved activations, same gradients."""

import pytest
import timm
import torch

import spikeformers  # noqa: F401
from spikeformers.models import memory
from spikeformers.models.memory import pack_bits, packed_spikes, unpack_bits
from spikeformers.models.neurons import LIF


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_bits_round_trip(n, dtype):
    spikes = (torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3).to(dtype)
    packed = pack_bits(spikes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, spikes.shape, dtype), spikes)
    # bit j of byte i is element 8i + j (the layout the CUDA words use, 8 instead of 32 per word)
    assert int(packed[0]) == sum(int(spikes[j]) << j for j in range(min(n, 8)))


def test_is_binary_checks_every_element():
    spikes = (torch.rand(5000, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    assert memory.is_binary(spikes) and memory.is_binary(spikes.view(50, 100).t())  # strided too
    spikes[4999] = 2.0  # past the 1,024-element sample
    assert not memory.is_binary(spikes)
    assert not memory.is_binary(torch.ones(5000, dtype=torch.int64))


def _saved_bytes(model, x, packed: bool) -> tuple[int, dict]:
    """Bytes autograd keeps for one forward (after packing), and the gradients of sum(logits)."""
    sizes = []

    def count(t):
        sizes.append(t.numel() * t.element_size())
        return t

    if packed:
        pack = memory._pack
        memory._pack = lambda t: (lambda s: (count(s[1]) if isinstance(s, tuple) else count(s), s)[1])(pack(t))
        try:
            with packed_spikes():
                out = model(x)
        finally:
            memory._pack = pack
    else:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return sum(sizes), grads


@pytest.mark.parametrize("name", ["spikformer_tiny", "sdt_tiny"])
def test_packed_storage_same_gradients_less_memory(name):
    torch.manual_seed(0)
    model = timm.create_model(name, backend="torch").train()
    x = torch.randn(4, 1, 32, 32)
    plain_bytes, plain_grads = _saved_bytes(model, x, packed=False)
    packed_bytes, packed_grads = _saved_bytes(model, x, packed=True)
    assert plain_grads.keys() == packed_grads.keys()
    for n in plain_grads:
        assert torch.equal(plain_grads[n], packed_grads[n]), n
    # Spike inputs of convs/linears are a third or more of what these models keep for backward.
    assert packed_bytes < 0.8 * plain_bytes, (packed_bytes, plain_bytes)


def test_packing_keeps_channels_last_layout():
    spikes = (torch.rand(2, 8, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    spikes = spikes.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = spikes * 1.0  # a graph node (only such tensors are packed)
    saved = memory._pack(y)
    assert isinstance(saved, tuple) and saved[0] == "bytes"
    back = memory._unpack(saved)
    assert torch.equal(back, y) and back.is_contiguous(memory_format=torch.channels_last)
