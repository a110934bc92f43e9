"""The timm model contract, asserted once over every model this package registers.

What timm's own tests/test_models.py asserts (forward, backward, default cfgs, ``num_classes=0``,
``reset_classifier``, ``forward_features`` + ``forward_head(pre_logits=True)``, ``features_only``,
``forward_intermediates``, FX), adapted only where a spiking model differs by design
(docs/architecture.md): ``forward_features`` returns the time-first stream, official parameters that
the official forward never uses get no gradient (declared by ``unused_parameters``), AT-SNN's
data-dependent halting is not FX-traceable, TorchScript is not supported.

Every model is built once (at its smallest valid input, T = 1, batch 2) and shared by the checks;
the checks that must build through ``timm.create_model`` run on one small model per family.
"""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models import LIF, set_backend

OURS = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("spikeformers."))
SMALL = [n for n in OURS if n.endswith("_tiny") or n in ("qcfs_resnet20",)]  # one per family, CPU-sized
SPIKING_SMALL = [n for n in SMALL if not n.startswith("qcfs_")]
NOT_FX = ("atsnn_",)  # token halting: the number of tokens processed depends on the data


def test_every_family_is_covered():
    families = {timm.models.model_entrypoint(n).__module__ for n in OURS}
    assert len(OURS) >= 49 and len(families) >= 7
    assert {timm.models.model_entrypoint(n).__module__ for n in SMALL} == families


def _input(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    channels = model.pretrained_cfg["input_size"][0]
    size = max(32, 2 * getattr(model, "size_multiple", 1))
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=OURS)
def name(request) -> str:
    # A module-scoped parametrized fixture: pytest groups the tests by model, so each model is built
    # once and freed before the next (the ImageNet configs reach 124M parameters).
    return request.param


@pytest.fixture(scope="module")
def built(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    if getattr(model, "T", None):
        model.T = 1
    return model


def _is_spiking(model) -> bool:
    return hasattr(model, "T")


def test_backward_reaches_every_used_parameter(built):
    model = built.train()
    x = _input(model)
    out = model(x)
    out = torch.cat(out) if isinstance(out, tuple) else out  # KD head: (logits, logits_kd) in training
    assert out.shape[-1] == 7 and torch.isfinite(out).all()
    model.zero_grad(set_to_none=True)
    out.float().mean().backward()
    unused = getattr(model, "unused_parameters", None)
    for pname, p in model.named_parameters():
        expected_unused = bool(unused and re.search(unused, pname))
        assert (p.grad is None) == expected_unused, f"{pname}: gradient {'missing' if p.grad is None else 'present'}"
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_default_cfg_names_real_layers(built):
    model = built
    state = model.state_dict()
    cfg = model.pretrained_cfg
    for key in (cfg["classifier"], cfg["first_conv"]):
        for layer in (key,) if isinstance(key, str) else key:
            assert f"{layer}.weight" in state, f"pretrained_cfg names {layer!r}, not a layer of the model"
    assert state[f"{cfg['first_conv']}.weight"].shape[1] == cfg["input_size"][0]


def test_features_head_and_reset_classifier(built):
    model = built.eval()
    x = _input(model)
    with torch.no_grad():
        logits = model(x)
        stream = model.forward_features(x)
        if _is_spiking(model):
            assert stream.shape[:2] == (model.T, 2), "forward_features returns the time-first stream"
        assert torch.equal(model.forward_head(stream), logits)
        pooled = model.forward_head(stream, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        assert model.get_classifier().out_features == 7
        model.reset_classifier(0)
        assert model.forward(x).shape == (2, model.num_features)
        assert torch.equal(model.forward(x), pooled)
        model.reset_classifier(5)
        assert model.forward(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(7)  # as built, for the next checks of this model


def test_forward_intermediates(built):
    model = built.eval()
    x = _input(model)
    levels = model.feature_info
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(maps) == len(levels)
        for info, fmap in zip(levels, maps):
            assert fmap.shape == (2, info["num_chs"], x.shape[-2] // info["reduction"], x.shape[-1] // info["reduction"])
        last = model.forward_intermediates(x, indices=1, stop_early=True, intermediates_only=True)
        assert len(last) == 1 and torch.equal(last[0], maps[-1])
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert torch.equal(first[0], maps[0])
        if _is_spiking(model):  # per-step maps on request; their mean over T is the default map
            steps = model.forward_intermediates(x, indices=1, intermediates_only=True, time_mean=False)[0]
            assert steps.shape[:2] == (model.T, 2) and torch.equal(steps.mean(0), maps[-1])


@pytest.mark.parametrize("name", SMALL)
def test_create_num_classes_0_and_features_only(name):
    model = timm.create_model(name, num_classes=0).eval()
    x = _input(model)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    features = timm.create_model(name, features_only=True).eval()
    channels = features.feature_info.channels()
    assert len(channels) == len(features.model.feature_info) >= 2
    with torch.no_grad():
        maps = features(x)
    assert [m.shape[1] for m in maps] == channels
    assert all(m.shape[0] == 2 and m.dim() == 4 and torch.isfinite(m).all() for m in maps)
    assert features.default_cfg["input_size"] == features.pretrained_cfg["input_size"]
    last = timm.create_model(name, features_only=True, out_indices=(-1,)).eval()
    assert len(last.feature_info.channels()) == 1


@pytest.mark.parametrize("name", SMALL)
def test_create_takes_device_and_dtype_and_rejects_unknown_arguments(name):
    model = timm.create_model(name, device="cpu", dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.in_chans == model.pretrained_cfg["input_size"][0]
    model.eval().reset_classifier(0)
    model.reset_classifier(3)  # a new head follows the model's dtype and train/eval mode
    assert model.get_classifier().weight.dtype == torch.float64 and not model.get_classifier().training
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model(name, not_a_model_arg=1)


@pytest.mark.parametrize("name", SPIKING_SMALL)
def test_prune_intermediate_layers_keeps_the_first_level(name):
    model = timm.create_model(name).eval()
    x = _input(model)
    with torch.no_grad():
        first = model.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
    n_params = sum(p.numel() for p in model.parameters())
    assert model.prune_intermediate_layers([0]) == [0]
    assert sum(p.numel() for p in model.parameters()) < n_params and model.num_classes == 0
    with torch.no_grad():
        assert torch.equal(model.forward_intermediates(x, indices=[0], intermediates_only=True)[0], first)


@pytest.mark.parametrize("name", [n for n in SMALL if not n.startswith(NOT_FX)])
def test_fx_trace_equals_eager(name):
    model = timm.create_model(name).eval()
    x = _input(model)
    _, eval_nodes = get_graph_node_names(model)
    traced = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    with torch.no_grad():
        assert torch.equal(traced(x)[eval_nodes[-1]], model(x))


# --- what every spiking family shares (one test each instead of a copy per family file) ----------

def _neuron_outputs(model, x) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """(neuron, output) of every neuron call: binary LIFs, and integer-count neurons (E-SpikeFormer's:
    a ``count()`` of at most ``max_spike_count`` spikes per step)."""
    outputs = []
    neurons = [m for m in model.modules()
               if isinstance(m, LIF) or (hasattr(m, "max_spike_count") and callable(getattr(m, "count", None)))]
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append((m, o.detach()))) for m in neurons]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def _as_counts(neuron, out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A neuron's output as spike counts per step and the most it may fire (1 for a LIF)."""
    if isinstance(neuron, LIF):
        return out, 1
    top = neuron.max_spike_count
    return (out * top if getattr(neuron, "normalize", False) else out), top


@pytest.mark.parametrize("name", SPIKING_SMALL)
def test_neurons_emit_spike_counts_and_eval_is_deterministic(name):
    """Every neuron emits whole spike counts within its range (binary for LIFs, 0..D for integer
    neurons), something fires, and evaluation is deterministic."""
    model = timm.create_model(name).train()
    x = _input(model)
    outputs = _neuron_outputs(model, x)
    assert outputs
    for neuron, out in outputs:
        counts, top = _as_counts(neuron, out)
        assert torch.equal(counts, counts.round()) and counts.min() >= 0 and counts.max() <= top, type(neuron).__name__
    assert sum(float(out.sum()) for _, out in outputs) > 0, "nothing fired: the checks below would be vacuous"
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", SPIKING_SMALL)
def test_per_step_logits_average_to_logits(name):
    model = timm.create_model(name, T=3).eval()
    x = _input(model)
    with torch.no_grad():
        logits = model(x)
        model.per_step_logits = True
        steps = model(x)
    assert steps.shape == (3, 2, model.num_classes)
    torch.testing.assert_close(steps.mean(0), logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SPIKING_SMALL)
def test_sequence_input_uses_its_own_time_steps(name):
    model = timm.create_model(name, T=4, per_step_logits=True).eval()
    x = _input(model)
    with torch.no_grad():
        assert model(x.expand(6, *x.shape)).shape == (6, 2, model.num_classes)


@pytest.mark.parametrize("name", SPIKING_SMALL)
def test_bad_input_is_one_line_value_error(name):
    model = timm.create_model(name)
    c, h = model.in_chans, _input(model).shape[-1]
    bad_size = h - 2
    cases = [
        (torch.randn(c, h, h), rf"got a 3-D tensor of shape \({c}, {h}, {h}\)"),
        (torch.randn(2, c + 2, h, h), f"expects {c} input channels, got {c + 2}"),
        (torch.randn(2, c, bad_size, bad_size), f"multiples of {model.size_multiple}.*got {bad_size}x{bad_size}"),
    ]
    for x, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            model(x)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", SPIKING_SMALL)
def test_T_must_be_a_positive_integer(name):
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match=f"T \\(time steps\\) must be a positive integer, got {bad!r}"):
            timm.create_model(name, T=bad)
    model = timm.create_model(name, T=2)
    with pytest.raises(ValueError, match="positive integer"):
        model.T = 0
    assert model.T == 2


@pytest.mark.parametrize("name", SPIKING_SMALL)
def test_backends_agree(name):
    """The torch and SpikingJelly neurons: identical logits (spikes are exact), gradients within
    rounding (their backward passes sum in different orders)."""
    model = timm.create_model(name).train()
    x = _input(model)
    runs = {}
    for backend in ("torch", "spikingjelly"):
        set_backend(model, backend)
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        runs[backend] = logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert torch.equal(runs["torch"][0], runs["spikingjelly"][0])
    for a, b in zip(runs["torch"][1], runs["spikingjelly"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SPIKING_SMALL)
def test_grad_checkpointing_is_exact(name):
    """Recomputing stages in backward changes no gradient, and BatchNorm statistics are updated
    once, not again on recompute."""
    torch.manual_seed(0)
    plain = timm.create_model(name).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = _input(plain, batch=4)
    for model in (plain, ckpt):
        out = model(x)
        out = torch.cat(out) if isinstance(out, tuple) else out
        out.square().mean().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max() <= 1e-6, n
    assert all(torch.equal(v, ckpt.state_dict()[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("name", SPIKING_SMALL)
def test_layer_decay_groups_stem_first_head_last(name):
    from timm.optim import create_optimizer_v2

    model = timm.create_model(name)
    groups = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5).param_groups
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    scales = sorted(set(scale_of.values()))
    first_conv = model.get_submodule(model.pretrained_cfg["first_conv"]).weight
    assert len(scales) >= 3 and scale_of[id(first_conv)] == scales[0] and scale_of[id(model.head.weight)] == 1.0


# --- compilers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdt_tiny", "qcfs_vgg_tiny"])
def test_torch_compile_graph_equals_eager(name):
    """``torch.compile`` captures the model (dynamo graph capture, eager kernels: fast on 2 cores)."""
    model = timm.create_model(name).eval()
    x = _input(model)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


def test_torchscript_is_unsupported():
    """TorchScript is unsupported by design (docs/architecture.md): scripting raises, it does not produce a
    silently different module. Users script nothing; they use torch.compile or FX (tested above)."""
    with pytest.raises(Exception):
        torch.jit.script(timm.create_model("sdt_tiny"))
