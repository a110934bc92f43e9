"""Our NeuroBench metrics against the real NeuroBench 2.3.0 package, key for key.

NeuroBench is not a dependency (it pulls snnTorch, tonic, numba and torchaudio); CI installs the
``neurobench`` extra with torch held by a constraint, or NeuroBench and snnTorch alone with
``--no-deps`` (``.ci/run``). Where it is not importable every test here is skipped. NeuroBench runs through its own ``Benchmark`` loop with ``TorchModel`` (our
networks, our neuron classes registered with ``add_activation_module``) or ``SNNTorchModel`` (an
snnTorch twin of the toy network), so its own hooks find the connection layers and activations.

Counts (ParameterCount, Footprint, SynapticOperations, MembraneUpdates) must agree exactly; the
sparsities are ratios that NeuroBench averages over batches, so they agree to rounding.
Documented convention differences are tested as such, not skipped:

- NeuroBench names an activation by its attribute name, so modules of the same name in different
  blocks share one ``ActivationSparsityByLayer`` entry; ours are keyed by the full module path.
- NeuroBench's ``MembraneUpdates`` and ``NeuronOperations`` read snnTorch's ``mem`` attribute and
  reset mechanism: on our neurons (multi-step, no stored state) it reports 0 updates. On an
  snnTorch neuron it counts step t when the stored *pre-reset* membrane changed; ours counts the
  *post-reset* membrane. A post-reset change implies a pre-reset change, so ours is never larger:
  the gap is the neuron-steps whose pre-reset membrane moved while the post-reset one stayed (a
  neuron that fired at t−1 and fires again, or rests at the reset value, at t).
"""

import contextlib
import io

import pytest
import torch
from torch import nn

neurobench = pytest.importorskip(
    "neurobench", reason="NeuroBench is optional: `pip install --no-deps neurobench==2.3.0 snntorch` runs this check")
if neurobench.__version__ != "2.3.0":
    pytest.skip(f"the metrics follow NeuroBench 2.3.0, found {neurobench.__version__}", allow_module_level=True)

import snntorch  # noqa: E402  (NeuroBench imports it; installed with it)
from neurobench.benchmarks import Benchmark  # noqa: E402
from neurobench.metrics.static import ConnectionSparsity, Footprint, ParameterCount  # noqa: E402
from neurobench.metrics.workload import (  # noqa: E402
    ActivationSparsity, ActivationSparsityByLayer, MembraneUpdates, NeuronOperations, SynapticOperations)
from neurobench.models import SNNTorchModel, TorchModel  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import spikeformers  # noqa: E402,F401
from spikeformers.models.neurons import LIF  # noqa: E402
from spikeformers.train.neurobench import NeuronCounts, collect, neurobench_metrics  # noqa: E402

STATIC = [ParameterCount, Footprint, ConnectionSparsity]
WORKLOAD = [ActivationSparsity, ActivationSparsityByLayer, SynapticOperations, MembraneUpdates]


pytestmark = pytest.mark.usefixtures("eager_lif")  # conftest.py: eager LIF loops for tiny inputs


def run_neurobench(wrapped, x: torch.Tensor, batch_size: int, workload=WORKLOAD, static=STATIC) -> dict:
    """NeuroBench's own Benchmark loop over ``x`` (batch first). Benchmark catches a failing metric,
    prints it and reports 0, so the printed output must be free of errors."""
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch_size)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = Benchmark(wrapped, loader, [], [], [static, workload]).run(quiet=False)
    assert "Error" not in printed.getvalue(), printed.getvalue()
    return results


def by_attribute_name(counts) -> dict:
    """Our per-neuron-layer sparsity merged the way NeuroBench names layers (attribute name)."""
    spikes, outputs = {}, {}
    for r in counts.rows:
        if isinstance(r, NeuronCounts):
            key = r.name.rsplit(".", 1)[-1]
            spikes[key] = spikes.get(key, 0.0) + r.spikes
            outputs[key] = outputs.get(key, 0.0) + r.outputs
    return {k: (outputs[k] - spikes[k]) / outputs[k] for k in outputs}


# --- T1: the toy network -------------------------------------------------------------------------

W1 = [[1, 0, 0.5, 0], [0, 0.5, 0, 0], [0.5, 0.5, 0.5, 0.5]]
W2 = [[1, -1, 0], [0.5, 0.5, 0.5]]


class ToyL2(nn.Module):
    """fc1 (the image repeated over T, folded [T·B, 4]) → LIF (τ 2, threshold 1, hard reset 0) → fc2
    → mean over T. With ``sequence`` the input is [B, T, 4], one frame per step."""

    def __init__(self, T: int = 2, sequence: bool = False):
        super().__init__()
        self.T, self.sequence = T, sequence
        self.fc1, self.lif, self.fc2 = nn.Linear(4, 3), LIF(), nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor(W1))
            self.fc1.bias.zero_()
            self.fc2.weight.copy_(torch.tensor(W2))

    def forward(self, x):
        frames = x.transpose(0, 1) if self.sequence else x.unsqueeze(0).expand(self.T, *x.shape)  # [T, B, 4]
        spikes = self.lif(self.fc1(frames.flatten(0, 1)).unflatten(0, (self.T, -1)))
        return self.fc2(spikes.flatten(0, 1)).unflatten(0, (self.T, -1)).mean(0)


def test_t1_toy_network_against_neurobench():
    image = torch.tensor([[1.2, 3.0, 0.0, 0.4]])
    model = ToyL2()
    ours = neurobench_metrics(model, collect(model, [image]))
    wrapped = TorchModel(model)
    wrapped.add_activation_module(LIF)
    theirs = run_neurobench(wrapped, image, 1)
    # the hand-computed values (NeuroBench 2.3.0 on the toy network), then ours = theirs key for key
    assert theirs["SynapticOperations"] == {"Effective_MACs": 10, "Effective_ACs": 4, "Dense": 36}
    assert (theirs["ParameterCount"], theirs["Footprint"], theirs["ConnectionSparsity"]) == (21, 84, 0.3333)
    assert theirs["ActivationSparsity"] == 0.5 and theirs["ActivationSparsityByLayer"] == {"lif": 0.5}
    for key in ("ParameterCount", "Footprint", "ConnectionSparsity", "SynapticOperations", "ActivationSparsity",
                "ActivationSparsityByLayer"):
        assert ours[key] == theirs[key], key
    # convention: NeuroBench counts membrane updates of snnTorch neurons only (ours: 3 + 2, hand trace)
    assert theirs["MembraneUpdates"] == 0 and ours["MembraneUpdates"] == 5


class SnnToyL2(nn.Module):
    """The same network in snnTorch, one call per time step: Leaky with β 0.5, threshold 1 and reset
    to zero is our LIF (H = V + (X − V)/2) when its input current is halved, so fc1's weights are
    W1/2 (same zero pattern, same synaptic operations)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(3, 2, bias=False)
        self.lif = snntorch.Leaky(beta=0.5, threshold=1.0, reset_mechanism="zero", init_hidden=True)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor(W1) / 2)
            self.fc1.bias.zero_()
            self.fc2.weight.copy_(torch.tensor(W2))

    def forward(self, frame):  # [B, 4] -> (output, spikes) as SNNTorchModel expects
        spikes = self.lif(self.fc1(frame))
        return self.fc2(spikes), spikes


# Two samples, three steps. Sample 0: y = W1·x = [1.2, 1.5, 2.3], [2.4, 0, 1.2], 0; sample 1: [3, 0, 1.5]
# at every step. Hand trace, H = V/2 + y/2, V = H unless H ≥ 1 (then 0):
#   sample 0  H = [.6 .75 1.15] [1.5 .375 .6] [0 .1875 .3]   spikes [0 0 1] [1 0 0] [0 0 0]
#   sample 1  H = [1.5 0 .75]   [1.5 0 1.125] [1.5 0 .75]    spikes [1 0 0] [1 0 1] [1 0 0]
# Post-reset V changes after step 0: sample 0: 3 + 2, sample 1: 1 + 1 -> (6 + 7) / 2 = 6.5 per sample.
# Pre-reset H changes: sample 0: 3 + 3 (neuron 0 goes 1.5 -> 0 while V stays 0), sample 1: 1 + 1 -> 7.
SEQUENCE = torch.tensor([[[1.2, 3.0, 0.0, 0.4], [2.4, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                         [[3.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]])


def test_membrane_updates_pre_and_post_reset_convention_on_an_snntorch_twin():
    model = ToyL2(T=3, sequence=True)
    counts = collect(model, [SEQUENCE])
    ours = neurobench_metrics(model, counts)
    theirs = run_neurobench(SNNTorchModel(SnnToyL2()), SEQUENCE, 2, workload=WORKLOAD + [NeuronOperations], static=[])
    # fc1 sees real values: MACs = Σ over frames of Σ_{x_i ≠ 0} (non-zero weights in column i):
    # (5 + 2 + 0) + 3·2 = 13; fc2 sees spikes: ACs (1 + 2 + 0) + (2 + 3 + 2) = 10; Dense 6·(12 + 6) = 108
    assert theirs["SynapticOperations"] == {"Effective_MACs": 6.5, "Effective_ACs": 5.0, "Dense": 54.0}
    assert ours["SynapticOperations"] == theirs["SynapticOperations"]
    assert theirs["ActivationSparsity"] == pytest.approx(1 - 6 / 18, rel=1e-15)  # 6 spikes of 18 outputs
    assert ours["ActivationSparsity"] == pytest.approx(theirs["ActivationSparsity"], rel=1e-15)
    # the documented difference: pre-reset (snnTorch, NeuroBench) 7, post-reset (ours) 6.5
    assert (theirs["MembraneUpdates"], ours["MembraneUpdates"]) == (7.0, 6.5)
    # Leaky costs 4 ops per update (NeuroBench's table); the dense count is every neuron every step
    assert theirs["NeuronOperations"] == {"Effective Neuron Ops": 28.0, "Neuron Dense Ops": 36.0}
    assert ours["NeuronOperations"] == {"Effective Neuron Ops": 26.0, "Neuron Dense Ops": 36}


def test_t2_padded_conv_against_neurobench():
    """3×3 conv, padding 1, on a 4×4 spike map with spikes at (0,0), (1,2), (3,3): in-bounds fan-outs
    4 + 9 + 4 = 17 ACs; Dense counts in-bounds taps only, 100 rather than 9·16 = 144."""
    conv = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False))
    nn.init.constant_(conv[0].weight, 0.3)
    conv.T = 1
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = x[0, 0, 1, 2] = x[0, 0, 3, 3] = 1
    theirs = run_neurobench(TorchModel(conv), x, 1, workload=[SynapticOperations])
    assert theirs["SynapticOperations"] == {"Effective_MACs": 0, "Effective_ACs": 17, "Dense": 100}
    assert neurobench_metrics(conv, collect(conv, [x]))["SynapticOperations"] == theirs["SynapticOperations"]


class TimeFirst(nn.Module):
    """NeuroBench feeds [B, T, ...] and divides by its first dimension; SpikingJelly's multi-step
    network wants [T, B, ...]."""

    def __init__(self, net, T):
        super().__init__()
        self.net, self.T = net, T

    def forward(self, x):
        return self.net(x.transpose(0, 1))


def test_spikingjelly_network_at_batch_3_divides_by_samples_not_steps():
    from spikingjelly.activation_based import functional, layer, neuron

    net = nn.Sequential(layer.Linear(8, 6, bias=True, step_mode="m"), neuron.LIFNode(step_mode="m"),
                        layer.Linear(6, 4, bias=False, step_mode="m"), neuron.IFNode(step_mode="m"))
    with torch.no_grad():  # no zero weight in either layer
        net[0].weight.copy_(torch.linspace(-0.5, 1.5, 48).reshape(6, 8))
        net[0].bias.fill_(0.1)
        net[2].weight.copy_(torch.linspace(-1, 2, 24).reshape(4, 6))
    spikes = torch.zeros(3, 3, 8)  # [B, T, 8]: 9, 13 and 6 input spikes
    spikes[0, 0, [0, 3, 5]] = spikes[0, 1, [1, 2]] = spikes[0, 2, [0, 1, 2, 7]] = 1
    spikes[1, 0, [1, 2, 4, 6]] = spikes[1, 1, :] = spikes[1, 2, [7]] = 1
    spikes[2, 1, [0, 5]] = spikes[2, 2, [3, 4, 5, 6]] = 1
    model = TimeFirst(net, T=3)
    functional.reset_net(net)
    ours = neurobench_metrics(model, collect(model, [spikes]))
    functional.reset_net(net)
    wrapped = TorchModel(model)
    wrapped.add_activation_module(neuron.BaseNode)
    theirs = run_neurobench(wrapped, spikes, 3)
    functional.reset_net(net)
    # fc0: 28 input spikes × 6 outputs / 3 samples = 56 ACs; Dense (8·6 + 6·4)·3 steps = 216 per sample
    assert theirs["SynapticOperations"]["Effective_ACs"] > 56 and theirs["SynapticOperations"]["Dense"] == 216
    for key in ("ParameterCount", "Footprint", "ConnectionSparsity", "SynapticOperations"):
        assert ours[key] == theirs[key], key
    assert ours["ActivationSparsity"] == pytest.approx(theirs["ActivationSparsity"], rel=1e-12)
    by_name = {k.rsplit(".", 1)[-1]: v for k, v in ours["ActivationSparsityByLayer"].items()}  # net.1 -> 1
    assert by_name == pytest.approx(theirs["ActivationSparsityByLayer"], rel=1e-12)
    assert theirs["MembraneUpdates"] == 0 < ours["MembraneUpdates"]


# --- registered tiny models of every family --------------------------------------------------------

ZOO = ["spikformer_tiny", "sdt_tiny", "sdtv2_tiny", "sdtv3_tiny", "spikingformer_tiny", "qkformer_tiny",
       "atsnn_spikformer_tiny", "atsnn_sdt_tiny", "qcfs_vgg_tiny"]


def assert_same_as_neurobench(model, x: torch.Tensor) -> dict:
    """Ours and NeuroBench's on ``x`` in two batches; our neuron classes registered as activations.
    Returns NeuroBench's results."""
    counts = collect(model, [x[: len(x) // 2], x[len(x) // 2:]])
    ours = neurobench_metrics(model, counts)
    wrapped = TorchModel(model)
    neuron_classes = {type(m) for m in model.modules() if isinstance(m, LIF) or isinstance(getattr(m, "neuron_model", None), str)}
    for cls in neuron_classes:
        wrapped.add_activation_module(cls)
    theirs = run_neurobench(wrapped, x, len(x) // 2)
    for key in ("ParameterCount", "Footprint", "ConnectionSparsity", "SynapticOperations"):
        assert ours[key] == theirs[key], key
    # NeuroBench averages the per-batch ratio over batches: equal to rounding
    assert ours["ActivationSparsity"] == pytest.approx(theirs["ActivationSparsity"], rel=1e-12)
    assert by_attribute_name(counts) == pytest.approx(theirs["ActivationSparsityByLayer"], rel=1e-12)
    assert {k.rsplit(".", 1)[-1] for k in ours["ActivationSparsityByLayer"]} == set(theirs["ActivationSparsityByLayer"])
    # convention: no snnTorch neuron, so NeuroBench counts no membrane update
    assert theirs["MembraneUpdates"] == 0
    return theirs


@pytest.mark.parametrize("name", ZOO)
def test_tiny_model_against_neurobench(name, zoo_model):
    model, channels = zoo_model(name)
    theirs = assert_same_as_neurobench(model, torch.rand(4, channels, 32, 32, generator=torch.Generator().manual_seed(0)) * 3)
    assert theirs["SynapticOperations"]["Effective_ACs"] > 0 or name.startswith(("qcfs_", "sdtv3_"))  # spikes reached a layer


def test_converted_ecmt_network_against_neurobench():
    """ECMT's SNN runs the network once per step (multi-threshold neurons keep their membrane):
    NeuroBench sees T calls per batch and still divides by the batch size, as we do."""
    from timm.models.vision_transformer import VisionTransformer

    from spikeformers.models import ecmt

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4).eval()
    snn = ecmt.convert(vit, ecmt.calibrate(vit, [torch.randn(4, 3, 32, 32)]))
    snn.T = 3
    theirs = assert_same_as_neurobench(snn, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    # the qkv layer alone runs T · 17 tokens · 32 in · 96 out dense taps per sample
    assert theirs["SynapticOperations"]["Dense"] > 3 * 17 * 32 * 96
