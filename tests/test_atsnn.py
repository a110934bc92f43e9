"""AT-SNN (models/atsnn.py, token_halting.py, token_merging.py): the tests of the reconstruction's
checklist (numbered as there, see docs/atsnn.md)."""

import pytest
import timm
import torch

import spikeformers  # noqa: F401
from spikeformers.models import atsnn
from spikeformers.models.atsnn import (
    Halting, bipartite_merge_map, distribution_prior_kl, distribution_target, group_any, halting_trace, merge_tokens,
    proportional_ssa, slot_sizes,
)
from spikeformers.models.neurons import LIF

N, L, T = 64, 2, 4  # spikformer_tiny on 32×32: 8×8 tokens, 2 blocks, 4 time steps


def trained_like_bn(model, generator):
    """Trained-like BN statistics so that tokens fire (random init leaves most LIFs silent)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.5 - 0.3)
            m.running_var.fill_(0.5)


def make(seed=0, double=True, **opts):
    """AT-SNN tiny model in eval mode and the plain Spikformer with the same weights."""
    torch.manual_seed(seed)
    model = timm.create_model("atsnn_spikformer_tiny", num_classes=10, in_chans=1, backend="torch", atsnn=opts)
    base = timm.create_model("spikformer_tiny", num_classes=10, in_chans=1, backend="torch")
    trained_like_bn(model, torch.Generator().manual_seed(seed))
    base.load_state_dict(model.state_dict(), strict=False)
    if opts.get("score_source") == "learned":  # a random halting head: token-dependent scores
        with torch.no_grad():
            model.halt_head.weight.copy_(torch.randn(1, 64, generator=torch.Generator().manual_seed(seed)))
    if double:
        model, base = model.double(), base.double()
    return model.eval(), base.eval()


def images(b=2, seed=1, double=True):
    x = torch.randn(b, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2
    return x.double() if double else x


def scramble_halted(x, active):
    """A ``halted_token_fill``: random features on the halted slots."""
    return torch.where(active[..., None], x, torch.randn_like(x))


# --- step-wise LIF -------------------------------------------------------------------------------


def test_lif_step_reproduces_multistep_lif_exactly():
    lif = LIF(backend="torch")
    x = torch.randn(6, 3, 50) * 2
    v, out = None, []
    for t in range(6):
        s, v = lif.step(x[t], v)
        out.append(s)
    assert torch.equal(torch.stack(out), lif(x))


@pytest.mark.parametrize("detach_reset", [True, False])
def test_lif_step_gradients_match_the_multistep_backward(detach_reset):
    lif = LIF(backend="torch", detach_reset=detach_reset, v_reset=0.0 if detach_reset else -0.2)
    x = (torch.randn(6, 3, 50, dtype=torch.float64) * 2).requires_grad_()
    grad_out = torch.randn(6, 3, 50, dtype=torch.float64)
    (expected,) = torch.autograd.grad(lif(x), x, grad_out)
    v, out = None, []
    for t in range(6):
        s, v = lif.step(x[t], v)
        out.append(s)
    (grad,) = torch.autograd.grad(torch.stack(out), x, grad_out)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-12)  # same BPTT, autograd's rounding


# --- halting -------------------------------------------------------------


@pytest.mark.parametrize("reading", ["A", "B", "C"])
def test_1_2_monotone_and_distribution(reading):
    h = torch.rand(3, 4, 500, generator=torch.Generator().manual_seed(0)) * 0.6
    out = halting_trace(h, reading)
    mask, p = out["mask"], out["p"]
    assert (p >= 0).all()
    if reading == "A":  # raster order: t-major
        order = lambda z: z.transpose(0, 1).reshape(-1, z.shape[-1])  # noqa: E731
        assert (order(out["H"]).diff(dim=0) >= -1e-7).all()
        assert (order(mask).diff(dim=0) <= 0).all(), "a halted token came back"
        torch.testing.assert_close(p.sum((0, 1)), torch.ones(500), atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(p.sum(0), torch.ones(4, 500), atol=1e-6, rtol=0)  # per row
        assert (mask.diff(dim=0) <= 0).all()  # along blocks
    if reading == "B":  # halted set is an upper set: also monotone along t
        assert (mask.diff(dim=1) <= 0).all()
        assert (out["H"].diff(dim=1) >= -1e-7).all() and (out["H"].diff(dim=0) >= -1e-7).all()
        assert (mask[0] == 1).all(), "block 1 always runs"


@pytest.mark.parametrize("reading", ["A", "B", "C"])
def test_7_hand_example(reading):
    h = torch.tensor([[0.3, 0.7], [0.5, 0.2]])[..., None]  # h[l, t], one token, L = T = 2
    out = halting_trace(h, reading)
    expected = {  # (mask[l, t], p[l, t], ρ): worked by hand in docs/atsnn.md
        "A": ([[1, 1], [1, 0]], [[0.3, 0.2], [0.5, 0.0]], 3.2),  # H: .3, .8, 1.5 ≥ .99 at (1, 2) → R = .2
        "B": ([[1, 1], [1, 0]], [[0.3, 1.0], [0.7, 0.0]], 4.7),  # H(1, 2) = .3 + .7 ≥ .99 → row 2 ends at l = 1
        "C": ([[1, 1], [1, 1]], [[0.3, 0.7], [0.7, 0.3]], 5.0),  # forced at l = L every row
    }[reading]
    torch.testing.assert_close(out["mask"][..., 0], torch.tensor(expected[0], dtype=torch.float32))
    torch.testing.assert_close(out["p"][..., 0], torch.tensor(expected[1]))
    assert out["rho"].item() == pytest.approx(expected[2])


@pytest.mark.parametrize("reading", ["A", "B", "C"])
def test_5_immediate_halting(reading):
    out = halting_trace(torch.ones(L, T, 7), reading)
    rows = 1 if reading == "A" else T
    assert out["mask"].sum() == 7 * rows
    assert torch.equal(out["rho"], torch.full((7,), 2.0 * rows))  # ρ = 1 position + R = 1 (per row)
    assert (out["p"][0, 0] == 1).all()
    model, _ = make(reading=reading, gate_center=-1e4)  # h = 1 everywhere
    model(images())
    assert torch.equal(model.token_stats["tokens"], torch.full((2,), float(N * rows)))


def test_6_ponder_gradient_only_through_remainder():
    h = torch.tensor([[0.3, 0.7], [0.5, 0.2]], requires_grad=True)
    halting_trace(h[..., None], "A")["rho"].sum().backward()
    # ρ = positions + R, R = 1 − h(1,1) − h(2,1): −1 before the halting position, 0 at and after it
    torch.testing.assert_close(h.grad, torch.tensor([[-1.0, 0.0], [-1.0, 0.0]]))


# --- the model: reduction to Spikformer (items 3, 4) ---------------------------------------------


@pytest.mark.parametrize("opts", [dict(halting=False, merge_r=0), None])
def test_4_flags_off_is_spikformer_bit_identical(opts):
    torch.manual_seed(0)
    model = timm.create_model("atsnn_spikformer_tiny", num_classes=10, in_chans=1, backend="torch", atsnn=opts).eval()
    base = timm.create_model("spikformer_tiny", num_classes=10, in_chans=1, backend="torch").eval()
    base.load_state_dict(model.state_dict(), strict=False)
    x = images(double=False)
    assert torch.equal(model(x), base(x))
    assert torch.equal(model.token_stats["tokens"], torch.full((2,), float(N * L * T)))


@pytest.mark.parametrize("reading,readout", [("A", "time_mean"), ("B", "mean_field"), ("C", "mean_field")])
def test_3_no_halting_matches_spikformer(reading, readout):
    model, base = make(reading=reading, readout=readout, gate_center=1e4)  # h = 0 but the forced last
    x = images()
    torch.testing.assert_close(model(x), base(x), atol=1e-9, rtol=1e-9)
    assert torch.equal(model.token_stats["tokens"], torch.full((2,), float(N * L * T)))


def test_3_no_halting_mean_field_under_A_is_head_of_last_position():
    model, base = make(gate_center=1e4)
    x = images()
    feats = base.forward_features(x)  # [T, B, N, D]
    torch.testing.assert_close(model(x), base.head(feats[-1].mean(1)), atol=1e-9, rtol=1e-9)


# --- masking and counting (items 8-11) ------------------------------------------------------------


# token-dependent halting: a random learned halting head (tests only)
PARTIAL = [dict(reading="A", gate_center=2.0, gate_scale=0.1, score_source="learned"),
           dict(reading="B", gate_center=1.0, gate_scale=0.1, score_source="learned"),
           dict(reading="C", gate_center=-2.0, score_source="learned"),
           dict(reading="A", gate_center=2.0, gate_scale=0.1, score_source="learned", merge_r=6)]


@pytest.mark.parametrize("opts", PARTIAL)
def test_8_halted_tokens_cannot_leak(opts):
    model, _ = make(**opts)
    x = images()
    ref = model(x)
    tokens = model.token_stats["tokens"]
    assert (tokens < N * L * T).all() and tokens.unique().numel() > 1, "the test needs token-dependent halting"
    model.halted_token_fill = scramble_halted
    torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=0)
    assert torch.equal(model.token_stats["tokens"], tokens)


@pytest.mark.parametrize("opts", PARTIAL)
def test_9_gather_at_batch1_equals_masking(opts):
    x = images(1, seed=3)
    masked, _ = make(gather_at_batch1=False, **opts)
    gathered, _ = make(gather_at_batch1=True, **opts)
    torch.testing.assert_close(gathered(x), masked(x), atol=1e-9, rtol=1e-9)
    assert torch.equal(gathered.token_stats["tokens"], masked.token_stats["tokens"])
    assert masked.token_stats["tokens"].item() < N * L * T


def test_10_11_count_is_mask_sum_falls_with_c_and_is_deterministic():
    x = images(4)
    means = []
    for c in (4.0, 2.0, 0.5, -2.0):
        model, _ = make(gate_center=c)
        model(x)
        stats = model.token_stats
        assert torch.equal(stats["per_position"].sum(), stats["tokens"].mean() * 1)  # Σ_(l,t) = per image
        first = stats["tokens"].clone()
        model(x)
        assert torch.equal(model.token_stats["tokens"], first)  # deterministic, state reset per forward
        means.append(first.mean().item())
    assert all(a >= b for a, b in zip(means, means[1:])) and means[0] > means[-1]


# --- merging (items 12-16) ------------------------------------------------------------------------


def test_12_13_merge_conserves_mass_and_count():
    g = torch.Generator().manual_seed(0)
    B, n, D = 5, 20, 8
    for r in (0, 1, 4, 9, 30):
        x, metric = torch.randn(B, n, D, generator=g), torch.randn(B, n, 6, generator=g)
        active = torch.rand(B, n, generator=g) < 0.6
        sizes = torch.randint(1, 4, (B, n), generator=g).float()
        slot = bipartite_merge_map(metric, active, r)
        r_eff = min(r, (n - 1) // 2)
        n_new = n - r_eff
        assert slot.min() >= 0 and slot.max() == n_new - 1
        merged = merge_tokens(x, sizes, slot, n_new)
        new_sizes = sizes.new_zeros(B, n_new).scatter_add(1, slot, sizes)
        torch.testing.assert_close((merged * new_sizes[..., None]).sum(1), (x * sizes[..., None]).sum(1))
        assert torch.equal(new_sizes.sum(1), sizes.sum(1)) and (new_sizes >= 1).all()
        assert torch.equal(new_sizes, new_sizes.round())
        new_active = group_any(active, slot, n_new)
        expected = active.sum(1) - torch.minimum(torch.tensor(r_eff), active.sum(1) // 2)
        assert torch.equal(new_active.sum(1), expected)
        # never an active token with a halted one
        assert torch.equal(group_any(~active, slot, n_new) & new_active, torch.zeros_like(new_active))
        if r == 0:
            assert torch.equal(slot, torch.arange(n).expand(B, n)) and torch.equal(merged, x)


def test_14_proportional_ssa_equals_duplicated_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.rand(1, 2, 5, 4, generator=g) < 0.5).double() for _ in range(3))
    sizes = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0]])
    reps = sizes[0].long()
    dup = lambda z: z.repeat_interleave(reps, dim=2)  # noqa: E731
    assert torch.equal(proportional_ssa(q, k, v, sizes, 0.125), proportional_ssa(q, dup(k), dup(v), None, 0.125))


def test_15_merging_identical_tokens_keeps_gap():
    x = torch.randn(1, 4, 3).double()
    x[0, 3] = x[0, 1]
    sizes = torch.tensor([[1.0, 2.0, 1.0, 1.0]]).double()
    slot = torch.tensor([[0, 1, 2, 1]])
    merged = merge_tokens(x, sizes, slot, 3)
    new_sizes = slot_sizes(slot, 3).double() * 0 + torch.tensor([[1.0, 3.0, 1.0]]).double()
    gap = lambda z, s: (z * s[..., None]).sum(1) / s.sum()  # noqa: E731
    torch.testing.assert_close(gap(merged, new_sizes), gap(x, sizes))


def test_16_merge_decided_once_for_all_time_steps(monkeypatch):
    calls = []
    original = atsnn.bipartite_merge_map
    monkeypatch.setattr(atsnn, "bipartite_merge_map", lambda *a: calls.append(1) or original(*a))
    model, _ = make(merge_r=[4, 4], gate_center=1e4)
    model(images())
    assert len(calls) == L  # one decision per block, at t = 0, reused for t > 0
    assert torch.equal(model.token_stats["per_position"], torch.tensor([[64.0] * T, [60.0] * T]).double())


# --- losses and training (items 17, 18) -----------------------------------------------------------


def test_17_distribution_prior():
    target = distribution_target(12, 8.0, 1.0, 0.02)
    assert target[:8].sum().item() == pytest.approx(0.98, abs=1e-6)
    assert distribution_prior_kl(target, target).item() == pytest.approx(0.0, abs=0.02)  # up to the clamp
    assert distribution_prior_kl(torch.full((12,), 1 / 12), target) > 0.3
    flat = distribution_target(8, 5.0, 3.0, 0.02)
    assert distribution_prior_kl(flat, flat).item() == pytest.approx(0.0, abs=1e-6)


def test_training_step_gives_aux_loss_and_gradients():
    model, _ = make(double=False, merge_r=4, gate_center=1.0)
    model.train()
    out = model(images(4, double=False))
    aux = model.aux_loss()
    assert aux is not None and torch.isfinite(aux) and aux > 0
    (out.logsumexp(1).mean() + aux).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)
    assert model.block[0].attn.q_linear.weight.grad.abs().sum() > 0


def test_halting_state_is_per_token():
    state = Halting("A", 2, 2, (3,), 0.01, torch.zeros(3))
    p = state.update(0, 0, torch.tensor([0.2, 0.995, 1.0]), torch.ones(3, dtype=torch.bool))
    assert torch.equal(state.active(), torch.tensor([True, False, False]))
    torch.testing.assert_close(p, torch.tensor([0.2, 1.0, 1.0]))


# --- BN statistics in training ------------------------------------------------------------------


@pytest.mark.parametrize("bn_stats,leaks", [("plain", True), ("masked", False), ("running", False)])
def test_training_bn_statistics_and_halted_tokens(bn_stats, leaks):
    """In training, plain BN mixes halted tokens into the batch statistics (the spec's default
    reading); masked BN uses the active tokens only and running BN no batch statistics, so then
    halted tokens cannot change the active ones even in training."""
    model, _ = make(bn_stats=bn_stats, **PARTIAL[0])
    model.train()
    x = images(4)
    ref = model(x)
    assert (model.token_stats["tokens"] < N * L * T).all()
    model.halted_token_fill = scramble_halted
    out = model(x)
    assert (not torch.allclose(out, ref, atol=1e-9)) == leaks


def test_masked_bn_equals_plain_bn_when_no_token_halts():
    x = images(4)
    outs, buffers = [], []
    for bn_stats in ("plain", "masked"):
        model, _ = make(bn_stats=bn_stats, gate_center=50.0)
        model.train()
        outs.append(model(x))
        buffers.append({k: v.clone() for k, v in model.state_dict().items() if "running" in k})
    torch.testing.assert_close(outs[1], outs[0], atol=1e-10, rtol=1e-10)
    for k in buffers[0]:
        torch.testing.assert_close(buffers[1][k], buffers[0][k], atol=1e-10, rtol=1e-10, msg=k)


def test_running_bn_leaves_block_statistics_and_trains_affine():
    model, _ = make(bn_stats="running", **PARTIAL[0])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("block") and "running" in k}
    model(images(4)).sum().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.block[0].attn.q_bn.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="atsnn.bn_stats must be one of"):
        atsnn.ATSNNConfig.from_any({"bn_stats": "frozen"})


# --- AT-SNN on SDT (beyond the paper) --------------------------------------------------------------


def make_sdt(seed=0, **opts):
    """atsnn_sdt_tiny (readout time_mean) in eval mode, float64, and sdt_tiny with the same weights."""
    torch.manual_seed(seed)
    model = timm.create_model("atsnn_sdt_tiny", num_classes=10, in_chans=1, backend="torch",
                              atsnn=dict(dict(readout="time_mean"), **opts))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():  # SDT's init std 0.02 makes every BN output nearly input-independent
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(25.0)
        trained_like_bn(model, g)
        if opts.get("score_source") == "learned":
            model.halt_head.weight.copy_(torch.randn(1, 64, generator=g))
    base = timm.create_model("sdt_tiny", num_classes=10, in_chans=1, backend="torch")
    base.load_state_dict(model.state_dict(), strict=False)
    return model.double().eval(), base.double().eval()


SDT_PARTIAL = dict(gate_center=2.0, gate_scale=0.1, score_source="learned")


def test_sdt_without_halting_is_sdt():
    model, base = make_sdt(gate_center=50.0)  # h ≈ 0: every token runs to the forced last position
    x = images(3)
    assert torch.equal(model(x), base(x))
    assert torch.equal(model.token_stats["tokens"], torch.full((3,), float(N * L * T), dtype=torch.float64))
    off, base = make_sdt(halting=False)
    assert torch.equal(off(x), base(x))


def test_sdt_halted_tokens_cannot_leak_and_gather_equals_masking():
    model, _ = make_sdt(**SDT_PARTIAL)
    x = images(4)
    ref = model(x)
    tokens = model.token_stats["tokens"]
    assert (tokens < N * L * T).all() and tokens.unique().numel() > 1, "the test needs token-dependent halting"
    model.halted_token_fill = scramble_halted
    torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=0)
    masked, _ = make_sdt(gather_at_batch1=False, **SDT_PARTIAL)
    gathered, _ = make_sdt(gather_at_batch1=True, **SDT_PARTIAL)
    one = images(1, seed=3)
    torch.testing.assert_close(gathered(one), masked(one), atol=1e-9, rtol=1e-9)
    assert torch.equal(gathered.token_stats["tokens"], masked.token_stats["tokens"])


def test_sdt_training_step_and_per_step_logits():
    model, _ = make_sdt(**SDT_PARTIAL)
    model.train()
    out = model(images(4))
    loss = out.logsumexp(1).mean() + model.aux_loss()
    loss.backward()
    assert torch.isfinite(loss) and model.halt_head.weight.grad.abs().sum() > 0
    per_step = timm.create_model("atsnn_sdt_tiny", num_classes=10, in_chans=1, per_step_logits=True,
                                 atsnn=dict(readout="time_mean")).eval()
    assert per_step(images(2, double=False)).shape == (T, 2, 10)


@pytest.mark.parametrize("opts,message", [
    (dict(readout="mean_field"), "use atsnn.readout=time_mean"),
    (dict(readout="time_mean", merge_r=2), "merging is implemented on Spikformer only"),
])
def test_sdt_rejects_unsupported_options(opts, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("atsnn_sdt_tiny", atsnn=opts)
    with pytest.raises(ValueError, match="without dvs_mode"):
        timm.create_model("atsnn_sdt_tiny", dvs_mode=True, atsnn=dict(readout="time_mean"))


def test_residual_update_masks_halted_slots_and_adds_only_the_gathered_rows():
    from spikeformers.models.atsnn import _add_update

    x = torch.randn(1, 5, 3, dtype=torch.float64)
    active = torch.tensor([[True, False, True, True, False]])
    update = torch.randn(1, 5, 3, dtype=torch.float64)  # nonzero on halted slots, as a BN shift makes it
    masked = _add_update(x, update, active, None)
    assert torch.equal(masked[active], (x + update)[active]) and torch.equal(masked[~active], x[~active])
    rows = active[0].nonzero().squeeze(1)
    gathered = _add_update(x, update[:, rows], active, rows)  # only the active rows were computed
    assert torch.equal(gathered, masked)


def test_cfgs_normalise_every_input_channel():
    for name in ("atsnn_spikformer_tiny", "atsnn_spikformer_cifar_4_384", "atsnn_sdt_tiny"):
        cfg = timm.get_pretrained_cfg(name)
        assert len(cfg.mean) == len(cfg.std) == cfg.input_size[0], name


def test_masked_bn_with_fewer_than_two_active_tokens_keeps_running_statistics():
    from spikeformers.models.atsnn import _linear_bn, _Pass

    bn = torch.nn.BatchNorm1d(4).train()
    bn.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(2, 3, 4)
    active = torch.zeros(2, 3, dtype=torch.bool)
    active[0, 1] = True  # one active token: no unbiased variance
    out = _linear_bn(torch.nn.Identity(), bn, x, _Pass(bn_stats="masked"), active)
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items())
    expected = (x - 0.5) / torch.sqrt(torch.tensor(1.0 + bn.eps))  # running statistics: mean 0.5, var 1
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backbone", ["spikformer", "sdt"])
def test_firing_rate_monitor_sees_the_step_wise_neurons(backbone):
    """With nothing halting the step-wise pass fires exactly like the backbone, so the monitor's
    rates match the backbone's; with halting only the computed (active) neurons are counted."""
    from spikeformers.train.evaluate import FiringRate

    model, base = make_sdt(gate_center=50.0) if backbone == "sdt" else make(gate_center=50.0)
    x = images(3)
    rates = []
    for m in (model, base):
        monitor = FiringRate(m)
        m(x)
        monitor.remove()
        rates.append((monitor.block_rates(), monitor.count))
    assert set(rates[0][0]) == set(rates[1][0]) and {"block.0", "block.1"} <= set(rates[0][0])
    assert rates[0][1] == rates[1][1]
    for block, rate in rates[1][0].items():
        assert rates[0][0][block] == pytest.approx(rate, abs=1e-12), block
    halting, _ = make_sdt(**SDT_PARTIAL) if backbone == "sdt" else make(**PARTIAL[0])
    monitor = FiringRate(halting)
    halting(x)
    assert monitor.count < rates[1][1]  # halted neurons are not counted


def test_energy_analysis_counts_active_atsnn_and_accepts_it_off():
    # the counts themselves: tests/test_energy_atsnn.py
    from spikeformers.train.energy import analyze

    model, _ = make(gate_center=2.0, merge_r=6)
    halting = analyze(model, [images(2)])
    off, _ = make(halting=False)
    full = analyze(off, [images(2)])
    assert halting.layers and full.layers
    assert 0 < halting.total_energy_mJ < full.total_energy_mJ
