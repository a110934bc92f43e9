"""The ``lemaire`` profile against SpikingJelly 2.0's ``estimate_lemaire_energy`` beyond one sample.

SpikingJelly's estimate is not per sample: it reports the total of the batch it is given and sizes
every buffer from the tensors one call sees. A spike-input layer's membrane buffer holds
``out.numel() / T`` words (B samples, one step), a neuron's ``out.numel() / T`` words, a
real-valued input buffer ``x.numel()`` words (B samples, T steps); the FIFO (1000 words) and the
weights do not depend on B. Lemaire et al. (ICONIP 2022) price one sample with per-layer memories,
and so does our profile: one sample, one step per buffer, every count divided by B. Hence:

- run one sample at a time, SpikingJelly agrees with us to the digit at any batch size and T
  (every count is a sum over samples and the buffers are the same);
- run on a batch of B, the membrane buffers are B times larger. Below 8 KiB the memory cost per
  byte grows linearly with the capacity, so there SpikingJelly's batch total is B × ours with the
  membrane term B times dearer: total / B = ours + (B − 1) · membrane;
- a real-valued input read over T steps sits in a buffer of T steps in SpikingJelly (T × the
  per-byte cost below 8 KiB) and of one step in ours; likewise a real-input conv's C_out·k address
  adds are counted once per call there (one call runs T steps of B samples) and once per pass here.

Digit-for-digit parity at B = 1 on the same toy network is tested with the other hand-computed
cases in test_energy_v2.py (T3).
"""

import pytest
import torch
from torch import nn

spikingjelly = pytest.importorskip("spikingjelly")
if getattr(spikingjelly, "__version__", "2.0.0") != "2.0.0":
    pytest.skip("parity is pinned to SpikingJelly 2.0.0", allow_module_level=True)

from spikingjelly.activation_based import functional, layer, neuron  # noqa: E402
from spikingjelly.activation_based.op_counter.analytical_energy import (  # noqa: E402
    LemaireEnergyConfig, estimate_lemaire_energy)

from spikeformers.train import energy_ma as ma  # noqa: E402
from spikeformers.train.neurobench import collect  # noqa: E402

E_ADD = 0.1  # pJ, one 32-bit add (Lemaire 2022 / Horowitz 2014)


def linear_net():
    """The Lemaire toy of test_energy_v2.py (T3): Linear(8, 6, bias) → LIF → Linear(6, 4) → IF, multi-step."""
    net = nn.Sequential(layer.Linear(8, 6, bias=True, step_mode="m"), neuron.LIFNode(step_mode="m"),
                        layer.Linear(6, 4, bias=False, step_mode="m"), neuron.IFNode(step_mode="m"))
    with torch.no_grad():
        net[0].weight.copy_(torch.linspace(-0.5, 1.5, 48).reshape(6, 8))
        net[0].bias.fill_(0.1)
        net[2].weight.copy_(torch.linspace(-1, 2, 24).reshape(4, 6))
    return net


def conv_net(step_mode="m"):
    """Conv(2→4, 3×3, stride 2, pad 1) → LIF → Conv(4→3, 3×3, pad 1, bias) → IF on 8×8 maps: 4×4
    outputs, so the bias adds are 3·4·4 = 48 per step."""
    if step_mode == "m":
        convs = (layer.Conv2d(2, 4, 3, stride=2, padding=1, bias=False, step_mode="m"),
                 layer.Conv2d(4, 3, 3, padding=1, bias=True, step_mode="m"))
    else:
        convs = (nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), nn.Conv2d(4, 3, 3, padding=1, bias=True))
    net = nn.Sequential(convs[0], neuron.LIFNode(step_mode=step_mode), convs[1], neuron.IFNode(step_mode=step_mode))
    with torch.no_grad():
        net[0].weight.copy_(torch.linspace(-0.5, 1.5, 72).reshape(4, 2, 3, 3))
        net[2].weight.copy_(torch.linspace(-1, 2, 108).reshape(3, 4, 3, 3))
        net[2].bias.fill_(0.1)
    return net


def spikingjelly(net, x):
    functional.reset_net(net)
    report = estimate_lemaire_energy(net, x, config=LemaireEnergyConfig(strict=False))
    functional.reset_net(net)
    return report


def ours(net, batches, T, time_first=True):
    return ma.price(collect(net, batches, T=T, time_first=time_first), ma.PROFILES["lemaire"])["snn"]


def one_at_a_time(net, x):
    """SpikingJelly's breakdown averaged over single-sample runs of a [T, B, ...] input."""
    reports = [spikingjelly(net, x[:, b:b + 1]) for b in range(x.shape[1])]
    mean = {k: sum(r.breakdown_pj[k] for r in reports) / len(reports) for k in reports[0].breakdown_pj}
    mean["total_pj"] = sum(r.total_pj for r in reports) / len(reports)
    return reports, mean


def assert_same_terms(snn, sj, bias_adds):
    """Our breakdown against SpikingJelly's: Lemaire counts bias adds as operations and bias reads
    as parameter reads; we keep both in the bias term."""
    b = snn["breakdown_pJ"]
    assert snn["total_pJ"] == pytest.approx(sj["total_pj"], rel=1e-12)
    assert b["compute"] + bias_adds == pytest.approx(sj["ops_pj"], rel=1e-12)
    assert b["addressing"] == pytest.approx(sj["addressing_pj"], rel=1e-12)
    assert b["io"] == pytest.approx(sj["inout_pj"], rel=1e-12)
    assert b["membrane"] == pytest.approx(sj["potential_pj"], rel=1e-12)
    assert b["weights"] + b["bias"] - bias_adds == pytest.approx(sj["params_pj"], rel=1e-12)


# Sample 0 is T3's input (SpikingJelly 2.0.0 on it alone: 251.73125 pJ); samples 1 and 2 differ.
SPIKES = torch.zeros(3, 3, 8)
SPIKES[0, 0, [0, 3, 5]] = SPIKES[1, 0, [1, 2]] = SPIKES[2, 0, [0, 1, 2, 7]] = 1
SPIKES[0, 1, [1, 2, 4, 6]] = SPIKES[1, 1, :] = SPIKES[2, 1, [7]] = 1
SPIKES[1, 2, [0, 5]] = SPIKES[2, 2, [3, 4, 5, 6]] = 1


def test_linear_network_per_sample_parity_at_batch_3():
    net = linear_net()
    reports, mean = one_at_a_time(net, SPIKES)
    assert reports[0].total_pj == pytest.approx(251.73125, rel=1e-12)  # T3's reference value
    bias_adds = 3 * 6 * E_ADD  # T · n_out of the biased layer
    assert_same_terms(ours(net, [SPIKES], T=3), mean, bias_adds)
    assert_same_terms(ours(net, [SPIKES[:, :1], SPIKES[:, 1:]], T=3), mean, bias_adds)  # any split into batches


def test_spikingjelly_prices_a_batch_as_one_sample_with_batch_sized_membrane_buffers():
    net = linear_net()
    B = SPIKES.shape[1]
    batch = spikingjelly(net, SPIKES)
    snn = ours(net, [SPIKES], T=3)
    b = snn["breakdown_pJ"]
    assert batch.buffer_sizes_bytes["potential_buffer_bytes"] == B * 6 * 4  # B samples of the widest layer
    assert batch.buffer_sizes_bytes["potential_buffer_bytes"] < 8 * 1024    # the linear part of the curve
    bias_adds = 3 * 6 * E_ADD
    assert batch.breakdown_pj["ops_pj"] == pytest.approx(B * (b["compute"] + bias_adds), rel=1e-12)
    assert batch.breakdown_pj["addressing_pj"] == pytest.approx(B * b["addressing"], rel=1e-12)
    assert batch.breakdown_pj["inout_pj"] == pytest.approx(B * b["io"], rel=1e-12)  # the FIFO: 1000 words for any B
    assert batch.breakdown_pj["params_pj"] == pytest.approx(B * (b["weights"] + b["bias"] - bias_adds), rel=1e-12)
    assert batch.breakdown_pj["potential_pj"] == pytest.approx(B * B * b["membrane"], rel=1e-12)
    assert batch.total_pj / B == pytest.approx(snn["total_pJ"] + (B - 1) * b["membrane"], rel=1e-12)
    assert batch.total_pj / B > snn["total_pJ"]


def test_conv_network_per_sample_parity_at_batch_3_and_4_steps():
    net = conv_net()
    x = (torch.rand(4, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    _, mean = one_at_a_time(net, x)
    assert_same_terms(ours(net, [x], T=4), mean, bias_adds=4 * 48 * E_ADD)


def test_real_valued_input_sits_in_a_buffer_of_all_steps_in_spikingjelly():
    net = linear_net()
    x = torch.rand(3, 2, 8, generator=torch.Generator().manual_seed(0))  # real values: fc0 runs dense MACs
    for T in (1, 3):
        _, mean = one_at_a_time(net, x[:T])
        snn = ours(net, [x[:T]], T=T)
        first_io = ma.price(collect(net, [x[:T]], T=T, time_first=True), ma.PROFILES["lemaire"])["rows"][0]["E_pJ"]["io"]
        # T·n_in words read at T× the per-byte cost (buffer of T steps, below 8 KiB): (T − 1)·E_in more
        mean["inout_pj"] -= (T - 1) * first_io
        mean["total_pj"] -= (T - 1) * first_io
        assert_same_terms(snn, mean, bias_adds=T * 6 * E_ADD)


def test_real_valued_padded_conv_counts_every_tap():
    net = conv_net(step_mode="s")  # one step: nn.Conv2d and single-step neurons
    x = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    sj = spikingjelly(net, x)
    assert_same_terms(ours(net, [x], T=1, time_first=False), sj.breakdown_pj | {"total_pj": sj.total_pj}, bias_adds=48 * E_ADD)
