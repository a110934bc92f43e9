"""ECMT conversion: the expectation compensation and
AtNeuron identities, the multi-threshold neuron, calibration, a tiny random ViT/Eva end to end
in float64, the energy count, rejection of unsupported models, and an untouched ANN."""

import math

import pytest
import torch
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import nn

from spikeformers.models import ecmt

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Linear weights N(0, 1/fan_in): an untrained net with O(1) activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
    return model.eval()


def images(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def calibration_batches(dtype=torch.float64) -> list[torch.Tensor]:
    return [images(16, 100 + i, dtype) for i in range(4)]  # 4×16 random images


def rel_errors(model: nn.Module, snn: ecmt.SpikingTransformer, x: torch.Tensor, T: int) -> list[float]:
    """‖SNN_t − ANN‖ / ‖ANN‖ for t = 1..T."""
    reference = model(x)
    out = snn.forward_steps(x, T)
    assert out.shape == (T, *reference.shape)
    return [((out[t] - reference).norm() / reference.norm()).item() for t in range(T)]


@pytest.fixture(scope="module")
def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return random_weights(VisionTransformer(**TINY)).double()


@pytest.fixture(scope="module")
def tiny_thresholds(tiny_vit):
    return ecmt.calibrate(tiny_vit, calibration_batches())


# --- ECM identity --------------------------------------------------------------------------


@pytest.mark.parametrize("f", [nn.GELU(), nn.Softmax(dim=-1), nn.LayerNorm(16)], ids=["gelu", "softmax", "layernorm"])
def test_ecm_output_rate_is_f_of_input_rate(f):
    torch.manual_seed(0)
    if isinstance(f, nn.LayerNorm):
        with torch.no_grad():
            f.weight.normal_(1, 0.5)
            f.bias.normal_(0, 0.5)
    ecm = ecmt.ECM(f)
    xs = 2 * torch.randn(16, 8, 16)  # a different input every step, std 2
    total = torch.zeros(8, 16)
    for t in range(1, 17):
        total += ecm(xs[t - 1])
        expected = t * f(xs[:t].mean(0))  # Σ_{i≤t} O_i = t·f(mean x)
        assert (total - expected).abs().max().item() < 1e-5, t


def test_ecm_does_not_alias_its_input():
    ecm, x = ecmt.ECM(nn.GELU()), torch.randn(4, 5)
    ecm(x)
    x.add_(100.0)  # the caller reuses its buffer
    assert ecm.total.abs().max() < 100


# --- AtNeuron identity ---------------------------------------------------------------------


def test_atneuron_output_rate_is_product_of_input_rates():
    torch.manual_seed(0)
    a_steps, b_steps = torch.randn(16, 2, 3, 5, 4), torch.randn(16, 2, 3, 4, 6)
    a_copy, b_copy = a_steps.clone(), b_steps.clone()
    neuron, total = ecmt.AtNeuron(), torch.zeros(2, 3, 5, 6)
    for t in range(1, 17):
        total += neuron(a_steps[t - 1], b_steps[t - 1])
        expected = a_steps[:t].sum(0) @ b_steps[:t].sum(0) / t  # S_A S_B / T
        assert ((total - expected).abs().max() / expected.abs().max()).item() < 1e-5, t
    assert torch.equal(a_steps, a_copy) and torch.equal(b_steps, b_copy)  # inputs never used as accumulators


# --- multi-threshold neuron, constant input ------------------------------------------------


def test_multi_threshold_neuron_constant_input():
    theta, n = 0.1, 4  # levels ±0.1·{1, 2, 4, 8}: per-step range ±0.8
    inside = torch.linspace(-0.8, 0.8, 3201, dtype=torch.float64)
    outside = torch.cat([torch.linspace(0.81, 3, 50), -torch.linspace(0.81, 3, 50)]).double()
    x = torch.cat([inside, outside])
    levels = {0.0} | {s * theta * 2**k for k in range(n) for s in (1, -1)}
    neuron, total = ecmt.MultiThresholdNeuron("fc1", theta, theta, n), torch.zeros_like(x)
    worst = []
    for t in range(1, 33):
        spike = neuron(x)
        # at most one spike per neuron and step: the output is 0 or a single level
        assert set(spike.unique().tolist()) <= levels
        total += spike
        mean = total / t
        worst.append((mean[: len(inside)] - inside).abs().max().item() * t)
        if t >= 8:  # saturation: larger inputs give ±θ·2^{n−1} every step
            assert torch.allclose(mean[len(inside):], 0.8 * outside.sign(), atol=0.35 / t + 1e-12)
    # error·T bounded inside the range: residual membrane < θ·2^{n−1} − θ/2 − θ·2^{n−2} = 3.5θ
    assert max(worst) <= 3.5 * theta + 1e-9
    assert worst[0] > 3.0 * theta  # and the bound is reached (one level per step), so it is tight


def test_neuron_fires_at_exactly_the_threshold():
    # θ = 0.5, n = 2: thresholds θ·2^k − θ/2 = 0.25, 0.75 (exact in binary); v ≥ threshold fires
    v = torch.tensor([0.25, 0.75, -0.25, -0.75, 0.2499, 0.7499], dtype=torch.float64)
    spikes = ecmt.MultiThresholdNeuron("fc1", 0.5, 0.5, 2)(v)
    assert spikes.tolist() == [0.5, 1.0, -0.5, -1.0, 0.0, 0.5]


def test_neuron_silences_a_side_with_non_positive_threshold():
    neuron = ecmt.MultiThresholdNeuron("s", 0.1, -0.003, 3)
    spikes = torch.stack([neuron(torch.tensor([-0.5, 0.26])) for _ in range(4)])
    assert (spikes[:, 0] == 0).all() and (spikes[:, 1] >= 0).all()


# --- calibration and the settings ------------------------------------------------------------


def test_calibration_is_running_mean_of_percentiles(tiny_vit, tiny_thresholds):
    places = {"attn": ("fc_qkv", "q", "k", "v", "s", "fc_out"), "mlp": ("fc1", "fc2")}
    expected_keys = {f"blocks.{i}.{part}.neurons.{p}" for i in range(2) for part, ps in places.items() for p in ps}
    assert set(tiny_thresholds) == expected_keys
    # fc_qkv sees LN1's output and fc2 the GELU output: recompute their percentiles from the ANN
    seen = {"fc_qkv": [], "fc2": []}
    hooks = [tiny_vit.blocks[1].norm1.register_forward_hook(lambda m, i, o: seen["fc_qkv"].append(o)),
             tiny_vit.blocks[1].mlp.act.register_forward_hook(lambda m, i, o: seen["fc2"].append(o))]
    with torch.no_grad():
        for x in calibration_batches():
            tiny_vit(x)
    for h in hooks:
        h.remove()
    for place, part in (("fc_qkv", "attn"), ("fc2", "mlp")):
        flat = [o.reshape(-1) for o in seen[place]]
        p_hi = [f.kthvalue(int(0.99 * f.numel())).values.item() for f in flat]
        p_lo = [-f.kthvalue(int(0.01 * f.numel())).values.item() for f in flat]
        theta_p, theta_n = tiny_thresholds[f"blocks.1.{part}.neurons.{place}"]
        assert theta_p == pytest.approx(sum(p_hi) / 4, rel=1e-12)
        assert theta_n == pytest.approx(sum(p_lo) / 4, rel=1e-12)


def test_convert_applies_the_neuron_settings(tiny_vit, tiny_thresholds):
    snn = ecmt.convert(tiny_vit, tiny_thresholds, n_linear=3, n_qkv=4, n_softmax=5, softmax_p=0.02, fc2_override=(0.25, 0.08))
    attn, mlp = snn.model.blocks[0].attn.neurons, snn.model.blocks[0].mlp.neurons
    assert [attn[p].levels for p in ("fc_qkv", "q", "k", "v", "s", "fc_out")] == [3, 4, 4, 3, 5, 3]  # v: n_linear
    assert (attn["s"].theta_p, attn["s"].theta_n) == (0.02, 0.02)
    assert (mlp["fc2"].theta_p, mlp["fc2"].theta_n) == (0.25, 0.08)
    assert (mlp["fc1"].theta_p, mlp["fc1"].theta_n) == tiny_thresholds["blocks.0.mlp.neurons.fc1"]
    calibrated = ecmt.convert(tiny_vit, tiny_thresholds).model.blocks[0].mlp.neurons["fc2"]
    assert (calibrated.theta_p, calibrated.theta_n) == tiny_thresholds["blocks.0.mlp.neurons.fc2"]


def test_convert_rejects_thresholds_of_another_model(tiny_vit, tiny_thresholds):
    partial = {k: v for k, v in tiny_thresholds.items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.neurons\.fc_qkv"):
        ecmt.convert(tiny_vit, partial)


# --- tiny ViT end to end (float64) ---------------------------------------------------


def test_tiny_vit_converges_to_the_ann(tiny_vit, tiny_thresholds):
    snn = ecmt.convert(tiny_vit, tiny_thresholds, n_linear=8, n_qkv=8, n_softmax=8)
    err = rel_errors(tiny_vit, snn, images(32, 7), 16)
    # reference (official code, another random ViT): 0.43, 0.23, 0.105 at T = 4, 8, 16
    assert err[15] < 0.2, err
    for T in (4, 8):
        assert err[2 * T - 1] < 0.7 * err[T - 1], (T, err)


def test_few_levels_saturate(tiny_vit, tiny_thresholds):
    """With n = 2 the per-step range θ·2 is below the activation outliers: the error stalls."""
    snn = ecmt.convert(tiny_vit, tiny_thresholds, n_linear=2, n_qkv=2, n_softmax=2)
    err = rel_errors(tiny_vit, snn, images(16, 7), 8)
    assert err[7] > 0.3


def test_forward_steps_resets_state_and_keeps_dtype(tiny_vit, tiny_thresholds):
    snn = ecmt.convert(tiny_vit, tiny_thresholds)
    x = images(4, 3)
    first, again = snn.forward_steps(x, 3), snn.forward_steps(x, 3)
    assert first.dtype == torch.float64 and torch.equal(first, again)
    snn.T = 3
    assert torch.equal(snn(x), first[-1])
    snn32, x32 = snn.float(), x.float()
    assert snn32.forward_steps(x32, 2).dtype == torch.float32


@pytest.mark.parametrize("variant", ["eva_rope", "deit_distilled"])
def test_other_families_converge(variant):
    torch.manual_seed(1)
    if variant == "eva_rope":  # EVA-style: fused qkv with q/v biases, rotary embeddings, qk and inner norms, layer scale
        model = Eva(**TINY, use_rot_pos_emb=True, qk_norm=True, scale_attn_inner=True, scale_mlp=True, init_values=0.5)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.q_bias.normal_(0, 0.5)
                block.attn.v_bias.normal_(0, 0.5)
    else:
        model = VisionTransformerDistilled(**TINY)
    model = random_weights(model, seed=1).double()
    snn = ecmt.convert(model, ecmt.calibrate(model, calibration_batches()))
    err = rel_errors(model, snn, images(16, 8), 16)
    assert err[15] < 0.2, err
    for T in (4, 8):
        assert err[2 * T - 1] < 0.7 * err[T - 1], (T, err)


# --- energy ----------------------------------------------------------------------------------


def test_energy_ratio_formula_by_hand():
    # t·(0.9/4.6)·ΣSOP/ΣOPS: (1·10/100, 2·40/200)
    assert ecmt.energy_ratios([10, 30], [100, 100]) == pytest.approx([0.9 / 4.6 * 0.1, 2 * 0.9 / 4.6 * 0.2])
    x = torch.tensor([[0.0, 0.5, 0.0], [0.25, 0.0, -1.0]])  # 3 non-zero inputs of 6, 4 outputs
    assert ecmt.linear_ops(x, 4) == (12, 24)
    a, b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    s_a, s_b = torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    # 1[a]1[b] = 1, 1[a]1[s_b] = 2, 1[s_a]1[b] = 2 + 1; dense 2·2·2
    assert ecmt.product_ops(a, b, s_a, s_b) == (6, 8)


def test_energy_counts_every_linear_and_product(tiny_vit, tiny_thresholds):
    snn = ecmt.convert(tiny_vit, tiny_thresholds)
    x = images(2, 5)
    sops, ops = ecmt.op_counts(snn, x, 3)
    B, N, C, K = 2, 17, 64, 10  # 16 patches + class token; heads split C, so q·kᵀ costs N·N·C
    per_block = N * C * 3 * C + 2 * N * N * C + N * C * C + 2 * N * C * 4 * C  # qkv, q·kᵀ and s·v, proj, fc1 + fc2
    assert ops == [B * (2 * per_block + C * K)] * 3
    assert all(0 < s < 3 * o for s, o in zip(sops, ops))  # a product counts up to three binary products
    ratios = ecmt.energy_ratio(snn, x, 3)
    assert ratios == pytest.approx(ecmt.energy_ratios(sops, ops))


# --- unsupported models and the caller's ANN ------------------------------------------------------


def _gated_attention_vit():
    model = VisionTransformer(**TINY)
    model.blocks[1].attn = Attention(64, num_heads=4, gated=True)
    return model


@pytest.mark.parametrize("build, layer", [
    (lambda: nn.Sequential(nn.Linear(3, 3)), r"model \(Sequential\)"),
    (lambda: VisionTransformer(**TINY, global_pool="map"), r"attn_pool"),
    (lambda: VisionTransformer(**TINY, global_pool="avgmax"), r"global_pool='avgmax'"),
    (lambda: VisionTransformer(**TINY, block_fn=ResPostBlock), r"blocks\.0 \(ResPostBlock\)"),
    (_gated_attention_vit, r"blocks\.1\.attn\.gate"),
    (lambda: Eva(**TINY, swiglu_mlp=True), r"blocks\.0\.mlp \(GluMlp\)"),
])
def test_unsupported_models_raise_naming_the_layer(build, layer):
    model = build()
    with pytest.raises(ValueError, match=layer) as info:
        ecmt.calibrate(model, [torch.randn(1, 3, 32, 32)])
    assert "\n" not in str(info.value)


def test_the_ann_is_left_unchanged():
    torch.manual_seed(0)
    model = random_weights(VisionTransformer(**TINY)).double().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(name, type(m)) for name, m in model.named_modules()]
    thresholds = ecmt.calibrate(model, calibration_batches()[:1])
    snn = ecmt.convert(model, thresholds)
    snn.forward_steps(images(2, 1), 2)
    ecmt.energy_ratio(snn, images(2, 1), 2)
    assert model.training
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
