"""Energy / SOP / firing-rate analysis and the trainer's rate monitor."""

import json

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

import spikeformers  # noqa: F401
from spikeformers.models.neurons import LIF
from spikeformers.train.data import DataInfo, Digits
from spikeformers.train.energy import EnergyConfig, analyze, attention_energy_ratio, layer_flops, main
from spikeformers.train.evaluate import evaluate


def test_layer_flops_are_the_analytic_counts():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 10, 10)
    assert layer_flops(conv, x, conv(x)) == 2 * (5 * 5) * 3 * 9 * 8  # k²·H_out·W_out·C_in·C_out per image
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
    y = torch.randn(1, 8, 6, 6)
    assert layer_flops(grouped, y, grouped(y)) == 36 * 2 * 9 * 8
    conv1d = nn.Conv1d(16, 32, 1)
    z = torch.randn(3, 16, 49)
    assert layer_flops(conv1d, z, conv1d(z)) == 3 * 49 * 16 * 32
    linear = nn.Linear(16, 4)
    tokens = torch.randn(2, 7, 16)
    assert layer_flops(linear, tokens, linear(tokens)) == 2 * 7 * 16 * 4


def test_flops_agree_with_spikingjelly_op_counter():
    from spikingjelly.activation_based.op_counter import DispatchCounterMode, FlopCounter

    conv, linear = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(16, 4)
    x, t = torch.randn(2, 3, 10, 10), torch.randn(5, 16)
    counter = FlopCounter()
    with DispatchCounterMode([counter], strict=False):
        out_c, out_l = conv(x), linear(t)
    counts = counter.get_counts()
    # SpikingJelly counts 2 FLOPs per MAC plus one per bias add; ours are MACs.
    sj_conv = sum(counts["Conv2d"].values())
    sj_linear = sum(counts["Linear"].values())
    assert (sj_conv - out_c.numel()) // 2 == layer_flops(conv, x, out_c)
    assert (sj_linear - out_l.numel()) // 2 == layer_flops(linear, t, out_l)


class Toy(nn.Module):
    """conv (real input, the first layer) -> LIF -> 1×1 conv, T folded into the batch."""

    def __init__(self, T=3):
        super().__init__()
        self.T = T
        self.conv1, self.lif, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), LIF(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = x.unsqueeze(0).expand(self.T, *x.shape)
        s = self.lif(self.conv1(x.flatten(0, 1)).unflatten(0, (self.T, -1)))
        self.spikes = s
        return self.conv2(s.flatten(0, 1)).mean()


def test_sops_and_energy_follow_the_formula():
    torch.manual_seed(0)
    model = Toy(T=3)
    x = torch.randn(2, 1, 6, 6) * 3
    report = analyze(model, [x], EnergyConfig(), model_name="toy")
    first, second = report.layers
    assert (first.unit, first.input_type, first.flops) == ("MAC", "real", 6 * 6 * 1 * 9 * 4)
    assert first.energy_mJ == pytest.approx(4.6 * first.flops * 1e-9)
    rates = (model.spikes != 0).float().mean(dim=(1, 2, 3, 4))  # per time step
    assert second.input_type == "binary" and second.steps == 3
    assert second.rate_per_step == pytest.approx(rates.tolist(), abs=1e-6)
    assert second.sops == pytest.approx(rates.mean().item() * 3 * (6 * 6 * 4 * 2), rel=1e-5)
    assert second.energy_mJ == pytest.approx(0.9 * second.sops * 1e-9)
    assert report.total_energy_mJ == pytest.approx(first.energy_mJ + second.energy_mJ)
    assert report.ann_energy_mJ == pytest.approx(4.6 * (first.flops + second.flops) * 1e-9)
    doubled = analyze(model, [x], EnergyConfig(first_layer_times_T=True)).layers[0]
    assert doubled.energy_mJ == pytest.approx(3 * first.energy_mJ)


def test_sdsa_record_matches_the_closed_form():
    model = timm.create_model("sdt_tiny.digits", pretrained=True)
    x = Digits(False).images[:32]
    report = analyze(model, [x])
    sdsa = [r for r in report.layers if r.op == "sdsa"]
    assert len(sdsa) == 2
    for r in sdsa:
        N, D = r.input_shape
        assert (N, D) == (64, 64) and r.flops == N * D
        assert r.energy_mJ == pytest.approx(0.9 * 4 * r.input_rate * N * D * 1e-9)  # E_AC·T·R̃·N·D
        vanilla = 4.6 * 2 * N * N * D * 1e-9  # E_MAC·2N²D
        assert vanilla / r.energy_mJ == pytest.approx(attention_energy_ratio(N, D, 4, r.input_rate))
    assert attention_energy_ratio(196, 512, 4, 0.1) == pytest.approx(2 * 196 * 4.6 / (4 * 0.1 * 0.9))
    assert 0 < report.total_energy_mJ < report.ann_energy_mJ


def test_spikformer_attention_products_and_integer_inputs():
    model = timm.create_model("spikformer_tiny.digits", pretrained=True)
    x = Digits(False).images[:32]
    nonzero = analyze(model, [x])
    ops = {r.op for r in nonzero.layers}
    assert {"ssa_qk", "ssa_av"} <= ops
    qk = next(r for r in nonzero.layers if r.op == "ssa_qk")
    assert qk.flops == 64 * 64 * 64  # N²·D
    q_linear = next(r for r in nonzero.layers if r.name == "block.0.attn.q_linear")
    assert q_linear.input_type == "integer"  # spike sums of the SPS/residual stream
    counted = analyze(model, [x], EnergyConfig(integer_inputs="sum"))
    q_sum = next(r for r in counted.layers if r.name == "block.0.attn.q_linear")
    assert q_sum.input_rate > q_linear.input_rate  # entries of value 2 count two additions
    head = next(r for r in nonzero.layers if r.name == "head")
    assert head.input_type == "real" and head.steps == 1 and head.unit == "AC"
    as_mac = next(r for r in analyze(model, [x], EnergyConfig(real_inputs="mac")).layers if r.name == "head")
    assert as_mac.unit == "MAC"


def test_cli_takes_the_registered_models_own_T(tmp_path, capsys):
    # sdtv3_tiny is built for T = 1 (D = 4 levels per step); the training config's T = 4 must not
    # leak into its analysis, and --T still wins
    for extra, T in (([], 1), (["--T", "2"], 2)):
        out = tmp_path / f"e{T}.json"
        assert main(["sdtv3_tiny.digits", "--n", "4", "--no-v2", "--json", str(out), *extra]) == 0
        assert json.loads(out.read_text())["T"] == T


def test_cli_json_csv_plots(tmp_path, capsys):
    assert main(["sdt_tiny.digits", "--n", "40", "--batch-size", "20", "--json", str(tmp_path / "e.json"),
                 "--csv", str(tmp_path / "e.csv"), "--plots", str(tmp_path / "plots")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert {"model", "T", "n_samples", "total_energy_mJ", "ann_energy_mJ", "layers"} <= set(report)
    assert report["n_samples"] == 40 and report["T"] == 4 and report["model"] == "sdt_tiny.digits"
    assert all({"name", "op", "flops", "input_rate", "sops", "energy_mJ"} <= set(layer) for layer in report["layers"])
    assert report["total_energy_mJ"] == pytest.approx(sum(layer["energy_mJ"] for layer in report["layers"]))
    assert (tmp_path / "e.csv").read_text().startswith("name,op,input_shape,flops")
    for png in ("firing_rates.png", "energy.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert "total" in capsys.readouterr().out


def test_firing_rate_monitor_and_dead_layer_detection():
    info = DataInfo("digits", 10, 1, 32)
    loader = DataLoader(Digits(False), batch_size=180)
    trained = evaluate(timm.create_model("sdt_tiny.digits", pretrained=True), loader, info, torch.device("cpu"))
    assert set(trained["block_rates"]) == {"patch_embed", "block.0", "block.1", "head_lif"}
    assert all(0 < r < 1 for r in trained["block_rates"].values())
    untrained = evaluate(timm.create_model("sdt_tiny"), loader, info, torch.device("cpu"))  # BN stats 0/1: silent
    assert untrained["dead_layers"], "an untrained model in eval mode barely spikes"


# --- the later families: input type per layer -------------------------------


def _types(name: str, **kwargs) -> tuple[dict, dict]:
    model = timm.create_model(name, **kwargs).train()  # train mode: batch statistics, as the spec's check
    report = analyze(model, [torch.rand(2, model.in_chans, 32, 32) * 4])
    return {r.name: r.input_type for r in report.layers}, {r.name: r for r in report.layers}


def test_spikingformer_inputs_binary_except_first_conv_and_head():
    kinds, records = _types("spikingformer_tiny")
    assert kinds.pop("patch_embed.block0_conv") == "real" and kinds.pop("head") == "real"
    assert set(kinds.values()) == {"binary"}
    assert {"block.0.attn.q_k", "block.0.attn.attn_v"} <= set(records)  # CIFAR kind: (Q Kᵀ) V


def test_qkformer_stream_fed_convs_get_integers():
    """Every conv fed by the spike-sum stream sees non-negative integers, the rest spikes."""
    model = timm.create_model("qkformer_tiny")
    for m in model.modules():  # BN bias 1: enough firing that main and shortcut spikes coincide
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.bias.data.fill_(1.0)
    report = analyze(model, [torch.rand(2, 1, 32, 32) * 4])
    kinds, records = {r.name: r.input_type for r in report.layers}, {r.name: r for r in report.layers}
    assert kinds.pop("patch_embed1.proj_conv") == "real" and kinds.pop("head") == "real"
    stream_fed = {k for k in kinds if k.endswith(("q_conv", "k_conv", "v_conv", "mlp1_conv"))
                  or (k.startswith(("patch_embed2", "patch_embed3")) and k.endswith(("proj3_conv", "proj_res_conv")))}
    assert {k for k, v in kinds.items() if v == "integer"} == stream_fed
    assert {v for k, v in kinds.items() if k not in stream_fed} == {"binary"}
    q_sum = next(r for k, r in records.items() if k.endswith(".q_sum"))
    assert q_sum.op == "qk_sum" and q_sum.flops == q_sum.input_shape[0] * q_sum.input_shape[1]  # O(N·D)
    assert any(k.endswith(".mask_k") for k in records) and any(k.endswith(".q_kv") for k in records)


def test_sdtv2_counts_repconv_and_sepconv_as_merged_convs_on_spikes():
    kinds, records = _types("sdtv2_tiny", depths=(1, 1))  # the digits variant has no attention blocks
    real = {k for k, v in kinds.items() if v == "real"}
    assert real == {"downsample1_1.encode_conv"}, real  # merged view: every other conv sees spikes
    assert not any(".body." in k or k.endswith("pwconv2") for k in records)
    rep = next(r for k, r in records.items() if k.endswith("q_conv.0 (merged)"))
    C = rep.input_shape[0]
    assert rep.flops == rep.input_shape[1] * rep.input_shape[2] * 9 * C * C  # one 3×3 conv C → C
