"""QKFormer: official keys/shapes/counts, strict loading, Q-K attention and
SSA against step-by-step references, the T·B-flattened LIF of the official SSA (legacy_tb_lif),
batch independence of the fixed model, timm API, input handling."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import get_pretrained_cfg

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models.neurons import LIF
from spikeformers.models.qkformer import (
    QKFormer,
    QKTokenAttention,
    SpikingSelfAttention,
    checkpoint_filter_fn,
)

OFFICIAL = [
    "qkformer_cifar10_4_384",
    "qkformer_cifar100_4_384",
    "qkformer_imagenet_10_384",
    "qkformer_imagenet_10_512",
    "qkformer_imagenet_10_768",
    "qkformer_cifar10dvs_2_256",
    "qkformer_gesture_2_256",
]
SJ = dict(backend="spikingjelly")


def sj_lif(x, v_threshold=1.0):
    return LIF(v_threshold=v_threshold, **SJ)(x)


def randomize_bn(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    """Random BN affine parameters (positive shifts, so the neurons fire) and running statistics
    set to the batch statistics of ``x``; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.num_features, generator=g) * 1.5)
            m.momentum = 1.0  # running statistics := this batch's statistics
        model.train()(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def small(kind="cifar", **kwargs):
    """A CPU-cheap model of each layout (same code paths as the official sizes)."""
    args = dict(
        cifar=dict(kind="cifar", in_chans=3, num_classes=5, embed_dim=64, depth=3, num_heads=4, T=3),
        imagenet=dict(kind="imagenet", in_chans=3, num_classes=5, embed_dim=64, depth=5, num_heads=2, T=2),
        dvs=dict(kind="dvs", in_chans=2, num_classes=5, embed_dim=64, num_heads=4, mlp_ratio=1.0, T=3),
    )[kind]
    return QKFormer(**dict(args, backend="spikingjelly", **kwargs))


# --- official configurations ------------------------------------------------------------------


@pytest.mark.parametrize("name", OFFICIAL)
def test_matches_official_key_list(name, reference):
    reference.assert_matches_official(timm.create_model(name), name)


@pytest.mark.parametrize("name", OFFICIAL)
def test_strict_load_of_official_mae_checkpoint(name, reference):
    official = reference.official_state(name)
    # MAE saver layout (ImageNet train.py): {"model": state, "epoch": ..., ...}
    checkpoint = {"model": official, "epoch": 199}
    model = timm.create_model(name)
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, official[key]), key


def test_filter_unwraps_timm_saver_and_prefixes(reference):
    official = reference.official_state("qkformer_cifar10dvs_2_256")
    checkpoint = {"epoch": 3, "state_dict": {f"module._orig_mod.{k}": v for k, v in official.items()}}
    model = timm.create_model("qkformer_cifar10dvs_2_256")
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)


def test_official_param_counts_spot_check():
    # counts in the official logs, independent of the reference files.
    counts = {"qkformer_cifar10_4_384": 6_706_234, "qkformer_imagenet_10_768": 64_962_760,
              "qkformer_cifar10dvs_2_256": 1_504_138}
    for name, n in counts.items():
        assert sum(p.numel() for p in timm.create_model(name).parameters()) == n, name


def test_heads_depth_split_and_mlp_ratio():
    heads = {"qkformer_cifar10_4_384": 8, "qkformer_imagenet_10_384": 6, "qkformer_imagenet_10_512": 8,
             "qkformer_imagenet_10_768": 12, "qkformer_cifar10dvs_2_256": 16, "qkformer_gesture_2_256": 16}
    for name, h in heads.items():
        model = timm.create_model(name)
        attns = [m for m in model.modules() if isinstance(m, (QKTokenAttention, SpikingSelfAttention))]
        assert {m.num_heads for m in attns} == {h}, name
    assert timm.create_model("qkformer_imagenet_10_384").stage_depths == (1, 2, 7)
    assert timm.create_model("qkformer_cifar10_4_384").stage_depths == (1, 1, 2)
    dvs = timm.create_model("qkformer_cifar10dvs_2_256", depth=4)  # official: depth is ignored on DVS
    assert dvs.stage_depths == (1, 1)
    assert dvs.stage2[0].mlp.mlp1_conv.out_channels == 256  # mlp ratio 1
    assert timm.create_model("qkformer_gesture_2_256").stage2[0].mlp.mlp1_conv.out_channels == 1024
    assert hasattr(timm.create_model("qkformer_imagenet_10_384").stage3[0], "attn")
    assert hasattr(dvs.stage2[0], "ssa")


# --- Q-K attention and SSA against step-by-step references ------------------------------------


def _conv_bn(conv, bn, x):  # [T, B, C, N] -> [T, B, C', N], T folded into the batch
    T, B = x.shape[:2]
    return bn(conv(x.flatten(0, 1))).reshape(T, B, -1, x.shape[-1])


def test_qk_token_attention_matches_per_head_token_reference():
    T, B, C, H, W, heads = 3, 2, 16, 4, 4, 4
    d = C // heads
    attn = QKTokenAttention(C, heads, lif=lambda **kw: LIF(**SJ, **kw)).train()
    x = torch.randint(0, 3, (T, B, C, H, W)).float()  # integer-valued stream
    out = attn(x)

    xf = x.flatten(3)
    q = sj_lif(_conv_bn(attn.q_conv, attn.q_bn, xf))  # [T, B, C, N]
    k = sj_lif(_conv_bn(attn.k_conv, attn.k_bn, xf))
    masked = torch.zeros_like(k)
    for hd in range(heads):
        for n in range(H * W):
            channels = slice(hd * d, (hd + 1) * d)
            score = q[:, :, channels, n].sum(-1)  # [T, B]: channel sum of Q for this head and token
            mask = sj_lif(score, v_threshold=0.5)  # LIF over T, per sample
            masked[:, :, channels, n] = mask[..., None] * k[:, :, channels, n]
    ref = sj_lif(_conv_bn(attn.proj_conv, attn.proj_bn, masked)).reshape(T, B, C, H, W)
    assert torch.equal(out, ref)
    assert 0 < out.mean() < 1  # not a trivial all-0 / all-1 case


def _ssa_reference(attn, x, legacy: bool):
    """SSA written per (t, b, head): (Q (Kᵀ V)) / 8 → LIF 0.5 → proj → BN → LIF; the last LIF is
    either per sample over T or an explicit loop over k = t·B + b with a [C, N] membrane."""
    T, B, C, H, W = x.shape
    heads, N = attn.num_heads, H * W
    d = C // heads
    xf = x.flatten(3)
    q, k, v = (sj_lif(_conv_bn(c, b, xf)) for c, b in
               ((attn.q_conv, attn.q_bn), (attn.k_conv, attn.k_bn), (attn.v_conv, attn.v_bn)))
    y = torch.zeros(T, B, C, N)
    for t in range(T):
        for b in range(B):
            for hd in range(heads):
                cs = slice(hd * d, (hd + 1) * d)
                qh, kh, vh = q[t, b, cs].T, k[t, b, cs].T, v[t, b, cs].T  # [N, d]
                y[t, b, cs] = (qh @ (kh.T @ vh) / 8).T
    s = sj_lif(y, v_threshold=0.5)
    z = _conv_bn(attn.proj_conv, attn.proj_bn, s)  # [T, B, C, N]
    if not legacy:
        return sj_lif(z).reshape(T, B, C, H, W)
    out = torch.zeros_like(z)
    v_mem = torch.zeros(C, N)
    for t in range(T):  # official: the multi-step neuron walks the flattened index k = t * B + b
        for b in range(B):
            h = v_mem + (z[t, b] - v_mem) / 2.0
            spike = (h >= 1.0).float()
            out[t, b] = spike
            v_mem = h * (1 - spike)
    return out.reshape(T, B, C, H, W)


@pytest.mark.parametrize("legacy", [False, True])
def test_ssa_matches_step_by_step_reference(legacy):
    T, B, C, H, W = 3, 3, 16, 4, 4
    attn = SpikingSelfAttention(C, 2, lif=lambda **kw: LIF(**SJ, **kw), legacy_tb_lif=legacy).train()
    with torch.no_grad():  # dense q/k/v spikes, so that the attention LIF fires
        for bn in (attn.q_bn, attn.k_bn, attn.v_bn):
            bn.bias.fill_(1.5)
    x = torch.randint(0, 4, (T, B, C, H, W)).float()
    out = attn(x)
    assert torch.allclose(out, _ssa_reference(attn, x, legacy))
    assert torch.equal(out, _ssa_reference(attn, x, legacy))
    assert 0 < out.mean() < 1
    # ... and the two modes really differ here (the reference check could fail).
    assert not torch.equal(out, _ssa_reference(attn, x, not legacy))


def test_legacy_proj_lif_equals_loop_over_flattened_index():
    """The legacy neuron is exactly the neuron over [T*B, C, N] taken as a time sequence."""
    T, B, C, N = 4, 3, 8, 5
    z = torch.randn(T * B, C, N) * 2
    flat = LIF(**SJ)(z)
    v_mem, expected = torch.zeros(C, N), []
    for k in range(T * B):  # k = t * B + b
        h = v_mem + (z[k] - v_mem) / 2.0
        spike = (h >= 1.0).float()
        expected.append(spike)
        v_mem = h * (1 - spike)
    assert torch.equal(flat, torch.stack(expected))
    assert not torch.equal(flat.reshape(T, B, C, N), LIF(**SJ)(z.reshape(T, B, C, N)))


# --- batch coupling ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cifar", "imagenet", "dvs"])
def test_fixed_model_is_batch_independent_legacy_is_not(kind):
    torch.manual_seed(0)
    B = 4
    if kind == "dvs":  # time-first frame sequences
        x = (torch.rand(3, B, 2, 32, 32) < 0.3).float()
        one, permute = (lambda i: x[:, i : i + 1]), (lambda p: x[:, p])
    else:
        x = torch.randn(B, 3, 32 if kind == "imagenet" else 16, 32 if kind == "imagenet" else 16) * 2
        one, permute = (lambda i: x[i : i + 1]), (lambda p: x[p])
    model = randomize_bn(small(kind), x)
    perm = torch.randperm(B)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(one(i)) for i in range(B)])
        assert torch.allclose(batched, alone, rtol=0, atol=1e-6)
        assert torch.allclose(model(permute(perm)), batched[perm], rtol=0, atol=1e-6)

        model.legacy_tb_lif = True
        coupled = model(x)
        coupled_alone = torch.cat([model(one(i)) for i in range(B)])
        coupled_permuted = model(permute(perm))
    # With B = 1 the legacy neuron is the per-sample one; in a batch it is not, and order matters.
    assert torch.allclose(coupled_alone, alone, rtol=0, atol=1e-6)
    assert (coupled - alone).abs().max() > 1e-2
    assert (coupled_permuted - coupled[perm]).abs().max() > 1e-3


def test_legacy_switch_propagates_and_pretrained_imagenet_defaults_to_legacy(tmp_path, reference):
    model = small("imagenet")
    ssas = [m for m in model.modules() if isinstance(m, SpikingSelfAttention)]
    assert ssas and not model.legacy_tb_lif and not any(m.legacy_tb_lif for m in ssas)
    model.legacy_tb_lif = True
    assert all(m.legacy_tb_lif for m in ssas)
    assert small("imagenet", legacy_tb_lif=True).legacy_tb_lif

    # Pretrained ImageNet weights (official MAE layout, local file) -> legacy_tb_lif=True by default.
    path = tmp_path / "checkpoint-199.pth"
    torch.save({"model": reference.official_state("qkformer_imagenet_10_384"), "epoch": 199}, path)
    overlay = dict(file=str(path))
    loaded = timm.create_model("qkformer_imagenet_10_384", pretrained=True, pretrained_cfg_overlay=overlay)
    assert loaded.legacy_tb_lif
    assert torch.equal(loaded.head.weight, torch.load(path)["model"]["head.weight"])
    fixed = timm.create_model("qkformer_imagenet_10_384", pretrained=True, pretrained_cfg_overlay=overlay,
                              legacy_tb_lif=False)
    assert not fixed.legacy_tb_lif
    assert not timm.create_model("qkformer_imagenet_10_384").legacy_tb_lif
    assert "legacy_tb_lif=True" in get_pretrained_cfg("qkformer_imagenet_10_384").notes


# --- forward / backward, timm API, input handling ------------------------------------------------


def test_tiny_forward_backward_and_default_cfg():
    cfg = get_pretrained_cfg("qkformer_tiny")
    assert cfg.input_size == (1, 32, 32) and cfg.num_classes == 10 and cfg.mean == (0.5,) and cfg.std == (0.5,)
    model = timm.create_model("qkformer_tiny").train()
    x = torch.randn(4, 1, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 10)
    F.cross_entropy(logits, torch.arange(4)).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.patch_embed1.proj_conv.weight.grad.abs().sum() > 0


def test_full_config_forward_backward_on_cpu():
    model = timm.create_model("qkformer_cifar10_4_384", T=2, backend="spikingjelly").train()
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.patch_embed1.proj_conv.weight.grad.abs().sum() > 0


def test_stream_is_integer_and_shapes():
    model = small("imagenet").eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 2, 64, 2, 2)  # [T, B, D, H/16, W/16]
    assert torch.equal(feats, feats.round()) and feats.min() >= 0
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible"):
        small("cifar", num_heads=5)
    with pytest.raises(ValueError, match="kind"):
        QKFormer(kind="vit")
    with pytest.raises(ValueError, match="depth"):
        small("imagenet", depth=3)


def test_registry_and_classifier_api():
    names = set(timm.list_models("qkformer*"))
    assert names == set(OFFICIAL) | {"qkformer_tiny"}
    model = timm.create_model("qkformer_tiny", num_classes=3)
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, model.num_features)
    assert [f["module"] for f in model.feature_info] == ["stage1", "stage2", "stage3"]


def test_group_matcher_orders_stages_and_patch_embeds():
    from timm.models import group_parameters

    model = small("imagenet")
    groups = group_parameters(model, model.group_matcher(), reverse=True)
    gid = lambda prefix: {v for k, v in groups.items() if k.startswith(prefix)}  # noqa: E731
    order = ["patch_embed1.", "stage1.0.", "patch_embed2.", "stage2.0.", "stage2.1.", "patch_embed3.", "stage3.0.",
             "stage3.1.", "head."]
    ids = [gid(p) for p in order]
    assert all(len(i) == 1 for i in ids)
    assert [i.pop() for i in ids] == list(range(len(order)))
    coarse = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert coarse["patch_embed2.proj3_conv.weight"] == coarse["stage2.1.mlp.fc2_conv.weight"]

