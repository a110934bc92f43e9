"""The training objective, chosen once per run from the data options and what the model returns.

A model returns plain logits ``[B, K]``, per-step logits ``[T, B, K]`` (TET), or in training a pair
``(logits, logits_kd)`` (a distillation head, ``kd=True``); a model may also add its own term
through ``aux_loss()`` (AT-SNN: ponder cost + prior). :func:`build_loss` turns these facts into one
callable ``loss(output, images, target)``, so the loop never inspects the output.
"""

from __future__ import annotations

from typing import Callable

import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from spikeformers.train.data import DataInfo

__all__ = ["TrainingLoss", "build_loss", "build_mixup", "tet_loss", "distillation_loss", "build_teacher"]

Objective = Callable[[object, torch.Tensor, torch.Tensor], torch.Tensor]  # (output, images, target) -> loss


def tet_loss(per_step_logits: torch.Tensor, target: torch.Tensor, lam: float, phi: float, criterion) -> torch.Tensor:
    """TET: (1 - λ) mean_t CE(out_t, y) + λ MSE(out, φ)."""
    ce = torch.stack([criterion(step, target) for step in per_step_logits]).mean()
    return (1 - lam) * ce + lam * F.mse_loss(per_step_logits, torch.full_like(per_step_logits, phi))


def distillation_loss(output: tuple, images: torch.Tensor, target: torch.Tensor, criterion, teacher, alpha: float) -> torch.Tensor:
    """Loss of a two-head model (DeiT hard distillation):
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


class TrainingLoss:
    """``objective(output, images, target)`` plus the model's own ``aux_loss()`` when it has one
    (it may return None, e.g. AT-SNN with halting off)."""

    def __init__(self, objective: Objective, aux_loss: Callable[[], torch.Tensor | None] | None = None) -> None:
        self.objective, self.aux_loss = objective, aux_loss

    def __call__(self, output, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.objective(output, images, target)
        if self.aux_loss is not None and (extra := self.aux_loss()) is not None:
            loss = loss + extra
        return loss


def build_mixup(data_cfg: DictConfig, info: DataInfo) -> Mixup | None:
    mix = data_cfg.mixup
    if mix.mixup <= 0 and mix.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mix.mixup, cutmix_alpha=mix.cutmix, prob=mix.prob, switch_prob=mix.switch_prob,
                 mode=mix.mode, label_smoothing=data_cfg.smoothing, num_classes=info.num_classes)


def _criterion(data_cfg: DictConfig, mixup: bool) -> torch.nn.Module:
    """Cross-entropy on soft targets (Mixup), with label smoothing, or plain."""
    if mixup:
        return SoftTargetCrossEntropy()
    if data_cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(data_cfg.smoothing)
    return torch.nn.CrossEntropyLoss()


def build_loss(cfg: DictConfig, info: DataInfo, model: torch.nn.Module, mixup: bool, device: torch.device) -> TrainingLoss:
    """The run's loss for ``model``. TET asks the model for per-step logits; a distillation
    teacher (``trainer.distill.teacher``) needs a model with a distillation head."""
    tcfg = cfg.trainer
    criterion = _criterion(cfg.data, mixup)
    if tcfg.tet.enable:
        model.per_step_logits = True
    distill = tcfg.get("distill") or OmegaConf.create({"teacher": None, "alpha": 0.5})
    teacher = build_teacher(distill, info, device)
    kd = getattr(model, "kd", False)  # trains on (logits, logits_kd)
    if teacher is not None and not kd:
        raise ValueError(f"trainer.distill.teacher is set but model {cfg.model.name} has no distillation head "
                         "(use a *_kd model or model.args={kd: true})")
    if kd:
        alpha = distill.alpha

        def objective(output, images, target):
            return distillation_loss(output, images, target, criterion, teacher, alpha)
    elif tcfg.tet.enable:
        lam, phi = tcfg.tet.lam, tcfg.tet.phi

        def objective(output, images, target):
            return tet_loss(output, target, lam, phi, criterion)
    else:
        def objective(output, images, target):
            return criterion(output, target)
    aux_loss = getattr(model, "aux_loss", None)
    return TrainingLoss(objective, aux_loss if callable(aux_loss) else None)
