"""Energy analysis of AT-SNN models with token halting on: only the tokens actually processed are
counted (connection layers, neurons, attention products; NeuroBench counts, the memory-aware
model and the legacy table). A hand-computed case with forced halting, and two invariants: with
halting disabled the counts are the backbone's, and more halting strictly lowers them."""

import pytest
import timm
import torch

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.train import energy_ma
from spikeformers.train.energy import analyze
from spikeformers.train.neurobench import AttentionCounts, NeuronCounts, collect, neurobench_metrics

N, L, T, D, HIDDEN = 64, 2, 4, 64, 256  # atsnn_spikformer_tiny on 32×32: 8×8 tokens, 2 blocks, MLP ratio 4


def lively_bn(model, seed):
    """Trained-like BN statistics so that tokens fire (random init leaves most LIFs silent)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5 - 0.3)
            m.running_var.fill_(0.5)


def make(name="atsnn_spikformer_tiny", base_name="spikformer_tiny", seed=0, **opts):
    """The AT-SNN model (float64, eval) and its backbone with the same weights."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, in_chans=1, backend="torch", atsnn=opts)
    base = timm.create_model(base_name, num_classes=10, in_chans=1, backend="torch")
    lively_bn(model, seed)
    base.load_state_dict(model.state_dict(), strict=False)
    return model.double().eval(), base.double().eval()


def images(b, seed=1):
    return torch.randn(b, 1, 32, 32, generator=torch.Generator().manual_seed(seed)).double() * 2


def force_halting(model, halted):
    """Halting scores 0 everywhere except h = 1 for the tokens ``halted`` [B, N] at the last block of
    step t = 0: those tokens run every block at t = 0 and nothing afterwards (reading A)."""
    calls = iter(range(10**9))

    def score(x, probes):
        t, l = divmod(next(calls), L)
        h = torch.zeros(x.shape[:2], dtype=x.dtype)
        if (t, l) == (0, L - 1):
            h[halted] = 1.0
        return h

    model._halting_score = score


def layers(nb):
    return {r["name"]: r for r in nb["layers"]}


@pytest.mark.parametrize("halted_per_sample", [[10, 20], [10]], ids=["masked_batch2", "gathered_batch1"])
def test_forced_halting_by_hand(halted_per_sample):
    """Block 1's fc1 neurons get the constant input 1.5 (BN scale 0, shift 1.5). LIF τ = 2, V_th = 1,
    hard reset to 0: H = 0.75 (no spike), 1.125 (spike, V → 0), 0.75, 1.125 — spikes at t = 1, 3
    and a membrane that changes at every step. Sample b halts k_b tokens after t = 0, so block 1
    processes 64 tokens at t = 0 and 64 − k_b at t = 1, 2, 3."""
    model, _ = make()
    with torch.no_grad():
        model.block[1].mlp.fc1_bn.weight.zero_()
        model.block[1].mlp.fc1_bn.bias.fill_(1.5)
    lif = model.block[1].mlp.fc1_lif
    assert (lif.tau, lif.v_threshold, lif.v_reset) == (2.0, 1.0, 0.0)
    assert bool((model.block[1].mlp.fc2_linear.weight != 0).all())  # every weight counts
    B = len(halted_per_sample)
    halted = torch.zeros(B, N, dtype=torch.bool)
    for b, k in enumerate(halted_per_sample):
        halted[b, :k] = True
    force_halting(model, halted)
    x = images(B)
    counts = collect(model, [x])
    assert model.token_stats["tokens"].tolist() == [N * L + (T - 1) * (N - k) * L for k in halted_per_sample]
    nb = neurobench_metrics(model, counts)
    by_name = layers(nb)

    running = [N - k for k in halted_per_sample]          # tokens per step t ≥ 1
    token_steps = sum(N + (T - 1) * r for r in running) / B  # per sample: 64 + 3·(64 − k)
    spikes = sum(2 * r for r in running) * HIDDEN / B        # fc1 spikes at t = 1 and 3
    neuron_steps = token_steps * HIDDEN

    fc1_lif = by_name["block.1.mlp.fc1_lif"]
    assert fc1_lif["membrane_updates"] == neuron_steps     # every computed membrane changes
    assert fc1_lif["sparsity"] == pytest.approx(1 - spikes / neuron_steps, rel=1e-12)
    row = next(r for r in counts.rows if r.name == "block.1.mlp.fc1_lif")
    assert isinstance(row, NeuronCounts)
    assert row.n * row.steps == pytest.approx(neuron_steps, rel=1e-12)  # what the memory-aware model prices

    fc2 = by_name["block.1.mlp.fc2_linear"]
    assert fc2["Dense"] == token_steps * HIDDEN * D
    assert fc2["Effective_ACs"] == spikes * D and fc2["Effective_MACs"] == 0

    qk = by_name["block.1.attn.qk"]  # Q·Kᵀ over the tokens present: N² at t = 0, (N − k)² after
    assert qk["Dense"] == sum(N * N + (T - 1) * r * r for r in running) * D / B

    force_halting(model, halted)  # the scores restart with the next forward
    report = analyze(model, [x])  # the legacy table counts the same tokens
    fc2_legacy = next(r for r in report.layers if r.name == "block.1.mlp.fc2_linear")
    assert fc2_legacy.steps == T
    assert fc2_legacy.flops == token_steps * HIDDEN * D / T  # mean FLOPs per step
    assert fc2_legacy.sops == pytest.approx(spikes * D, rel=1e-12)


def _totals(model, x):
    counts = collect(model, [x])
    nb = neurobench_metrics(model, counts)
    return counts, nb


@pytest.mark.parametrize("family", ["spikformer", "sdt"])
def test_halting_disabled_counts_equal_the_backbone(family):
    """Nothing halts before the forced last position: every layer counts what the backbone counts.
    (NeuroBench classifies AC/MAC per call, and the step-wise pass calls a layer once per step, so
    only the sum Effective_MACs + Effective_ACs is compared per layer.)"""
    if family == "sdt":
        model, base = make("atsnn_sdt_tiny", "sdt_tiny", gate_center=50.0, readout="time_mean")
    else:
        model, base = make(gate_center=1e4, readout="time_mean")
    x = images(2)
    (counts_a, nb_a), (counts_b, nb_b) = _totals(model, x), _totals(base, x)
    assert model.token_stats["tokens"].tolist() == [N * L * T] * 2
    a, b = layers(nb_a), layers(nb_b)
    assert set(a) == set(b)
    for name, ref in b.items():
        got = a[name]
        if ref["kind"] == "neuron":
            assert got["membrane_updates"] == ref["membrane_updates"], name
            assert got["sparsity"] == pytest.approx(ref["sparsity"], abs=1e-15), name
        else:
            assert got["Dense"] == ref["Dense"], name
            assert got["Effective_MACs"] + got["Effective_ACs"] == ref["Effective_MACs"] + ref["Effective_ACs"], name
    assert nb_a["MembraneUpdates"] == nb_b["MembraneUpdates"]
    assert nb_a["ext"]["MembraneUpdates_dense"] == nb_b["ext"]["MembraneUpdates_dense"]
    assert nb_a["ext"]["attention_synops"] == nb_b["ext"]["attention_synops"]
    legacy_a, legacy_b = analyze(model, [x]), analyze(base, [x])
    assert legacy_a.total_energy_mJ == pytest.approx(legacy_b.total_energy_mJ, rel=1e-12)
    assert legacy_a.ann_energy_mJ == pytest.approx(legacy_b.ann_energy_mJ, rel=1e-12)


def test_more_halting_strictly_lowers_every_count():
    """The halting gate's centre c: a lower c halts more tokens (docs/atsnn.md), and every count of
    the processed tokens falls with them."""
    x = images(4)
    seen = []
    for c in (4.0, 2.0, 0.5):
        model, _ = make(gate_center=c)
        counts, nb = _totals(model, x)
        tokens = float(model.token_stats["tokens"].sum())
        syn = nb["SynapticOperations"]
        attention = [r for r in counts.rows if isinstance(r, AttentionCounts)]
        snn_pj = energy_ma.price(counts, energy_ma.profile("mem45-int8"))["snn"]["total_pJ"]
        seen.append((tokens, syn["Dense"], syn["Effective_MACs"] + syn["Effective_ACs"], nb["MembraneUpdates"],
                     nb["ext"]["MembraneUpdates_dense"], sum(r.dense for r in attention), snn_pj,
                     analyze(model, [x]).total_energy_mJ))
    for fewer, more in zip(seen[1:], seen):
        assert all(f < m for f, m in zip(fewer, more)), (fewer, more)


def test_layers_see_only_the_running_rows_and_where_they_sit():
    """A hook on a Linear sees one call per step on the rows of the running tokens, [1, K, C_in],
    with ``step_tokens`` [B, n] saying which tokens they are (K = its count)."""
    model, _ = make()
    halted = torch.zeros(2, N, dtype=torch.bool)
    halted[0, :10], halted[1, :20] = True, True
    force_halting(model, halted)
    seen = []

    def hook(module, args, out):
        tokens = getattr(module, "step_tokens", None)
        seen.append((tuple(args[0].shape), None if tokens is None else (tuple(tokens.shape), int(tokens.sum()))))

    handle = model.block[1].mlp.fc2_linear.register_forward_hook(hook)
    with torch.no_grad():
        model(images(2))
    handle.remove()
    assert seen[0] == ((2, N, HIDDEN), None)  # t = 0: every token runs, one call on [B, n, C]
    assert seen[1:] == [((1, 98, HIDDEN), ((2, N), 98))] * (T - 1)  # 54 + 44 running tokens
