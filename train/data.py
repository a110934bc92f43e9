"""Data sets for training and evaluation, read from their real on-disk formats.

=============  ==========================================================  ==================
name           layout under ``data.root``                                  sample
=============  ==========================================================  ==================
digits         none: scikit-learn's bundled ``load_digits`` (embedded)     [1, 32, 32]
cifar10        ``cifar-10-batches-py/{data_batch_1..5,test_batch}``        [3, 32, 32]
cifar100       ``cifar-100-python/{train,test}``                           [3, 32, 32]
tinyimagenet   ``tiny-imagenet-200/{wnids.txt,train/,val/}``               [3, 64, 64]
imagenet       ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` (ImageFolder)  [3, 224, 224]
cifar10dvs     SpikingJelly ``CIFAR10DVS`` root (``events_np/`` or ``download/``)  [T, 2, H, W]
gesture        SpikingJelly ``DVS128Gesture`` root                         [T, 2, 128, 128]
=============  ==========================================================  ==================

Randomness is seeded per (seed, epoch, sample index) by :class:`EpochSeeded`, so a resumed run
sees exactly the augmentations an uninterrupted one would, whatever the worker layout.
A missing or malformed data set raises :class:`DatasetError`, one line naming path and layout.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DatasetError", "DataInfo", "build_datasets", "EpochSeeded", "sample_seed"]


class DatasetError(FileNotFoundError):
    """A data set is missing or not in its expected layout (message: one line, and an optional
    ``hint`` line, as :class:`spikeformers.models.errors.UserError` has)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    in_chans: int
    img_size: int
    sequence: bool = False  # samples are [T, C, H, W] event frames (batches [B, T, ...])
    frames: int | None = None


# --- reproducible randomness --------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one (seed, epoch, index) triple (SplitMix-style mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return int((z ^ (z >> 31)) & 0xFFFFFFFF)


class EpochSeeded(Dataset):
    """Wraps a data set so each sample's augmentation RNGs (torch, random, numpy) are seeded from
    (seed, epoch, index). Call :meth:`set_epoch` before each epoch's loader is iterated."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        s = sample_seed(self.seed, self.epoch, index)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s)
        return self.dataset[index]


# --- embedded default: scikit-learn digits ------------------------------------------------------


class Digits(Dataset):
    """scikit-learn's 1,797 8×8 digits, scaled to [0, 1], bilinearly upsampled to 32×32 and
    normalised with mean/std 0.5. Fixed stratified split: 1,437 train / 360 test (seed 0).
    Training augmentation: a random shift of up to ``max_shift`` pixels (zero fill)."""

    TEST_SIZE = 0.2

    def __init__(self, train: bool, img_size: int = 32, max_shift: int = 2, augment: bool = True) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=img_size, mode="bilinear", align_corners=False)
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=self.TEST_SIZE, random_state=0, stratify=digits.target
        )
        idx = torch.as_tensor(train_idx if train else test_idx)
        self.images = (images[idx] - 0.5) / 0.5
        self.labels = labels[idx]
        self.max_shift = max_shift if (train and augment) else 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.max_shift:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
            image = _shift(image, dy, dx)
        return image, int(self.labels[index])


def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate [C, H, W] by (dy, dx) pixels, filling with the background value (-1)."""
    padded = F.pad(image, (abs(dx), abs(dx), abs(dy), abs(dy)), value=-1.0)
    H, W = image.shape[-2:]
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[:, top : top + H, left : left + W]


# --- CIFAR (python pickle release) --------------------------------------------------------------

_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


class CifarPickle(Dataset):
    """CIFAR-10/100 from the official python-pickle files (uint8 rows of 3×32×32, CHW order)."""

    def __init__(self, root: str | Path, name: str, train: bool, transform=None) -> None:
        folder, train_files, test_files, label_key, self.num_classes = _CIFAR[name]
        base = Path(root) / folder
        files = train_files if train else test_files
        layout = f"{base}/{{{','.join(train_files + test_files)}}} (the python-pickle release)"
        data, labels = [], []
        for file in files:
            path = base / file
            if not path.is_file():
                raise DatasetError(f"{name} not found: expected {layout}; missing {path}", hint=_cifar_hint(Path(root), name))
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="bytes")
                data.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(y) for y in entry[label_key])
            except Exception as err:  # wrong pickle content or keys
                raise DatasetError(f"{name}: {path} is not a CIFAR pickle batch ({type(err).__name__}: {err})") from None
        outside = [y for y in labels if not 0 <= y < self.num_classes]
        if outside:  # caught here, not as an index error inside the loss once the model runs
            raise DatasetError(f"{name}: {base} holds labels outside 0..{self.num_classes - 1} (e.g. {outside[0]}, "
                               f"{len(outside)} samples)", hint=f"is it another data set than {name}? (cifar100 has 100 classes)")
        self.data = np.concatenate(data).transpose(0, 2, 3, 1)  # NHWC for PIL
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform else image), self.labels[index]


def _cifar_hint(root: Path, name: str) -> str | None:
    """What the user most likely did: gave the extracted folder itself as data.root (one level too
    deep), or downloaded the archive without extracting it."""
    folder, train_files, _, _, _ = _CIFAR[name]
    if (root / train_files[0]).is_file() or root.name == folder:
        return f"data.root is one level too deep: give the folder that holds {folder}/, data.root={root.parent}"
    archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]
    if (root / archive).is_file():
        return f"extract the archive first: tar -xzf {root / archive} -C {root}"
    return None


# --- TinyImageNet -------------------------------------------------------------------------------


class TinyImageNet(Dataset):
    """``tiny-imagenet-200``: train/<wnid>/images/*.JPEG; val/images/*.JPEG labelled by
    val/val_annotations.txt (``file<TAB>wnid<TAB>bbox...``); classes from wnids.txt."""

    def __init__(self, root: str | Path, train: bool, transform=None) -> None:
        base = Path(root) / "tiny-imagenet-200"
        layout = f"{base}/{{wnids.txt,train/<wnid>/images/*.JPEG,val/images/*.JPEG,val/val_annotations.txt}}"
        wnids_file = base / "wnids.txt"
        if not wnids_file.is_file():
            raise DatasetError(f"tinyimagenet not found: expected {layout}; missing {wnids_file}")
        wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
        self.class_to_idx = {w: i for i, w in enumerate(wnids)}
        self.samples: list[tuple[Path, int]] = []
        if train:
            for wnid in wnids:
                folder = base / "train" / wnid / "images"
                if not folder.is_dir():
                    raise DatasetError(f"tinyimagenet: missing {folder} (expected {layout})")
                self.samples += [(p, self.class_to_idx[wnid]) for p in sorted(folder.glob("*.JPEG"))]
        else:
            annotations = base / "val" / "val_annotations.txt"
            if not annotations.is_file():
                raise DatasetError(f"tinyimagenet: missing {annotations} (expected {layout})")
            for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
                parts = line.split("\t")
                if len(parts) < 2 or parts[1] not in self.class_to_idx:
                    raise DatasetError(f"tinyimagenet: {annotations}:{line_no} is not '<file>\\t<wnid>\\t...' with a known wnid")
                self.samples.append((base / "val" / "images" / parts[0], self.class_to_idx[parts[1]]))
        if not self.samples:
            raise DatasetError(f"tinyimagenet: no images found under {base} (expected {layout})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = Image.open(path).convert("RGB")
        return (self.transform(image) if self.transform else image), label


# --- construction from the Hydra ``data`` config ------------------------------------------------


def _image_transform(cfg, train: bool):
    from timm.data import create_transform

    aug = cfg.aug
    return create_transform(
        input_size=cfg.img_size,
        is_training=train,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        interpolation=aug.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        re_prob=aug.re_prob,
        crop_pct=aug.crop_pct,
    )


def build_datasets(cfg, augment: bool = True) -> tuple[Dataset, Dataset, DataInfo]:
    """(train set, test set, info) for the Hydra ``data`` config node. ``augment=False`` gives the
    training split the evaluation transform (e.g. to calibrate a conversion on training data)."""
    name = cfg.name
    if name == "digits":
        info = DataInfo(name, 10, 1, cfg.img_size)
        return (
            Digits(True, cfg.img_size, cfg.aug.max_shift if augment else 0),
            Digits(False, cfg.img_size),
            info,
        )
    if name in _CIFAR:
        train = CifarPickle(cfg.root, name, True, _image_transform(cfg, augment))
        test = CifarPickle(cfg.root, name, False, _image_transform(cfg, False))
        return train, test, DataInfo(name, train.num_classes, 3, cfg.img_size)
    if name == "tinyimagenet":
        train = TinyImageNet(cfg.root, True, _image_transform(cfg, augment))
        test = TinyImageNet(cfg.root, False, _image_transform(cfg, False))
        return train, test, DataInfo(name, len(train.class_to_idx), 3, cfg.img_size)
    if name == "imagenet":
        from torchvision.datasets import ImageFolder

        splits = []
        for split, is_train in (("train", True), ("val", False)):
            folder = Path(cfg.root) / split
            if not folder.is_dir():
                raise DatasetError(f"imagenet not found: expected {Path(cfg.root)}/{{train,val}}/<wnid>/*.JPEG; missing {folder}")
            splits.append(ImageFolder(str(folder), transform=_image_transform(cfg, is_train and augment)))
        return splits[0], splits[1], DataInfo(name, len(splits[0].classes), 3, cfg.img_size)
    if name in ("cifar10dvs", "gesture"):
        from spikeformers.train.dvs import build_dvs_datasets

        return build_dvs_datasets(cfg)
    raise ValueError(f"unknown data set {name!r}; expected digits, cifar10, cifar100, tinyimagenet, imagenet, cifar10dvs or gesture")
