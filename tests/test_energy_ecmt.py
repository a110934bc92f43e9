"""Energy analysis of spikes beyond {0, 1}: ECMT's attention products (AtNeurons) counted by the
NeuroBench collector as ECMT counts them itself, and E-SpikeFormer's integer spike counts S/D
counted as Σ S spikes in the legacy table, as its spike-driven (binary) mode counts them."""

import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models import ecmt
from spikeformers.models.sdt_v3 import SpikeCountNeuron
from spikeformers.models.spike_driven import set_spike_mode
from spikeformers.train.energy import analyze
from spikeformers.train import energy_ma as ma
from spikeformers.train.neurobench import AttentionCounts, collect, neurobench_metrics

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
N, C, T, B = 17, 64, 3, 2  # 16 patches + class token


def tiny_snn(**levels) -> ecmt.SpikingTransformer:
    """A random tiny ViT (weights N(0, 1/fan_in), float64) converted by ECMT."""
    torch.manual_seed(0)
    vit = VisionTransformer(**TINY)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in vit.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
    vit = vit.double().eval()
    batches = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(100 + i)).double() for i in range(2)]
    return ecmt.convert(vit, ecmt.calibrate(vit, batches), **levels)


def images(n, seed=5):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).double()


def ecmt_product_counts(snn, x) -> dict[str, tuple[int, int]]:
    """ECMT's own SOPs of every AtNeuron over T steps (:func:`ecmt.product_ops`, as
    :func:`ecmt.op_counts` counts them), split into (operand pairs with a spike-valued operand,
    the others): A·B has one if A or B is single-amplitude {−a, 0, a}, A·S_B if A is, S_A·B if B is."""
    def single_amplitude(t):
        nonzero = t[t != 0].abs()
        return nonzero.numel() == 0 or bool((nonzero == nonzero[0]).all())

    counts, hooks = {}, []
    for name, m in snn.named_modules():
        if isinstance(m, ecmt.AtNeuron):
            def hook(m, args, out, name=name):
                a, b = args
                zero = torch.zeros_like
                ab = ecmt.product_ops(a, b, zero(a), zero(b))[0]          # 1[A]1[B] only
                a_sb = ecmt.product_ops(a, zero(b), zero(a), m.sum_b)[0]  # 1[A]1[S_B]
                sa_b = ecmt.product_ops(zero(a), b, m.sum_a, zero(b))[0]  # 1[S_A]1[B]
                assert ab + a_sb + sa_b == ecmt.product_ops(a, b, m.sum_a, m.sum_b)[0]
                ac = (ab if single_amplitude(a) or single_amplitude(b) else 0) + (a_sb if single_amplitude(a) else 0) \
                    + (sa_b if single_amplitude(b) else 0)
                done = counts.get(name, (0, 0))
                counts[name] = (done[0] + ac, done[1] + ab + a_sb + sa_b - ac)
            hooks.append(m.register_forward_hook(hook))
    try:
        snn.forward_steps(x, T)
    finally:
        for h in hooks:
            h.remove()
    return counts


@pytest.mark.parametrize("levels", [{}, dict(n_softmax=1)], ids=["multi_level", "one_level_softmax"])
def test_collector_counts_the_atneuron_products_as_ecmt_does(levels):
    snn = tiny_snn(**levels)
    x = images(B)
    expected = ecmt_product_counts(snn, x)
    assert len(expected) == 2 * TINY["depth"]
    snn.T = T
    counts = collect(snn, [x])
    rows = {r.name: r for r in counts.rows if isinstance(r, AttentionCounts)}
    assert set(rows) == set(expected)
    for name, (ac, mac) in expected.items():
        row = rows[name]
        assert row.s == ac + mac, name                       # ECMT's own SOPs, exactly
        assert row.s_macs == mac, name                       # no operand spike-valued: MAC
        assert row.product == ("qk" if name.endswith("qk") else "av") and row.steps == T
        assert row.dense == 3 * B * T * N * N * C            # three dense products per step (all-ones operands)
    if levels:  # one-level softmax neurons emit ±0.0125: the S·V products have a spike operand
        assert any(ac > 0 for name, (ac, _) in expected.items() if name.endswith("sv"))
    else:
        assert all(ac == 0 for ac, _ in expected.values())
    nb = neurobench_metrics(snn, counts)
    ext = nb["ext"]["attention_synops"]
    total = sum(ac + mac for ac, mac in expected.values())
    assert ext["Effective_MACs"] + ext["Effective_ACs"] == total / B
    assert ext["Effective_MACs"] == sum(mac for _, mac in expected.values()) / B  # graded products are MACs
    assert ext["Dense"] == 2 * TINY["depth"] * 3 * T * N * N * C
    # priced: a MAC costs the AC's add plus a multiply at b_v
    p = ma.PROFILES["mem45-int8"]
    for name, (ac, mac) in expected.items():
        priced = ma.price(counts, p)["rows"]
        row = next(r for r in priced if r["name"] == name)
        assert row["E_pJ"]["compute"] == pytest.approx((ac + mac) / B * p.e_ac + mac / B * p.e_mul_v, rel=1e-9)


def test_legacy_table_counts_the_atneuron_products_as_ecmt_does():
    snn = tiny_snn()
    x = images(B)
    expected = ecmt_product_counts(snn, x)
    snn.T = T
    report = analyze(snn, [x])
    rows = {r.name: r for r in report.layers if r.op.startswith("ecmt_")}
    assert set(rows) == set(expected)
    for name, (ac, mac) in expected.items():
        row = rows[name]
        assert row.steps == T and row.flops == N * N * C  # one dense product per sample and step
        assert row.sops == pytest.approx((ac + mac) / B, rel=1e-12)


# --- E-SpikeFormer's integer spike counts ------------------------------------------------------------


class CountThenLinear(nn.Sequential):
    T = 1


def test_integer_counts_are_counted_as_spikes_by_hand():
    """S = [4, 0, 2] (D = 4) reaches Linear(3, 2) as S/D = [1, 0, 0.5]: Σ S = 6 spikes, each
    driving 2 outputs, 12 SOPs (counting the non-zero entries would give 4)."""
    net = CountThenLinear(SpikeCountNeuron(max_spike_count=4), nn.Linear(3, 2)).eval()
    x = torch.tensor([[4.0, 0.0, 2.0]])
    assert net[0](x).tolist() == [[1.0, 0.0, 0.5]]
    integer = next(r for r in analyze(net, [x]).layers if r.name == "1")
    assert integer.sops == 12 and integer.unit == "AC"
    set_spike_mode(net, "binary")
    binary = next(r for r in analyze(net, [x]).layers if r.name == "1")
    assert binary.sops == pytest.approx(12, rel=1e-6) and binary.steps == 4  # the D planes as virtual steps


def in_both_modes(model, count):
    """``count()`` with ``model`` in integer mode, then in spike-driven (binary) mode; the model is
    left in integer mode."""
    integer = count()
    set_spike_mode(model, "binary")
    try:
        return integer, count()
    finally:
        set_spike_mode(model, "integer")


def test_integer_mode_sops_equal_binary_mode_sops(lively):
    torch.manual_seed(0)
    model = lively(timm.create_model("sdtv3_tiny", num_classes=10).eval())
    x = torch.randn(2, 1, 32, 32)
    integer, binary = in_both_modes(model, lambda: analyze(model, [x]))
    by_name = {r.name: r for r in binary.layers}
    assert [r.name for r in integer.layers] == list(by_name)
    counted = [r for r in integer.layers if r.input_type == "integer"]
    assert len(counted) > 5
    for r in integer.layers:
        assert r.sops == pytest.approx(by_name[r.name].sops, rel=1e-9), r.name
        assert r.unit == by_name[r.name].unit, r.name
    assert integer.total_energy_mJ == pytest.approx(binary.total_energy_mJ, rel=1e-9)
    assert integer.ann_energy_mJ == pytest.approx(binary.ann_energy_mJ, rel=1e-12)


def test_memory_aware_counts_of_integer_counts_by_hand():
    """The v2 counter reads S/D from a spike-count neuron as S spikes: S = [4, 0, 2] (D = 4) into
    Linear(3, 2) gives Z = Σ S = 6 input events and S_eff = 12 (6 spikes × 2 outputs), the neuron
    row 6 events of at most 4 per neuron and step; the NeuroBench keys read the values as they are
    (S/D = [1, 0, 0.5] is not in {−1, 0, 1}: 4 effective MACs)."""
    net = CountThenLinear(SpikeCountNeuron(max_spike_count=4), nn.Linear(3, 2)).eval()
    x = torch.tensor([[4.0, 0.0, 2.0]])
    counts = collect(net, [x], T=1)
    neuron = next(r for r in counts.rows if r.name == "0")
    linear = next(r for r in counts.rows if r.name == "1")
    assert neuron.events == 6 and neuron.levels == 4 and neuron.spikes == 2
    assert linear.input_type == "integer" and linear.z_sum == 6 and linear.s_eff_sum == 12
    assert linear.effective_macs == 4 and linear.effective_acs == 0
    p = ma.PROFILES["mem45-int8"]
    rows = {r["name"]: r for r in ma.price(counts, p)["rows"]}
    assert rows["1"]["E_pJ"]["compute"] == pytest.approx(12 * p.e_ac, rel=1e-12)
    assert rows["0"]["E_pJ"]["io"] == pytest.approx(6 * p.bits_e * p.m(p.fifo_entries * p.bits_e / 8), rel=1e-12)
    # on a chip the counts arrive as spikes: 12 ACs, no MAC left for the host; 3 neurons × D = 4
    # virtual steps, plus the 2 outputs
    from spikeformers.train.energy_hw import hardware_report

    loihi = hardware_report(counts, neurobench_metrics(net, counts))["loihi"]
    assert "first_layer_macs" not in loihi["unmapped"] and loihi["fits"]["neurons_required"] == 3 + 2
    assert loihi["energy_pJ"] == pytest.approx(12 * loihi["sop_pJ"] + 3 * 4 * loihi["neuron_pJ"], rel=1e-12)


def test_memory_aware_synaptic_events_equal_in_integer_and_binary_mode(lively):
    torch.manual_seed(0)
    model = lively(timm.create_model("sdtv3_tiny", num_classes=10).eval())
    x = torch.randn(2, 1, 32, 32)
    integer, binary = in_both_modes(model, lambda: collect(model, [x]))
    from spikeformers.train.neurobench import ConnectionCounts

    ints = {r.name: r for r in integer.rows if isinstance(r, ConnectionCounts)}
    bins = {r.name: r for r in binary.rows if isinstance(r, ConnectionCounts)}
    fed = [n for n, r in ints.items() if r.input_type in ("integer", "binary")]
    assert len(fed) > 5
    for n in fed:  # Σ S over the entries = Σ over the D binary planes, event for event
        assert ints[n].z_sum == bins[n].z_sum, n
        assert ints[n].s_eff_sum == pytest.approx(bins[n].s_eff_sum, rel=1e-12), n
