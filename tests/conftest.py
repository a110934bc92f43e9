"""Shared fixtures. The official key lists (tests/reference/keys*) are copies of the project's
reference data (shared/reference), vendored so the suite runs from a plain checkout."""

import json
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).parent / "reference"

# Official configuration (reference file stem) -> (our timm name, num_classes).
OFFICIAL_CONFIGS = {
    "sf_cifar10_4_384": ("spikformer_cifar_4_384", 10),
    "sf_cifar100_4_384": ("spikformer_cifar_4_384", 100),
    "sf_cifar10_4_256": ("spikformer_cifar_4_256", 10),
    "sf_cifar10_2_384": ("spikformer_cifar_2_384", 10),
    "sf_imagenet_8_384": ("spikformer_imagenet_8_384", 1000),
    "sf_imagenet_8_512": ("spikformer_imagenet_8_512", 1000),
    "sf_imagenet_10_512": ("spikformer_imagenet_10_512", 1000),
    "sf_imagenet_8_768": ("spikformer_imagenet_8_768", 1000),
    "sf_cifar10dvs_2_256": ("spikformer_cifar10dvs_2_256", 10),
    "sdt_cifar10_2_256": ("sdt_cifar_2_256", 10),
    "sdt_cifar10_2_512": ("sdt_cifar_2_512", 10),
    "sdt_cifar100_2_256": ("sdt_cifar_2_256", 100),
    "sdt_cifar100_2_512": ("sdt_cifar_2_512", 100),
    "sdt_cifar10dvs_2_256": ("sdt_cifar10dvs_2_256", 10),
    "sdt_gesture_2_256": ("sdt_gesture_2_256", 11),
    "sdt_imagenet_8_384": ("sdt_imagenet_8_384", 1000),
    "sdt_imagenet_6_512": ("sdt_imagenet_6_512", 1000),
    "sdt_imagenet_8_512": ("sdt_imagenet_8_512", 1000),
    "sdt_imagenet_10_512": ("sdt_imagenet_10_512", 1000),
    "sdt_imagenet_8_768": ("sdt_imagenet_8_768", 1000),
}


def reference_file(config: str, suffix: str) -> Path:
    """``<config><suffix>`` from reference/keys (Spikformer, SDT v1) or reference/keys_more
    (Spikingformer, SDT v2, QKFormer)."""
    for folder in ("keys", "keys_more"):
        path = REFERENCE / folder / f"{config}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(f"no reference file {config}{suffix} in {REFERENCE}/keys or keys_more")


def read_key_list(config: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parse ``<config>.txt``: ``key [d0,d1,...]`` per line, in official state_dict order."""
    entries = []
    for line in reference_file(config, ".txt").read_text().splitlines():
        if line.strip():
            key, shape = line.rsplit(" ", 1)
            entries.append((key, tuple(json.loads(shape))))
    return entries


def read_summary(config: str) -> dict:
    return json.loads(reference_file(config, ".json").read_text())


def assert_matches_official(model: torch.nn.Module, config: str) -> None:
    """``model``'s state_dict has the official keys in official order, the official shapes, and
    the exact parameter / state-tensor / BN-buffer counts of ``config``'s summary."""
    state = model.state_dict()
    expected = read_key_list(config)
    summary = read_summary(config)
    assert list(state) == [k for k, _ in expected], "keys (and their order) differ"
    for key, shape in expected:
        assert tuple(state[key].shape) == shape, key
    assert sum(p.numel() for p in model.parameters()) == summary["n_params"]
    assert len(state) == summary["n_state_tensors"]
    buffers = sum(v.numel() for k, v in state.items() if k.rsplit(".", 1)[-1].startswith(("running", "num_batches")))
    assert buffers == summary["n_buffers_elems"]


def official_state(config: str) -> dict[str, torch.Tensor]:
    """A random state_dict in the official layout of ``config`` (for strict-loading tests)."""
    return {
        key: torch.randint(0, 5, shape) if key.endswith("num_batches_tracked") else torch.randn(shape)
        for key, shape in read_key_list(config)
    }


class Reference:
    """Access to the official key lists for tests (``reference`` fixture)."""

    configs = OFFICIAL_CONFIGS
    read_key_list = staticmethod(read_key_list)
    read_summary = staticmethod(read_summary)
    assert_matches_official = staticmethod(assert_matches_official)
    official_state = staticmethod(official_state)


@pytest.fixture
def reference() -> Reference:
    return Reference()


def pytest_generate_tests(metafunc):
    # Tests that take ``official_config`` run once per official configuration.
    if "official_config" in metafunc.fixturenames:
        metafunc.parametrize("official_config", sorted(OFFICIAL_CONFIGS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def eager_lif():
    """The eager LIF loops for a whole test module (tiny inputs: faster than compiling them, the same
    results). Use with ``pytestmark = pytest.mark.usefixtures("eager_lif")``."""
    import os

    before = os.environ.get("SPIKEFORMERS_LIF_COMPILE")
    os.environ["SPIKEFORMERS_LIF_COMPILE"] = "0"
    yield
    if before is None:
        del os.environ["SPIKEFORMERS_LIF_COMPILE"]
    else:
        os.environ["SPIKEFORMERS_LIF_COMPILE"] = before


def _analysable_zoo_model(name: str):
    """A registered tiny model ready for the energy and NeuroBench counters: T = 2, every BN bias 1
    (enough firing in eval mode for every path to carry spikes); an ANN (``qcfs_*``) is converted
    to its SNN. Returns (model, input channels)."""
    import timm
    from torch import nn

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.bias.data.fill_(1.0)
    if name.startswith("qcfs_"):
        from spikeformers.models.qcfs import to_snn

        return to_snn(model, T=2), model.pretrained_cfg["input_size"][0]
    model.T = 2
    return model, model.in_chans


@pytest.fixture(scope="session")
def zoo_model():
    """``zoo_model(name)`` -> (model, input channels): see :func:`_analysable_zoo_model`."""
    return _analysable_zoo_model


def _lively(model: torch.nn.Module, seed: int = 1, qkv_bias: float = 1.0, stream_bias: float = 0.1) -> torch.nn.Module:
    """BN parameters and statistics under which a random model fires at 64×64 (fresh ones barely
    do at ≤ 64×64, and attention not at all): BN biases ~0.1 on the stream, ~1 before the q/k/v
    neurons (so that Q, K and V carry counts ≥ 1 and the attention output fires)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                qkv = any(f".{p}_conv" in name for p in "qkv")
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3 + (qkv_bias if qkv else stream_bias))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="session")
def lively():
    """``lively(model, seed=1, qkv_bias=1.0, stream_bias=0.1)``: see :func:`_lively`."""
    return _lively
