"""Surrogate-gradient BPTT training of spiking transformers (``spikeformers-train``).

One readable loop; timm supplies the optimizer, scheduler, Mixup, losses and EMA, Hydra the
configuration (``pkg://spikeformers.configs``), torchrun/SLURM the processes. With no overrides it
trains ``spikformer_tiny`` on the embedded digits set. Every run directory holds
``config.yaml``, ``metrics.csv``, ``curves.png`` and ``checkpoints/{last,best}.pt``.

Reproducibility: the sample order and every augmentation are seeded by (seed, epoch, step), so
``resume=<checkpoint>`` (or ``resume=auto``) continues exactly where the checkpoint left off.
SIGTERM/SIGUSR1 (preemption) write a checkpoint at the next step boundary and exit cleanly.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models.factory import build_model
from spikeformers.models.memory import packed_spikes
from spikeformers.train.checkpoint import atomic_write, copy_atomic, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from spikeformers.train.data import DataInfo, EpochSeeded, build_datasets, sample_seed
from spikeformers.train.evaluate import ShardSampler, evaluate, to_model_input
from spikeformers.train.logging import MetricsCsv, NullLogger, WandbLogger, plot_curves

__all__ = ["train", "main", "build_model", "tet_loss", "distillation_loss"]

log = logging.getLogger(__name__)


# --- distributed -------------------------------------------------------------------------------


class Dist:
    """Process-group facts. DDP iff the launcher set WORLD_SIZE > 1 (torchrun, SLURM/submitit)."""

    def __init__(self, device_cfg: str) -> None:
        if "SLURM_JOB_ID" in os.environ and "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export()  # sets RANK, WORLD_SIZE, ...
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_cfg == "auto":
            device_cfg = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{self.local_rank}" if device_cfg == "cuda" else device_cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            # CUDA: NCCL for GPU tensors plus gloo for the few CPU tensors (metrics) we reduce.
            dist.init_process_group("cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo")
        self.primary = self.rank == 0

    def any(self, *flags: bool) -> list[bool]:
        """Logical OR of per-rank flags across ranks (so every rank stops at the same step)."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class EpochSampler(Sampler):
    """Shuffled, rank-sharded indices for one epoch, seeded by (seed, epoch), starting at
    ``start`` (a resumed mid-epoch run skips the samples it already trained on)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int, start_batch: int = 0):
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
        order = torch.randperm(n, generator=g).tolist()
        per_rank = (n // world) // batch_size * batch_size  # equal, whole batches on every rank
        self.indices = order[rank * per_rank : (rank + 1) * per_rank][start_batch * batch_size :]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --- model and loss ----------------------------------------------------------------------------


def tet_loss(per_step_logits: torch.Tensor, target: torch.Tensor, lam: float, phi: float, criterion) -> torch.Tensor:
    """TET (architectures.md §6.3): (1 - λ) mean_t CE(out_t, y) + λ MSE(out, φ)."""
    ce = torch.stack([criterion(step, target) for step in per_step_logits]).mean()
    return (1 - lam) * ce + lam * F.mse_loss(per_step_logits, torch.full_like(per_step_logits, phi))


def distillation_loss(output: tuple, images: torch.Tensor, target: torch.Tensor, criterion, teacher, alpha: float) -> torch.Tensor:
    """Loss of a two-head model (more_families.md §2.8, DeiT hard distillation):
    (1 − α)·criterion(head, y) + α·CE(head_kd, argmax teacher(x)). Without a teacher the
    distillation head learns the labels too: ½·criterion(head, y) + ½·criterion(head_kd, y)."""
    logits, logits_kd = output
    if teacher is None:
        return 0.5 * (criterion(logits, target) + criterion(logits_kd, target))
    with torch.no_grad():
        teacher_labels = teacher(images if images.dim() == 4 else images.mean(0)).argmax(1)
    return (1 - alpha) * criterion(logits, target) + alpha * F.cross_entropy(logits_kd, teacher_labels)


def build_teacher(dcfg: DictConfig, info: DataInfo, device: torch.device) -> torch.nn.Module | None:
    if not dcfg.teacher:
        return None
    overlay = dict(file=str(dcfg.teacher_checkpoint)) if dcfg.teacher_checkpoint else None
    teacher = timm.create_model(dcfg.teacher, pretrained=bool(dcfg.teacher_pretrained or overlay),
                                pretrained_cfg_overlay=overlay, num_classes=info.num_classes, in_chans=info.in_chans)
    return teacher.to(device).eval().requires_grad_(False)


# --- the loop ----------------------------------------------------------------------------------


def train(cfg: DictConfig) -> dict:
    """Run one training job described by ``cfg``; returns the final/best metrics."""
    ctx = Dist(cfg.trainer.device)
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    tcfg = cfg.trainer
    torch.manual_seed(cfg.seed + ctx.rank)
    np.random.seed((cfg.seed + ctx.rank) % 2**32)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if ctx.primary:
        atomic_write(out_dir / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(cfg, resolve=True)))

    # data and model
    train_set, test_set, info = build_datasets(cfg.data)
    model = build_model(cfg.model, info).to(ctx.device)
    if tcfg.memory not in ("plain", "checkpoint", "packed"):
        raise ValueError(f"trainer.memory must be 'plain', 'checkpoint' or 'packed', got {tcfg.memory!r}")
    if tcfg.memory == "checkpoint":  # recompute blocks in backward: activation memory of one block
        model.set_grad_checkpointing(True)
    # packed: spikes kept for backward are stored as bits (models/memory.py), same gradients
    spike_storage = packed_spikes if tcfg.memory == "packed" else nullcontext
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tcfg.sync_bn and ctx.world > 1 and ctx.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    batch_size = cfg.data.batch_size // ctx.world  # data.batch_size is the global batch
    if batch_size < 1 or (len(train_set) // ctx.world) < batch_size:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} does not fit {len(train_set)} training samples on {ctx.world} process(es)")
    steps_per_epoch = (len(train_set) // ctx.world) // batch_size
    if tcfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tcfg.max_steps_per_epoch)

    if tcfg.freeze_backbone:  # fine-tuning: train only the classifier
        for pname, param in raw_model.named_parameters():
            param.requires_grad = pname.startswith(("head.", "head_kd."))
    optimizer = create_optimizer_v2(
        raw_model, opt=cfg.optim.name, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        layer_decay=cfg.optim.layer_decay, filter_bias_and_bn=cfg.optim.get("filter_bias_and_bn", True),
        **OmegaConf.to_container(cfg.optim.kwargs, resolve=True),
    )
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched.name, num_epochs=tcfg.epochs, warmup_epochs=cfg.sched.warmup_epochs,
        warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr, cooldown_epochs=cfg.sched.cooldown_epochs,
        step_on_epochs=cfg.sched.step_on_epochs, updates_per_epoch=steps_per_epoch,
    )
    mix = cfg.data.mixup
    mixup_fn = None
    if mix.mixup > 0 or mix.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=mix.mixup, cutmix_alpha=mix.cutmix, prob=mix.prob, switch_prob=mix.switch_prob,
                         mode=mix.mode, label_smoothing=cfg.data.smoothing, num_classes=info.num_classes)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()
    elif cfg.data.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.data.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    if tcfg.tet.enable:
        raw_model.per_step_logits = True
    distill = tcfg.get("distill") or OmegaConf.create({"teacher": None, "alpha": 0.5})
    teacher = build_teacher(distill, info, ctx.device)
    if teacher is not None and not getattr(raw_model, "kd", False):
        raise ValueError(f"trainer.distill.teacher is set but model {cfg.model.name} has no distillation head (use a *_kd model or model.args={{kd: true}})")
    ema = ModelEmaV3(raw_model, decay=tcfg.ema.decay) if tcfg.ema.enable else None
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[tcfg.amp_dtype]
    autocast = (lambda: torch.autocast(ctx.device.type, dtype=amp_dtype)) if tcfg.amp else nullcontext
    scaler = torch.amp.GradScaler("cuda") if (tcfg.amp and amp_dtype == torch.float16 and ctx.device.type == "cuda") else None

    # resume
    start_epoch, start_batch, global_step = 0, 0, 0
    resumed_loss = (0.0, 0)
    best = {"top1": -1.0, "epoch": -1}
    history: list[dict] = []
    resume_path = _resume_path(cfg.resume, ckpt_dir)
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_batch, global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        resumed_loss = tuple(state.get("partial_loss", (0.0, 0)))
        best, history = state["best"], state["history"]
        set_rng_state(state["rng"])
        if ctx.primary:
            print(f"resumed from {resume_path}: epoch {start_epoch}, batch {start_batch}")
    if ctx.world > 1:
        # static_graph: the official models keep parameters that never get gradients (norm1/norm2,
        # talking_heads, pos_embed); the used set is fixed, so DDP can skip them every step.
        model = DistributedDataParallel(raw_model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                        static_graph=True)
    if tcfg.compile:
        model = torch.compile(model)

    metrics_csv = MetricsCsv(out_dir / "metrics.csv", history) if ctx.primary else None
    logger = _make_logger(cfg, out_dir) if ctx.primary else NullLogger()
    stop = _PreemptionFlag()
    seeded_train = EpochSeeded(train_set, cfg.seed)
    test_loader = DataLoader(test_set, batch_size=cfg.data.eval_batch_size, sampler=ShardSampler(len(test_set), ctx.rank, ctx.world),
                             num_workers=cfg.data.num_workers)

    def checkpoint_state(epoch: int, batch_in_epoch: int, partial_loss: tuple[float, int] = (0.0, 0)) -> dict:
        return {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "global_step": global_step,
            "partial_loss": list(partial_loss),  # mid-epoch: (sum, count) of this epoch's losses so far
            "best": best, "history": metrics_csv.rows if metrics_csv else history,
            "rng": rng_state(),
            "model_name": cfg.model.name,
            "num_classes": info.num_classes,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }

    show_progress = ctx.primary and tcfg.progress and sys.stderr.isatty()
    for epoch in range(start_epoch, num_epochs):
        seeded_train.set_epoch(epoch)
        if mix.off_epoch is not None and mixup_fn is not None and epoch >= mix.off_epoch:
            mixup_fn.mixup_enabled = False
        sampler = EpochSampler(len(train_set), batch_size, cfg.seed, epoch, ctx.rank, ctx.world,
                               start_batch if epoch == start_epoch else 0)
        loader = DataLoader(seeded_train, batch_size=batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                            drop_last=True, pin_memory=ctx.device.type == "cuda")
        first_batch = start_batch if epoch == start_epoch else 0
        model.train()
        t0 = time.time()
        loss_sum, loss_count = resumed_loss if epoch == start_epoch else (0.0, 0)
        bar = tqdm(total=steps_per_epoch, initial=first_batch, desc=f"epoch {epoch}", disable=not show_progress, leave=False)
        for batch_idx, (images, target) in enumerate(loader, start=first_batch):
            if batch_idx >= steps_per_epoch:
                break
            images, target = to_model_input(images, info, ctx.device), target.to(ctx.device)
            if tcfg.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            if mixup_fn is not None and mixup_fn.mixup_enabled:
                np.random.seed(sample_seed(cfg.seed, epoch, 10**9 + batch_idx))  # mixup draws from numpy
                images, target = mixup_fn(images, target)
            with autocast(), spike_storage():
                output = model(images)
                if isinstance(output, tuple):  # (logits, logits_kd) of a distillation-head model
                    loss = distillation_loss(output, images, target, criterion, teacher, distill.alpha)
                elif tcfg.tet.enable:
                    loss = tet_loss(output, target, tcfg.tet.lam, tcfg.tet.phi, criterion)
                else:
                    loss = criterion(output, target)
                aux_loss = getattr(raw_model, "aux_loss", None)  # e.g. AT-SNN: α_p·ponder + α_d·KL prior
                if callable(aux_loss) and (extra := aux_loss()) is not None:
                    loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if tcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip)
            loss_value = loss.item()
            nonfinite, preempted = ctx.any(not math.isfinite(loss_value), stop.requested)
            if nonfinite:
                last = ckpt_dir / "last.pt"
                raise FloatingPointError(
                    f"non-finite training loss ({loss_value}) at epoch {epoch}, step {batch_idx}; stopped before the update"
                    + (f"; the last good checkpoint is {last}" if last.exists() else "; no checkpoint was written yet"))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            global_step += 1
            if not cfg.sched.step_on_epochs:
                scheduler.step_update(global_step)
            if ema is not None:
                ema.update(raw_model, step=global_step)
            loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if preempted:
                bar.close()
                if ctx.primary:
                    save_checkpoint(checkpoint_state(epoch, batch_idx + 1, (loss_sum, loss_count)), ckpt_dir / "last.pt")
                    print(f"preempted: saved {ckpt_dir / 'last.pt'} at epoch {epoch}, step {batch_idx + 1}; exiting")
                logger.finish()
                stop.restore()
                ctx.close()
                return {"preempted": True, "epoch": epoch}
            if tcfg.save_every_steps and global_step % tcfg.save_every_steps == 0 and ctx.primary:
                save_checkpoint(checkpoint_state(epoch, batch_idx + 1, (loss_sum, loss_count)), ckpt_dir / "last.pt")
        bar.close()
        if cfg.sched.step_on_epochs:
            scheduler.step(epoch + 1)
        train_seconds = time.time() - t0

        eval_model = ema.module if ema is not None else raw_model
        with autocast():
            stats = evaluate(eval_model, test_loader, info, ctx.device, world=ctx.world)
        train_loss = _mean_across(ctx, loss_sum, loss_count)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": round(train_loss, 6),
               "test_loss": round(stats["loss"], 6), "test_top1": round(stats["top1"], 4), "test_top5": round(stats["top5"], 4),
               "epoch_seconds": round(time.time() - t0, 3), "train_seconds": round(train_seconds, 3),
               "firing_rate": round(stats["firing_rate"], 6)}
        if stats.get("tokens_per_image") is not None:  # adaptive-token models (AT-SNN)
            row["tokens_per_image"] = round(stats["tokens_per_image"], 3)
        if tcfg.log_block_rates:  # firing-rate monitor: mean rate per block on the test set
            row |= {f"fr_{block}": round(value, 6) for block, value in stats["block_rates"].items()}
        for kind in ("dead", "saturated"):
            layers = stats[f"{kind}_layers"]
            if layers and ctx.primary:
                what = "never fired" if kind == "dead" else "fired at every step"
                log.warning("epoch %d: %d LIF layer(s) %s on a whole test batch: %s", epoch, len(layers), what,
                            ", ".join(layers[:5]) + (" ..." if len(layers) > 5 else ""))
        improved = stats["top1"] > best["top1"]
        if improved:
            best = {"top1": stats["top1"], "epoch": epoch}
        if ctx.primary:
            metrics_csv.append(row)
            save_checkpoint(checkpoint_state(epoch + 1, 0), ckpt_dir / "last.pt")
            if improved:
                copy_atomic(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
            curves = plot_curves(metrics_csv.rows, out_dir / "curves.png")
            logger.log({k: v for k, v in row.items() if k != "epoch"} | {"epoch": epoch}, step=global_step)
            logger.log_image("curves", curves, step=global_step)
            print(f"epoch {epoch}: train_loss {row['train_loss']:.4f}  test_loss {row['test_loss']:.4f}  "
                  f"top1 {row['test_top1']:.2f}%  top5 {row['test_top5']:.2f}%  fr {row['firing_rate']:.3f}  "
                  f"({row['epoch_seconds']:.1f}s)", flush=True)

    if ctx.world > 1:
        _check_replicas_in_sync(ctx, raw_model)
    rows = metrics_csv.rows if metrics_csv else history
    result = {"best_top1": best["top1"], "best_epoch": best["epoch"], "final_top1": rows[-1]["test_top1"] if rows else None}
    logger.finish({"best_acc": best["top1"], "best_epoch": best["epoch"]})
    stop.restore()
    ctx.close()
    return result


def _mean_across(ctx: Dist, total: float, count: int) -> float:
    if ctx.world > 1:
        t = torch.tensor([total, float(count)], dtype=torch.float64)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


def _check_replicas_in_sync(ctx: Dist, model: torch.nn.Module) -> None:
    """DDP invariant: every rank ends with the same parameters (elementwise max == min)."""
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    if ctx.device.type != "cuda":
        flat = flat.cpu()
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise RuntimeError(f"DDP replicas diverged: parameters differ across {ctx.world} ranks")
    if ctx.primary:
        print(f"DDP: parameters identical on {ctx.world} ranks", flush=True)


def _resume_path(resume, ckpt_dir: Path) -> Path | None:
    if resume in (None, "", False):
        return None
    if resume == "auto":  # SLURM requeue: continue if this run dir already has a checkpoint
        last = ckpt_dir / "last.pt"
        return last if last.exists() else None
    return Path(resume)


def _make_logger(cfg: DictConfig, out_dir: Path):
    if cfg.logger.name == "wandb":
        return WandbLogger(cfg.logger, OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), out_dir)
    return NullLogger()


class _PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --- entry points ------------------------------------------------------------------------------


@hydra.main(config_path="pkg://spikeformers.configs", config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    return result.get("best_top1")


def main() -> None:
    """Console script ``spikeformers-train``. Non-primary DDP ranks skip Hydra's own log files
    (conventions.md §2.5); every rank uses the same ``hydra.run.dir``."""
    if int(os.environ.get("RANK", 0)) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    hydra_main()


if __name__ == "__main__":
    main()
