"""What the terminal shows during and after a run: `epoch k/N` with an ETA, and one closing line
with the best and final top-1 and where the checkpoints are."""

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spikeformers.train.main import _duration


def test_duration_is_short_and_exact():
    assert [_duration(s) for s in (0.4, 7.2, 65, 3725)] == ["0s", "7s", "1m05s", "1h02m05s"]


def test_a_run_shows_epoch_k_of_n_with_eta_and_ends_with_one_summary_line(tmp_path):
    exe = shutil.which("spikeformers-train", path=str(Path(sys.executable).parent))
    env = dict(os.environ, SPIKEFORMERS_LIF_COMPILE="0", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    run = tmp_path / "run"
    out = subprocess.run([exe, "debug=limit", f"hydra.run.dir={run}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    epochs = re.findall(r"^epoch (\d+)/(\d+): .*\((\d+\.\d)s(?:, ETA (\S+))?\)$", out.stdout, re.M)
    assert [(k, n) for k, n, _, _ in epochs] == [("1", "3"), ("2", "3"), ("3", "3")]
    assert all(eta for _, _, _, eta in epochs[:2]) and epochs[2][3] == ""  # no ETA after the last epoch
    (done,) = [line for line in out.stdout.splitlines() if line.startswith("done:")]
    assert re.fullmatch(rf"done: best top-1 \d+\.\d\d% \(epoch [123]\), final \d+\.\d\d%; checkpoints in "
                        rf"{re.escape(str(run / 'checkpoints'))}", done)
    assert out.stdout.rstrip().splitlines()[-1] == done
    logged = (run / "main.log").read_text()  # the run's log file gets the same lines
    assert all(f"epoch {k}/3: " in logged for k in (1, 2, 3)) and done in logged


def test_silent_layers_warn_after_warmup_and_only_inform_during_it(caplog):
    import logging

    from spikeformers.train.distributed import Dist
    from spikeformers.train.main import _warn_silent_layers

    ctx, stats = Dist("cpu"), {"dead_layers": ["block.0.attn.q_lif"], "saturated_layers": []}
    with caplog.at_level(logging.INFO, logger="spikeformers.train.main"):
        _warn_silent_layers(ctx, 0, stats, warmup_epochs=1)
        _warn_silent_layers(ctx, 1, stats, warmup_epochs=1)
    (during, after) = caplog.records
    assert during.levelno == logging.INFO and "warm-up" in during.getMessage() and "epoch 1:" in during.getMessage()
    assert after.levelno == logging.WARNING and "warm-up" not in after.getMessage() and "epoch 2:" in after.getMessage()


def test_cpu_runs_do_not_show_the_cuda_home_warning(monkeypatch):
    import logging

    import torch

    from spikeformers.train.cli import quiet_cuda_probe

    logger = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    quiet_cuda_probe()
    assert not logger.isEnabledFor(logging.WARNING)


def test_curves_show_lr_and_firing_rate_mark_the_best_epoch_and_name_the_run():
    import matplotlib.pyplot as plt

    from spikeformers.train.logging import curves_figure

    rows = [dict(epoch=e, lr=1e-3 / (e + 1), train_loss=2 - e / 4, test_loss=2.1 - e / 5, test_top1=acc,
                 firing_rate=0.1 + e / 100) for e, acc in enumerate([50.0, 80.0, 75.0, 60.0])]
    fig = curves_figure(rows, "sdt_tiny — run7")
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert titles == ["loss", "test accuracy", "learning rate", "mean firing rate (test)"]
        assert fig._suptitle.get_text() == "sdt_tiny — run7"
        acc = fig.axes[1]
        star = [line for line in acc.get_lines() if line.get_marker() == "*"]
        assert len(star) == 1 and list(star[0].get_xdata()) == [2] and list(star[0].get_ydata()) == [80.0]
        fig.canvas.draw()
        for ax in fig.axes:  # whole epochs on every x axis, counted from 1
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks) and min(ticks) >= 1
        assert list(fig.axes[2].get_lines()[0].get_ydata()) == [r["lr"] for r in rows]
    finally:
        plt.close(fig)


def test_presets_are_listed_one_line_each_as_the_docs_say():
    exe = shutil.which("spikeformers-train", path=str(Path(sys.executable).parent))
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert "`spikeformers-train --presets`" in docs
    out = subprocess.run([exe, "--presets"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    presets = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml"))
    listed = out.stdout.splitlines()
    assert [line.split()[0] for line in listed] == presets
    assert all(len(line.split(maxsplit=1)) == 2 and len(line) <= 131 and "§" not in line for line in listed)
    assert not any("no description" in line for line in listed)


class Terminal(io.StringIO):
    """stderr as a terminal: the tools draw their progress bars only there."""

    def isatty(self) -> bool:
        return True


def _qcfs_checkpoint(tmp_path: Path) -> Path:
    import torch
    from omegaconf import OmegaConf, open_dict

    from spikeformers.models.factory import build_model
    from spikeformers.train.cli import compose_config
    from spikeformers.train.data import DataInfo

    cfg = compose_config("train", ["experiment=qcfs_digits"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    path = tmp_path / "qcfs.pt"
    torch.save({"config": OmegaConf.to_container(cfg, resolve=True), "num_classes": 10, "ema": None,
                "model": build_model(cfg.model, DataInfo("digits", 10, 1, 32)).state_dict(), "model_name": "qcfs_vgg_tiny"}, path)
    return path


@pytest.mark.parametrize("tool", ["eval", "convert"])
def test_eval_and_convert_show_progress_on_a_terminal_only(tool, tmp_path, monkeypatch, capsys):
    """360 test digits in batches of 120: a bar that counts the 3 batches, on a terminal; nothing on a pipe."""
    if tool == "eval":
        from spikeformers.train.evaluate import main

        argv, label = ["model.name=sdt_tiny.digits", "model.pretrained=true", "batch_size=120"], "eval digits"
    else:
        from spikeformers.train.convert import main

        argv, label = ["qcfs", "--checkpoint", str(_qcfs_checkpoint(tmp_path)), "--T", "1,2", "--batch-size", "120"], "qcfs T=1..2"
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(argv) == 0
    bar = terminal.getvalue()
    assert label in bar and "3/3" in bar, bar
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file
    assert main(argv) == 0
    assert sys.stderr.getvalue() == ""
    quiet = Terminal()  # and switched off on a terminal too
    monkeypatch.setattr(sys, "stderr", quiet)
    assert main([*argv, "progress=false" if tool == "eval" else "--no-progress"]) == 0
    assert label not in quiet.getvalue()
    capsys.readouterr()
