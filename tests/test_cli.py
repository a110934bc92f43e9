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


# --- spikeformers-convert: names and units ------------------------------------------------------


def _ann_checkpoint(tmp_path: Path, model: str, overrides: list[str], choices: dict | None) -> Path:
    """A spikeformers-train checkpoint of an untrained ANN on digits (conversion needs no accuracy)."""
    cfg = compose_config("train", [f"model={model}", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    ann = build_model(cfg.model, DataInfo("digits", 10, 1, 32))
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    state = {"config": OmegaConf.to_container(cfg, resolve=True), "model": ann.state_dict(), "ema": None,
             "num_classes": 10, "model_name": cfg.model.name}
    torch.save(state | ({"choices": choices} if choices is not None else {}), path)
    return path


def test_the_digits_vit_is_shown_by_the_config_name_the_user_chose(tmp_path):
    from spikeformers.train.evaluate import model_label

    state = {"config": {"model": {"name": "vit_tiny_patch16_224"}}, "model_name": "vit_tiny_patch16_224"}
    assert model_label(state | {"choices": {"model": "vit_digits"}}) == "vit_digits (vit_tiny_patch16_224)"
    assert model_label(state | {"choices": {"model": "ann"}}) == "vit_tiny_patch16_224"  # a base config names nothing
    qcfs = {"config": {"model": {"name": "qcfs_vgg_tiny"}}, "model_name": "qcfs_vgg_tiny", "choices": {"model": "qcfs"}}
    assert model_label(qcfs) == "qcfs_vgg_tiny"
    # a checkpoint written before checkpoints recorded the choice: the run folder's .hydra/hydra.yaml has it
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      model: vit_digits\n")
    assert model_label(state, run / "checkpoints" / "best.pt") == "vit_digits (vit_tiny_patch16_224)"
    assert model_label(state, tmp_path / "elsewhere.pt") == "vit_tiny_patch16_224"


def _headers(table: str) -> list[str]:
    return [h.strip() for h in table.splitlines()[1].split("  ") if h.strip()]


@pytest.mark.parametrize("method, model, overrides, energy_header, other_unit", [
    ("ecmt", "vit_digits", [], "E_SNN/E_ANN (ratio)", "mJ"),
    ("qcfs", "qcfs", ["model.name=qcfs_vgg_tiny", "model.args={levels: 4}"], "energy (mJ/sample)", "E_SNN"),
])
def test_convert_table_names_the_chosen_model_and_gives_every_column_its_unit(
        method, model, overrides, energy_header, other_unit, tmp_path, capsys, monkeypatch):
    import matplotlib.pyplot as plt

    from spikeformers.train.convert import main

    ckpt = _ann_checkpoint(tmp_path, model, overrides, {"model": model, "experiment": None})
    titles = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (titles.append(fig.axes[0].get_title()), real_close(fig)))
    out = tmp_path / "result.json"
    assert main([method, "--checkpoint", str(ckpt), "--T", "1,2", "--max-samples", "8", "--batch-size", "8",
                 "--calib-batches", "1", "--energy", "--json", str(out), "--plot", str(tmp_path / "acc.png")]) == 0
    table = capsys.readouterr().out.strip()
    label = "vit_digits (vit_tiny_patch16_224)" if model == "vit_digits" else "qcfs_vgg_tiny"
    assert table.splitlines()[0].startswith(f"{method.upper()} {label}: ANN top-1 ")
    assert titles == [f"{method.upper()}: {label}"]
    headers = _headers(table)
    assert headers == ["T (steps)", "top-1 (%)", "rel. error (ratio)", energy_header]
    assert all(h.endswith(")") for h in headers) and other_unit not in table.splitlines()[1]
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["1", "2"]
    saved = json.loads(out.read_text())
    field = {"ecmt": "energy_ratio", "qcfs": "energy_mJ"}[method]
    assert saved["label"] == label and saved["model"] in label  # "model": the name to build it by
    assert all(field in row and "energy" not in row for row in saved["snn"])


@pytest.mark.parametrize("module", ["evaluate", "energy", "convert", "hub_cli"])
def test_every_option_of_every_tool_has_help_text(module, monkeypatch, capsys):
    """Five CLIs, one style: --help explains every option (eval's shows --checkpoint and --json)."""
    import argparse

    silent = []
    real_add = argparse._ActionsContainer.add_argument  # parsers, sub-command parsers and groups

    def add_argument(self, *names, **kwargs):
        if not kwargs.get("help") and kwargs.get("action") != "help":
            silent.append(names)
        return real_add(self, *names, **kwargs)

    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", add_argument)
    with pytest.raises(SystemExit) as exit_info:
        import_module(f"spikeformers.train.{module}").main(["--help"])
    assert exit_info.value.code == 0 and not silent, silent
    if module == "evaluate":
        shown = capsys.readouterr().out
        assert "--checkpoint" in shown and "--json" in shown and "KEY=VALUE" in shown
