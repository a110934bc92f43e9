"""Energy v2 rows outside the synapses: residual adds, pooling, unfolded BatchNorm, and the merged
conv an SDT v2 RepConv chain is priced as on the ANN side.

Every expected number is worked out by hand below from the memory-aware model's formulas and the
test profile's unit costs (e_add 0.1 and e_mul 3.1 at every width, 0.05 pJ per bit at any memory
size, b_w 8, b_v 16, b_e 32; the int8 ANN: MAC 3.2, accumulator add 0.1, b_a 8); then a property
test over every registered tiny model checks that the rows appear where the architecture has them."""

from dataclasses import replace

import pytest
import timm
import torch
from torch import nn

import spikeformers  # noqa: F401
from spikeformers.models.layers import seq
from spikeformers.train import energy_ma as ma
from spikeformers.train.energy_hw import hardware_report
from spikeformers.train.neurobench import (ConnectionCounts, NormCounts, PoolCounts, ResidualCounts, collect,
                                           neurobench_metrics)

FLAT = ma.Profile("flat-test", e_ac=0.1, e_mac_real=3.2, e_mul_v=3.1, e_leak=3.2, e_reset=0.1, e_bias_add=0.1,
                  memory="flat", mem_flat_pj_per_bit=0.05, first_layer="executed", ann=(("int8", ma.AnnCost(8, 8, 3.2, 0.1)),))


pytestmark = pytest.mark.usefixtures("eager_lif")  # conftest.py: eager LIF loops for tiny inputs


def _spikes() -> torch.Tensor:
    """[T = 2, B = 1, N = 3, C = 4] with 3 spikes at step 0 and 2 at step 1 (Z = 5)."""
    x = torch.zeros(2, 1, 3, 4)
    x[0, 0, 0, 0] = x[0, 0, 0, 3] = x[0, 0, 2, 1] = 1
    x[1, 0, 1, 0] = x[1, 0, 1, 1] = 1
    return x


def _rows(block: dict) -> dict:
    return {r["name"]: r for r in block["rows"]}


# --- residual adds ------------------------------------------------------------------------------


class ResidualToy(nn.Module):
    """out = x + flip(x) (spike + spike) or x + fc(x) (real + real), then fc and the mean over time
    (the readout: not a pool). It holds a Linear, so its forward is a block's."""

    def __init__(self, real: bool):
        super().__init__()
        self.real, self.fc = real, nn.Linear(4, 4, bias=False)
        nn.init.constant_(self.fc.weight, 0.5)

    def forward(self, x):  # [T, B, N, C]
        y = self.fc(x) if self.real else x.flip(-1)
        return self.fc(x + y).mean(0)


def test_spike_plus_spike_residual():
    counts = collect(ResidualToy(real=False), [_spikes()], time_first=True)
    (row,) = [r for r in counts.rows if isinstance(r, ResidualCounts)]
    assert (row.name, row.input_type, row.n, row.steps, row.z_a, row.z_b) == ("add0", "spikes", 12, 2, 5, 5)
    assert not any(isinstance(r, PoolCounts) for r in counts.rows)  # the mean over time is the readout
    block = ma.price(counts, FLAT)
    add = _rows(block)["add0"]
    # adds (nnz(a) + nnz(b)) · e_add = 10 · 0.1 = 1.0; event reads 10 · 32 bit · 0.05 = 16.0;
    # the sum written once per element and step: T·n·b_v·m = 2 · 12 · 16 · 0.05 = 19.2 → 36.2
    assert add["role"] == "residual" and add["counts"]["adds"] == 10
    assert (add["E_pJ"]["compute"], add["E_pJ"]["io"], add["E_pJ"]["membrane"]) == pytest.approx((1.0, 16.0, 19.2))
    assert add["E_pJ"]["total"] == pytest.approx(36.2)
    assert add["rate"] == pytest.approx(10 / 48)  # (Z_a + Z_b) / (2·T·n)
    # the ANN adds n = 12 activations once: 12 · 0.1 + 3 reads/writes · 12 · 8 bit · 0.05 = 1.2 + 14.4
    assert add["ann_pJ"]["int8_naive"] == pytest.approx(15.6)
    # break-even: the write is rate-independent (A), the adds and reads scale with the rate
    assert add["rate_scaling_pJ"] == pytest.approx({"const": 19.2, "lin": 17.0, "quad": 0.0})
    assert block["curve"]["A"] == pytest.approx(19.2)  # the only rate-independent term of this net
    # E_SNN at rate 1 (L): the residual's 2·T·n = 48 events at 0.1 + 32 · 0.05 = 1.7 each = 81.6,
    # plus fc with every input a spike: 96 synaptic events (T·N·C_in·C_out = 2·3·4·4) at
    # 0.1 (add) + 0.4 (weight) + 1.6 (membrane read and write) + 0.1 (address) = 2.2 → 211.2, and
    # 24 input events · 1.6 = 38.4: L = 81.6 + 211.2 + 38.4 = 331.2
    assert block["curve"]["L"] == pytest.approx(331.2)


def test_real_plus_real_residual():
    x = torch.full((2, 1, 3, 4), 0.5)
    counts = collect(ResidualToy(real=True), [x], time_first=True)
    add = _rows(ma.price(counts, FLAT))["add0"]
    # T·n adds: 24 · 0.1 = 2.4; two reads and a write of b_v words: 3 · 24 · 16 · 0.05 = 57.6 → 60.0
    assert add["input_type"] == "real" and add["counts"]["adds"] == 24
    assert (add["E_pJ"]["compute"], add["E_pJ"]["membrane"], add["E_pJ"]["total"]) == pytest.approx((2.4, 57.6, 60.0))
    assert add["rate_scaling_pJ"]["lin"] == 0.0 and add["ann_pJ"]["int8_naive"] == pytest.approx(15.6)


# --- pooling and the head's mean ------------------------------------------------------------------


class MeanHead(nn.Module):
    """The heads' global average: mean over tokens, a Linear, then the mean over time."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):  # [T, B, N, C]
        return self.head(x.mean(2)).mean(0)


def test_global_average_over_tokens_on_spikes_and_reals():
    block = ma.price(collect(MeanHead(), [_spikes()], time_first=True), FLAT)
    mean = _rows(block)["mean0"]
    # n_in 12 → n_out 4 per step (window 3). Spikes: Z = 5 adds · 0.1 = 0.5; event reads
    # 5 · 32 · 0.05 = 8.0; the averages written T·n_out·b_v·m = 2 · 4 · 16 · 0.05 = 6.4 → 14.9
    assert (mean["role"], mean["input_type"], mean["counts"]["window"]) == ("pool", "spikes", 3)
    assert (mean["E_pJ"]["compute"], mean["E_pJ"]["io"], mean["E_pJ"]["membrane"]) == pytest.approx((0.5, 8.0, 6.4))
    assert mean["E_pJ"]["total"] == pytest.approx(14.9)
    # ANN (one pass on reals): n_out·(k−1) adds 4 · 2 · 0.1 = 0.8, reads 12 · 8 · 0.05 = 4.8, writes 4 · 8 · 0.05 = 1.6
    assert mean["ann_pJ"]["int8_naive"] == pytest.approx(7.2)
    reals = torch.linspace(0.1, 2.4, 24).reshape(2, 1, 3, 4)  # (a constant 0.5 would read as single-amplitude spikes)
    real = _rows(ma.price(collect(MeanHead(), [reals], time_first=True), FLAT))["mean0"]
    # reals: T·n_out·(k−1) adds = 2 · 4 · 2 · 0.1 = 1.6; reads and writes T·(n_in + n_out)·b_v·m = 2 · 16 · 0.8 = 25.6
    assert real["input_type"] == "real" and real["E_pJ"]["total"] == pytest.approx(27.2)


class PoolToy(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):  # [T, B, 1, 4, 4]
        return seq(x, self.pool)


def _pool_input() -> torch.Tensor:
    """Spikes at (0,0), (0,1), (3,3) at step 0 and (2,2) at step 1: Z = 4; the 2×2 max has 2 + 1 outputs."""
    x = torch.zeros(2, 1, 1, 4, 4)
    x[0, 0, 0, 0, 0] = x[0, 0, 0, 0, 1] = x[0, 0, 0, 3, 3] = x[1, 0, 0, 2, 2] = 1
    return x


def test_max_and_average_pooling_on_spikes():
    mx = _rows(ma.price(collect(PoolToy(nn.MaxPool2d(2)), [_pool_input()]), FLAT))["pool"]
    # an OR: no arithmetic; input events 4 and output events 3, each 32 bit · 0.05 → 7 · 1.6 = 11.2
    assert (mx["counts"]["op"], mx["counts"]["window"], mx["E_pJ"]["compute"]) == ("max", 4, 0.0)
    assert mx["E_pJ"]["total"] == pytest.approx(11.2)
    # ANN: 4 outputs × 3 compares · 0.1 = 1.2, reads 16 · 8 · 0.05 = 6.4, writes 4 · 8 · 0.05 = 1.6
    assert mx["ann_pJ"]["int8_naive"] == pytest.approx(9.2)
    avg = _rows(ma.price(collect(PoolToy(nn.AvgPool2d(2)), [_pool_input()]), FLAT))["pool"]
    # one add per event 4 · 0.1 = 0.4, event reads 4 · 1.6 = 6.4, averages written 2 · 4 · 16 · 0.05 = 6.4
    assert avg["E_pJ"]["total"] == pytest.approx(13.2) and avg["ann_pJ"]["int8_naive"] == pytest.approx(9.2)


# --- BatchNorm: folded into the layer it reads, or unfolded ------------------------------------------


class BnBeforeConv(nn.Module):
    """Registered conv, then BN, but the BN runs on the spikes *before* the conv: module order says
    the BN follows the conv, the data flow says it reads spikes and cannot fold."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)

    def forward(self, x):  # [T, B, 2, 2, 2]
        return seq(x, self.bn, self.conv)


class ConvThenBn(BnBeforeConv):
    def forward(self, x):
        return seq(x, self.conv, self.bn)


def _bn_input() -> torch.Tensor:
    x = torch.zeros(2, 1, 2, 2, 2)
    x[0, 0, 0, 0, 0] = x[1, 0, 1, 1, 1] = 1
    return x


def test_unfolded_batchnorm_is_priced_and_read_from_the_data_flow():
    model = BnBeforeConv()
    counts = collect(model, [_bn_input()])
    bn = next(r for r in counts.rows if isinstance(r, NormCounts))
    conv = next(r for r in counts.rows if isinstance(r, ConnectionCounts))
    assert not bn.folded and (bn.n, bn.steps, bn.channels) == (8, 2, 2)
    assert not conv.bias  # no BN reads the conv's output
    row = _rows(ma.price(counts, FLAT))["bn"]
    # T·n·(e_mul + e_add) = 2 · 8 · 3.2 = 51.2; scale and shift read per element 2 · T·n · 8 bit · 0.05 = 12.8
    assert (row["role"], row["E_pJ"]["compute"], row["E_pJ"]["weights"]) == ("bn", pytest.approx(51.2), pytest.approx(12.8))
    assert row["E_pJ"]["total"] == pytest.approx(64.0) and row["ann_pJ"]["int8_naive"] == 0.0
    assert "bn_unfolded" in hardware_report(counts, neurobench_metrics(model, counts))["loihi"]["unmapped"]


def test_folded_batchnorm_is_the_layers_bias_unless_priced_unfolded():
    counts = collect(ConvThenBn(), [_bn_input()])
    bn = next(r for r in counts.rows if isinstance(r, NormCounts))
    assert bn.folded and bn.into == "conv"
    folded = _rows(ma.price(counts, FLAT))
    assert "bn" not in folded
    # the bias after folding: T·n_out·(e_add + b_w·m) = 2 · 8 · (0.1 + 0.4) = 8.0
    assert folded["conv"]["E_pJ"]["bias"] == pytest.approx(8.0)
    unfolded = _rows(ma.price(counts, replace(FLAT, bn="unfolded")))
    assert unfolded["conv"]["E_pJ"]["bias"] == 0.0 and unfolded["bn"]["E_pJ"]["total"] == pytest.approx(64.0)


# --- SDT v2: the ANN side prices the merged conv ----------------------------------------------------


class RepConvToy(nn.Module):
    def __init__(self):
        super().__init__()
        from spikeformers.models.sdt_v2 import RepConv

        self.rep = RepConv(2, 3)

    def forward(self, x):  # [T, B, 2, 4, 4] spikes
        return seq(x, self.rep)


def test_repconv_chain_is_one_3x3_conv_on_the_ann_side():
    x = (torch.rand(2, 1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    counts = collect(RepConvToy(), [x])
    chain = counts.merged["rep"]
    assert chain["members"] == ["rep.body.0", "rep.body.2.0", "rep.body.2.1"]
    # a 3×3 pad-1 conv on a 4×4 map has (2 + 3 + 3 + 2)² = 100 in-bounds taps per channel pair
    assert (chain["dense"], chain["weights"], chain["n_in"], chain["n_out"]) == (100 * 2 * 3, 54, 32, 48)
    rows = _rows(ma.price(counts, FLAT))
    ann = [rows[n]["ann_pJ"] for n in chain["members"]]
    # naive: 600 MACs · 3.2 = 1920, weights and inputs per MAC 600 · 8 · 0.05 = 240 each, outputs
    # 48 · 0.4 = 19.2, addressing (32 + 48 + 3·9) · 0.1 = 10.7, bias 48 · (0.1 + 0.4) = 24 → 2453.9
    assert ann[0]["int8_naive"] == pytest.approx(2453.9)
    # reuse: weights once 54 · 0.4 = 21.6, inputs once 32 · 0.4 = 12.8 → 2008.3
    assert ann[0]["int8_reuse"] == pytest.approx(2008.3)
    assert [a["int8_naive"] for a in ann[1:]] == [0.0, 0.0]  # the merged conv stands for the whole chain
    assert rows["rep.body.0"]["counts"]["merged_into"] == "rep"


# --- every registered tiny model --------------------------------------------------------------------

OURS = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("spikeformers."))
ZOO = [n for n in OURS if n.endswith("_tiny")]
# what the papers' block equations add: Spikformer and QKFormer add spike tensors (an integer
# stream), SDT v1/v2/v3 and Spikingformer add real membranes (the membrane shortcut)
STREAM = {"spikformer": "spikes", "qkformer": "spikes", "sdt": "real", "sdtv2": "real", "sdtv3": "real",
          "spikingformer": "real"}


def _family(name: str) -> str:
    return name.removeprefix("atsnn_").removesuffix("_tiny")


@pytest.fixture(scope="module", params=ZOO)
def zoo(request):
    name = request.param
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    for m in model.modules():  # BN bias 1: every path carries activity in eval mode
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.bias.data.fill_(1.0)
    if name.startswith("qcfs_"):
        from spikeformers.models.qcfs import to_snn

        channels, model = model.pretrained_cfg["input_size"][0], to_snn(model, T=2)
    else:
        model.T, channels = 2, model.in_chans
    x = torch.rand(2, channels, 32, 32, generator=torch.Generator().manual_seed(0)) * 3
    return name, model, collect(model, [x])


def test_rows_appear_where_the_architecture_has_them(zoo):
    name, model, counts = zoo
    residuals = [r for r in counts.rows if isinstance(r, ResidualCounts)]
    pools = {r.name: r for r in counts.rows if isinstance(r, PoolCounts)}
    for module_name, m in model.named_modules():  # every pooling module that ran has its row
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            assert module_name in pools, module_name
    if name.startswith("qcfs_"):  # a VGG: no shortcut, average pools on IF spikes
        assert not residuals and all(p.op == "avg" and p.input_type == "spikes" for p in pools.values())
        return
    blocks = [s for s, stage in model.stages() if "Block" in type(stage).__name__]
    assert blocks
    for block in blocks:  # x ← x + Attn(x); x ← x + MLP(x) (or the conv blocks' two shortcuts)
        adds = [r for r in residuals if r.name.startswith(block + ".")]
        assert len(adds) == 2, (block, [r.name for r in adds])
        assert {r.input_type for r in adds} == {STREAM[_family(name)]}, block
        assert all(r.steps == 2 for r in adds)
    means = [p for p in pools.values() if p.op == "mean"]
    assert len(means) == 1 and means[0].n_out * means[0].window == means[0].n_in  # the head's token average


def test_totals_are_the_sums_of_the_rows_in_every_profile(zoo):
    _, _, counts = zoo
    for p in (ma.PROFILES["mem45-int8"], ma.PROFILES["lemaire"], ma.profile("mem45-int8", dataflow="reuse"),
              ma.profile("mem45-int8", bn="unfolded"), ma.profile("mem45-fp32", execution="dense")):
        block = ma.price(counts, p)
        roles = {r["role"] for r in block["rows"]}
        assert {"residual", "pool"} & roles
        assert block["snn"]["total_pJ"] == pytest.approx(sum(r["E_pJ"]["total"] for r in block["rows"]), rel=1e-12)
        for key, total in (("int8_naive", block["ann"]["int8_naive_pJ"]), ("fp32_reuse", block["ann"]["fp32_reuse_pJ"])):
            assert total == pytest.approx(sum(r["ann_pJ"][key] for r in block["rows"]), rel=1e-12)
        c = block["curve"]
        assert block["snn"]["rate_independent_pJ"] == pytest.approx(sum(r["rate_scaling_pJ"]["const"] for r in block["rows"]))
        assert min(c["A"], c["L"], c["Q"]) >= 0


def test_sepconv_chains_are_one_kxk_conv_on_the_ann_side():
    """SDT v2's SepConv: depthwise 7×7 → 1×1 counts as one 7×7 conv (2C → C, stride 1, pad 3) on the
    depthwise conv's spike input; its in-bounds taps are counted here with plain loops."""
    torch.manual_seed(0)
    model = timm.create_model("sdtv2_tiny", num_classes=5)
    model.T = 2
    counts = collect(model, [torch.rand(2, model.in_chans, 32, 32, generator=torch.Generator().manual_seed(0))])
    assert counts.merged
    for at, chain in counts.merged.items():
        assert at.endswith("Conv.dwconv") and chain["members"] == [at, at.replace("dwconv", "pwconv2")]
        side = int(round((chain["n_in"] / chain["c_in"]) ** 0.5))  # square maps
        per_axis = sum(min(y + 3, side - 1) - max(y - 3, 0) + 1 for y in range(side))
        assert chain["kernel"] == 7 and chain["dense"] == per_axis ** 2 * chain["c_in"] * chain["c_out"]
        assert chain["c_in"] == 2 * chain["c_out"] and chain["weights"] == 49 * chain["c_in"] * chain["c_out"]
    rows = _rows(ma.price(counts, ma.PROFILES["mem45-int8"]))
    for at, chain in counts.merged.items():
        first, second = (rows[m] for m in chain["members"])
        assert first["ann_pJ"]["int8_naive"] > 0 and second["ann_pJ"]["int8_naive"] == 0.0


def test_bad_bn_option_is_one_line():
    from spikeformers.models.errors import UserError

    with pytest.raises(UserError, match="bn must be one of folded, unfolded"):
        ma.profile("mem45-int8", bn="sometimes")
    assert ma.profile("mem45-int8", e_add_v=None).add_v == ma.PROFILES["mem45-int8"].e_ac
    assert ma.profile("mem45-int8", e_add_v=0.0).add_v == 0.0


@pytest.mark.parametrize("batch", [1, 2])
def test_a_converted_ecmt_vit_has_its_two_shortcuts_per_block_and_no_others(batch):
    """The timm ViT block's x + attn(…) and x + mlp(…), once per step; the position embedding (a
    parameter, the same shape as the tokens at batch 1), the expectation-compensation sums and the
    readout's running total are not shortcuts."""
    from timm.models.vision_transformer import VisionTransformer

    from spikeformers.models import ecmt

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4).eval()
    snn = ecmt.convert(vit, ecmt.calibrate(vit, [torch.randn(4, 3, 32, 32)]))
    snn.T = 3
    counts = collect(snn, [torch.randn(batch, 3, 32, 32)])
    adds = [r for r in counts.rows if isinstance(r, ResidualCounts)]
    assert sorted(r.name for r in adds) == [f"model.blocks.{i}.add{j}" for i in range(2) for j in range(2)]
    assert all(r.input_type == "real" and r.steps == 3 and r.n == 17 * 32 for r in adds)  # 16 patches + cls
