"""QCFS activation, ReLU replacement and IF-neuron conversion."""

import copy
import json

import pytest
import timm
import torch
import torchvision
from torch import nn

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models.qcfs import QCFS, ConvertedSNN, IFNeuron, replace_activations, to_snn


def constant_drive(theta: float, z: torch.Tensor, T: int) -> torch.Tensor:
    """Mean IF output over T steps of constant input z, through IFNeuron's folded interface."""
    neuron = IFNeuron(theta)
    neuron.T = T
    return neuron(z.unsqueeze(0).expand(T, *z.shape).reshape(-1)).reshape(T, -1).mean(0)


# --- the activation --------------------------------------------------------------------


def test_qcfs_forward_levels_and_formula():
    act = QCFS(levels=4, threshold=2.0)
    x = torch.linspace(-3, 5, 2001)
    y = act(x).detach()
    expected = 2.0 * torch.clamp(torch.floor(x * 4 / 2.0 + 0.5) / 4, 0, 1)
    assert torch.equal(y, expected)
    assert set(y.unique().tolist()) == {0.0, 0.5, 1.0, 1.5, 2.0}  # L + 1 levels of λ/L


@pytest.mark.parametrize("gradient", ["clamp_first", "round_first"])
def test_qcfs_gradients_match_the_table(gradient):
    lam, L = 2.0, 4
    act = QCFS(levels=L, threshold=lam, gradient=gradient)
    x = torch.tensor([-0.3, -0.2, 0.1, 0.9, 1.7, 2.1, 2.3, 3.0], requires_grad=True)
    for i in range(len(x)):
        act.zero_grad()
        x.grad = None
        y = act(x)
        y[i].backward()
        xi, yi = x[i].item(), y[i].item()
        if gradient == "clamp_first":
            inside, above = 0 <= xi <= lam, xi > lam
        else:
            inside, above = -lam / (2 * L) <= xi < lam * (1 + 1 / (2 * L)), xi >= lam * (1 + 1 / (2 * L))
        assert x.grad[i].item() == pytest.approx(1.0 if inside else 0.0), (gradient, xi)
        expected_dlam = (yi - xi) / lam if inside else (1.0 if above else 0.0)
        assert act.threshold.grad.item() == pytest.approx(expected_dlam, abs=1e-6), (gradient, xi)


def test_qcfs_rejects_bad_arguments():
    with pytest.raises(ValueError, match="levels"):
        QCFS(levels=0)
    with pytest.raises(ValueError, match="gradient"):
        QCFS(gradient="newest")


# --- replacement -----------------------------------------------------------------------


def test_replace_activations_on_torchvision_resnet18_gives_one_lambda_per_use():
    model = replace_activations(torchvision.models.resnet18(num_classes=10))
    acts = [name for name, m in model.named_modules() if isinstance(m, QCFS)]
    assert len(acts) == 1 + 8 * 2  # stem + two per BasicBlock (one after the residual sum)
    assert "layer1.0.act2" in acts
    assert isinstance(model.maxpool, nn.AvgPool2d) and model.maxpool.kernel_size == 3
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in model.modules())
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert "layer1.0.conv1.weight" in model.state_dict()  # original keys kept


@pytest.mark.parametrize("name,count", [("vgg16", 15), ("resnet18", 17)])
def test_replace_activations_on_timm_models(name, count):
    model = replace_activations(timm.create_model(name, num_classes=10))
    assert sum(isinstance(m, QCFS) for m in model.modules()) == count
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_registered_qcfs_models():
    for name, acts in [("qcfs_vgg16", 15), ("qcfs_vgg_tiny", 6), ("qcfs_resnet18", 17), ("qcfs_resnet20", 19)]:
        model = timm.create_model(name, num_classes=10, in_chans=1, levels=4)
        qcfs_layers = [m for m in model.modules() if isinstance(m, QCFS)]
        assert len(qcfs_layers) == acts and all(m.levels == 4 for m in qcfs_layers)
        assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in model.modules())
    model = timm.create_model("qcfs_resnet20", num_classes=10, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_unsupported_activation_is_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.BatchNorm2d(8), nn.GELU()))
    with pytest.raises(ValueError, match=r"'1\.1' is GELU"):
        replace_activations(model)


def test_shared_activation_module_is_rejected():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x))))

    with pytest.raises(ValueError, match="'act' is applied 2 times"):
        replace_activations(Shared())


# --- the IF neuron and the theory -----------------------------------------


def test_if_neuron_rate_equals_qcfs_with_L_equal_T():
    """Constant input for T steps == QCFS with L := T, exactly."""
    theta = 2.0
    z = torch.rand(200_000, generator=torch.Generator().manual_seed(1)) * 7 - 1  # U(-1, 6)
    for T in (1, 4, 8, 16, 32):
        snn = constant_drive(theta, z, T)
        ann = QCFS(levels=T, threshold=theta)(z).detach()
        assert torch.equal(snn, ann), T


def test_if_neuron_is_unbiased_for_T_not_L():
    """Mean(SNN_T − QCFS_L) is zero within noise; per-sample error ≲ θ/(2·min(T, L))."""
    theta = 2.0
    z = torch.rand(200_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 7 - 1
    for L, T in ((4, 8), (8, 4), (4, 1), (4, 32)):
        diff = constant_drive(theta, z, T) - QCFS(levels=L, threshold=theta).double()(z).detach()
        assert abs(diff.mean().item()) <= 5 * diff.std().item() / len(z) ** 0.5, (L, T)
        assert diff.abs().max().item() <= theta / min(T, L) + 1e-9, (L, T)


def random_qcfs_cnn(levels: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The setup: conv-BN-act-pool ×2, FC-act-FC; randomised BN statistics; each λ the 99th
    percentile of its pre-activation. Returns (model in eval mode, 64 inputs), float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(2048, 128), nn.ReLU(), nn.Linear(128, 10),
    ).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(64, 3, 32, 32, dtype=torch.float64)
    percentiles, h = [], x
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.ReLU):
                percentiles.append(torch.quantile(h.flatten(), 0.99).item())
            h = m(h)
    replace_activations(model, levels=levels)
    for act, p in zip([m for m in model.modules() if isinstance(m, QCFS)], percentiles):
        act.threshold.data.fill_(p)
    return model.double().eval(), x


def clip_network(model: nn.Module) -> nn.Module:
    """λ·clip(x/λ, 0, 1): QCFS with L → ∞, the SNN's limit as T → ∞."""
    clip = copy.deepcopy(model)
    for m in clip.modules():
        if isinstance(m, QCFS):
            m.levels = 2**40
    return clip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_network_converges_to_the_clip_network():
    """Err(2T) ≤ 0.6·err(T) for T ≥ 8, the same for L = 4 and L = 8."""
    errors = {}
    for levels in (4, 8):
        model, x = random_qcfs_cnn(levels)
        with torch.no_grad():
            target = clip_network(model)(x)
            steps = to_snn(model).double().forward_steps(x, 64)
        errors[levels] = [rel(steps[T - 1], target) for T in (8, 16, 32, 64)]
        for e_T, e_2T in zip(errors[levels], errors[levels][1:]):
            assert e_2T <= 0.6 * e_T, errors
    assert errors[4] == pytest.approx(errors[8], rel=1e-12)  # the SNN does not depend on L


def test_snn_matches_a_step_by_step_reference_in_float64():
    """The folded forward equals running the ANN's layers one time step at a time with explicit
    IF state (v(0) = θ/2, soft reset), exactly in float64."""
    model, x = random_qcfs_cnn(levels=4, seed=3)
    T = 6
    state: dict[int, torch.Tensor] = {}
    outputs = []
    with torch.no_grad():
        for _ in range(T):
            h = x
            for i, m in enumerate(model):
                if isinstance(m, QCFS):
                    theta = m.threshold.double()
                    v = state.get(i, torch.full_like(h, 0.5) * theta) + h
                    h = (v >= theta).double() * theta
                    state[i] = v - h
                else:
                    h = m(h)
            outputs.append(h)
        reference = torch.stack(outputs).cumsum(0) / torch.arange(1, T + 1, dtype=torch.float64).view(T, 1, 1)
        ours = to_snn(model).double().forward_steps(x, T)
    assert torch.equal(ours, reference)


def test_first_layer_snn_equals_ann_at_T_equal_L():
    """With constant input, T = L gives the QCFS ANN exactly for the first layer."""
    model, x = random_qcfs_cnn(levels=4)
    first = nn.Sequential(*list(model)[:3])
    with torch.no_grad():
        assert torch.equal(to_snn(first).double().forward_steps(x, 4)[-1], first(x).flatten(1))


def test_to_snn_keeps_the_ann_and_names_unsupported_layers():
    model, _ = random_qcfs_cnn(levels=4)
    before = copy.deepcopy(model.state_dict())
    snn = to_snn(model, T=3)
    assert isinstance(snn, ConvertedSNN) and snn.T == 3
    assert sum(isinstance(m, IFNeuron) for m in snn.modules()) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, QCFS) for m in model.modules())
    bad = nn.Sequential(nn.Linear(4, 4), QCFS(), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"layer '2' \(LayerNorm\)"):
        to_snn(bad)
    with pytest.raises(ValueError, match="no QCFS"):
        to_snn(nn.Sequential(nn.Linear(4, 4)))


def test_energy_tool_counts_the_converted_snn():
    from spikeformers.train.energy import analyze

    model, x = random_qcfs_cnn(levels=4)
    snn = to_snn(model, T=4).float()
    report = analyze(snn, [x[:8].float()])
    kinds = {r.name: r.input_type for r in report.layers}
    assert kinds["network.0"] == "real" and report.layers[0].unit == "MAC"  # the analog image
    assert kinds["network.11"] == "binary"  # FC after an IF layer: spikes of amplitude θ
    assert kinds["network.9"] == "real"  # FC after average-pooled spikes
    assert report.T == 4 and all(r.steps == 4 for r in report.layers)
    assert 0 < report.total_energy_mJ < report.ann_energy_mJ * 4


# --- CLI --------------------------------------------------------------------------------------


def test_convert_cli_on_a_trained_checkpoint(tmp_path, capsys):
    """`spikeformers-convert qcfs` on a (briefly) trained digits run: table, JSON schema, plot."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from spikeformers.train.convert import run
    from spikeformers.train.main import train

    GlobalHydra.instance().clear()
    with initialize_config_module("spikeformers.configs", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=qcfs_digits", "model.args.levels=2", "trainer.epochs=1",
                                          "trainer.max_steps_per_epoch=3", "trainer.progress=false"])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    train(cfg)
    out = tmp_path / "result.json"
    result = run(["qcfs", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--T", "1,4",
                  "--json", str(out), "--plot", str(tmp_path / "acc.png"), "--dtype", "float64"])
    saved = json.loads(out.read_text())
    assert saved["method"] == "qcfs" and saved["model"] == "qcfs_vgg_tiny"
    assert [r["T"] for r in saved["snn"]] == [1, 4] and set(saved["snn"][0]) >= {"T", "top1", "rel_error"}
    assert 0 <= saved["ann_top1"] <= 100 and saved == json.loads(json.dumps(result))
    assert (tmp_path / "acc.png").stat().st_size > 0
    assert "QCFS qcfs_vgg_tiny" in capsys.readouterr().out

    # the eval entry point evaluates the same conversion (convert=qcfs), with IF firing rates
    from spikeformers.train.evaluate import run_eval

    GlobalHydra.instance().clear()
    with initialize_config_module("spikeformers.configs", version_base="1.3"):
        eval_cfg = compose("eval", overrides=[f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
                                              "convert=qcfs", "convert_T=4"])
    GlobalHydra.instance().clear()
    evaluated = run_eval(eval_cfg)
    four = next(r for r in saved["snn"] if r["T"] == 4)
    assert "qcfs SNN, T=4" in evaluated["model"] and 0 < evaluated["firing_rate"] < 1
    assert evaluated["n_samples"] == saved["n_samples"] == 360
    assert abs(evaluated["top1"] - four["top1"]) <= 100 / 360 + 1e-9  # float32 here, float64 above: one flip at most


def test_convert_cli_rejects_bad_input(tmp_path):
    from spikeformers.train.convert import run

    with pytest.raises(SystemExit):
        run(["qcfs", "--model", "qcfs_resnet20", "--data", "digits", "--T", "0,2"])
    with pytest.raises(SystemExit):
        run(["qcfs", "--model", "resnet18", "--data", "digits"])
    with pytest.raises(FileNotFoundError):
        run(["qcfs", "--checkpoint", str(tmp_path / "missing.pt")])
