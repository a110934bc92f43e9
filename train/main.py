"""Surrogate-gradient BPTT training of spiking transformers (``spikeformers-train``).

One readable loop; timm supplies the optimizer, scheduler, Mixup, losses and EMA, Hydra the
configuration (``pkg://spikeformers.configs``), torchrun/SLURM the processes. With no overrides it
trains ``sdt_tiny`` on the embedded digits set. Every run directory holds
``config.yaml``, ``metrics.csv``, ``curves.png`` and ``checkpoints/{last,best}.pt``.

The loop reads top-down: :func:`train` calls :func:`build` (data, model, optimizer, scheduler,
EMA, loss), :func:`restore` (resume), then per epoch :func:`train_one_epoch` and
:func:`end_of_epoch` (evaluation, checkpoint, logging).

Reproducibility: the sample order and every augmentation are seeded by (seed, epoch, step), so
``resume=<checkpoint>`` (or ``resume=auto``) continues exactly where the checkpoint left off.
SIGTERM/SIGUSR1/SIGUSR2 (preemption) and SIGINT (Ctrl-C) write a checkpoint at the next step
boundary and exit (75, EX_TEMPFAIL, after preemption; 130 after Ctrl-C); the run folder's ``status``
file says in one line how the run stands (running, finished, preempted, interrupted, failed). One training at a time holds a run folder,
and a new run never replaces an earlier run's files unless told to (``overwrite=true``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models.factory import build_model
from spikeformers.models.memory import packed_spikes
from spikeformers.train.checkpoint import (RunFolderError, RunFolderLock, atomic_write, copy_atomic, load_checkpoint,
                                           previous_run_files, recorded_best_epoch, remove_run_files, rng_state,
                                           save_checkpoint, set_rng_state)
from spikeformers.train.data import DataInfo, EpochSeeded, build_datasets, sample_seed
from spikeformers.train.distributed import (Dist, EpochSampler, PreemptionFlag, StopRequested, broadcast_buffers,
                                            check_replicas_in_sync, gather_floats, mean_across, set_threads,
                                            until_stopped)
from spikeformers.train.evaluate import ShardSampler, evaluate, to_model_input
from spikeformers.train.logging import MetricsCsv, NullLogger, WandbLogger, plot_curves
from spikeformers.train.losses import TrainingLoss, build_loss, build_mixup, distillation_loss, tet_loss

__all__ = ["train", "main", "build", "restore", "train_one_epoch", "end_of_epoch", "Job", "Progress", "Interrupted",
           "Preempted", "PREEMPTED_EXIT", "STATUS_FILE", "build_model", "tet_loss", "distillation_loss"]

log = logging.getLogger(__name__)


# --- state --------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything :func:`build` makes once for a run."""

    cfg: DictConfig
    ctx: Dist
    info: DataInfo
    raw_model: torch.nn.Module  # the weights: optimizer, EMA and checkpoints use this one
    model: torch.nn.Module  # what the loop calls: raw_model, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object  # a timm scheduler
    num_epochs: int
    ema: ModelEmaV3 | None
    loss: TrainingLoss
    mixup: Mixup | None
    scaler: torch.amp.GradScaler  # enabled only for float16 autocast on CUDA
    autocast: Callable[[], ContextManager]
    spike_storage: Callable[[], ContextManager]  # how spikes saved for backward are stored
    train_set: EpochSeeded
    test_loader: DataLoader
    batch_size: int  # per process
    steps_per_epoch: int

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"


@dataclass
class Progress:
    """Where the run stands; checkpoints store it and a resume restores it."""

    epoch: int = 0
    batch: int = 0  # the next batch of this epoch
    global_step: int = 0
    loss_sum: float = 0.0  # this epoch's training losses so far
    loss_count: int = 0
    best: dict = field(default_factory=lambda: {"top1": -1.0, "epoch": -1})
    history: list[dict] = field(default_factory=list)  # the metrics.csv rows

    def step_done(self, loss: float) -> None:
        self.batch += 1
        self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.loss_sum, self.loss_count = self.epoch + 1, 0, 0.0, 0


def checkpoint_state(job: Job, progress: Progress, partial_by_rank: list[list[float]] | None = None) -> dict:
    """Everything an exact resume needs, as tensors and plain types (``weights_only`` loading).
    ``partial_by_rank``: every rank's [loss sum, count] of this epoch so far (DDP)."""
    return {
        "model": job.raw_model.state_dict(),
        "optimizer": job.optimizer.state_dict(),
        "scheduler": job.scheduler.state_dict(),
        "ema": job.ema.state_dict() if job.ema is not None else None,
        "scaler": job.scaler.state_dict() if job.scaler.is_enabled() else None,
        "epoch": progress.epoch, "batch_in_epoch": progress.batch, "global_step": progress.global_step,
        "partial_loss": [progress.loss_sum, progress.loss_count],  # mid-epoch: this epoch's losses so far
        "partial_loss_by_rank": partial_by_rank or [[progress.loss_sum, progress.loss_count]],
        "best": progress.best, "history": progress.history,
        "rng": rng_state(),
        "threads": torch.get_num_threads(),  # float sums depend on it: a resume keeps the run's count
        "model_name": job.cfg.model.name,
        "choices": _hydra_choices(),  # the config names the user picked (model=vit_digits): what tools show
        "num_classes": job.info.num_classes,
        "config": OmegaConf.to_container(job.cfg, resolve=True),
    }


def _hydra_choices() -> dict[str, str | None]:
    """The config-group options of this run (``model: vit_digits``, ``experiment: ecmt_digits``);
    empty outside a Hydra run (``train(cfg)`` called from Python)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {str(k): (None if v is None else str(v)) for k, v in choices.items() if not str(k).startswith("hydra")}


# --- build --------------------------------------------------------------------------------------


def build(cfg: DictConfig, ctx: Dist) -> Job:
    """Data, model, optimizer, scheduler, Mixup, loss, EMA and mixed precision, in this order (the
    model and a teacher draw their initial weights from the seeded RNG)."""
    tcfg = cfg.trainer
    train_set, test_set, info = build_datasets(cfg.data)
    model, spike_storage = _build_model(cfg, ctx, info)
    batch_size, steps_per_epoch = _batch_geometry(cfg, ctx, len(train_set))
    optimizer, scheduler, num_epochs = _build_optimizer(cfg, model, steps_per_epoch)
    mixup = build_mixup(cfg.data, info)
    loss = build_loss(cfg, info, model, mixup is not None, ctx.device)
    ema = ModelEmaV3(model, decay=tcfg.ema.decay) if tcfg.ema.enable else None
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[tcfg.amp_dtype]
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=tcfg.amp and amp_dtype == torch.float16 and ctx.device.type == "cuda")
    test_loader = DataLoader(test_set, batch_size=cfg.data.eval_batch_size, sampler=ShardSampler(len(test_set), ctx.rank, ctx.world),
                             num_workers=cfg.data.num_workers, worker_init_fn=_ignore_ctrl_c)
    return Job(cfg, ctx, info, raw_model=model, model=model, optimizer=optimizer, scheduler=scheduler,
               num_epochs=num_epochs, ema=ema, loss=loss, mixup=mixup, scaler=scaler,
               autocast=partial(torch.autocast, ctx.device.type, dtype=amp_dtype) if tcfg.amp else nullcontext,
               spike_storage=spike_storage, train_set=EpochSeeded(train_set, cfg.seed), test_loader=test_loader,
               batch_size=batch_size, steps_per_epoch=steps_per_epoch)


def _build_model(cfg: DictConfig, ctx: Dist, info: DataInfo) -> tuple[torch.nn.Module, Callable[[], ContextManager]]:
    """The model on its device with the trainer's memory options; and the spike-storage context."""
    tcfg = cfg.trainer
    model = build_model(cfg.model, info).to(ctx.device)
    if tcfg.memory not in ("plain", "checkpoint", "packed"):
        raise ValueError(f"trainer.memory must be 'plain', 'checkpoint' or 'packed', got {tcfg.memory!r}")
    if tcfg.memory == "checkpoint":  # recompute blocks in backward: activation memory of one block
        model.set_grad_checkpointing(True)
    # packed: spikes kept for backward are stored as bits (models/memory.py), same gradients
    spike_storage = packed_spikes if tcfg.memory == "packed" else nullcontext
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.device.type == "cpu" and str(tcfg.get("cpu_speed") or "none") != "none":
        from spikeformers.train.speed import DEFAULT_OPTIONS, apply_cpu_speed

        # the same fp32 computation, reordered for the CPU's libraries (docs/performance.md)
        model = apply_cpu_speed(model, DEFAULT_OPTIONS if tcfg.cpu_speed == "default" else tcfg.cpu_speed)
    if tcfg.sync_bn and ctx.world > 1 and ctx.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if tcfg.freeze_backbone:  # fine-tuning: train only the classifier
        for pname, param in model.named_parameters():
            param.requires_grad = pname.startswith(("head.", "head_kd."))
    return model, spike_storage


def _batch_geometry(cfg: DictConfig, ctx: Dist, n_train: int) -> tuple[int, int]:
    """(per-process batch size, steps per epoch); ``data.batch_size`` is the global batch."""
    batch_size = cfg.data.batch_size // ctx.world
    if batch_size < 1 or (n_train // ctx.world) < batch_size:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} does not fit {n_train} training samples on {ctx.world} process(es)")
    steps_per_epoch = (n_train // ctx.world) // batch_size
    if cfg.trainer.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.trainer.max_steps_per_epoch)
    return batch_size, steps_per_epoch


def _build_optimizer(cfg: DictConfig, model: torch.nn.Module, steps_per_epoch: int):
    """(optimizer, scheduler, number of epochs including cooldown)."""
    optimizer = create_optimizer_v2(
        model, opt=cfg.optim.name, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        layer_decay=cfg.optim.layer_decay, filter_bias_and_bn=cfg.optim.get("filter_bias_and_bn", True),
        **OmegaConf.to_container(cfg.optim.kwargs, resolve=True),
    )
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched.name, num_epochs=cfg.trainer.epochs, warmup_epochs=cfg.sched.warmup_epochs,
        warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr, cooldown_epochs=cfg.sched.cooldown_epochs,
        step_on_epochs=cfg.sched.step_on_epochs, updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler, num_epochs


def restore(job: Job, path: Path | None) -> Progress:
    """Load a checkpoint into the job (weights, optimizer, scheduler, EMA, scaler, RNGs); the
    progress it recorded, or a fresh start when ``path`` is None."""
    if path is None:
        return Progress()
    state = load_checkpoint(path)
    job.raw_model.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    if job.ema is not None and state.get("ema") is not None:
        job.ema.load_state_dict(state["ema"])
    if state.get("scaler") is not None:
        job.scaler.load_state_dict(state["scaler"])  # a no-op when this run's scaler is disabled
    if state.get("threads") and job.cfg.trainer.get("threads") is None and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(state["threads"])  # auto may differ on another machine; the run's count stays exact
    loss_sum, loss_count = _own_partial_loss(state, job.ctx)
    progress = Progress(state["epoch"], state["batch_in_epoch"], state["global_step"], loss_sum, loss_count,
                        state["best"], state["history"])
    set_rng_state(state["rng"])
    if job.ctx.primary:
        print(f"resumed from {path}: epoch {progress.epoch}, batch {progress.batch}")
    return progress


def _own_partial_loss(state: dict, ctx: Dist) -> tuple[float, int]:
    """This rank's share of the interrupted epoch's training loss. On the number of processes the
    checkpoint was written with, each rank gets its own sums back; on another number, rank 0
    carries the totals (the epoch's mean needs only those)."""
    by_rank = state.get("partial_loss_by_rank")
    if by_rank is None:  # checkpoints written before every rank's sums were kept
        loss_sum, loss_count = state.get("partial_loss", (0.0, 0))
        return float(loss_sum), int(loss_count)
    if len(by_rank) == ctx.world:
        loss_sum, loss_count = by_rank[ctx.rank]
        return float(loss_sum), int(loss_count)
    if not ctx.primary:
        return 0.0, 0
    return float(sum(s for s, _ in by_rank)), int(sum(c for _, c in by_rank))


def _distribute(model: torch.nn.Module, cfg: DictConfig, ctx: Dist) -> torch.nn.Module:
    if ctx.world > 1:
        # static_graph: the official models keep parameters that never get gradients (norm1/norm2,
        # talking_heads, pos_embed); the used set is fixed, so DDP can skip them every step.
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                        static_graph=True)
    if cfg.trainer.compile:
        model = torch.compile(model)
    return model


# --- one epoch ----------------------------------------------------------------------------------


def train_one_epoch(job: Job, progress: Progress, stop: PreemptionFlag, report: Report) -> bool:
    """Train epoch ``progress.epoch`` from batch ``progress.batch``. Returns False when preempted
    (after checkpointing the step it stopped at)."""
    cfg, tcfg, ctx, epoch = job.cfg, job.cfg.trainer, job.ctx, progress.epoch
    loader = _epoch_loader(job, progress)
    job.model.train()
    show = ctx.primary and tcfg.progress and sys.stderr.isatty()
    bar = tqdm(total=job.steps_per_epoch, initial=progress.batch, desc=f"epoch {epoch}", disable=not show, leave=False)
    for images, target in loader:
        if progress.batch >= job.steps_per_epoch:
            break
        images, target = _training_batch(job, images, target, epoch, progress.batch)
        loss_value = _forward_backward(job, images, target)
        nonfinite, preempted = ctx.any(not math.isfinite(loss_value), stop.requested)
        if nonfinite:
            raise _nonfinite_loss(job, loss_value, epoch, progress.batch)
        _optimizer_step(job, progress)
        progress.step_done(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if preempted:
            bar.close()
            _checkpoint_and_say_why(job, progress, report, stop)
            return False
        if tcfg.save_every_steps and progress.global_step % tcfg.save_every_steps == 0:
            report.checkpoint(job, progress)
    bar.close()
    if cfg.sched.step_on_epochs:
        job.scheduler.step(epoch + 1)
    return True


def _epoch_loader(job: Job, progress: Progress) -> DataLoader:
    """This rank's batches of epoch ``progress.epoch`` from batch ``progress.batch`` on, with the
    epoch's augmentation seeds (and Mixup switched off from ``data.mixup.off_epoch``)."""
    cfg, ctx, epoch = job.cfg, job.ctx, progress.epoch
    job.train_set.set_epoch(epoch)
    if job.mixup is not None and cfg.data.mixup.off_epoch is not None and epoch >= cfg.data.mixup.off_epoch:
        job.mixup.mixup_enabled = False
    sampler = EpochSampler(len(job.train_set), job.batch_size, cfg.seed, epoch, ctx.rank, ctx.world, progress.batch)
    return DataLoader(job.train_set, batch_size=job.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                      drop_last=True, pin_memory=ctx.device.type == "cuda", worker_init_fn=_ignore_ctrl_c)


def _ignore_ctrl_c(worker_id: int) -> None:
    """Loader workers share the terminal's process group, so Ctrl-C reaches them too; the main
    process decides when to stop (after a checkpoint) and shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _checkpoint_and_say_why(job: Job, progress: Progress, report: Report, stop: PreemptionFlag) -> None:
    """A stop signal: write ``last.pt`` where the run stands, then the run's status, and say so in
    one line (the status first: under submitit the signal's next handler exits the process)."""
    report.checkpoint(job, progress)
    why = "interrupted" if stop.interrupted else "preempted"
    report.status(f"{why}: {stop.signal.name} at epoch {progress.epoch}, step {progress.batch}; "
                  f"checkpoint {job.last_checkpoint}; resume=auto continues")
    report.say(f"{why}: saved {job.last_checkpoint} at epoch {progress.epoch}, step {progress.batch} "
               f"({stop.signal.name}); resume=auto continues; exiting")


def _nonfinite_loss(job: Job, loss_value: float, epoch: int, step: int) -> FloatingPointError:
    kept = (f"; the last good checkpoint is {job.last_checkpoint}" if job.last_checkpoint.exists()
            else "; no checkpoint was written yet")
    return FloatingPointError(f"non-finite training loss ({loss_value}) at epoch {epoch}, step {step}; "
                              f"stopped before the update{kept}")


def _training_batch(job: Job, images: torch.Tensor, target: torch.Tensor, epoch: int, batch: int):
    """Inputs on the device in the model's layout, Mixup/CutMix applied."""
    images, target = to_model_input(images, job.info, job.ctx.device), target.to(job.ctx.device)
    if job.cfg.trainer.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    if job.mixup is not None and job.mixup.mixup_enabled:
        np.random.seed(sample_seed(job.cfg.seed, epoch, 10**9 + batch))  # mixup draws from numpy
        images, target = job.mixup(images, target)
    return images, target


def _forward_backward(job: Job, images: torch.Tensor, target: torch.Tensor) -> float:
    """Loss and (unscaled, clipped) gradients of one batch; returns the loss value."""
    with job.autocast(), job.spike_storage():
        loss = job.loss(job.model(images), images, target)
    job.optimizer.zero_grad(set_to_none=True)
    job.scaler.scale(loss).backward()
    job.scaler.unscale_(job.optimizer)
    if job.cfg.trainer.grad_clip:
        torch.nn.utils.clip_grad_norm_(job.raw_model.parameters(), job.cfg.trainer.grad_clip)
    return loss.item()


def _optimizer_step(job: Job, progress: Progress) -> None:
    job.scaler.step(job.optimizer)
    job.scaler.update()
    progress.global_step += 1
    if not job.cfg.sched.step_on_epochs:
        job.scheduler.step_update(progress.global_step)
    if job.ema is not None:
        job.ema.update(job.raw_model, step=progress.global_step)


# --- end of epoch -------------------------------------------------------------------------------


def end_of_epoch(job: Job, progress: Progress, report: Report, started: float, train_seconds: float,
                 stop: PreemptionFlag | None = None) -> bool:
    """Evaluate (the EMA weights when enabled), record the epoch's row, checkpoint (``best.pt``
    too when top-1 improved) and log. Returns False when a stop signal cut the evaluation short:
    nothing of it is recorded, and the checkpoint makes a resume redo this evaluation."""
    epoch = progress.epoch
    stats = _evaluate_unless_stopped(job, stop)
    if stats is None:
        _checkpoint_and_say_why(job, progress, report, stop)
        return False
    train_loss = mean_across(job.ctx, progress.loss_sum, progress.loss_count)
    row = _epoch_row(job, epoch, train_loss, stats, time.time() - started, train_seconds)
    _warn_silent_layers(job.ctx, epoch, stats, warmup_epochs=job.cfg.sched.get("warmup_epochs", 0) or 0)
    improved = stats["top1"] > progress.best["top1"]
    if improved:
        progress.best = {"top1": stats["top1"], "epoch": epoch}
    progress.history.append(row)
    progress.next_epoch()
    report.epoch_done(job, progress, row, improved)
    return True


def _evaluate_unless_stopped(job: Job, stop: PreemptionFlag | None) -> dict | None:
    """The test-set statistics of one model on every rank; None when a stop signal arrived first."""
    model = job.ema.module if job.ema is not None else job.raw_model
    broadcast_buffers(job.ctx, *([job.raw_model, job.ema.module] if job.ema is not None else [job.raw_model]))
    batches = loader = job.test_loader
    if stop is not None:
        per_rank = len(loader.dataset) // job.ctx.world  # the fewest test samples a rank gets
        batches = until_stopped(loader, stop, job.ctx, batches_on_every_rank=math.ceil(per_rank / loader.batch_size))
    try:
        with job.autocast():
            return evaluate(model, batches, job.info, job.ctx.device, world=job.ctx.world)
    except StopRequested:
        return None


def _epoch_row(job: Job, epoch: int, train_loss: float, stats: dict, seconds: float, train_seconds: float) -> dict:
    """One metrics.csv row (the column order is the file's)."""
    row = {"epoch": epoch, "lr": job.optimizer.param_groups[0]["lr"], "train_loss": round(train_loss, 6),
           "test_loss": round(stats["loss"], 6), "test_top1": round(stats["top1"], 4), "test_top5": round(stats["top5"], 4),
           "epoch_seconds": round(seconds, 3), "train_seconds": round(train_seconds, 3),
           "firing_rate": round(stats["firing_rate"], 6)}
    if stats.get("tokens_per_image") is not None:  # adaptive-token models (AT-SNN)
        row["tokens_per_image"] = round(stats["tokens_per_image"], 3)
    if job.cfg.trainer.log_block_rates:  # firing-rate monitor: mean rate per block on the test set
        row |= {f"fr_{block}": round(value, 6) for block, value in stats["block_rates"].items()}
    return row


def _warn_silent_layers(ctx: Dist, epoch: int, stats: dict, warmup_epochs: int = 0) -> None:
    """Layers that never fired (or always fired) on a whole test batch. During the LR warm-up that is
    usual (the BN statistics are still settling), so it is logged as information, not a warning."""
    for kind in ("dead", "saturated"):
        layers = stats[f"{kind}_layers"]
        if layers and ctx.primary:
            what = "never fired" if kind == "dead" else "fired at every step"
            in_warmup = epoch < warmup_epochs
            level = logging.INFO if in_warmup else logging.WARNING
            log.log(level, "epoch %d: %d LIF layer(s) %s on a whole test batch%s: %s", epoch + 1, len(layers),
                    what, " (LR warm-up: usually settles)" if in_warmup else "",
                    ", ".join(layers[:5]) + (" ..." if len(layers) > 5 else ""))


class Report:
    """What rank 0 writes: ``config.yaml``, ``metrics.csv``, ``curves.png``, checkpoints, the
    logger (wandb) and the console; the other ranks write nothing."""

    def __init__(self, cfg: DictConfig, ctx: Dist, history: list[dict]) -> None:
        self.out_dir, self.ctx, self.primary = Path(cfg.output_dir), ctx, ctx.primary
        self.metrics = MetricsCsv(self.out_dir / "metrics.csv", history) if self.primary else None
        self.logger = _make_logger(cfg, self.out_dir) if self.primary else NullLogger()
        self.epoch_seconds: list[float] = []  # this process's epochs, for the ETA
        self.title = f"{cfg.model.name} — {self.out_dir.name}"  # the curves' title: model and run folder

    def checkpoint(self, job: Job, progress: Progress) -> None:
        """Write ``last.pt``; every rank calls it (each rank's partial loss sums go into it)."""
        partial_by_rank = gather_floats(self.ctx, [progress.loss_sum, float(progress.loss_count)])
        if self.primary:
            save_checkpoint(checkpoint_state(job, progress, partial_by_rank), job.last_checkpoint)

    def say(self, message: str) -> None:
        """A line for the terminal, and for the run's log file (Hydra's ``<run>/main.log``)."""
        if self.primary:
            print(message, flush=True)
            _to_log_files(message)

    def status(self, line: str) -> None:
        """The run folder's one-line status (:func:`write_status`); rank 0 writes it."""
        if self.primary:
            write_status(self.out_dir, line)

    def epoch_done(self, job: Job, progress: Progress, row: dict, improved: bool) -> None:
        """The checkpoint first, then what derives from it: a kill between these writes leaves
        files that a resume puts right (:meth:`agree_with_history`)."""
        self.checkpoint(job, progress)
        if not self.primary:
            return
        if improved:
            copy_atomic(job.last_checkpoint, self.best_checkpoint)
        self.metrics.append(row)
        curves = plot_curves(self.metrics.rows, self.out_dir / "curves.png", self.title)
        self.logger.log({k: v for k, v in row.items() if k != "epoch"} | {"epoch": row["epoch"]}, step=progress.global_step)
        self.logger.log_image("curves", curves, step=progress.global_step)
        self.epoch_seconds.append(row["epoch_seconds"])
        left = job.num_epochs - (row["epoch"] + 1)
        eta = f", ETA {_duration(left * sum(self.epoch_seconds) / len(self.epoch_seconds))}" if left else ""
        self.say(f"epoch {row['epoch'] + 1}/{job.num_epochs}: train_loss {row['train_loss']:.4f}  "
                 f"test_loss {row['test_loss']:.4f}  top1 {row['test_top1']:.2f}%  top5 {row['test_top5']:.2f}%  "
                 f"fr {row['firing_rate']:.3f}  ({row['epoch_seconds']:.1f}s{eta})")

    def run_done(self, progress: Progress) -> None:
        """The one line a finished run ends with: best and final top-1, and where the checkpoints are."""
        if not progress.history:
            return
        best, final = progress.best, progress.history[-1]["test_top1"]
        self.status(f"finished: best top-1 {best['top1']:.2f}% (epoch {best['epoch'] + 1}), final {final:.2f}%; "
                    f"{len(progress.history)} epochs")
        self.say(f"done: best top-1 {best['top1']:.2f}% (epoch {best['epoch'] + 1}), final {final:.2f}%; "
                 f"checkpoints in {self.best_checkpoint.parent}")

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / "checkpoints" / "best.pt"

    def agree_with_history(self, progress: Progress, resumed_from: Path) -> None:
        """After a resume: ``metrics.csv``, ``curves.png`` and ``best.pt`` as the checkpoint's
        history says. A kill -9 can land between the files an epoch writes (``last.pt`` is always
        first), so any of the others may be a step behind, or ahead of the checkpoint."""
        if not self.primary:
            return
        if progress.history or self.metrics.path.exists():
            self.metrics.rewrite()
        curves = self.out_dir / "curves.png"
        if progress.history:
            plot_curves(self.metrics.rows, curves, self.title)
        else:
            curves.unlink(missing_ok=True)
        self._repair_best(progress, resumed_from)

    def _repair_best(self, progress: Progress, resumed_from: Path) -> None:
        best_epoch = progress.best["epoch"]
        if best_epoch < 0 or recorded_best_epoch(self.best_checkpoint) == best_epoch:
            return
        if (progress.epoch, progress.batch) == (best_epoch + 1, 0):  # the state at the end of the best epoch
            copy_atomic(resumed_from, self.best_checkpoint)
            self.say(f"repaired {self.best_checkpoint}: the history's best epoch is {best_epoch}")
        else:
            log.warning("%s does not hold the history's best epoch %d and its weights are gone; it is rewritten "
                        "when top-1 improves", self.best_checkpoint, best_epoch)


def _to_log_files(message: str) -> None:
    """``message`` into the log files of the root logger only (the terminal got it from print)."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 7.2 -> '7s'."""
    s = int(round(seconds))
    h, m = s // 3600, s % 3600 // 60
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


# --- the run ------------------------------------------------------------------------------------


# sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"): the run was stopped
# by a scheduler's signal after its checkpoint and continues with resume=auto. Not 0, so a scheduler
# (or a script around torchrun) does not count the job as done; not 1, so it is not a crash.
PREEMPTED_EXIT = 75
# <run folder>/status: one line, its first word the state: running, finished, preempted, interrupted, failed
STATUS_FILE = "status"


def write_status(out_dir: Path, line: str) -> None:
    atomic_write(Path(out_dir) / STATUS_FILE, lambda p: p.write_text(line + "\n"))


class Preempted(SystemExit):
    """A scheduler's stop signal (SIGTERM, SIGUSR1, SIGUSR2) ended the run after its checkpoint:
    exit status :data:`PREEMPTED_EXIT`."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT)


class Interrupted(SystemExit):
    """Ctrl-C (SIGINT) stopped the run after its checkpoint: exit status 130 (128 + SIGINT), as
    shells report a program that Ctrl-C ended, and no traceback."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGINT)


def train(cfg: DictConfig) -> dict:
    """Run one training job described by ``cfg``; returns the final/best metrics, or
    ``{"preempted": True, ...}`` after a scheduler's stop signal. Raises :class:`Interrupted`
    after Ctrl-C and :class:`RunFolderError` when the run folder is busy or holds another run."""
    ctx = Dist(cfg.trainer.device)
    threads = torch.get_num_threads()  # trainer.threads applies to this run only, not to a caller's process
    try:
        with _claimed_run_folder(cfg, ctx):
            try:
                return _run(cfg, ctx)
            except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint
                _last_status(ctx, cfg, "interrupted: a second Ctrl-C stopped the run without a checkpoint")
                raise
            except Exception as error:
                first = (str(error).strip().splitlines() or [""])[0][:300]
                _last_status(ctx, cfg, f"failed: {type(error).__name__}: {first}")
                raise
    finally:
        torch.set_num_threads(threads)
        ctx.close()


def _last_status(ctx: Dist, cfg: DictConfig, line: str) -> None:
    """The status of a run that ends with an error; never hides that error (a read-only folder)."""
    if ctx.primary:
        try:
            write_status(cfg.output_dir, line)
        except OSError:
            pass


def _run(cfg: DictConfig, ctx: Dist) -> dict:
    if ctx.primary:
        write_status(cfg.output_dir, f"running: pid {os.getpid()}")
    threads = set_threads(cfg.trainer.get("threads"))
    chosen = cfg.trainer.get("threads")
    log.info("CPU threads: %d (%s)", threads, f"trainer.threads={chosen}" if chosen else
             "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "trainer.threads=null: the available CPUs but one")
    _seed(cfg, ctx)
    if ctx.primary:
        atomic_write(Path(cfg.output_dir) / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(cfg, resolve=True)))
    job = build(cfg, ctx)
    resume_path = _resume_path(cfg.resume, job.last_checkpoint)
    progress = restore(job, resume_path)
    job.model = _distribute(job.raw_model, cfg, ctx)
    report = Report(cfg, ctx, progress.history)
    if resume_path is not None:
        report.agree_with_history(progress, resume_path)
    stop = PreemptionFlag()
    try:
        while progress.epoch < job.num_epochs:
            started = time.time()
            if not (train_one_epoch(job, progress, stop, report)
                    and end_of_epoch(job, progress, report, started, time.time() - started, stop)):
                report.logger.finish()
                if stop.interrupted:
                    raise Interrupted
                stop.pass_on()
                return {"preempted": True, "epoch": progress.epoch, "signal": stop.signal.name}
        if ctx.world > 1:
            check_replicas_in_sync(ctx, job.raw_model)
        best = progress.best
        report.logger.finish({"best_acc": best["top1"], "best_epoch": best["epoch"]})
        report.run_done(progress)
        final = progress.history[-1]["test_top1"] if progress.history else None
        return {"best_top1": best["top1"], "best_epoch": best["epoch"], "final_top1": final}
    finally:
        stop.restore()


@contextmanager
def _claimed_run_folder(cfg: DictConfig, ctx: Dist) -> Iterator[None]:
    """Rank 0 locks the run folder for the life of the run and checks that this command may write
    into it; every rank learns the outcome, so all of them stop together."""
    out_dir = Path(cfg.output_dir)
    with ExitStack() as held:
        refusal = None
        if ctx.primary:
            try:
                held.enter_context(RunFolderLock(out_dir))
                _take_over_run_folder(cfg, out_dir)
            except RunFolderError as err:
                refusal = err
        if ctx.any(refusal is not None)[0]:
            raise refusal or RunFolderError(f"rank 0 could not claim the run folder {out_dir}; see its message")
        yield


def _take_over_run_folder(cfg: DictConfig, out_dir: Path) -> None:
    """Refuse to write into a folder that holds an earlier run unless this run continues it
    (``resume=auto`` or one of its checkpoints) or the user said ``overwrite=true``."""
    resume, overwrite = cfg.resume, bool(cfg.get("overwrite", False))
    if overwrite and resume not in (None, "", False):
        raise RunFolderError(f"overwrite=true starts {out_dir} over, so it cannot go with resume={resume}; "
                             "pass one of them")
    previous = previous_run_files(out_dir)
    if not previous:
        return
    if overwrite:
        removed = remove_run_files(out_dir)
        print(f"overwrite=true: removed the earlier run's {', '.join(removed)} from {out_dir}", flush=True)
        return
    held = ", ".join(previous)
    if resume in (None, "", False):
        raise RunFolderError(f"{out_dir} already holds a run ({held}); continue it with resume=auto, "
                             "or replace it with overwrite=true")
    if resume == "auto" or _is_inside(resume, out_dir / "checkpoints"):
        return
    raise RunFolderError(f"{out_dir} already holds a run ({held}) and resume={resume} is not one of its "
                         "checkpoints; choose another hydra.run.dir, or replace that run with overwrite=true")


def _is_inside(path, folder: Path) -> bool:
    return Path(path).resolve().parent == folder.resolve()


def _seed(cfg: DictConfig, ctx: Dist) -> None:
    torch.manual_seed(cfg.seed + ctx.rank)
    np.random.seed((cfg.seed + ctx.rank) % 2**32)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _resume_path(resume, last_checkpoint: Path) -> Path | None:
    if resume in (None, "", False):
        return None
    if resume == "auto":  # SLURM requeue: continue if this run dir already has a checkpoint
        return last_checkpoint if last_checkpoint.exists() else None
    return Path(resume)


def _make_logger(cfg: DictConfig, out_dir: Path):
    if cfg.logger.name == "wandb":
        return WandbLogger(cfg.logger, OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), out_dir)
    return NullLogger()


# --- entry points ------------------------------------------------------------------------------


@hydra.main(config_path="pkg://spikeformers.configs", config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """One Hydra job. Before anything is built: the typed config fields, and the model a resume
    checkpoint holds; the user's mistakes, then and during the run, end as one line
    (``spikeformers-train: error: ...``, exit 2; docs/errors.md)."""
    from spikeformers.models.factory import check_same_model, training_checkpoint
    from spikeformers.train.cli import TRAIN_FIELDS, check_fields, user_errors

    with user_errors("spikeformers-train"):
        check_fields(cfg, TRAIN_FIELDS)
        resume = Path(cfg.output_dir) / "checkpoints" / "last.pt" if cfg.resume == "auto" else cfg.resume
        if resume and (cfg.resume != "auto" or Path(resume).exists()):
            check_same_model(training_checkpoint(resume, "resume checkpoint"), cfg.model.name, resume,
                             hint="resume a run of the same model; a new model needs a new run folder")
        result = train(cfg)
    if result.get("preempted"):  # after the checkpoint and the status line: tell the scheduler
        raise Preempted
    return result.get("best_top1")


def presets_listing() -> str:
    """``spikeformers-train --presets``: every ``experiment=`` preset with the first sentence of
    its description (the comment that opens the preset file)."""
    folder = resources.files("spikeformers.configs") / "experiment"
    lines = []
    for preset in sorted(f for f in folder.iterdir() if f.name.endswith(".yaml")):
        comment = [line[1:].strip() for line in preset.read_text().splitlines()
                   if line.startswith("#") and not line.startswith("# @package")]
        text = " ".join(comment)
        first = text.split(". ")[0].rstrip(".") if text else "(no description)"
        first = first if len(first) <= 100 else first[:99].rstrip() + "…"
        lines.append(f"{preset.name[:-5]:<30} {first}")
    return "\n".join(lines)


def main() -> None:
    """Console script ``spikeformers-train``: Hydra owns the command line. Non-primary DDP ranks
    skip Hydra's own log files; every rank uses the same ``hydra.run.dir``."""
    if sys.argv[1:] == ["--presets"]:
        print(presets_listing())
        return
    if int(os.environ.get("RANK", 0)) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    from spikeformers.train.cli import TRAIN_FIELDS, check_hydra_overrides, user_errors

    # Overrides Hydra cannot apply, and typed fields that do not fit, end as one line before Hydra
    # makes a run folder (Hydra itself would print a multi-line block).
    with user_errors("spikeformers-train"):
        check_hydra_overrides("train", sys.argv[1:], TRAIN_FIELDS)
    hydra_main()


if __name__ == "__main__":
    main()
