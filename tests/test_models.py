"""Spikformer and SDT v1: official keys/shapes/param counts, semantics,
timm registry, input handling."""

import pytest
import timm
import torch
import torch.nn.functional as F

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models import LIF, SpikeDrivenTransformer, Spikformer
from spikeformers.models.layers import checkpoint_filter_fn
from spikeformers.models.sdt import SpikeDrivenSelfAttention
from spikeformers.models.spikformer import SSAConv, SSALinear

TINY = ["spikformer_tiny", "sdt_tiny"]


def sf_lif(x, v_threshold=1.0):
    return LIF(v_threshold=v_threshold, backend="spikingjelly")(x)


# --- official configurations ------------------------------------------------------------------


def test_state_dict_matches_official_key_list(official_config, reference):
    name, num_classes = reference.configs[official_config]
    reference.assert_matches_official(timm.create_model(name, num_classes=num_classes), official_config)


@pytest.mark.parametrize("config", ["sf_cifar10_4_384", "sf_cifar10dvs_2_256", "sdt_cifar10_2_256"])
def test_strict_load_of_official_layout(config, reference):
    name, num_classes = reference.configs[config]
    official = {}
    for key, shape in reference.read_key_list(config):
        official[key] = torch.randint(0, 5, shape) if key.endswith("num_batches_tracked") else torch.randn(shape)
    # timm-saver layout from a DDP run: {"state_dict": {"module.<key>": ...}, ...}
    checkpoint = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in official.items()}}
    model = timm.create_model(name, num_classes=num_classes)
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, official[key]), key


def test_official_param_counts_spot_check():
    # the headline numbers, independent of the reference files.
    assert sum(p.numel() for p in timm.create_model("spikformer_cifar_4_384").parameters()) == 9_330_874
    assert sum(p.numel() for p in timm.create_model("sdt_cifar_2_512").parameters()) == 10_233_546
    assert sum(p.numel() for p in timm.create_model("sdt_imagenet_8_512").parameters()) == 29_689_896


# --- attention semantics against step-by-step references --------------------------------------


def _bn_conv(conv, bn, x):  # x [T, B, C, ...] -> [T, B, C', ...], T folded into the batch
    T, B = x.shape[:2]
    return bn(conv(x.flatten(0, 1))).reshape(T, B, -1, *x.shape[3:])


def test_sdsa_matches_channelwise_reference():
    """SDSA written per channel: mask_c = SN_0.5(Σ_n k_cn v_cn), out = proj(q ⊙ mask) + x."""
    T, B, C, H, W = 3, 2, 16, 4, 4
    attn = SpikeDrivenSelfAttention(C, num_heads=4, lif=lambda **kw: LIF(backend="spikingjelly", **kw)).train()
    x = torch.randn(T, B, C, H, W) * 2
    s = sf_lif(x)
    q = sf_lif(_bn_conv(attn.q_conv, attn.q_bn, s)).flatten(3)  # [T, B, C, N]
    k = sf_lif(_bn_conv(attn.k_conv, attn.k_bn, s)).flatten(3)
    v = sf_lif(_bn_conv(attn.v_conv, attn.v_bn, s)).flatten(3)
    mask = sf_lif((k * v).sum(-1), v_threshold=0.5)  # [T, B, C]
    out = (q * mask[..., None]).reshape(T, B, C, H, W)
    expected = _bn_conv(attn.proj_conv, attn.proj_bn, out) + x
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-5)
    assert mask.sum() > 0 and mask.mean() < 1  # the test exercises both mask values


def test_sdsa_dvs_mode_pools_over_tokens_and_head_channels():
    """DVS mode: 3×3 spatial max on k, v; 3×3 max over (N, d) of the head layout on k⊙v and q⊙kv."""
    T, B, C, H, W, h = 2, 2, 16, 3, 3, 2
    d, N = C // h, H * W
    attn = SpikeDrivenSelfAttention(C, num_heads=h, dvs_mode=True, lif=lambda **kw: LIF(backend="spikingjelly", **kw)).train()
    attn.q_bn.bias.data.fill_(2.0)  # dense q, so the k⊙v mask reaches the output
    x = torch.randn(T, B, C, H, W) * 2
    s = sf_lif(x)

    def spatial_max(z):  # [T, B, C, H, W]
        return F.max_pool2d(z.flatten(0, 2).unsqueeze(1), 3, 1, 1).reshape(z.shape)

    def heads(z):  # [T, B, C, H, W] -> [T, B, h, N, d]
        return z.flatten(3).reshape(T, B, h, d, N).transpose(3, 4)

    def nd_max(z):  # 3×3 max over the (N, d) plane of [T, B, h, N, d]
        return F.max_pool2d(z.flatten(0, 2).unsqueeze(1), 3, 1, 1).reshape(z.shape)

    q = heads(sf_lif(_bn_conv(attn.q_conv, attn.q_bn, s)))
    k = heads(spatial_max(sf_lif(_bn_conv(attn.k_conv, attn.k_bn, s))))
    v = heads(spatial_max(sf_lif(_bn_conv(attn.v_conv, attn.v_bn, s))))

    def output(kv_pool):
        kv = sf_lif((nd_max(k * v) if kv_pool else k * v).sum(3, keepdim=True), v_threshold=0.5)
        out = nd_max(q * kv).transpose(3, 4).reshape(T, B, C, H, W)
        return _bn_conv(attn.proj_conv, attn.proj_bn, out) + x

    expected = output(kv_pool=True)
    assert not torch.allclose(expected, output(kv_pool=False))  # the test can see that pool
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-5)


def _lively(module):
    """Larger BN gains so the few-step test inputs make every LIF fire sometimes."""
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.weight.data.fill_(3.0)
            m.bias.data.fill_(1.0)
    return module


def _ssa_reference(q, k, v, num_heads, scale):
    """Per-head softmax-free attention on [T, B, N, C] spikes, heads = contiguous channel slices."""
    d = q.shape[-1] // num_heads
    outs = []
    for i in range(num_heads):
        sl = slice(i * d, (i + 1) * d)
        outs.append((q[..., sl] @ k[..., sl].transpose(-1, -2)) @ v[..., sl] * scale)
    return torch.cat(outs, dim=-1)


def test_ssa_linear_matches_per_head_reference():
    T, B, N, C, h = 4, 3, 16, 32, 2
    attn = _lively(SSALinear(C, h, lif=lambda **kw: LIF(backend="spikingjelly", **kw)).train())
    x = (torch.rand(T, B, N, C) < 0.3).float() + (torch.rand(T, B, N, C) < 0.3).float()  # spike sums

    def lin_bn(linear, bn, z):  # Linear on tokens, BatchNorm1d over channels
        y = linear(z.flatten(0, 1))
        return bn(y.transpose(1, 2)).transpose(1, 2).reshape(T, B, N, C)

    q = sf_lif(lin_bn(attn.q_linear, attn.q_bn, x))
    k = sf_lif(lin_bn(attn.k_linear, attn.k_bn, x))
    v = sf_lif(lin_bn(attn.v_linear, attn.v_bn, x))
    a = sf_lif(_ssa_reference(q, k, v, h, 0.125), v_threshold=0.5)
    expected = sf_lif(lin_bn(attn.proj_linear, attn.proj_bn, a))
    assert torch.equal(attn(x), expected)
    assert 0 < a.mean() < 1 and 0 < expected.mean() < 1


@pytest.mark.parametrize("scale,order", [(0.125, "q_kv_scale"), (0.25, "qk_v_scale")])
def test_ssa_conv_matches_per_head_reference(scale, order):
    T, B, C, H, W, h = 4, 2, 32, 4, 4, 2
    attn = _lively(SSAConv(C, h, scale, order, lif=lambda **kw: LIF(backend="spikingjelly", **kw)).train())
    x = (torch.rand(T, B, C, H, W) < 0.3).float() * 2
    tokens = x.flatten(3)  # [T, B, C, N]
    q, k, v = (
        sf_lif(_bn_conv(conv, bn, tokens)).transpose(-1, -2)
        for conv, bn in ((attn.q_conv, attn.q_bn), (attn.k_conv, attn.k_bn), (attn.v_conv, attn.v_bn))
    )
    a = sf_lif(_ssa_reference(q, k, v, h, scale), v_threshold=0.5).transpose(-1, -2)  # [T, B, C, N]
    expected = sf_lif(_bn_conv(attn.proj_conv, attn.proj_bn, a)).reshape(T, B, C, H, W)
    assert torch.equal(attn(x), expected)
    assert 0 < a.mean() < 1 and 0 < expected.mean() < 1


# --- whole models ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,shape,tokens",
    [
        ("spikformer_tiny", (1, 32, 32), 64),
        ("sdt_tiny", (1, 32, 32), 64),
        ("spikformer_cifar10dvs_2_256", (2, 128, 128), 64),
        ("sdt_cifar10dvs_2_256", (2, 64, 64), 256),
        ("sdt_gesture_2_256", (2, 128, 128), 256),
    ],
)
def test_token_grid_per_dataset(name, shape, tokens):
    # tokens after the patch embedding for each dataset's pooling.
    model = timm.create_model(name, T=2).train()
    x = torch.rand(2, 1, *shape)  # [T, B, C, H, W] sequence
    feats = model.forward_features(x)
    n = feats.shape[2] if getattr(model, "kind", None) == "cifar" else feats[0, 0, 0].numel()
    assert n == tokens
    assert model(x).shape == (1, model.num_classes)


def test_imagenet_token_grid():
    model = timm.create_model("sdt_imagenet_8_384", depth=1, T=1).eval()
    assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 1, 384, 14, 14)
    sf = timm.create_model("spikformer_imagenet_8_384", depth=1, T=1).eval()
    assert sf.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 1, 384, 14, 14)


def test_patch_embed_outputs():
    # Spikformer SPS adds RPE spikes to spikes ({0,1,2}); SDT MS_SPS returns real values.
    x = torch.randn(2, 2, 1, 32, 32)
    sf = timm.create_model("spikformer_tiny").train()
    assert set(sf.patch_embed(x).unique().tolist()) <= {0.0, 1.0, 2.0}
    sdt = timm.create_model("sdt_tiny").train()
    out = sdt.patch_embed(x)
    assert not set(out.unique().tolist()) <= {0.0, 1.0, 2.0}


def test_head_averages_as_specified():
    x = torch.randn(2, 1, 32, 32)
    sf = timm.create_model("spikformer_tiny").eval()
    feats = sf.forward_features(x)  # [T, B, N, D]
    torch.testing.assert_close(sf(x), sf.head(feats.mean(2).mean(0)))
    sdt = timm.create_model("sdt_tiny").eval()
    feats = sdt.forward_features(x)  # [T, B, D, H, W]
    spikes = LIF(backend="spikingjelly")(feats.flatten(3).mean(3))
    torch.testing.assert_close(sdt(x), sdt.head(spikes).mean(0))


def test_registry_and_timm_api(reference):
    names = set(timm.list_models("sdt*")) | set(timm.list_models("spikformer*"))
    assert {name for name, _ in reference.configs.values()} | set(TINY) <= names
    model = timm.create_model("sdt_cifar_2_256", num_classes=100, T=2)
    assert isinstance(model, SpikeDrivenTransformer) and model.T == 2 and model.num_classes == 100
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert isinstance(timm.create_model("spikformer_tiny"), Spikformer)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5
    features = timm.create_model("spikformer_tiny", num_classes=0)
    assert features(torch.randn(2, 1, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="unknown Spikformer kind"):
        Spikformer(kind="svhn")
    with pytest.raises(ValueError, match="pooling_stat"):
        SpikeDrivenTransformer(pooling_stat="01")


def test_neurons_add_no_state():
    model = timm.create_model("sdt_tiny")
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert len(lifs) == 4 + 2 * (5 + 2) + 1  # patch embed, 2 blocks × (shortcut, q, k, v, th | fc1, fc2), head
    assert not any(k.endswith(".v") for k in model.state_dict())


def test_timm_optimizer_api_layer_decay_and_no_weight_decay():
    from timm.optim import create_optimizer_v2

    dvs = timm.create_model("spikformer_cifar10dvs_2_256")
    assert dvs.no_weight_decay() == {"pos_embed"}
    groups = create_optimizer_v2(dvs, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5).param_groups
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == 4  # stem, block 0, block 1, head+norm: 0.5**3 ... 1
    assert scales[0] == pytest.approx(0.125) and scales[-1] == 1.0
    pos = [g for g in groups if any(p is dvs.pos_embed for p in g["params"])][0]
    assert pos["weight_decay"] == 0.0
    dvs.set_grad_checkpointing(True)
    assert dvs.grad_checkpointing


def test_naive_checkpoint_would_update_batchnorm_twice():
    from torch.utils.checkpoint import checkpoint

    block = timm.create_model("sdt_tiny").block[0].train()
    x = torch.randn(2, 2, 64, 8, 8, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert int(block.attn.q_bn.num_batches_tracked) == 2  # the hazard checkpoint_block avoids
