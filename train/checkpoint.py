"""Training checkpoints: written atomically (``models/serialization.py``), holding only tensors and
plain Python types so they load with ``torch.load(path, weights_only=True)``, plus the RNG states
an exact resume needs.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from spikeformers.models.serialization import atomic_write, copy_atomic, load_checkpoint, save_checkpoint

__all__ = ["atomic_write", "save_checkpoint", "load_checkpoint", "copy_atomic", "rng_state", "set_rng_state"]


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
