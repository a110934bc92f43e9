"""Run outputs: ``metrics.csv`` (always), ``curves.png``, and optional Weights & Biases."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from spikeformers.train.checkpoint import atomic_write

__all__ = ["MetricsCsv", "plot_curves", "WandbLogger", "NullLogger"]

REQUIRED_COLUMNS = ["epoch", "lr", "train_loss", "test_loss", "test_top1", "test_top5", "epoch_seconds"]


class MetricsCsv:
    """One row per epoch. The whole file is rewritten atomically after each epoch, so a crash
    never leaves a partial row; ``rows`` is restored from the checkpoint on resume."""

    def __init__(self, path: str | Path, rows: list[dict] | None = None) -> None:
        self.path = Path(path)
        self.rows = list(rows or [])

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))
        self.rewrite()

    def rewrite(self) -> None:
        """The file as ``rows`` says (a header alone when there are none)."""
        columns = REQUIRED_COLUMNS + sorted({k for r in self.rows for k in r} - set(REQUIRED_COLUMNS))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, lambda tmp: tmp.write_text(buffer.getvalue()))


def plot_curves(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """``curves_figure`` as a PNG (written atomically)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(rows, title)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def curves_figure(rows: list[dict], title: str = ""):
    """Four panels per epoch (counted from 1, as the terminal does): train/test loss, test top-1
    with the best epoch marked, the learning rate, and the mean firing rate. ``title`` names the
    run (model and run folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) + 1 for r in rows]
    top1 = [float(r["test_top1"]) for r in rows]
    best = max(range(len(rows)), key=lambda i: top1[i]) if rows else None
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    (ax_loss, ax_acc), (ax_lr, ax_fr) = axes
    ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], marker="o", label="train")
    ax_loss.plot(epochs, [float(r["test_loss"]) for r in rows], marker="o", label="test")
    ax_loss.set(ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, top1, marker="o", color="tab:green")
    if best is not None:
        ax_acc.plot([epochs[best]], [top1[best]], marker="*", markersize=16, color="tab:red", linestyle="",
                    label=f"best {top1[best]:.2f}% (epoch {epochs[best]})")
        ax_acc.legend(loc="lower right")
    ax_acc.set(ylabel="top-1 (%)", title="test accuracy")
    ax_lr.plot(epochs, [float(r.get("lr", "nan")) for r in rows], marker="o", color="tab:purple")
    ax_lr.set(ylabel="learning rate", title="learning rate")
    ax_fr.plot(epochs, [float(r.get("firing_rate", "nan")) for r in rows], marker="o", color="tab:orange")
    ax_fr.set(ylabel="spikes per neuron and step", title="mean firing rate (test)")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class NullLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def finish(self, summary: dict | None = None) -> None:
        pass


class WandbLogger(NullLogger):
    """Thin wrapper: ``mode`` online/offline/disabled; the run lives in ``<out_dir>/wandb``."""

    def __init__(self, cfg, config: dict, out_dir: Path) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name,
            tags=list(cfg.tags or []),
            group=cfg.group,
            mode=cfg.mode,
            dir=str(out_dir),
            config=config,
            resume="allow" if cfg.run_id else None,
            id=cfg.run_id,
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def finish(self, summary: dict | None = None) -> None:
        for key, value in (summary or {}).items():
            self.run.summary[key] = value
        self.run.finish()
