"""Spike-driven Transformer v3 / E-SpikeFormer base models: official keys/order/shapes/counts, strict
loading, the integer spike-count neuron (values and gradients at the rounding ties and window edges,
D = 4 and 8), the attention against a step-by-step reference, the counting head, per-step logits,
and forward/backward with attention that actually fires."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import surrogate
from torch import nn

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models.layers import checkpoint_filter_fn
from spikeformers.models.sdt_v3 import (
    Attention,
    ilif_counts,
    SpikeCountFunction,
    SpikeCountNeuron,
    SpikeDrivenTransformerV3,
    TransformerBlock,
)

# The official key lists: the project's reference data, next to the checkout.
KEYS_V3 = Path(__file__).parents[2] / "shared" / "reference" / "keys_v3"
CHANNELS = {  # official Efficient_Spiking_Transformer_{t,s,m,l}
    "sdtv3_imagenet_t": (24, 48, 96, 128),
    "sdtv3_imagenet_s": (32, 64, 128, 192),
    "sdtv3_imagenet_m": (48, 96, 192, 240),
    "sdtv3_imagenet_l": (64, 128, 256, 360),
}
PARAMS = {  # counted on the official classes, independent of the reference files
    "sdtv3_imagenet_t": 2_702_048,
    "sdtv3_imagenet_s": 5_105_608,
    "sdtv3_imagenet_m": 10_023_112,
    "sdtv3_imagenet_l": 18_987_504,
}
CONFIGS = sorted(PARAMS)


def read_key_list(config: str) -> list[tuple[str, tuple[int, ...]]]:
    """``<config>.txt`` of keys_v3: ``key [d0,d1,...]`` per line, in official state_dict order
    (the format of tests/reference/keys*, read as conftest.py reads it)."""
    path = KEYS_V3 / f"{config}.txt"
    if not path.exists():
        pytest.skip(f"reference key list {path.name} not found next to the checkout")
    entries = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.rsplit(" ", 1)
            entries.append((key, tuple(json.loads(shape))))
    return entries


def official_state(config: str) -> dict[str, torch.Tensor]:
    """A random state_dict in the official layout of ``config``."""
    return {key: torch.randint(0, 5, shape) if key.endswith("num_batches_tracked") else torch.randn(shape)
            for key, shape in read_key_list(config)}


def closed_form_params(c0: int, c1: int, c2: int, c3: int, classes: int = 1000) -> int:
    """The parameter count of the base architecture, term by term: ConvBlock(C) = SepConv
    (2C² + 4C + 98C + 4C + 2C² + 2C) + 3×3 MLP (36C² + 8C + 36C² + 2C); TransformerBlock(C) =
    SepConv₃ (4C² + 4C + 18C + 4C + 2C) + attention (C² + 2C twice, 4C² + 8C, 4C² + 2C) + MLP
    (8C² + 10C); downsampler 3×3 (i→o) = 9io + o (bias) + 2o (BN); stem 7×7 = 147c + c + 2c."""
    conv_block = lambda c: 76 * c * c + 118 * c  # noqa: E731
    transformer_block = lambda c: 22 * c * c + 57 * c  # noqa: E731
    down = lambda i, o: 9 * i * o + 3 * o  # noqa: E731
    c = c0 // 2
    return (150 * c + conv_block(c) + down(c, c0) + conv_block(c0) + down(c0, c1) + 2 * conv_block(c1)
            + down(c1, c2) + 6 * transformer_block(c2) + down(c2, c3) + 2 * transformer_block(c3) + c3 * classes + classes)


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (fresh ones are 1/0/0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3 + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def neuron_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output of every SpikeCountNeuron of ``model`` on ``x``, by module name."""
    outputs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, SpikeCountNeuron):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.detach())))
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


# --- official configurations ------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_official_config_keys_order_shapes_and_counts(config):
    model = timm.create_model(config)
    state = model.state_dict()
    expected = read_key_list(config)
    summary = json.loads((KEYS_V3 / f"{config}.json").read_text())
    assert list(state) == [k for k, _ in expected], "keys (and their order) differ"
    for key, shape in expected:
        assert tuple(state[key].shape) == shape, key
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == summary["n_params"] == PARAMS[config]
    assert len(state) == summary["n_state_tensors"] == 605
    buffers = sum(v.numel() for k, v in state.items() if k.rsplit(".", 1)[-1].startswith(("running", "num_batches")))
    assert buffers == summary["n_buffers_elems"]


@pytest.mark.parametrize("config", CONFIGS)
def test_param_count_follows_the_closed_form(config):
    model = timm.create_model(config, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == closed_form_params(*CHANNELS[config], classes=10)
    assert closed_form_params(*CHANNELS[config]) == PARAMS[config]


@pytest.mark.parametrize("config", CONFIGS)
def test_strict_load_of_an_official_state(config):
    model = timm.create_model(config)
    official = official_state(config)
    # the official saver's layout {"model", "optimizer", "epoch", "scaler", "args"}, DDP prefixes stripped
    saved = {"model": {f"module.{k}": v for k, v in official.items()}, "optimizer": {}, "epoch": 199, "args": None}
    model.load_state_dict(checkpoint_filter_fn(saved, model), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, official[key]), key


def test_attention_scales_are_doubled():
    # 2 / √(C // 8) per stage, e.g. t: 2/√12 and 2/√16; l: 2/√32 and 2/√45 (360 // 8 = 45)
    expected = {"sdtv3_imagenet_t": (2 / 12 ** 0.5, 0.5), "sdtv3_imagenet_s": (0.5, 2 / 24 ** 0.5),
                "sdtv3_imagenet_m": (2 / 24 ** 0.5, 2 / 30 ** 0.5), "sdtv3_imagenet_l": (2 / 32 ** 0.5, 2 / 45 ** 0.5)}
    for config, (s3, s4) in expected.items():
        model = timm.create_model(config)
        assert model.block3[0].attn.scale == pytest.approx(s3, rel=1e-12)
        assert model.block4[0].attn.scale == pytest.approx(s4, rel=1e-12)


def test_no_neuron_state_and_no_unused_parameters():
    model = timm.create_model("sdtv3_imagenet_t")
    assert model.unused_parameters is None
    neurons = [m for m in model.modules() if isinstance(m, SpikeCountNeuron)]
    # 4 ConvBlocks × (3 + 2), 4 downsamplers (not the stem), 8 blocks × (3 + 5 + 2), the head neuron
    assert len(neurons) == 4 * 5 + 4 + 8 * 10 + 1
    assert not any(list(m.parameters()) or list(m.buffers()) for m in neurons)


# --- the integer neuron ------------------------------------------------------------------------


def _values_and_grads(neuron: nn.Module, x: list[float], dtype=torch.float64):
    x = torch.tensor(x, dtype=dtype, requires_grad=True)
    out = neuron(x)
    out.sum().backward()
    return out.detach().tolist(), x.grad.tolist()


TIES = [-0.5, 0.0, 0.49, 0.5, 1.5, 2.5, 3.5, 3.99, 4.0, 4.5, 7.0]


def test_base_neuron_rounds_half_to_even_with_closed_window():
    out, grad = _values_and_grads(SpikeCountNeuron(4), TIES)
    assert out == [0, 0, 0, 0, 0.5, 0.5, 1, 1, 1, 1, 1]  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4
    assert grad == [0, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0, 0]  # 1/D on [0, D], both ends in


def test_large_neuron_rounds_half_up_with_open_window():
    out, grad = _values_and_grads(SpikeCountNeuron(4, rounding="half_up", grad_window="open"), TIES)
    assert out == [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 1, 1]  # 0.5 -> 1, 2.5 -> 3
    assert grad == [0, 0, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0, 0, 0]  # 1/D on (0, D), both ends out


def test_neuron_at_D_8_and_the_unnormalised_head_count():
    x = [-1.0, 0.0, 0.5, 1.5, 2.5, 4.5, 7.5, 8.0, 8.5, 20.0]
    out, grad = _values_and_grads(SpikeCountNeuron(8), x)
    assert [8 * v for v in out] == [0, 0, 0, 2, 2, 4, 8, 8, 8, 8]
    assert grad == [0] + [0.125] * 7 + [0, 0]
    out, grad = _values_and_grads(SpikeCountNeuron(8, normalize=False), x)
    assert out == [0, 0, 0, 2, 2, 4, 8, 8, 8, 8]  # raw counts, gradient 1 in the window
    assert grad == [0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    out, grad = _values_and_grads(SpikeCountNeuron(4, normalize=False), [3.5, 4.0, 4.01, 5.0])
    assert out == [4, 4, 4, 4] and grad == [1, 1, 0, 0]  # clamped at D


def test_base_neuron_is_spikingjellys_multi_level_spike_count():
    x = torch.randn(4096, dtype=torch.float64) * 3 + 2
    x[:64] = torch.arange(64, dtype=torch.float64) / 8 - 2  # exact ties and window edges
    for d in (4, 8):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = SpikeCountNeuron(d, normalize=False)(a)
        sj = surrogate.MultiLevelSpikeCount(d)(b)
        ours.backward(torch.arange(4096.0, dtype=torch.float64))
        sj.backward(torch.arange(4096.0, dtype=torch.float64))
        assert torch.equal(ours, sj) and torch.equal(a.grad, b.grad)
        # the generic function agrees with it in the same setting
        c = x.clone().requires_grad_()
        generic = SpikeCountFunction.apply(c, d, False, False)
        generic.backward(torch.arange(4096.0, dtype=torch.float64))
        assert torch.equal(generic, sj) and torch.equal(c.grad, b.grad)


def test_neuron_keeps_dtype_shape_and_validates_arguments():
    x = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16) * 3
    out = SpikeCountNeuron(4)(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert set((out.float() * 4).unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="max_spike_count"):
            SpikeCountNeuron(bad)
    with pytest.raises(ValueError, match="rounding"):
        SpikeCountNeuron(4, rounding="nearest")
    with pytest.raises(ValueError, match="grad_window"):
        SpikeCountNeuron(4, grad_window="half_open")


# --- the paper's I-LIF over real time steps (option tau) -----------------------------------------


def _counts(neuron: SpikeCountNeuron, x: list[float]) -> list[float]:
    """Counts of ``neuron`` for a one-element input sequence x[t] ([T, 1])."""
    out = neuron(torch.tensor(x, dtype=torch.float64)[:, None])[:, 0]
    return (out * (neuron.max_spike_count if neuron.normalize else 1)).tolist()


def test_ilif_three_steps_by_hand():
    """U[t] = H[t−1] + X[t], S[t] = R(clamp(U, 0, D)), H[t] = β(U[t] − S[t]), β = 1 − 1/τ.

    τ = 2 (β = 0.5), X = (1.7, 2.6, 0.4): U = 1.7 → S 2, H = −0.15; U = 2.45 → S 2, H = 0.225;
    U = 0.625 → S 1. Stateless: (2, 3, 0)."""
    assert _counts(SpikeCountNeuron(4, tau=2.0), [1.7, 2.6, 0.4]) == [2, 2, 1]
    assert _counts(SpikeCountNeuron(4), [1.7, 2.6, 0.4]) == [2, 3, 0]
    # ties: X = (0.5, 0.5, 0.5), β = 0.5. Half to even: U = 0.5 → 0, H = 0.25; U = 0.75 → 1, H = −0.125;
    # U = 0.375 → 0. Half up: U = 0.5 → 1, H = −0.25; U = 0.25 → 0, H = 0.125; U = 0.625 → 1.
    assert _counts(SpikeCountNeuron(4, tau=2.0), [0.5, 0.5, 0.5]) == [0, 1, 0]
    assert _counts(SpikeCountNeuron(4, rounding="half_up", grad_window="open", tau=2.0), [0.5, 0.5, 0.5]) == [1, 0, 1]
    # saturation: X = (7, 0, 0), D = 4: U = 7 → 4, H = 1.5; U = 1.5 → 2, H = −0.25; U = −0.25 → 0.
    assert _counts(SpikeCountNeuron(4, normalize=False, tau=2.0), [7.0, 0.0, 0.0]) == [4, 2, 0]
    # τ = 1 (β = 0): no memory, the stateless neuron
    assert _counts(SpikeCountNeuron(4, tau=1.0), [1.7, 2.6, 0.4]) == [2, 3, 0]


def test_ilif_is_spikingjellys_ilif_node():
    """Base variant: values and gradients equal SpikingJelly 2.0's ILIFNode (multi-step, threshold 1,
    MultiLevelSpikeCount(D), gradient through the reset)."""
    from spikingjelly.activation_based import functional, neuron

    torch.manual_seed(0)
    x = torch.randn(5, 3, 64, dtype=torch.float64) * 2 + 1
    for d, tau in ((4, 4 / 3), (8, 2.0)):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = SpikeCountNeuron(d, normalize=False, tau=tau)(a)
        node = neuron.ILIFNode(tau=tau, v_threshold=1.0, surrogate_function=surrogate.MultiLevelSpikeCount(d), step_mode="m")
        theirs = node(b)
        functional.reset_net(node)
        weights = torch.randn_like(x)
        (ours * weights).sum().backward()
        (theirs * weights).sum().backward()
        assert torch.equal(ours, theirs)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(ilif_counts(x[:1], torch.round, 0.25), torch.round(x[:1]))  # T = 1: the quantiser alone


def test_ilif_makes_time_steps_real_and_T1_official():
    torch.manual_seed(0)
    plain = randomize_bn(timm.create_model("sdtv3_tiny", num_classes=5)).eval()
    ilif = randomize_bn(timm.create_model("sdtv3_tiny", num_classes=5, tau=4 / 3)).eval()
    ilif.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(ilif(x), plain(x))  # T = 1: the official stateless network
        ilif.T, ilif.per_step_logits = 3, True
        steps = ilif(x)
    assert not torch.equal(steps[0], steps[1]), "I-LIF steps of a repeated image should differ"
    assert {m.tau for m in ilif.modules() if isinstance(m, SpikeCountNeuron)} == {4 / 3}
    large = timm.create_model("sdtv3_imagenet_12_768", tau=2.0, depth=1, num_classes=3)
    assert {m.tau for m in large.modules() if isinstance(m, SpikeCountNeuron)} == {2.0}
    for bad in (0.5, -1, True, "2"):
        with pytest.raises(ValueError, match="tau must be None"):
            SpikeCountNeuron(4, tau=bad)


# --- attention and blocks against step-by-step references ---------------------------------------


def test_attention_matches_step_by_step_reference():
    """S = SN(x); Q, K (C wide), V (4C wide) = SN(BN(W S)); per head h, channels c = h·d + j:
    Y_h = (Q_h K_hᵀ) V_h · 2/√(C//h); out = BN(W_proj SN(Y)) with Y's channels h·4d + j."""
    torch.manual_seed(0)
    T, B, C, H, W, heads, D = 2, 2, 24, 4, 4, 4, 4
    d, N = C // heads, H * W
    attn = randomize_bn(Attention(C, heads, SpikeCountNeuron)).train()
    x = torch.randn(T, B, C, H, W, dtype=torch.float64) * 2 + 1
    attn.double()
    out = attn(x)

    def sn(v):  # base neuron, hidden: S/D
        return torch.round(v.clamp(0, D)) / D

    def conv_bn(branch, s):  # [T·B, C_in, N] -> [T·B, C_out, N] in training mode
        y = torch.einsum("oc,bcn->bon", branch[0].weight[:, :, 0, 0], s)
        bn = branch[1]
        return F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)

    s = sn(x.reshape(T * B, C, N))
    q, k, v = (sn(conv_bn(getattr(attn, f"{p}_conv"), s)) for p in "qkv")
    y = torch.zeros(T * B, 4 * C, N, dtype=torch.float64)
    for h in range(heads):
        qh, kh = q[:, h * d:(h + 1) * d], k[:, h * d:(h + 1) * d]  # [TB, d, N]
        vh = v[:, h * 4 * d:(h + 1) * 4 * d]  # [TB, 4d, N]
        a = torch.einsum("bin,bim->bnm", qh, kh)  # N×N map
        y[:, h * 4 * d:(h + 1) * 4 * d] = torch.einsum("bnm,bjm->bjn", a, vh) * 2 / (C // heads) ** 0.5
    expected = conv_bn(attn.proj_conv, sn(y)).reshape(T, B, C, H, W)
    assert sn(y).abs().sum() > 0, "attention silent: the comparison would be vacuous"
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_transformer_block_residuals_and_neuron_placement():
    """x ← x + SepConv₃(x); x ← x + Attn(x); x ← x + MLP(x), each branch neuron-first."""
    torch.manual_seed(0)
    block = randomize_bn(TransformerBlock(16, 4, SpikeCountNeuron)).eval().double()
    x = torch.randn(1, 2, 16, 4, 4, dtype=torch.float64)
    y1 = x + block.conv(x)
    y2 = y1 + block.attn(y1)
    torch.testing.assert_close(block(x), y2 + block.mlp(y2), rtol=0, atol=0)
    sep = block.conv
    assert [type(m).__name__ for m in sep.children()] == ["SpikeCountNeuron", "Sequential"] * 3
    assert sep.dwconv[0].kernel_size == (3, 3) and sep.dwconv[0].groups == 32 and sep.pwconv1[0].bias is None
    assert block.mlp.fc1_conv.bias is not None and isinstance(block.mlp.fc1_bn, nn.BatchNorm1d)


# --- the model: head, time axis, D, forward/backward ---------------------------------------------


def test_head_sees_the_raw_count_of_the_pooled_stream():
    model = randomize_bn(timm.create_model("sdtv3_tiny", num_classes=7)).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        model.downsample4.encode_bn.bias.add_(1.5)  # pooled features around 2: counts S and S/D differ
        stream = model.forward_features(x)  # [T, B, C3, H, W]
        pooled = stream.flatten(3).mean(3)
        counts = torch.round(pooled.clamp(0, 4))
        assert counts.max() >= 2, "the test needs counts above 1"
        torch.testing.assert_close(model(x), model.head(counts).mean(0), rtol=0, atol=0)
        assert torch.equal(model.forward_head(stream, pre_logits=True), counts.mean(0))
    outputs = neuron_outputs(model, x)
    assert set(outputs["head_spike"].unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_hidden_neurons_emit_counts_over_D_and_D_is_settable():
    for d in (4, 8):
        model = randomize_bn(timm.create_model("sdtv3_tiny", max_spike_count=d)).train()
        outputs = neuron_outputs(model, torch.randn(2, 1, 32, 32))
        levels = set()
        for name, out in outputs.items():
            scale = 1 if name == "head_spike" else d
            assert torch.equal(out * scale, torch.round(out * scale)) and out.min() >= 0 and out.max() * scale <= d, name
            levels |= set((out * scale).unique().tolist())
        assert levels == set(range(d + 1)), "every count level should occur somewhere"
    model = timm.create_model("sdtv3_tiny").set_max_spike_count(8)
    assert model.max_spike_count == 8 and {m.max_spike_count for m in model.modules() if isinstance(m, SpikeCountNeuron)} == {8}
    assert [m.normalize for m in model.modules() if isinstance(m, SpikeCountNeuron)].count(False) == 1


def test_model_defaults_follow_the_official_base_code():
    model = timm.create_model("sdtv3_imagenet_s")
    assert model.T == 1 and model.max_spike_count == 4 and model.num_classes == 1000
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == pytest.approx(224 / 232) and cfg["interpolation"] == "bicubic"
    assert model.downsample1_1.encode_spike is None and model.downsample4.encode_conv.stride == (1, 1)
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.1) and model.head.bias.abs().max() == 0


def test_image_time_steps_repeat_identical_steps():
    """The neurons are stateless: T = 2 computes the T = 1 network twice (train-mode BN sees the
    same batch statistics, as the biased variance of a duplicated batch is unchanged)."""
    torch.manual_seed(0)
    one = randomize_bn(timm.create_model("sdtv3_tiny", depths=(1, 1), num_classes=5)).double().train()
    two = randomize_bn(timm.create_model("sdtv3_tiny", depths=(1, 1), num_classes=5, T=2, per_step_logits=True))
    two.load_state_dict(one.state_dict())
    two.double().train()
    x = torch.randn(4, 1, 64, 64, dtype=torch.float64)
    logits = one(x)
    steps = two(x)
    assert steps.shape == (2, 4, 5)
    torch.testing.assert_close(steps[0], logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(steps[1], logits, rtol=1e-9, atol=1e-9)
    # eval: the same running statistics (a T-times larger batch updates the variance by n/(n-1) differently)
    two.load_state_dict(one.state_dict())
    two.per_step_logits = False
    two.eval(), one.eval()
    torch.testing.assert_close(two(x), one(x), rtol=1e-9, atol=1e-9)


def test_forward_backward_tiny_and_drop_path_has_no_effect():
    torch.manual_seed(0)
    model = timm.create_model("sdtv3_tiny").train()
    x = torch.randn(4, 1, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.head.weight.grad.abs().sum() > 0
    torch.manual_seed(1)
    a = timm.create_model("sdtv3_tiny", depths=(1, 1)).train()
    b = timm.create_model("sdtv3_tiny", depths=(1, 1), drop_path_rate=0.5).train()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_base_t_at_128_forward_backward_with_firing_attention():
    """At 128² (8×8 tokens) the attention of a model with warmed BN statistics fires; every parameter
    gets a finite gradient, and the transformer weights a non-zero one."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("sdtv3_imagenet_t", num_classes=10)).train()
    x = torch.randn(2, 3, 128, 128)
    outputs = neuron_outputs(model, x)
    assert outputs["block3.0.attn.attn_spike"].abs().sum() > 0 and outputs["block4.1.attn.attn_spike"].abs().sum() > 0
    out = model(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("block3.0.attn.q_conv.0.weight", "block3.0.attn.v_conv.0.weight", "block4.1.mlp.fc2_conv.weight",
                 "downsample1_1.encode_conv.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_registry_and_timm_api():
    names = set(timm.list_models("sdtv3*"))
    assert {"sdtv3_tiny", *CONFIGS} <= names
    model = timm.create_model("sdtv3_tiny", num_classes=3, T=2, max_spike_count=8)
    assert isinstance(model, SpikeDrivenTransformerV3) and model.T == 2 and model.max_spike_count == 8
    assert model.pretrained_cfg["input_size"] == (1, 32, 32)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5
    with pytest.raises(ValueError, match="embed_dim"):
        SpikeDrivenTransformerV3(embed_dim=(25, 48, 96, 128))
    with pytest.raises(ValueError, match="max_spike_count"):
        timm.create_model("sdtv3_tiny", max_spike_count=0)


def test_docs_example_runs_as_written():
    page = (Path(__file__).parents[1] / "docs" / "sdt_v3.md").read_text()
    block = page.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "docs/sdt_v3.md", "exec"), {})


# --- shipped digits weights and the hub tags of the official releases -----------------------------


def test_shipped_digits_checkpoint_reaches_97_percent(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    from spikeformers.models import hub
    from spikeformers.train.data import DataInfo, Digits
    from spikeformers.train.evaluate import evaluate

    monkeypatch.setenv("SPIKEFORMERS_CACHE", str(tmp_path))
    weights = hub.resolve("sdtv3_tiny.digits")
    assert hub.sha256_of(hub.fetch("sdtv3_tiny.digits")) == weights.sha256  # verified before use
    model = timm.create_model("sdtv3_tiny.digits", pretrained=True)
    assert model.in_chans == 1 and model.num_classes == 10 and model.T == 1 and model.max_spike_count == 4
    stats = evaluate(model, DataLoader(Digits(False), batch_size=360), DataInfo("digits", 10, 1, 32), torch.device("cpu"))
    assert stats["top1"] >= 97.0
    assert stats["top1"] == pytest.approx(weights.top1, abs=0.3)  # the accuracy the registry reports


def test_release_tags_carry_D_and_explain_conversion(tmp_path, monkeypatch):
    """D is in no checkpoint: the 1×8 tags build D = 8, the 1×4 ones D = 4; unconverted official files
    say how to convert them."""
    monkeypatch.setenv("SPIKEFORMERS_CACHE", str(tmp_path))
    for tag, d, size in (("in1k_1x4", 4, 224), ("in1k_1x8", 8, 224), ("in1k_1x8_384", 8, 384)):
        model = timm.create_model(f"sdtv3_imagenet_12_768_kd.{tag}", depth=1)
        assert model.max_spike_count == d and model.pretrained_cfg["input_size"] == (3, size, size), tag
        assert {m.max_spike_count for m in model.modules() if isinstance(m, SpikeCountNeuron)} == {d}
    assert timm.create_model("sdtv3_imagenet_12_512_kd.in1k_1x8", depth=1, max_spike_count=4).max_spike_count == 4
    assert timm.create_model("sdtv3_imagenet_m.in1k").max_spike_count == 4
    with pytest.raises(FileNotFoundError, match="spikeformers-hub convert FILE --model sdtv3_imagenet_12_512_kd"):
        timm.create_model("sdtv3_imagenet_12_512_kd.in1k_1x8", pretrained=True)


def test_firing_rate_counts_spikes_per_virtual_step():
    # The training/eval monitor must see E-SpikeFormer's neurons (it once reported 0.000) and count a
    # count S as S spikes over D virtual steps: hidden neurons output S/D, the head neuron raw S.
    from spikeformers.train.evaluate import FiringRate

    D = 4
    hidden, head = SpikeCountNeuron(D), SpikeCountNeuron(D, normalize=False)
    model = nn.Sequential(hidden, head)
    monitor = FiringRate(model)
    model(torch.tensor([0.2, 1.0, 2.6, 9.0]))  # hidden counts 0, 1, 3, 4 -> outputs 0, .25, .75, 1
    monitor.remove()
    # hidden: (0+1+3+4)/(4*4) = 0.5; head on [0, .25, .75, 1] -> counts 0, 0, 1, 1 -> 2/(4*4)
    assert monitor.block_rates() == {"0": 0.5, "1": 0.125}
    assert monitor.spikes / monitor.count == pytest.approx((8 + 2) / 32)
