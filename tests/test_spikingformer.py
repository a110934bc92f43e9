"""Spikingformer: official keys/shapes/counts, checkpoint naming, semantics
against step-by-step references written here, whole-model equality with a functional reference
(logits, gradients, BN buffers), input handling and the timm API."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models import LIF, set_backend
from spikeformers.models.spikingformer import (
    Spikingformer,
    SpikingSelfAttention,
    SpikingTokenizer,
    checkpoint_filter_fn,
)

CONFIGS = [
    "spikingformer_cifar10_4_384",
    "spikingformer_cifar100_4_384",
    "spikingformer_cifar10_4_256",
    "spikingformer_cifar10_2_384",
    "spikingformer_imagenet_8_384",
    "spikingformer_imagenet_8_512",
    "spikingformer_imagenet_8_768",
    "spikingformer_cifar10dvs_2_256",
    "spikingformer_gesture_2_256",
]
SJ = "spikingjelly"


def sj_lif(x, v_threshold=1.0, tau=2.0):
    return LIF(v_threshold=v_threshold, tau=tau, backend=SJ)(x)


def is_binary(t):
    return set(t.unique().tolist()) <= {0.0, 1.0}


def lively(module, gain=3.0, shift=1.0):
    """Larger BN gains so that the few-step test inputs make every LIF fire sometimes."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.weight.data.fill_(gain)
            m.bias.data.fill_(shift)
    return module


def small(kind, **kw):
    """A small model of each official layout (fast on CPU), neurons on the SpikingJelly backend."""
    args = dict(embed_dim=32, depth=2, num_heads=4, T=2, backend=SJ, num_classes=5)
    args.update(dict(cifar=dict(in_chans=3), imagenet=dict(in_chans=3), dvs=dict(in_chans=2, num_heads=8))[kind])
    args.update(kw)
    return Spikingformer(kind=kind, **args)


INPUT = {"cifar": (3, 16, 16), "imagenet": (3, 32, 32), "dvs": (2, 32, 32)}


# --- official configurations ------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_official_key_list(name, reference):
    reference.assert_matches_official(timm.create_model(name), name)


def test_official_param_counts_spot_check():
    # independent of the reference files.
    counts = {"spikingformer_cifar10_4_384": 9_326_266, "spikingformer_imagenet_8_512": 29_705_768,
              "spikingformer_cifar10dvs_2_256": 2_568_714}
    for name, n in counts.items():
        assert sum(p.numel() for p in timm.create_model(name).parameters()) == n, name


def _ddp_saver(state):
    return {"epoch": 7, "arch": "Spikingformer", "state_dict": {f"module.{k}": v for k, v in state.items()}}


def _alternative_naming(key):
    """Committed naming → the Spikformer-style naming of the official energy log."""
    import re

    key = re.sub(r"^patch_embed\.proj4_(conv|bn)\.", r"patch_embed.rpe_\1.", key)
    key = re.sub(r"^patch_embed\.proj(\d)_(conv|bn)\.", r"patch_embed.proj_\2\1.", key)
    key = re.sub(r"^patch_embed\.block4_(conv|bn)\.", r"patch_embed.rpe_\1.", key)
    key = re.sub(r"^patch_embed\.block0_(conv|bn)\.", r"patch_embed.proj_\1.", key)
    key = re.sub(r"^patch_embed\.block(\d)_(conv|bn)\.", r"patch_embed.proj_\2\1.", key)
    return re.sub(r"\.mlp\.mlp(\d)_", r".mlp.fc\1_", key)


@pytest.mark.parametrize("name", ["spikingformer_cifar10_2_384", "spikingformer_imagenet_8_384", "spikingformer_gesture_2_256"])
@pytest.mark.parametrize("naming", ["committed", "alternative"])
def test_strict_load_of_official_checkpoint(name, naming, reference):
    official = reference.official_state(name)
    rename = _alternative_naming if naming == "alternative" else (lambda k: k)
    renamed = {rename(k): v for k, v in official.items()}
    if naming == "alternative":  # the test really exercises the rename map
        assert not set(renamed) & {k for k in official if ".mlp." in k or "proj1_" in k or "block1_" in k}
        assert any(k.startswith("patch_embed.rpe_conv") for k in renamed)
    model = timm.create_model(name)
    model.load_state_dict(checkpoint_filter_fn(_ddp_saver(renamed), model), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, official[key]), key


def test_filter_handles_plain_and_model_wrapped_dicts():
    model = timm.create_model("spikingformer_tiny")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for wrapped in (state, {"model": state}, {"state_dict_ema": {f"module.{k}": v for k, v in state.items()}}):
        assert list(checkpoint_filter_fn(wrapped, model)) == list(state)


def test_pretrained_file_in_alternative_naming_loads_through_timm(tmp_path):
    src = timm.create_model("spikingformer_tiny").eval()
    for p in src.parameters():
        p.data.normal_()
    path = tmp_path / "official.pth"
    torch.save(_ddp_saver({_alternative_naming(k): v for k, v in src.state_dict().items()}), path)
    loaded = timm.create_model("spikingformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for key, value in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# --- components against step-by-step references -----------------------------------------------


def _bn_conv(conv, bn, x):  # x [T, B, C, ...] -> [T, B, C', ...], T folded into the batch
    T, B = x.shape[:2]
    return bn(conv(x.flatten(0, 1))).reshape(T, B, -1, *x.shape[3:])


def _ssa_reference(attn, x, tau=2.0):
    """SSA written per head with explicit token sums; returns (output, attn_lif spikes)."""
    T, B, C, H, W = x.shape
    h = attn.num_heads
    d = C // h
    s = sj_lif(x, tau=tau).flatten(3)  # input LIF (official name proj_lif)
    q, k, v = (sj_lif(_bn_conv(conv, bn, s), tau=tau)
               for conv, bn in ((attn.q_conv, attn.q_bn), (attn.k_conv, attn.k_bn), (attn.v_conv, attn.v_bn)))
    heads = []
    for i in range(h):  # channel c = i * d + j
        qh, kh, vh = (z[:, :, i * d:(i + 1) * d] for z in (q, k, v))  # [T, B, d, N]
        scores = torch.einsum("tbcn,tbcm->tbnm", qh, kh)  # Q Kᵀ, [T, B, N, N]
        heads.append(torch.einsum("tbnm,tbjm->tbjn", scores, vh) * 0.125)  # (Q Kᵀ V)ᵀ, [T, B, d, N]
    a = sj_lif(torch.cat(heads, dim=2), v_threshold=0.5, tau=tau)
    return _bn_conv(attn.proj_conv, attn.proj_bn, a).reshape(T, B, C, H, W), a


@pytest.mark.parametrize("order,contiguous", [("qk_v_scale", False), ("q_kv_scale", True)])
@pytest.mark.parametrize("tau", [2.0, 1.5])
def test_ssa_matches_per_head_reference(order, contiguous, tau):
    T, B, C, H, W, h = 4, 2, 32, 4, 4, 4
    lif = lambda **kw: LIF(backend=SJ, tau=tau, **kw)  # noqa: E731
    attn = lively(SpikingSelfAttention(C, h, order, lif, contiguous)).train()
    x = torch.randn(T, B, C, H, W) * 2
    expected, a = _ssa_reference(attn, x, tau)
    out = attn(x)
    assert torch.equal(out, expected)
    assert 0 < a.mean() < 1  # both attention-LIF outcomes occur
    assert not is_binary(out)  # no LIF after proj_bn


def test_block_is_membrane_shortcut_and_ignores_norms():
    model = lively(timm.create_model("spikingformer_tiny", backend=SJ)).train()
    block = model.block[0]
    for norm in (block.norm1, block.norm2):  # never applied: poisoning them changes nothing
        norm.weight.data.fill_(float("nan"))
    x = torch.randn(2, 3, 64, 4, 4) * 2
    attn_out, _ = _ssa_reference(block.attn, x)
    y = x + attn_out
    m = block.mlp
    expected = y + _bn_conv(m.mlp2_conv, m.mlp2_bn, sj_lif(_bn_conv(m.mlp1_conv, m.mlp1_bn, sj_lif(y))))
    out = block(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def _tokenizer_reference(pe, x, tau=2.0):
    """Stage 0 conv → BN (no LIF); stages 1–4 LIF → [MaxPool(3,2,1)] → conv → BN."""
    z = _bn_conv(getattr(pe, f"{pe.names[0]}_conv"), getattr(pe, f"{pe.names[0]}_bn"), x)
    for i, name in enumerate(pe.names[1:], start=1):
        s = sj_lif(z, tau=tau)
        if pe.pool_stages[i]:
            pooled = F.max_pool2d(s.flatten(0, 1), 3, 2, 1)
            s = pooled.reshape(*s.shape[:2], *pooled.shape[1:])
        z = _bn_conv(getattr(pe, f"{name}_conv"), getattr(pe, f"{name}_bn"), s)
    return z


@pytest.mark.parametrize("kind,pools,names", [
    ("cifar", (False, False, False, True, True), ["block0", "block1", "block2", "block3", "block4"]),
    ("imagenet", (False, True, True, True, True), ["proj", "proj1", "proj2", "proj3", "proj4"]),
])
def test_tokenizer_op_order(kind, pools, names):
    pe = SpikingTokenizer(3, 32, kind, lif=lambda **kw: LIF(backend=SJ, **kw)).train()
    assert pe.pool_stages == pools and list(pe.names) == names
    assert [n for n, m in pe.named_children() if isinstance(m, LIF)] == [f"{n}_lif" for n in names[1:]]
    x = torch.randn(2, 2, 3, 32, 32)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0])) for n, m in pe.named_children()]
    out = pe(x)
    for hk in hooks:
        hk.remove()
    assert torch.equal(seen[f"{names[0]}_conv"], x.flatten(0, 1))  # stage 0: the image itself, no LIF
    for i, name in enumerate(names[1:], start=1):
        assert is_binary(seen[f"{name}_conv"]), name  # every later conv sees spikes
    pool_names = [n for n, m in pe.named_children() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pool_names) == sum(pools) and all(is_binary(seen[n]) for n in pool_names)  # pools act on spikes
    assert out.shape == (2, 2, 32, 32 // 2 ** sum(pools), 32 // 2 ** sum(pools))
    assert not is_binary(out)  # real-valued BN output, no RPE residual
    torch.testing.assert_close(out, _tokenizer_reference(pe, x), rtol=0, atol=1e-5)


def test_tau_and_thresholds_per_kind():
    for name, tau in [("spikingformer_cifar10dvs_2_256", 1.5), ("spikingformer_gesture_2_256", 1.5),
                      ("spikingformer_cifar10_2_384", 2.0), ("spikingformer_imagenet_8_384", 2.0)]:
        model = timm.create_model(name)
        lifs = {n: m for n, m in model.named_modules() if isinstance(m, LIF)}
        assert len(lifs) == 4 + 7 * len(model.block)  # tokenizer 1–4; per block proj, q, k, v, attn, mlp1, mlp2
        assert all(m.tau == tau for m in lifs.values()), name
        attn_lifs = {f"block.{i}.attn.attn_lif" for i in range(len(model.block))}
        assert {n for n, m in lifs.items() if m.v_threshold == 0.5} == attn_lifs
        assert all(m.v_threshold == 1.0 for n, m in lifs.items() if not n.endswith("attn_lif"))
    dvs = timm.create_model("spikingformer_cifar10dvs_2_256")
    assert dvs.block[0].norm1.eps == 1e-6 and timm.create_model("spikingformer_tiny").block[0].norm1.eps == 1e-5


def test_no_head_lif_head_sees_real_values():
    model = lively(timm.create_model("spikingformer_tiny")).eval()
    x = torch.randn(2, 1, 32, 32)
    seen = []
    hook = model.head.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    logits = model(x)
    hook.remove()
    assert not is_binary(seen[0])
    feats = model.forward_features(x)  # [T, B, D, H', W'], real-valued stream
    assert feats.shape == (4, 2, 64, 8, 8) and not is_binary(feats)
    torch.testing.assert_close(logits, model.head(feats.flatten(3).mean(3).mean(0)), rtol=0, atol=0)


# --- whole model against a functional reference (logits, gradients, BN buffers) ---------------


def assert_grads_close(model, ref):
    """Gradients equal up to fp32 summation-order noise: 2e-5 of the tensor's largest entry plus
    1e-6 of the model's (biases in front of a train-mode BN have gradients that are ~0 in theory)."""
    pairs = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters()) if p.grad is not None]
    scale = max(g.abs().max() for _, g, _ in pairs)
    assert len(pairs) == sum(1 for q in ref.parameters() if q.grad is not None)
    for n, g, r in pairs:
        assert (g - r).abs().max() <= 2e-5 * r.abs().max() + 1e-6 * scale, n


def _bn_f(bn, z, training):
    if training:
        bn.num_batches_tracked += 1
    return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, 0.1, bn.eps)


def _reference_forward(m, x, training):
    """The official forward in functional ops on ``m``'s parameters and buffers."""
    tau = 1.5 if m.kind == "dvs" else 2.0
    lif = lambda z, th=1.0: sj_lif(z, th, tau)  # noqa: E731
    T = m.T if x.dim() == 4 else x.shape[0]
    if x.dim() == 4:
        x = x.unsqueeze(0).repeat(T, 1, 1, 1, 1)
    fold, unfold = (lambda z: z.flatten(0, 1)), (lambda z: z.reshape(T, -1, *z.shape[1:]))
    pe = m.patch_embed
    z = x
    for i, name in enumerate(pe.names):
        f = fold(lif(z)) if i else fold(z)
        if pe.pool_stages[i]:
            f = F.max_pool2d(f, 3, 2, 1)
        z = unfold(_bn_f(getattr(pe, f"{name}_bn"), F.conv2d(f, getattr(pe, f"{name}_conv").weight, padding=1), training))
    for blk in m.block:
        a = blk.attn
        Tn, B, C, H, W = z.shape
        s = fold(lif(z).flatten(3))
        qkv = [unfold(_bn_f(bn, F.conv1d(s, conv.weight), training)) for conv, bn in
               ((a.q_conv, a.q_bn), (a.k_conv, a.k_bn), (a.v_conv, a.v_bn))]
        q, k, v = (lif(t).reshape(Tn, B, a.num_heads, C // a.num_heads, H * W) for t in qkv)  # [T,B,h,d,N]
        o = torch.einsum("tbhcn,tbhcm,tbhjm->tbhjn", q, k, v) * 0.125
        o = lif(o.reshape(Tn, B, C, H * W), 0.5)
        z = z + unfold(_bn_f(a.proj_bn, F.conv1d(fold(o), a.proj_conv.weight, a.proj_conv.bias), training)).reshape(z.shape)
        p = blk.mlp
        y = unfold(_bn_f(p.mlp1_bn, F.conv2d(fold(lif(z)), p.mlp1_conv.weight, p.mlp1_conv.bias), training))
        z = z + unfold(_bn_f(p.mlp2_bn, F.conv2d(fold(lif(y)), p.mlp2_conv.weight, p.mlp2_conv.bias), training))
    return F.linear(z.flatten(3).mean(3).mean(0), m.head.weight, m.head.bias)


@pytest.mark.parametrize("kind", ["cifar", "imagenet", "dvs"])
def test_whole_model_matches_functional_reference(kind):
    model = lively(small(kind), gain=2.0, shift=0.5)
    ref = copy.deepcopy(model)
    x = torch.randn(3, *INPUT[kind]) if kind != "dvs" else (torch.rand(2, 3, *INPUT[kind]) < 0.3).float()
    y = torch.tensor([0, 3, 4])
    for training in (True, False, True):
        model.train(training), ref.train(training)
        model.zero_grad(), ref.zero_grad()
        logits, expected = model(x), _reference_forward(ref, x, training)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        F.cross_entropy(logits, y).backward()
        F.cross_entropy(expected, y).backward()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            if ".norm" in n:
                assert p.grad is None and q.grad is None, n  # unused LayerNorms get no gradient
        assert_grads_close(model, ref)
        for (n, b), c in zip(model.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=n)  # BN stats over T·B folded
    assert int(model.block[0].attn.q_bn.num_batches_tracked) == 2


def test_backends_agree():
    model = lively(small("dvs", backend="torch")).train()
    x = (torch.rand(2, 2, *INPUT["dvs"]) < 0.3).float()
    out = {}
    for backend in ("torch", SJ):
        set_backend(model, backend)
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        out[backend] = logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert torch.equal(out["torch"][0], out[SJ][0])
    scale = max(g.abs().max() for g in out[SJ][1])
    for g1, g2 in zip(out["torch"][1], out[SJ][1]):
        assert (g1 - g2).abs().max() <= 2e-5 * g2.abs().max() + 1e-6 * scale


# --- forward/backward, input handling, timm API -----------------------------------------------


@pytest.mark.parametrize("name,kwargs,shape", [
    ("spikingformer_tiny", {}, (2, 1, 32, 32)),
    ("spikingformer_cifar10_2_384", {"T": 1}, (1, 3, 32, 32)),
])
def test_forward_backward(name, kwargs, shape):
    model = timm.create_model(name, **kwargs).train()
    x = torch.randn(*shape)
    logits = model(x)
    assert logits.shape == (shape[0], 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(shape[0])).backward()
    used = [(n, p) for n, p in model.named_parameters() if ".norm" not in n]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in used)
    assert all(p.grad is None for n, p in model.named_parameters() if ".norm" in n)
    spikes = []
    hooks = [m.register_forward_hook(lambda m, i, o: spikes.append(o)) for m in model.modules() if isinstance(m, LIF)]
    model(x)
    for hk in hooks:
        hk.remove()
    assert len(spikes) == 4 + 7 * len(model.block) and all(is_binary(s) for s in spikes)
    model.eval()
    assert torch.equal(model(x), model(x))


def test_bad_input_sizes_per_layout():  # the common input checks are in test_contract.py
    with pytest.raises(ValueError, match="multiples of 16.*got 40x40"):
        small("imagenet")(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="multiples of 16.*got 120x120"):
        timm.create_model("spikingformer_gesture_2_256")(torch.randn(2, 1, 2, 120, 120))


def test_token_grids_and_sequence_input():
    dvs = timm.create_model("spikingformer_cifar10dvs_2_256", depth=1).eval()
    assert dvs.forward_features(torch.rand(2, 1, 2, 128, 128)).shape == (2, 1, 256, 8, 8)  # 64 tokens
    net = timm.create_model("spikingformer_imagenet_8_384", depth=1, T=1).eval()
    assert net.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 1, 384, 14, 14)  # 196 tokens
    tiny = timm.create_model("spikingformer_tiny", T=4, per_step_logits=True).eval()
    assert tiny(torch.randn(6, 2, 1, 32, 32)).shape == (6, 2, 10)  # a sequence's own T wins


def test_registry_cfgs_and_timm_api():
    names = set(timm.list_models("spikingformer*"))
    assert names == set(CONFIGS) | {"spikingformer_tiny"}
    classes = {"spikingformer_cifar100_4_384": 100, "spikingformer_gesture_2_256": 11, "spikingformer_imagenet_8_768": 1000}
    for name, k in classes.items():
        assert timm.get_pretrained_cfg(name).num_classes == k
    cfg = timm.get_pretrained_cfg("spikingformer_cifar100_4_384")
    assert cfg.mean == (0.4914, 0.4822, 0.4465) and cfg.input_size == (3, 32, 32)  # CIFAR-10 values
    assert cfg.paper_ids == "arXiv:2304.11954" and cfg.first_conv == "patch_embed.block0_conv"
    assert timm.get_pretrained_cfg("spikingformer_gesture_2_256").input_size == (2, 128, 128)
    tiny_cfg = timm.get_pretrained_cfg("spikingformer_tiny")
    assert tiny_cfg.input_size == (1, 32, 32) and tiny_cfg.mean == (0.5,) and tiny_cfg.num_classes == 10
    model = timm.create_model("spikingformer_cifar10_4_256", num_classes=100, T=2, drop_path_rate=0.1)
    assert isinstance(model, Spikingformer) and model.T == 2 and model.num_classes == 100
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5
    features = timm.create_model("spikingformer_tiny", num_classes=0)
    assert features(torch.randn(2, 1, 32, 32)).shape == (2, 64)
    assert model.group_matcher() == dict(stem=r"^patch_embed", blocks=r"^block\.(\d+)")
    with pytest.raises(ValueError, match="unknown Spikingformer kind"):
        Spikingformer(kind="svhn")
    with pytest.raises(ValueError, match="not divisible"):
        Spikingformer(kind="cifar", embed_dim=64, num_heads=5)


# --- training presets --------------------------------------------------


def test_experiment_presets_follow_the_spec():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="spikeformers.configs", version_base="1.3"):
            cfg = {name: compose(config_name="train", overrides=[f"experiment=spikingformer_{name}", "output_dir=."])
                   for name in ("cifar10", "cifar100", "imagenet_8_768", "imagenet_8_512", "cifar10dvs", "gesture")}
    finally:
        GlobalHydra.instance().clear()
    c10, c100 = cfg["cifar10"], cfg["cifar100"]
    assert c10.model.name == "spikingformer_cifar10_4_384" and c100.model.name == "spikingformer_cifar100_4_384"
    for c in (c10, c100):
        recipe = (c.optim.name, c.optim.lr, c.optim.weight_decay, c.data.batch_size, c.trainer.epochs)
        assert recipe == ("adamw", 5e-4, 6e-2, 64, 400)
        assert (c.data.mixup.mixup, c.data.mixup.cutmix, c.data.mixup.off_epoch, c.data.aug.re_prob) == (0.5, 0.0, 200, 0.25)
        assert c.data.aug.auto_augment == "rand-m9-n1-mstd0.4-inc1" and list(c.data.mean) == [0.4914, 0.4822, 0.4465]
    assert c100.data.name == "cifar100"
    for name, batch in (("imagenet_8_768", 192), ("imagenet_8_512", 288)):
        c = cfg[name]
        assert c.model.name == f"spikingformer_{name}" and c.data.batch_size == batch
        recipe = (c.optim.lr, c.optim.weight_decay, c.sched.warmup_lr, c.sched.min_lr, c.trainer.epochs)
        assert recipe == (5e-4, 5e-2, 1e-6, 1e-5, 300)
        assert (c.data.mixup.mixup, c.data.mixup.cutmix, c.data.aug.crop_pct) == (0.8, 1.0, 1.0)
    for name, epochs in (("cifar10dvs", 96), ("gesture", 192)):
        c = cfg[name]
        assert (c.model.T, c.data.frames, c.data.frame_size, c.trainer.epochs) == (16, 16, 128, epochs)
        assert (c.optim.lr, c.optim.weight_decay, c.optim.kwargs.eps, c.data.batch_size) == (1e-3, 0.06, 1e-8, 16)
        assert (c.data.mixup.prob, c.data.mixup.off_epoch) == (0.5, 75)
    assert all(c.sched.step_on_epochs and c.sched.cooldown_epochs == 10 for c in cfg.values())
