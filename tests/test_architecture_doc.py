"""docs/architecture.md: the example family runs as written and gets the whole timm contract from the
base with no code of its own, and the page's claims about where things live hold."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
MODULE = "spikeformers.models.example_convnet"


@pytest.fixture(scope="module")
def family():
    code = re.search(r"## Adding a family.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType(MODULE)
    sys.modules[MODULE] = module
    try:
        exec(compile(code, str(DOC), "exec"), module.__dict__)
        yield module
    finally:
        sys.modules.pop(MODULE, None)


def test_example_family_registers_and_trains(family):
    model = timm.create_model("example_convnet_tiny", num_classes=5)
    assert timm.models.model_entrypoint("example_convnet_tiny").__module__ == MODULE
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 5)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.per_step_logits = True
    assert model(x).shape == (model.T, 2, 5)  # TET readout from the base
    with pytest.raises(ValueError, match="expects 3 input channels"):
        model(torch.rand(2, 1, 32, 32))


def test_example_family_gets_the_timm_contract(family):
    model = timm.create_model("example_convnet_tiny").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pooled.shape == (2, 32)
        maps = model.forward_intermediates(x, intermediates_only=True)
        assert [m.shape for m in maps] == [(2, 32, 16, 16)] * 2
        model.reset_classifier(0)
        assert torch.equal(model(x), pooled)
    features = timm.create_model("example_convnet_tiny", features_only=True, out_indices=(-1,)).eval()
    assert features.feature_info.channels() == [32] and features(x)[0].shape == (2, 32, 16, 16)
    model = timm.create_model("example_convnet_tiny").eval()
    _, nodes = get_graph_node_names(model)
    assert "patch_embed" in nodes and "block.1" in nodes  # FX sees stem -> blocks -> head
    with torch.no_grad():
        assert torch.equal(create_feature_extractor(model, [nodes[-1]])(x)[nodes[-1]], model(x))


def test_every_home_the_page_names_exists():
    root = DOC.parents[1]
    named = set(re.findall(r"`((?:models|train|kernels|tests|configs)/[\w./]*)`", DOC.read_text()))
    assert len(named) >= 15
    for path in named:
        assert (root / path).exists(), f"docs/architecture.md names {path}, which does not exist"
