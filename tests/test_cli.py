"""The command-line tools: where they live, how they report errors, and spikeformers-eval's
arguments (composed with Hydra's compose API, without touching sys.argv)."""

import json
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from spikeformers.models.factory import build_model
from spikeformers.train.cli import compose_config
from spikeformers.train.data import DataInfo

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_scripts_live_in_the_training_app(name):
    module, function = SCRIPTS[name].split(":")
    assert module.startswith("spikeformers.train."), f"{name} -> {module}"
    assert callable(getattr(import_module(module), function))


@pytest.fixture
def cifar_checkpoint(tmp_path):
    """A training checkpoint whose stored data set (cifar10) is missing on this machine; its
    weights fit digits (1 channel, 10 classes)."""
    cfg = compose_config("train", ["model.args={embed_dim: 16}", "data=cifar10", f"data.root={tmp_path / 'none'}"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    model = build_model(cfg.model, DataInfo("digits", 10, 1, 32))
    path = tmp_path / "last.pt"
    torch.save({"config": OmegaConf.to_container(cfg, resolve=True), "model": model.state_dict(), "ema": None,
                "num_classes": 10}, path)
    return path


def test_eval_uses_the_checkpoint_data_unless_the_command_line_names_one(cifar_checkpoint, tmp_path, capsys, monkeypatch):
    from spikeformers.train.evaluate import main

    argv = ["spikeformers-eval", "untouched"]
    monkeypatch.setattr(sys, "argv", list(argv))
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(cifar_checkpoint)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("spikeformers-eval: error: cifar10 not found")

    out = tmp_path / "eval.json"
    assert main(["data=digits", "--checkpoint", str(cifar_checkpoint), "batch_size=360", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "digits" and result["n_samples"] == 360 and result["checkpoint"] == str(cifar_checkpoint)
    assert sys.argv == argv


@pytest.mark.parametrize("argv, message", [
    (["no_such_key=1"], "Could not override 'no_such_key'"),
    (["checkpoint=missing.pt"], "checkpoint not found: missing.pt"),
])
def test_eval_usage_errors_exit_2_with_one_line(argv, message, capsys):
    from spikeformers.train.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("spikeformers-eval: error: ") and message in err


def test_convert_usage_error_exits_2(tmp_path, capsys):
    from spikeformers.train.convert import main

    with pytest.raises(SystemExit) as exit_info:
        main(["qcfs", "--checkpoint", str(tmp_path / "missing.pt")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("spikeformers-convert: error: checkpoint not found")
