"""Training checkpoints and the run folder that holds them.

Checkpoints are written atomically (``models/serialization.py``), hold only tensors and plain
Python types so they load with ``torch.load(path, weights_only=True)``, and carry the RNG states
an exact resume needs. A run folder is claimed for one training at a time (:class:`RunFolderLock`)
and never taken over from a previous run unless the user says so (:func:`previous_run_files`).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from spikeformers.models.errors import UserError
from spikeformers.models.serialization import atomic_write, copy_atomic, load_checkpoint, save_checkpoint

__all__ = ["atomic_write", "save_checkpoint", "load_checkpoint", "copy_atomic", "rng_state", "set_rng_state",
           "RunFolderError", "RunFolderLock", "previous_run_files", "remove_run_files", "recorded_best_epoch"]


def rng_state() -> dict:
    """Every RNG the loop touches, as plain types (numpy's state becomes a list)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        # this process's own device only: a resume may run on another number of GPUs
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if isinstance(state.get("cuda"), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- the run folder ------------------------------------------------------------------------------

# What a training writes into its run folder; config.yaml is rewritten by every start anyway.
RUN_OUTPUTS = ("checkpoints", "metrics.csv", "curves.png")


class RunFolderError(UserError):
    """The run folder is busy, or holds a run this command would replace."""


def previous_run_files(out_dir: Path) -> list[str]:
    """The outputs of an earlier run in ``out_dir`` (``checkpoints/`` with a ``.pt`` file,
    ``metrics.csv``); empty when there is none. Hydra's own ``.hydra/`` and log do not count."""
    found = []
    if any((out_dir / "checkpoints").glob("*.pt")):
        found.append("checkpoints/")
    if (out_dir / "metrics.csv").exists():
        found.append("metrics.csv")
    return found


def remove_run_files(out_dir: Path) -> list[str]:
    """Delete the outputs of the earlier run in ``out_dir`` (only on ``overwrite=true``)."""
    removed = []
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name + ("/" if name == "checkpoints" else ""))
    return removed


class RunFolderLock:
    """An exclusive lock on a run folder for the life of one training (``.train.lock``; the
    holder's pid in ``.train.pid`` beside it, since some filelock versions truncate the lock file
    itself when another process tries it). The operating system drops the lock when the holder
    dies, so a kill -9 never leaves the folder locked."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.lock = FileLock(str(out_dir / ".train.lock"), timeout=0)
        self.pid_file = out_dir / ".train.pid"

    def __enter__(self) -> "RunFolderLock":
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except Timeout:
            raise RunFolderError(f"{self.out_dir} is in use by another training (pid {self._holder()}); wait for it "
                                 "to end, or choose another hydra.run.dir") from None
        except OSError as err:
            raise RunFolderError(f"cannot lock the run folder {self.out_dir}: {err.strerror or err}") from None
        atomic_write(self.pid_file, lambda tmp: tmp.write_text(f"{os.getpid()}\n"))
        return self

    def __exit__(self, *exc) -> None:
        self.pid_file.unlink(missing_ok=True)
        self.lock.release()

    def _holder(self) -> str:
        try:
            return self.pid_file.read_text().strip() or "unknown"
        except OSError:
            return "unknown"  # the holder has not written it yet


def recorded_best_epoch(path: Path) -> int | None:
    """The best epoch a checkpoint file records (``best.pt`` holds the state of the end of that
    epoch); None when the file is missing or unreadable. Memory-mapped: the weights are not read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["best"]["epoch"])
    except Exception:  # missing, truncated, or not a training checkpoint: nothing to trust
        return None
