"""Event-camera data sets through SpikingJelly 2.0 (frames integrated offline from placed files).

``cifar10dvs``: ``CIFAR10DVS(root, data_type='frame', frames_number=T, split_by='number')``; it has
no official split, so the first 90% of each class trains and the rest tests (as the official
Spikformer and SDT code split it). ``gesture``: ``DVS128Gesture(root, train=..., ...)`` (1,176 / 288 samples). Frames are
[T, 2, 128, 128]; ``frame_size`` resizes them (SDT CIFAR10-DVS uses 64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from spikeformers.train.data import DataInfo, DatasetError


class Frames(Dataset):
    """SpikingJelly frame samples as float tensors [T, 2, S, S], optionally resized."""

    def __init__(self, dataset: Dataset, frame_size: int | None) -> None:
        self.dataset, self.frame_size = dataset, frame_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        frames, label = self.dataset[index]
        frames = torch.as_tensor(np.asarray(frames), dtype=torch.float32)
        if self.frame_size and frames.shape[-1] != self.frame_size:
            frames = F.interpolate(frames, size=(self.frame_size, self.frame_size), mode="bilinear", align_corners=False)
        return frames, int(label)


def _class_split(labels: list[int], train_fraction: float = 0.9) -> tuple[list[int], list[int]]:
    """First ``train_fraction`` of every class (in data-set order) trains, the rest tests."""
    train, test = [], []
    for cls in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == cls]
        cut = int(round(len(idx) * train_fraction))
        train += idx[:cut]
        test += idx[cut:]
    return train, test


def build_dvs_datasets(cfg):
    root = Path(cfg.root)
    if cfg.frames is None:
        raise ValueError(f"data={cfg.name} needs data.frames (frames per sample, the model's T)")
    if not root.is_dir():
        raise DatasetError(f"{cfg.name} not found: expected a SpikingJelly data set root at {root} "
                           f"(with events_np/ or download/; see docs/training.md)")
    kwargs = dict(data_type="frame", frames_number=cfg.frames, split_by="number")
    size = cfg.frame_size or 128
    if cfg.name == "cifar10dvs":
        from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS

        full = CIFAR10DVS(str(root), **kwargs)
        labels = [int(y) for _, y in full.samples]
        train_idx, test_idx = _class_split(labels)
        info = DataInfo("cifar10dvs", 10, 2, size, sequence=True, frames=cfg.frames)
        return Frames(Subset(full, train_idx), cfg.frame_size), Frames(Subset(full, test_idx), cfg.frame_size), info
    from spikingjelly.datasets.dvs128_gesture import DVS128Gesture

    train = DVS128Gesture(str(root), train=True, **kwargs)
    test = DVS128Gesture(str(root), train=False, **kwargs)
    info = DataInfo("gesture", 11, 2, size, sequence=True, frames=cfg.frames)
    return Frames(train, cfg.frame_size), Frames(test, cfg.frame_size), info
