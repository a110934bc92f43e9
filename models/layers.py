"""Helpers shared by the spiking transformer families.

Activations are time-first, ``[T, B, ...]``. Stateless layers (conv, linear, BN, pooling) run with
T folded into the batch, ``[T*B, ...]``, so BatchNorm statistics are shared across time steps and
computed over T*B*(tokens or pixels), exactly as the official code does.
"""

from __future__ import annotations

import contextlib
import logging
import re

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from spikeformers.models.neurons import LIF

__all__ = [
    "seq", "time_sequence", "split_heads", "ssa_product", "SpikeFirstMlp", "checkpoint_filter_fn", "family_filter", "state_dims",
    "checkpoint_block",
]


def seq(x: torch.Tensor, *modules: nn.Module) -> torch.Tensor:
    """Run stateless ``modules`` in order on ``x`` [T, B, ...] with T folded into the batch."""
    T, B = x.shape[:2]
    y = x.flatten(0, 1)
    for module in modules:
        y = module(y)
    return y.reshape(T, B, *y.shape[1:])


def time_sequence(
    x: torch.Tensor, T: int, in_chans: int, size_multiple: int, model_name: str
) -> torch.Tensor:
    """Turn model input into a [T, B, C, H, W] sequence, or raise a one-line ``ValueError``.

    Images ``[B, C, H, W]`` are repeated over ``T`` time steps (direct encoding). Sequences
    ``[T', B, C, H, W]`` (e.g. DVS frames) are used as given: their own T' wins.
    """
    if x.dim() == 4:
        x = x.unsqueeze(0).expand(T, *x.shape)
    elif x.dim() != 5:
        raise ValueError(
            f"{model_name} expects images [B, C, H, W] or sequences [T, B, C, H, W], "
            f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    channels, height, width = x.shape[2:]
    if channels != in_chans:
        raise ValueError(
            f"{model_name} expects {in_chans} input channels, got {channels} "
            f"(input shape {tuple(x.shape)})"
        )
    if height % size_multiple or width % size_multiple or height == 0 or width == 0:
        raise ValueError(
            f"{model_name} expects height and width that are positive multiples of "
            f"{size_multiple} (its patch embedding pools {size_multiple.bit_length() - 1} times), "
            f"got {height}x{width}"
        )
    return x


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[T, B, N, C] -> [T, B, h, N, d], head-major channels (c = head * d + j)."""
    T, B, N, C = x.shape
    return x.reshape(T, B, N, num_heads, C // num_heads).permute(0, 1, 3, 2, 4)


def ssa_product(q, k, v, scale: float, order: str) -> torch.Tensor:
    """Spiking self-attention without softmax (Spikformer, ICLR 2023, eq. 9), [T, B, h, N, d] each.

    The three official files multiply in different orders; on spikes every product is an integer
    and ``scale`` a power of two, so the orders agree in fp32, but fp16 rounding follows the order:
    ``"qk_scale_v"`` ((Q Kᵀ) s) V (CIFAR), ``"qk_v_scale"`` ((Q Kᵀ) V) s (DVS, Spikingformer),
    ``"q_kv_scale"`` Q (Kᵀ V) s (ImageNet: linear in the token count).
    """
    if order == "qk_scale_v":
        return (q @ k.transpose(-2, -1) * scale) @ v
    if order == "qk_v_scale":
        return (q @ k.transpose(-2, -1)) @ v * scale
    return q @ (k.transpose(-2, -1) @ v) * scale


class SpikeFirstMlp(nn.Module):
    """LIF → 1×1 conv (bias) → BN → LIF → 1×1 conv (bias) → BN on [T, B, C, H, W], every conv fed
    binary spikes, under the official flat names ``{prefix}1_lif``, ``{prefix}1_conv``,
    ``{prefix}1_bn``, ``{prefix}2_…``: SDT v1's ``MS_MLP_Conv`` (prefix ``fc``, with its own
    membrane shortcut) and Spikingformer's MLP (prefix ``mlp``, the block adds the residual)."""

    def __init__(self, dim: int, hidden: int, prefix: str, residual: bool, lif=LIF) -> None:
        super().__init__()
        self.residual = residual
        self.names = [(f"{prefix}{i}_lif", f"{prefix}{i}_conv", f"{prefix}{i}_bn") for i in (1, 2)]
        for (lif_name, conv_name, bn_name), (c_in, c_out) in zip(self.names, ((dim, hidden), (hidden, dim))):
            self.add_module(lif_name, lif())
            self.add_module(conv_name, nn.Conv2d(c_in, c_out, 1))
            self.add_module(bn_name, nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        for lif_name, conv_name, bn_name in self.names:
            x = seq(getattr(self, lif_name)(x), getattr(self, conv_name), getattr(self, bn_name))
        return x + identity if self.residual else x


class _FrozenBatchNormStats(contextlib.AbstractContextManager):
    """While active, BatchNorm layers in ``module`` normalise with batch statistics as usual but
    leave their running statistics and ``num_batches_tracked`` untouched (momentum 0)."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]

    def __enter__(self):
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        return self

    def __exit__(self, *exc):
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
        return False


def checkpoint_block(block: nn.Module, x: torch.Tensor, fn=None) -> torch.Tensor:
    """Activation checkpointing of one block, correct for spiking blocks: the forward keeps only
    the block's input and backward recomputes the rest. Our neurons start from V = 0 on every
    call, so recomputation cannot advance neuron state twice; BatchNorm statistics are frozen
    during the recomputation so they are updated exactly once, as without checkpointing.
    ``fn`` (default: ``block`` itself) is the part of ``block`` to run, e.g. one of its layers."""
    contexts = lambda: (contextlib.nullcontext(), _FrozenBatchNormStats(block))  # noqa: E731
    return checkpoint(block if fn is None else fn, x, use_reentrant=False, context_fn=contexts)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Official Spikformer/SDT checkpoints → our state_dict.

    Our key names are the official ones, so this only unwraps the training-checkpoint dict
    (timm saver ``state_dict``/``state_dict_ema``, Spikformer-DVS ``model``) and strips the
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes.
    """
    for wrapper in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


def family_filter(model_name: str):
    """The checkpoint filter of ``model_name``'s family: its module's ``checkpoint_filter_fn``
    (e.g. Spikingformer's rename map), or the shared unwrapping one."""
    import sys

    import timm

    module = sys.modules[timm.models.model_entrypoint(model_name).__module__]
    return getattr(module, "checkpoint_filter_fn", checkpoint_filter_fn)


def state_dims(state: dict, source: object, model_name: str | None = None) -> tuple[int, int]:
    """(num_classes, in_chans) of a state_dict, read off the classifier and first conv that
    ``model_name``'s timm cfg names (default: Spikformer/SDT's ``head``, ``patch_embed.proj_conv``)."""
    import timm

    cfg = timm.get_pretrained_cfg(model_name) if model_name else None
    first_conv = (getattr(cfg, "first_conv", None) or "patch_embed.proj_conv") + ".weight"
    classifier = (getattr(cfg, "classifier", None) or "head") + ".weight"
    if classifier not in state or first_conv not in state:
        raise ValueError(f"{source} does not look like a {model_name or 'Spikformer/SDT'} state_dict (no {classifier} / {first_conv})")
    return state[classifier].shape[0], state[first_conv].shape[1]


def __getattr__(name: str):
    # Transitional: the model base moved to spikeformers.models.base.
    if name == "SpikingClassifier":
        from spikeformers.models.base import SpikingClassifier

        return SpikingClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def keep_own_distillation_head(state: dict, model: nn.Module) -> dict:
    """A checkpoint without a fitting ``head_kd`` (a stage-1 checkpoint, or another class count) for
    a model with a distillation head: keep the model's freshly initialised ``head_kd.*``, as the
    official SDT v2/v3 fine-tunes do by loading with ``strict=False``, and log which keys were kept."""
    if not getattr(model, "kd", False) or "head.weight" not in state:
        return state
    own = model.state_dict()
    keep = [k for k, v in own.items() if k.startswith("head_kd.") and (k not in state or state[k].shape != v.shape)]
    if not keep:
        return state
    logging.getLogger(type(model).__module__).warning(
        "checkpoint has no fitting distillation head: keeping the model's initial %s", ", ".join(keep))
    return dict(state, **{k: own[k] for k in keep})
