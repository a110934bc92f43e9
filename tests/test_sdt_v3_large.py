"""E-SpikeFormer large models: official keys/order/shapes/counts and strict loading for every key list,
the large neuron variant everywhere, the linear attention against a step-by-step reference, the KD
head (train: both logits; eval: their mean; ``head`` on the real-valued mean, ``head_kd`` on the raw
count), drop path over the whole batch, layer scales, the 83M model's ``rep_conv`` branch, and the
official layer-decay groups."""

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models.sdt_v3 import (
    LargeBlock,
    LinearAttention,
    SpikeCountNeuron,
    SpikeDrivenTransformerV3Large,
    checkpoint_filter_fn,
)

KEYS_V3 = Path(__file__).parents[2] / "shared" / "reference" / "keys_v3"
PARAMS = {  # counted on the official classes (spikformer12_512 / spikformer12_768, kd False / True)
    "sdtv3_imagenet_12_512": 82_502_952,
    "sdtv3_imagenet_12_512_kd": 83_015_952,
    "sdtv3_imagenet_12_768": 170_971_714,
    "sdtv3_imagenet_12_768_kd": 171_740_714,
}
ENTRIES = {"sdtv3_imagenet_12_512": 1238, "sdtv3_imagenet_12_512_kd": 1240,
           "sdtv3_imagenet_12_768": 1094, "sdtv3_imagenet_12_768_kd": 1096}
CHANNELS = {"512": (128, 256, 512), "768": (196, 384, 768)}


def read_key_list(config: str) -> list[tuple[str, tuple[int, ...]]]:
    path = KEYS_V3 / f"{config}.txt"
    if not path.exists():
        pytest.skip(f"reference key list {path.name} not found next to the checkout")
    entries = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.rsplit(" ", 1)
            entries.append((key, tuple(json.loads(shape))))
    return entries


def closed_form_params(c0: int, c1: int, c2: int, rep_conv: bool, kd: bool, classes: int = 1000, depth: int = 12) -> int:
    """Term by term: stem 7×7 = 147c + c + 2c (c = C0/2); LargeConvBlock(C) = two 3×3 convs with bias
    and BN (36C² + 4C + 8C + 36C² + C + 2C); downsampler (i→o) = 9io + o + 2o; LargeBlock(C) = layer
    scales 2C + 4 projections (1.5C² + 3C + 1.5C² + 2C + 2C) + MLP (4C² + 4C + 8C + 4C² + C + 2C),
    + rep_conv (C² + 2C twice); a head (C2 + 1)·K."""
    conv_block = lambda c: 72 * c * c + 15 * c  # noqa: E731
    down = lambda i, o: 9 * i * o + 3 * o  # noqa: E731
    block = 2 * c2 + 4 * (3 * c2 * c2 + 7 * c2) + 8 * c2 * c2 + 15 * c2 + (2 * c2 * c2 + 4 * c2 if rep_conv else 0)
    c = c0 // 2
    heads = (2 if kd else 1) * (c2 + 1) * classes
    return (150 * c + conv_block(c) + down(c, c0) + conv_block(c0) + down(c0, c1) + 2 * conv_block(c1)
            + down(c1, c2) + depth * block + heads)


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3 + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def small_large(**kwargs) -> SpikeDrivenTransformerV3Large:
    """The large architecture at CPU size (same code path as the registered configs)."""
    args = dict(embed_dim=(16, 32, 64), depth=2, num_classes=5, rep_conv=True, kd=True, drop_path_rate=0.0)
    return SpikeDrivenTransformerV3Large(**dict(args, **kwargs))


# --- official configurations ------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(PARAMS))
def test_official_keys_counts_and_strict_load(config):
    model = timm.create_model(config)
    state = model.state_dict()
    expected = read_key_list(config)
    summary = json.loads((KEYS_V3 / f"{config}.json").read_text())
    assert list(state) == [k for k, _ in expected], "keys (and their order) differ"
    for key, shape in expected:
        assert tuple(state[key].shape) == shape, key
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == summary["n_params"] == PARAMS[config]
    assert len(state) == summary["n_state_tensors"] == ENTRIES[config]
    buffers = sum(v.numel() for k, v in state.items() if k.rsplit(".", 1)[-1].startswith(("running", "num_batches")))
    assert buffers == summary["n_buffers_elems"]
    size = config.split("_")[3]
    assert n_params == closed_form_params(*CHANNELS[size], rep_conv=size == "512", kd=config.endswith("_kd"))
    # a state in the official layout, inside the official saver's dict with DDP prefixes
    official = {key: torch.randint(0, 5, shape) if key.endswith("num_batches_tracked") else torch.randn(shape)
                for key, shape in expected}
    saved = {"model": {f"module.{k}": v for k, v in official.items()}, "optimizer": {}, "epoch": 149, "scaler": {}, "args": None}
    model.load_state_dict(checkpoint_filter_fn(saved, model), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, official[key]), key


def test_defaults_follow_the_official_large_code():
    model = timm.create_model("sdtv3_imagenet_12_512")
    assert model.T == 1 and model.max_spike_count == 4 and not model.kd and not hasattr(model, "head_kd")
    assert model.num_features == 512 and model.unused_parameters is None
    neurons = [(n, m) for n, m in model.named_modules() if isinstance(m, SpikeCountNeuron)]
    assert {(m.rounding, m.grad_window) for _, m in neurons} == {("half_up", "open")}, "every neuron: the large variant"
    assert [n for n, m in neurons if not m.normalize] == ["lif"]  # only the head_kd neuron emits raw counts
    # drop path: linspace(0, 0.1, 12); block 0 has none
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.block3]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)], abs=1e-7)
    assert isinstance(model.block3[0].drop_path, nn.Identity)
    assert all(torch.equal(b.layer_scale1, torch.full((512,), 1e-6)) for b in model.block3)
    assert all(b.rep_conv is not None for b in model.block3)
    assert all(b.rep_conv is None for b in timm.create_model("sdtv3_imagenet_12_768", num_classes=3).block3)
    kd = timm.create_model("sdtv3_imagenet_12_512_kd", num_classes=7)
    assert kd.kd and kd.head.out_features == kd.head_kd.out_features == 7  # num_classes sets both heads
    # init: Linear xavier-uniform, zero bias (bound √(6 / (fan_in + fan_out)))
    bound = math.sqrt(6 / (512 + 7))
    assert kd.head.weight.abs().max() <= bound and kd.head.weight.abs().max() > 0.9 * bound and kd.head.bias.abs().max() == 0


def test_base_models_keep_the_base_neuron_variant():
    model = timm.create_model("sdtv3_imagenet_t")
    assert {(m.rounding, m.grad_window) for m in model.modules() if isinstance(m, SpikeCountNeuron)} == {("half_even", "closed")}


def test_layer_decay_groups_match_the_official_fine_tune():
    """Official: the conv stages and downsamplers are layer 0 (0.75^13), block3.i gets 0.75^(12 − i),
    the heads 1."""
    from timm.optim import create_optimizer_v2

    model = timm.create_model("sdtv3_imagenet_12_512_kd", num_classes=10)
    groups = create_optimizer_v2(model, "lamb", lr=1e-3, weight_decay=0.05, layer_decay=0.75).param_groups
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    expected = {"downsample1_1.encode_conv.weight": 13, "ConvBlock2_2.0.conv1.0.0.weight": 13,
                "downsample3.encode_bn.weight": 13, "block3.0.attn.q_conv.0.conv1.0.weight": 12,
                "block3.5.layer_scale1": 7, "block3.11.mlp.fc2_conv.bias": 1, "head.weight": 0, "head_kd.bias": 0}
    for name, power in expected.items():
        assert scale[id(model.get_parameter(name))] == pytest.approx(0.75 ** power, rel=1e-6), name


# --- attention and blocks -------------------------------------------------------------------------


def test_linear_attention_matches_step_by_step_reference():
    """S = SN(x); Q, K, V = SN(BN(RepConv1d(S))) (three BNs: conv1 → BN → conv2 → BN → BN);
    per head Y_h = Q_h (K_hᵀ V_h) · 0.125 with channels c = h·d + j; out = BN(RepConv1d(SN(Y)))."""
    torch.manual_seed(0)
    T, B, C, N, heads, D = 2, 2, 32, 64, 4, 4
    d = C // heads
    neuron = lambda: SpikeCountNeuron(D, rounding="half_up", grad_window="open")  # noqa: E731
    attn = randomize_bn(LinearAttention(C, heads, neuron)).train().double()
    x = torch.randn(T, B, C, N, dtype=torch.float64) * 2 + 1
    out = attn(x)

    def sn(v):  # the large neuron, hidden: floor(clamp(v, 0, D) + 0.5) / D
        return torch.floor(v.clamp(0, D) + 0.5) / D

    def bn(layer, y):
        return F.batch_norm(y, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)

    def project(p, s):  # [TB, C, N]
        rep, outer = p[0], p[1]
        y = bn(rep.conv1[1], torch.einsum("oc,bcn->bon", rep.conv1[0].weight[:, :, 0], s))
        y = bn(rep.conv2[1], torch.einsum("oc,bcn->bon", rep.conv2[0].weight[:, :, 0], y))
        return bn(outer, y)

    s = sn(x.reshape(T * B, C, N))
    q, k, v = (sn(project(getattr(attn, f"{p}_conv"), s)) for p in "qkv")
    y = torch.zeros(T * B, C, N, dtype=torch.float64)
    for h in range(heads):
        qh, kh, vh = (t[:, h * d:(h + 1) * d] for t in (q, k, v))  # [TB, d, N]
        kv = torch.einsum("bin,bjn->bij", kh, vh)  # Kᵀ V: d × d
        y[:, h * d:(h + 1) * d] = torch.einsum("bin,bij->bjn", qh, kv) * 0.125
    assert sn(y).abs().sum() > 0, "attention silent: the comparison would be vacuous"
    expected = project(attn.proj_conv, sn(y)).reshape(T, B, C, N)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_block_residuals_layer_scale_and_rep_conv():
    """x ← x + RepConv1d(SN(x)); x ← x + Attn(x)·γ₁; x ← x + MLP(x)·γ₂ (γ per channel), eval mode."""
    torch.manual_seed(0)
    block = randomize_bn(LargeBlock(16, 4, lambda: SpikeCountNeuron(4, rounding="half_up", grad_window="open"),
                                    rep_conv=True, layer_scale_init=1e-6)).eval().double()
    with torch.no_grad():
        block.layer_scale1.copy_(torch.linspace(0.5, 2.0, 16))
        block.layer_scale2.copy_(torch.linspace(-1.0, 1.0, 16))
    x = torch.randn(1, 2, 16, 3, 4, dtype=torch.float64) * 2
    t = x.flatten(3)
    r = block.rep_conv(block.lif(t).flatten(0, 1)).reshape(t.shape)
    y1 = t + r
    y2 = y1 + block.attn(y1) * block.layer_scale1[:, None]
    y3 = y2 + block.mlp(y2) * block.layer_scale2[:, None]
    torch.testing.assert_close(block(x), y3.reshape(x.shape), rtol=0, atol=0)
    assert r.abs().sum() > 0 and (y2 - y1).abs().sum() > 0, "branches silent: vacuous"


def test_drop_path_drops_the_branch_of_the_whole_batch_per_time_step():
    torch.manual_seed(0)
    neuron = lambda: SpikeCountNeuron(4, rounding="half_up", grad_window="open")  # noqa: E731
    block = randomize_bn(LargeBlock(16, 4, neuron, drop_path=1.0, layer_scale_init=1.0)).train()
    x = torch.randn(2, 3, 16, 4, 4) * 2
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)  # rate 1: both branches dropped in training
    assert not torch.equal(block.eval()(x), x)  # never in eval mode
    block = LargeBlock(16, 4, neuron, drop_path=0.5).train()
    ones = torch.ones(3, 4, 16, 9)  # [T, B, C, N]
    seen = set()
    for _ in range(20):
        kept = block.drop_path(ones)
        for t in range(3):  # each step: all of the batch kept (×2) or all dropped
            values = kept[t].unique().tolist()
            assert values in ([0.0], [2.0]), values
            seen.add(values[0])
    assert seen == {0.0, 2.0}


# --- the KD head ----------------------------------------------------------------------------------


def test_kd_head_by_hand():
    """``head`` reads the real-valued token mean x̄, ``head_kd`` the half-up count of x̄ (not / D):
    pooled values (0.5, 2.5, 3.7, −1, 6) give counts (1, 3, 4, 0, 4). Train: the pair; eval: the mean."""
    model = small_large(embed_dim=(4, 4, 5), num_heads=1, num_classes=5)
    with torch.no_grad():
        for head in (model.head, model.head_kd):
            head.weight.copy_(torch.eye(5))
            head.bias.zero_()
        model.head_kd.bias.fill_(0.25)
    pooled = torch.tensor([0.5, 2.5, 3.7, -1.0, 6.0])
    stream = pooled.reshape(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2)  # [T, B, C, H, W]: every position = x̄
    counts = torch.tensor([1.0, 3.0, 4.0, 0.0, 4.0])
    logits, logits_kd = model.train().forward_head(stream)
    assert torch.equal(logits, pooled[None]) and torch.equal(logits_kd, counts[None] + 0.25)
    torch.testing.assert_close(model.eval().forward_head(stream), ((pooled + counts + 0.25) / 2)[None], rtol=0, atol=0)
    assert torch.equal(model.forward_head(stream, pre_logits=True), pooled[None])
    model.per_step_logits = True
    assert model.forward_head(stream.expand(3, 1, 5, 2, 2)).shape == (3, 1, 5)


def test_kd_model_train_tuple_eval_mean_and_no_kd_single_output():
    torch.manual_seed(0)
    model = randomize_bn(small_large())
    x = torch.randn(2, 3, 64, 64)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2 and all(o.shape == (2, 5) for o in out)
    (F.cross_entropy(out[0], torch.tensor([0, 1])) + F.cross_entropy(out[1], torch.tensor([2, 3]))).backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.head_kd.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        stream = model.forward_features(x)
        pooled = stream.flatten(3).mean(3)
        expected = (model.head(pooled).mean(0) + model.head_kd(model.lif(pooled)).mean(0)) / 2
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    plain = small_large(kd=False).train()
    assert isinstance(plain(x), torch.Tensor) and not hasattr(plain, "head_kd")
    model.reset_classifier(3)
    assert model.head.out_features == model.head_kd.out_features == 3


def test_checkpoint_without_head_kd_keeps_the_models_own():
    """The distillation stage starts from the fine-tuned checkpoint, which has no ``head_kd``."""
    model = small_large()
    state = {k: v.clone() + 1 if v.is_floating_point() else v
             for k, v in model.state_dict().items() if not k.startswith("head_kd.")}
    own = model.head_kd.weight.detach().clone()
    model.load_state_dict(checkpoint_filter_fn({"model": state}, model), strict=True)
    assert torch.equal(model.head_kd.weight, own) and torch.equal(model.head.weight, state["head.weight"])


# --- the registered 83M model runs (the upstream shape fix) ---------------------------------------


def test_83m_forward_backward_at_128_with_firing_attention():
    """The committed official 83M classifier raises NameError in its rep_conv branch; ours reshapes
    back to the block input's [T, B, C, N]. At 128² (8×8 tokens), with O(1) layer scales (the 1e-6
    init makes every transformer gradient ~1e-6 of the rest), every parameter gets a finite gradient."""
    torch.manual_seed(0)
    # the registered config with 3 of its 12 blocks (every block is built alike), for CPU time
    model = randomize_bn(timm.create_model("sdtv3_imagenet_12_512_kd", num_classes=10, drop_path_rate=0.0, depth=3)).train()
    with torch.no_grad():
        for b in model.block3:
            b.layer_scale1.fill_(1.0)
            b.layer_scale2.fill_(1.0)
    fired = {}
    hook = model.block3[0].attn.attn_lif.register_forward_hook(lambda m, i, o: fired.update(y=o.detach()))
    logits, logits_kd = model(torch.randn(2, 3, 128, 128))
    hook.remove()
    assert fired["y"].abs().sum() > 0, "attention silent"
    (F.cross_entropy(logits, torch.tensor([1, 2])) + F.cross_entropy(logits_kd, torch.tensor([3, 4]))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("block3.0.rep_conv.conv1.0.weight", "block3.0.attn.q_conv.0.conv1.0.weight", "block3.2.mlp.fc2_conv.weight",
                 "block3.1.layer_scale1", "downsample1_1.encode_conv.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


# --- released checkpoints: the 83M file's rep_conv (official issue #9) ----------------------------


def _state_with_rep_conv(model: nn.Module, conv1: int, bn1: int, conv2: int, run: bool = True) -> dict:
    """``model``'s state with every ``rep_conv`` given hidden widths (conv1.0 out, conv1.1 BN, conv2.0 in)."""
    state = dict(model.state_dict())
    for i, block in enumerate(model.block3):
        c, p = block.rep_conv.conv1[0].in_channels, f"block3.{i}.rep_conv."
        state[f"{p}conv1.0.weight"] = torch.randn(conv1, c, 1)
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"{p}conv1.1.{name}"] = torch.rand(bn1) + 0.5
        state[f"{p}conv1.1.num_batches_tracked"] = torch.tensor(100 if run else 0)
        state[f"{p}conv2.0.weight"] = torch.randn(c, conv2, 1)
    return state


def test_wider_rep_conv_of_an_earlier_release_loads_strictly():
    """A consistently 1.5·C-wide rep_conv (the RepConv2 of the code before its 2025-03 fix) loads:
    the filter rebuilds the model's rep_conv at that width, and the model runs."""
    model = small_large()  # C2 = 64 -> 96
    state = _state_with_rep_conv(model, 96, 96, 96)
    model.load_state_dict(checkpoint_filter_fn({"model": state}, model), strict=True)
    assert model.block3[1].rep_conv.conv1[0].weight.shape == (96, 64, 1)
    assert torch.equal(model.block3[1].rep_conv.conv2[0].weight, state["block3.1.rep_conv.conv2.0.weight"])
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_released_83m_rep_conv_mismatch_is_one_line_naming_the_layers(tmp_path, monkeypatch, capsys):
    """The released 83M file reportedly has 768-wide rep_conv BNs after a 512-wide conv: no code can
    run that; the converter says which layers in one line (no key wall)."""
    from spikeformers.models.errors import UserError
    from spikeformers.train.hub_cli import main as hub_main

    model = small_large()
    state = _state_with_rep_conv(model, 64, 96, 64, run=False)
    with pytest.raises(UserError, match=r"rep_conv layers do not fit together in 2 of 2 blocks: "
                                        r"block3\.0\.rep_conv\.conv1\.1\.\{weight,bias,running_mean,running_var\} \[96\] "
                                        r"after block3\.0\.rep_conv\.conv1\.0\.weight \[64, 64, 1\]") as err:
        checkpoint_filter_fn({"model": state}, model)
    assert "never updated" in err.value.hint and "\n" not in str(err.value)
    # the same through `spikeformers-hub convert` on a registered model, in the official saver format
    monkeypatch.setenv("SPIKEFORMERS_CACHE", str(tmp_path / "cache"))
    big = timm.create_model("sdtv3_imagenet_12_512_kd", depth=1)
    official = _state_with_rep_conv(big, 512, 768, 512, run=False)
    torch.save({"model": {k: v for k, v in official.items() if not k.startswith("block3.1")}, "epoch": 99},
               tmp_path / "83M-1x4.pth")
    with pytest.raises(SystemExit) as exit_info:
        hub_main(["convert", str(tmp_path / "83M-1x4.pth"), "--model", "sdtv3_imagenet_12_512_kd", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("spikeformers-hub: error: the checkpoint's rep_conv layers do not fit together in 1 of 12 blocks: "
                               "block3.0.rep_conv.conv1.1.{weight,bias,running_mean,running_var} [768] after "
                               "block3.0.rep_conv.conv1.0.weight [512, 512, 1]"), lines
    assert len(lines) == 2 and lines[1].startswith("hint: ")


# --- experiment presets: the official recipes' numbers -------------------------------------------


def _compose(preset: str, *overrides: str) -> dict:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="spikeformers.configs", version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"experiment={preset}", *overrides])
    finally:
        GlobalHydra.instance().clear()
    cfg.output_dir = "."
    return OmegaConf.to_container(cfg, resolve=True)


def test_presets_follow_the_official_recipes():
    import inspect

    accepted = set(inspect.signature(SpikeDrivenTransformerV3Large).parameters)
    base = _compose("sdtv3_imagenet_m")
    assert base["model"]["args"] is None and base["model"]["name"] == "sdtv3_imagenet_m"
    assert (base["optim"]["lr"], base["data"]["batch_size"], base["trainer"]["epochs"]) == (4.8e-3, 2048, 200)  # 6e-4·2048/256
    assert base["sched"]["warmup_epochs"] == 5 and base["sched"]["min_lr"] == 1e-6 and base["optim"]["layer_decay"] is None
    assert base["data"]["aug"]["crop_pct"] == pytest.approx(224 / 232) and base["model"]["T"] == 1
    assert _compose("sdtv3_imagenet_s")["model"]["name"] == "sdtv3_imagenet_s"
    ft = _compose("sdtv3_imagenet_12_512_finetune")
    assert (ft["optim"]["lr"], ft["data"]["batch_size"], ft["trainer"]["epochs"]) == (2.4e-3, 1024, 150)
    assert ft["optim"]["layer_decay"] == 0.75
    assert (ft["data"]["mixup"]["mixup"], ft["data"]["mixup"]["cutmix"], ft["trainer"]["ema"]["enable"]) == (0.8, 1.0, False)
    assert set(ft["model"]["args"]) <= accepted and ft["model"]["args"]["drop_path_rate"] == 0.1
    kd = _compose("sdtv3_imagenet_12_768_kd", "finetune_from=runs/ft/checkpoints/last.pt")
    assert kd["model"]["name"] == "sdtv3_imagenet_12_768_kd" and kd["model"]["checkpoint"] == "runs/ft/checkpoints/last.pt"
    assert (kd["optim"]["lr"], kd["data"]["batch_size"], kd["trainer"]["epochs"]) == (6.125e-3, 1568, 100)  # 1e-3·1568/256
    assert kd["trainer"]["distill"]["teacher"] == "caformer_b36.sail_in22k_ft_in1k" and kd["trainer"]["distill"]["alpha"] == 0.5
    assert (kd["data"]["mixup"]["mixup"], kd["sched"]["warmup_epochs"]) == (0.5, 5)
    digits = _compose("sdtv3_digits")["model"]
    assert (digits["name"], digits["T"]) == ("sdtv3_tiny", 1)


def test_distillation_stage_starts_from_a_fine_tune_checkpoint(tmp_path):
    """What experiment=sdtv3_imagenet_12_*_kd does with finetune_from: a checkpoint of the KD-less
    model initialises the KD model through the factory (head_kd freshly initialised)."""
    from omegaconf import OmegaConf

    from spikeformers.models.factory import build_model
    from spikeformers.train.data import DataInfo

    args = {"embed_dim": [16, 32, 64], "depth": 1}
    data = DataInfo("imagenet", 10, 3, 64)
    fine_tuned = timm.create_model("sdtv3_imagenet_12_512", num_classes=10, **args)
    torch.save({"model": fine_tuned.state_dict(), "model_name": "sdtv3_imagenet_12_512", "config": {}}, tmp_path / "last.pt")
    cfg = OmegaConf.create({"name": "sdtv3_imagenet_12_512_kd", "T": 1, "backend": "auto", "pretrained": False,
                            "checkpoint": str(tmp_path / "last.pt"), "args": args})
    model = build_model(cfg, data)
    assert model.kd and torch.equal(model.head.weight, fine_tuned.head.weight)
    assert torch.equal(model.block3[0].rep_conv.conv1[0].weight, fine_tuned.block3[0].rep_conv.conv1[0].weight)
    assert model.head_kd.weight.shape == (10, 64)


def test_wider_rep_conv_file_loads_through_timm_pretrained(tmp_path):
    """A converted file with the wider rep_conv loads with ``pretrained=True`` and a file overlay: the
    filter widens the freshly built model before timm's strict load."""
    from safetensors.torch import save_file

    args = dict(embed_dim=(16, 32, 64), depth=2, num_classes=5)
    source = timm.create_model("sdtv3_imagenet_12_512", **args).set_rep_conv_hidden(96)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = timm.create_model("sdtv3_imagenet_12_512", pretrained=True, **args,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors"), num_classes=5))
    assert model.block3[1].rep_conv.conv1[0].weight.shape == (96, 64, 1)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
