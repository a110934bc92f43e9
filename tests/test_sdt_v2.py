"""Spike-driven Transformer v2 / Meta-SpikeFormer: official keys/shapes/counts,
BN-and-pad and RepConv semantics, attention against an independent step-by-step reference, heads,
re-parameterisation, timm API, input handling."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models import LIF
from spikeformers.models.sdt_v2 import (
    BNAndPadLayer,
    MSAttention,
    RepConv,
    SpikeDrivenTransformerV2,
    checkpoint_filter_fn,
)

CONFIGS = ["sdtv2_imagenet_8_384", "sdtv2_imagenet_8_512", "sdtv2_imagenet_8_512_kd", "sdtv2_imagenet_8_768"]
PARAMS = {  # independent of the reference files
    "sdtv2_imagenet_8_384": 31_333_864,
    "sdtv2_imagenet_8_512": 55_350_248,
    "sdtv2_imagenet_8_512_kd": 55_991_248,
    "sdtv2_imagenet_8_768": 123_741_160,
}
SMALL = dict(in_chans=3, num_classes=10, embed_dim=(16, 32, 48, 64), depths=(1, 1), num_heads=4, T=2)


def sj_lif(x, v_threshold=1.0):
    return LIF(v_threshold=v_threshold, backend="spikingjelly")(x)


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (fresh ones are 1/0/0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def small_model(**kwargs) -> SpikeDrivenTransformerV2:
    return randomize_bn(SpikeDrivenTransformerV2(**dict(SMALL, backend="spikingjelly", **kwargs)))


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics := this batch's statistics (momentum 1), so that eval mode fires."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = 1.0
    model.train()(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


# --- official configurations ------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_official_config_keys_counts_and_strict_load(config, reference):
    model = timm.create_model(config)
    reference.assert_matches_official(model, config)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[config]
    # MAE/DeiT saver layout {"model": state, "epoch": ...}, loaded strictly through the filter
    official = reference.official_state(config)
    model.load_state_dict(checkpoint_filter_fn({"model": official, "epoch": 1}, model), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, official[key]), key
    if config.endswith("_kd"):
        # a stage-1 (non-KD) state: head_kd stays as initialised (filter) / is reported missing (strict=False)
        plain = {k: v for k, v in official.items() if not k.startswith("head_kd.")}
        fresh = timm.create_model(config)
        head_kd = fresh.head_kd.weight.clone()
        fresh.load_state_dict(checkpoint_filter_fn({"model": plain}, fresh), strict=True)
        assert torch.equal(fresh.head_kd.weight, head_kd) and torch.equal(fresh.head.weight, official["head.weight"])
        result = fresh.load_state_dict(plain, strict=False)
        assert sorted(result.missing_keys) == ["head_kd.bias", "head_kd.weight"] and not result.unexpected_keys


def test_checkpoint_filter_unwraps_savers():
    model = timm.create_model("sdtv2_tiny")
    state = model.state_dict()
    for wrapped in ({"model": state, "optimizer": {}, "epoch": 3}, {"state_dict": {f"module.{k}": v for k, v in state.items()}},
                    {f"_orig_mod.{k}": v for k, v in state.items()}):
        assert list(checkpoint_filter_fn(wrapped, model)) == list(state)


# --- BN-and-pad, RepConv, double BN -----------------------------------------------------------


def test_bn_and_pad_uses_running_stats_after_this_calls_update():
    torch.manual_seed(0)
    layer = BNAndPadLayer(pad_pixels=1, num_features=3)
    bn = layer.bn
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
        bn.running_mean.copy_(torch.tensor([0.2, -1.0, 0.5]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    x = torch.randn(4, 3, 5, 6) * 2 + 3
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    layer.train()
    out = layer(x)
    # running statistics after this batch (momentum 0.1, unbiased variance)
    mean1 = 0.9 * mean0 + 0.1 * x.mean((0, 2, 3))
    var1 = 0.9 * var0 + 0.1 * x.var((0, 2, 3), unbiased=True)
    gamma, beta = bn.weight.detach(), bn.bias.detach()
    after = beta - mean1 * gamma / torch.sqrt(var1 + bn.eps)
    before = beta - mean0 * gamma / torch.sqrt(var0 + bn.eps)
    assert out.shape == (4, 3, 7, 8)
    border = torch.ones(7, 8, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    for c in range(3):
        torch.testing.assert_close(out[:, c][:, border], after[c].expand(4, int(border.sum())))
    assert (after - before).abs().min() > 0.05  # an implementation padding before the update would fail
    # interior: plain training-mode BN (batch statistics)
    ref = F.batch_norm(x, None, None, gamma, beta, training=True, eps=bn.eps)
    torch.testing.assert_close(out[:, :, 1:-1, 1:-1], ref)
    # gamma/beta get gradients only through the interior (the pad constant is detached)
    layer.zero_grad()
    out.sum().backward()
    g_int = torch.autograd.grad(F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps).sum(),
                                (bn.weight, bn.bias))
    torch.testing.assert_close(bn.weight.grad, g_int[0])
    torch.testing.assert_close(bn.bias.grad, g_int[1])


def test_bn_and_pad_eval_pad_is_bn_of_zero():
    layer = randomize_bn(BNAndPadLayer(1, 4)).eval()
    x = torch.randn(2, 4, 3, 3)
    out = layer(x)
    zero_bn = layer.bn(torch.zeros(1, 4, 1, 1)).flatten()
    torch.testing.assert_close(out[0, :, 0, 0], zero_bn)
    # so the padded output is BN of the zero-padded input (what makes RepConv foldable)
    torch.testing.assert_close(out, layer.bn(F.pad(x, [1] * 4)))
    torch.testing.assert_close(layer.pad_values(), zero_bn.detach())


def test_repconv_structure_and_two_bns_in_a_row():
    attn = MSAttention(16, num_heads=4)
    for name in ("q_conv", "k_conv", "v_conv", "proj_conv"):
        branch = getattr(attn, name)
        assert isinstance(branch, nn.Sequential) and isinstance(branch[0], RepConv) and isinstance(branch[1], nn.BatchNorm2d)
        body = branch[0].body
        assert body[0].kernel_size == (1, 1) and body[0].bias is None
        assert isinstance(body[1], BNAndPadLayer) and body[1].pad_pixels == 1
        assert body[2][0].kernel_size == (3, 3) and body[2][0].padding == (0, 0) and body[2][0].groups == 16
        assert body[2][1].kernel_size == (1, 1) and isinstance(body[2][2], nn.BatchNorm2d)
    # training mode: out = BN_outer(BN_inner(...)) — the outer BN renormalises the inner one's output
    branch = randomize_bn(attn.q_conv).train()
    x = (torch.rand(6, 16, 5, 5) > 0.7).float()
    body = copy.deepcopy(branch[0].body)  # BN-and-pad updates its running statistics on every call
    inner = body[2][1](body[2][0](body[1](body[0](x))))
    inner_bn = F.batch_norm(inner, None, None, branch[0].body[2][2].weight, branch[0].body[2][2].bias, training=True)
    expected = F.batch_norm(inner_bn, None, None, branch[1].weight, branch[1].bias, training=True)
    torch.testing.assert_close(branch(x), expected)


# --- attention against a step-by-step reference -----------------------------------------------


def _repconv_bn_reference(branch, s):
    """q/k/v/proj branch on [T, B, C, H, W] spikes, written with functional ops, in training mode
    (batch statistics; the pad constant from the running statistics after this call's update)."""
    T, B, C, H, W = s.shape
    rep, outer = branch[0].body, branch[1]
    x = F.conv2d(s.reshape(T * B, C, H, W), rep[0].weight)
    bn = rep[1].bn
    mean_run = (1 - bn.momentum) * bn.running_mean + bn.momentum * x.mean((0, 2, 3))
    var_run = (1 - bn.momentum) * bn.running_var + bn.momentum * x.var((0, 2, 3), unbiased=True)
    y = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    pad = (bn.bias - mean_run * bn.weight / torch.sqrt(var_run + bn.eps)).detach()
    canvas = pad.view(1, C, 1, 1).expand(T * B, C, H + 2, W + 2).clone()
    canvas[:, :, 1:-1, 1:-1] = y
    z = F.conv2d(canvas, rep[2][0].weight, groups=C)
    z = F.conv2d(z, rep[2][1].weight)
    z = F.batch_norm(z, None, None, rep[2][2].weight, rep[2][2].bias, training=True)
    z = F.batch_norm(z, None, None, outer.weight, outer.bias, training=True)
    return z.reshape(T, B, -1, H, W)


def test_attention_matches_step_by_step_reference():
    """S = SN(x); Q, K, V = SN(BN(RepConv(S))); per head A_h = Q_h (K_hᵀ V_h) · 0.125 over channels
    c = h·d + j; out = BN(RepConv(SN_0.5(A)))."""
    torch.manual_seed(0)
    T, B, C, H, W, heads = 3, 2, 16, 4, 4, 4
    d = C // heads
    attn = randomize_bn(MSAttention(C, heads, lif=lambda **kw: LIF(backend="spikingjelly", **kw))).train()
    with torch.no_grad():
        for name in ("q_conv", "k_conv", "v_conv"):
            getattr(attn, name)[1].bias.fill_(2.0)  # dense Q, K, V so that the attention LIF fires
    x = torch.randn(T, B, C, H, W) * 2
    with torch.no_grad():  # the reference reads the running statistics before the module updates them
        s = sj_lif(x)
        q, k, v = (sj_lif(_repconv_bn_reference(getattr(attn, f"{n}_conv"), s)).flatten(3) for n in "qkv")  # [T, B, C, N]
        a = torch.zeros(T, B, C, H * W)
        for h in range(heads):
            ch = slice(h * d, (h + 1) * d)
            qh, kh, vh = (t[:, :, ch].transpose(2, 3) for t in (q, k, v))  # [T, B, N, d]
            kv = torch.einsum("tbnd,tbne->tbde", kh, vh)
            a[:, :, ch] = torch.einsum("tbnd,tbde->tbne", qh, kv).transpose(2, 3) * 0.125
        expected = _repconv_bn_reference(attn.proj_conv, sj_lif(a, 0.5).reshape(T, B, C, H, W))
    assert q.mean() > 0.05 and sj_lif(a, 0.5).mean() > 0.01  # the reference path fires
    out = attn(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert int(attn.q_conv[0].body[1].bn.num_batches_tracked) == 1 and int(attn.q_conv[1].num_batches_tracked) == 1


# --- model semantics ----------------------------------------------------------------------------


def _features_and_head_inputs(model, x):
    feats = model.forward_features(x)
    mean = feats.flatten(3).mean(3)  # [T, B, C3]
    return mean, sj_lif(mean)


def test_head_readings():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32) * 3
    spikes = small_model().eval()
    older = small_model(head_on_spikes=False).eval()
    older.load_state_dict(spikes.state_dict())
    with torch.no_grad():
        mean, mean_lif = _features_and_head_inputs(spikes, x)
        assert 0 < mean_lif.mean() < 1
        torch.testing.assert_close(spikes(x), spikes.head(mean_lif).mean(0))  # HEAD: head on the spikes
        torch.testing.assert_close(older(x), older.head(mean).mean(0))  # before d95ad13: head on the mean
        assert not torch.allclose(spikes(x), older(x))
        torch.testing.assert_close(spikes.forward_head(spikes.forward_features(x), pre_logits=True), mean_lif.mean(0))


@pytest.mark.parametrize("head_on_spikes", [True, False])
def test_kd_head_train_and_eval(head_on_spikes):
    torch.manual_seed(0)
    model = small_model(kd=True, head_on_spikes=head_on_spikes)
    x = torch.randn(2, 3, 32, 32) * 3
    model.train()
    logits, logits_kd = model(x)
    assert logits.shape == logits_kd.shape == (2, 10)
    model.eval()
    with torch.no_grad():
        mean, mean_lif = _features_and_head_inputs(model, x)
        head_in = mean_lif if head_on_spikes else mean
        expected = (model.head(head_in).mean(0) + model.head_kd(mean_lif).mean(0)) / 2
        torch.testing.assert_close(model(x), expected)
        model.per_step_logits = True
        steps = model(x)
    assert steps.shape == (2, 2, 10)
    torch.testing.assert_close(steps.mean(0), expected)


def test_bn_statistics_over_folded_time_and_batch():
    model = SpikeDrivenTransformerV2(**dict(SMALL, T=3)).train()
    x = torch.randn(2, 3, 32, 32)
    bn = model.downsample1_1.encode_bn
    model(x)
    conv = model.downsample1_1.encode_conv(x.unsqueeze(0).expand(3, -1, -1, -1, -1).flatten(0, 1))
    torch.testing.assert_close(bn.running_mean, 0.1 * conv.mean((0, 2, 3)))


def test_backends_agree_and_grad_checkpointing_is_exact():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32) * 3, torch.tensor([1, 7])
    runs = []
    for backend, ckpt in (("spikingjelly", False), ("torch", False), ("torch", True)):
        torch.manual_seed(0)
        model = small_model(kd=True)
        model.train()
        for m in model.modules():
            if isinstance(m, LIF):
                m.backend = backend
        model.set_grad_checkpointing(ckpt)
        logits, logits_kd = model(x)
        loss = F.cross_entropy(logits, y) + F.cross_entropy(logits_kd, y)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()], [b.clone() for b in model.buffers()]))
    (l_sj, g_sj, b_sj), (l_t, g_t, b_t), (l_c, g_c, b_c) = runs
    assert torch.equal(l_sj, l_t) and torch.equal(l_t, l_c)  # spikes are bit-identical across backends
    assert all(torch.equal(a, b) for a, b in zip(b_sj, b_t)) and all(torch.equal(a, b) for a, b in zip(b_t, b_c))
    assert all(torch.equal(a, b) for a, b in zip(g_t, g_c))  # checkpointing changes nothing
    for a, b in zip(g_sj, g_t):  # the torch LIF backward rounds differently from SpikingJelly's
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --- re-parameterisation ------------------------------------------------------------------------


def test_repconv_fuses_into_one_conv():
    torch.manual_seed(0)
    branch = randomize_bn(nn.Sequential(RepConv(8, 12), nn.BatchNorm2d(12))).eval()
    fused = branch[0].fused(branch[1])
    assert fused.kernel_size == (3, 3) and fused.padding == (1, 1) and fused.bias is not None
    x = (torch.rand(3, 8, 6, 5) > 0.5).float()
    with torch.no_grad():
        assert (fused(x) - branch(x)).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reparameterize_keeps_eval_outputs(dtype):
    torch.manual_seed(0)
    model = small_model(kd=True)
    with torch.no_grad():  # dense Q, K, V so that every attention fires (a silent one makes the proj BNs ill-conditioned)
        for attn in (model.block3[0].attn, model.block4[0].attn):
            for name in ("q_conv", "k_conv", "v_conv"):
                getattr(attn, name)[1].bias.fill_(2.0)
    model = model.to(dtype)
    x = torch.randn(4, 3, 32, 32, dtype=dtype) * 3
    with pytest.raises(RuntimeError, match="eval"):
        model.reparameterize()
    calibrate(model, x)
    rates = []
    hook = model.block4[0].attn.attn_lif.register_forward_hook(lambda m, i, out: rates.append(float(out.mean())))
    with torch.no_grad():
        stream, logits = model.forward_features(x), model(x)
        hook.remove()
        assert rates[0] > 0.1  # the attention fires
        model.reparameterize()
        stream_fused, logits_fused = model.forward_features(x), model(x)
    assert not any(isinstance(m, RepConv) for m in model.modules())
    assert isinstance(model.block3[0].attn.q_conv, nn.Conv2d) and "block3.0.attn.q_conv.bias" in model.state_dict()
    assert logits.abs().max() > 0
    assert (stream_fused - stream).abs().max() <= 1e-5  # the real-valued stream before the head LIF
    assert (logits_fused - logits).abs().max() <= 1e-5


# --- end to end, timm API, input handling ------------------------------------------------------


def test_tiny_forward_backward_and_cfg():
    model = timm.create_model("sdtv2_tiny")
    assert model.depths == (0, 0) and model.embed_dim == (16, 32, 64, 128)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 32, 32) and cfg["num_classes"] == 10 and cfg["mean"] == (0.5,) and cfg["std"] == (0.5,)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.T = 2
    model.per_step_logits = True
    assert model(x).shape == (2, 2, 10)


def test_full_config_forward_backward_small_input():
    model = timm.create_model("sdtv2_imagenet_8_384", T=1, backend="spikingjelly")  # no LIF compile for T=1
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.downsample1_1.encode_conv.weight.grad is not None and model.head.weight.grad is not None


def test_registry_cfgs_and_timm_api():
    names = set(timm.list_models("sdtv2*"))
    assert names == set(CONFIGS) | {"sdtv2_tiny"}
    cfg = timm.get_pretrained_cfg("sdtv2_imagenet_8_512_kd")
    assert cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic" and cfg.input_size == (3, 224, 224)
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.paper_ids == "arXiv:2404.03663"
    assert cfg.first_conv == "downsample1_1.encode_conv" and cfg.classifier == "head"
    model = timm.create_model("sdtv2_tiny", num_classes=5, T=2, kd=True, drop_path_rate=0.1, backend="torch")
    assert isinstance(model, SpikeDrivenTransformerV2) and model.T == 2 and model.kd and model.num_classes == 5
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.head_kd.out_features == 7
    features = timm.create_model("sdtv2_tiny", num_classes=0)
    assert features(torch.randn(2, 1, 32, 32)).shape == (2, 128)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SpikeDrivenTransformerV2(embed_dim=(16, 32, 48, 64), num_heads=5)
    with pytest.raises(ValueError, match="4 channel counts"):
        SpikeDrivenTransformerV2(embed_dim=(16, 32, 48))


def test_layer_decay_groups():
    from timm.optim import create_optimizer_v2

    model = timm.create_model("sdtv2_tiny", depths=(1, 1))
    groups = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5).param_groups
    # stem, 10 later downsamplers/blocks in forward order, head
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == 12 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.5**11)
    stem = [g for g in groups if any(p is model.downsample1_1.encode_conv.weight for p in g["params"])][0]
    block4 = [g for g in groups if any(p is model.block4[0].mlp.fc1_conv.weight for p in g["params"])][0]
    assert stem["lr_scale"] == scales[0] and block4["lr_scale"] == pytest.approx(0.5)
    assert model.group_matcher(coarse=True)["blocks"][0] == (r"^ConvBlock1_1\.", (0,))

