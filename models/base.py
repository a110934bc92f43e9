"""The model skeleton every spiking family shares, and the timm contract it keeps.

A family model subclasses :class:`SpikingClassifier`, builds its modules under the official names
(so official checkpoints load with ``strict=True``) and declares only what differs:

- ``stages()``: ``(name, stage)`` pairs in forward order; each stage maps the time-first stream
  ``[T, B, ...]`` to the next (a module, or a parameter-free function such as a layout change);
- ``feature_info``: the levels ``forward_intermediates()`` and ``features_only=True`` return, each
  naming the stage after which it is taken (timm's ``module`` field);
- ``readout`` and ``head_neuron``: how the head reads the stream (below);
- ``tokens_last``: the stream is ``[T, B, N, D]`` rather than ``[T, B, D, *spatial]``.

The base then owns the time axis (image input repeated over ``T``, sequences used as given), the
input checks, the readout, ``per_step_logits`` (TET), ``forward_features``/``forward_head``,
``reset_classifier``, gradient checkpointing, ``forward_intermediates`` and feature extraction.

Readouts (every family's official head is one of these two):

- ``"mean_then_head"``: mean over tokens, then over time, then the classifier (Spikformer,
  Spikingformer, QKFormer). Per-step logits apply the classifier to every step instead.
- ``"head_then_mean"``: mean over tokens → ``head_neuron`` (a LIF) → classifier per step → mean
  over time (Spike-driven Transformer v1/v2).

SNN differences from a timm CNN/ViT, by design (docs/architecture.md):

- ``forward_features`` returns the time-first stream ``[T, B, ...]``; ``forward_intermediates``
  returns maps ``[B, C, H, W]`` averaged over time (``time_mean=False``: ``[T, B, C, H, W]``).
- TorchScript is not supported (the neurons dispatch on backend and device in Python); use
  ``torch.compile`` or FX (blocks and neurons are FX leaves).
- Some official modules are built but never called (kept for strict checkpoint loading); they get
  no gradient, so plain DDP needs ``find_unused_parameters=True`` for those families.
"""

from __future__ import annotations

import numbers
import re
from typing import Callable

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function, register_notrace_module, trunc_normal_
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models._builder import pretrained_cfg_for_features
from torch import nn

from spikeformers.models import hub
from spikeformers.models.layers import checkpoint_block, checkpoint_filter_fn, time_sequence
from spikeformers.models.neurons import LIF

__all__ = [
    "SpikingClassifier", "build_spiking_model", "as_features", "new_classifier", "fx_leaf", "positive_int",
    "spiking_cfg", "CIFAR_CFG", "dvs_cfg", "init_linear_and_layernorm", "init_conv_and_bn",
]

# Neurons keep their state in Python loops over T and dispatch on backend and device: FX must see
# them as single calls. The input check branches on the input's rank, so it is one call as well.
register_notrace_module(LIF)
register_notrace_function(time_sequence)


def positive_int(value, what: str) -> int:
    """``value`` as an int if it is a positive integer (not a bool), else a one-line ``ValueError``
    naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def fx_leaf(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: FX traces this module as one call (blocks and patch embeddings reshape by
    their input's shape, which symbolic tracing cannot follow). timm's feature extraction and
    ``create_feature_extractor`` then see the model as stem → blocks → head."""
    return register_notrace_module(cls)


@register_notrace_function
def pool_tokens(x: torch.Tensor, tokens_last: bool) -> torch.Tensor:
    """Mean over tokens of the stream: [T, B, N, D] (``tokens_last``) or [T, B, D, *S] -> [T, B, D]."""
    return x.mean(2) if tokens_last else x.flatten(3).mean(3)


@register_notrace_function
def stream_to_map(x: torch.Tensor, height: int, width: int, tokens_last: bool) -> torch.Tensor:
    """A stream [T, B, D, H, W], [T, B, D, N] or [T, B, N, D] as maps [T, B, D, height, width]."""
    if x.dim() == 5:
        return x
    if tokens_last:
        x = x.transpose(2, 3)
    return x.unflatten(3, (height, width))


class SpikingClassifier(nn.Module):
    """Base of every spiking family: time axis, input checks, readout, and the timm model API.

    Subclasses set ``T``, ``in_chans``, ``num_classes``, ``num_features``, ``size_multiple``,
    ``per_step_logits``, ``head`` and ``feature_info``, and define ``stages()``."""

    readout = "mean_then_head"  # or "head_then_mean" (see the module docstring)
    head_neuron: str | None = None  # attribute name of the neuron between token pooling and the head
    classifiers: tuple[str, ...] = ("head",)  # every Linear head; reset_classifier rebuilds them all
    tokens_last = False  # stream layout [T, B, N, D] instead of [T, B, D, *spatial]
    # Official parameters that the official forward never uses (kept for strict checkpoint
    # loading); they get no gradient, so DDP needs find_unused_parameters=True when this is set.
    unused_parameters: str | None = None  # a regex over parameter names
    stem_regex = r"^patch_embed"
    grad_checkpointing = False

    @property
    def T(self) -> int:
        """Time steps for image input (a sequence input brings its own)."""
        return self._T

    @T.setter
    def T(self, value: int) -> None:
        # T = -1 used to run as T = 1, T = 0 died in a reshape and T = 2.5 in expand: refuse at once
        self._T = positive_int(value, "T (time steps)")

    # --- what a family declares ---------------------------------------------------------------

    # Stage attributes in forward order; a ModuleList stands for its blocks ``name.0``, ``name.1``, ...
    stage_names: tuple[str, ...] = ("patch_embed", "block")

    def stages(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """(name, stage) in forward order, from ``stage_names``: by default ``patch_embed`` then
        ``block.0``, ``block.1``, ..."""
        out = []
        for name in self.stage_names:
            module = getattr(self, name)
            if isinstance(module, nn.ModuleList):
                out += [(f"{name}.{i}", blk) for i, blk in enumerate(module)]
            else:
                out.append((name, module))
        return out

    def stage_group_matcher(self, coarse: bool = False) -> dict:
        """Layer-decay groups in forward order: the first stage is the stem, then every later stage
        (``coarse``: one group per stage attribute); the head comes last."""
        names = [name for name, _ in self.stages()]
        later = names[1:]
        if coarse:
            later = list(dict.fromkeys(n.split(".")[0] for n in later))
        return dict(stem=rf"^{re.escape(names[0])}\.", blocks=[(rf"^{re.escape(n)}\.", (i,)) for i, n in enumerate(later)])

    def block_feature_info(self, num_chs: int, reduction: int) -> list[dict]:
        """One feature level per block of a single-stage model (as timm's ViTs), all at the same width."""
        return [dict(num_chs=num_chs, reduction=reduction, module=f"block.{i}") for i in range(len(self.block))]

    @staticmethod
    def check_global_pool(global_pool: str | None, model_name: str) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"{model_name} only supports global_pool='avg', got {global_pool!r}")

    # --- forward ------------------------------------------------------------------------------

    def to_time_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] repeated over ``T``, or sequences [T', B, C, H, W] as given; a
        one-line ``ValueError`` names a wrong rank, channel count or size."""
        return time_sequence(x, self.T, self.in_chans, self.size_multiple, type(self).__name__)

    def run_stage(self, stage: Callable, x: torch.Tensor) -> torch.Tensor:
        """Run one stage, checkpointed when grad checkpointing is on. A stage with a
        ``layer_checkpointing`` flag checkpoints its own layers one by one instead (a patch
        embedding at full resolution would otherwise be recomputed all at once)."""
        if (self.grad_checkpointing and self.training and torch.is_grad_enabled()
                and isinstance(stage, nn.Module) and not hasattr(stage, "layer_checkpointing")):
            return checkpoint_block(stage, x)
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> the time-first stream after the last stage."""
        x = self.to_time_sequence(x)
        for _, stage in self.stages():
            x = self.run_stage(stage, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Stream -> logits [B, K] (per-step [T, B, K] with ``per_step_logits``), or with
        ``pre_logits`` the pooled features [B, num_features] the classifier sees (averaged over T)."""
        x = pool_tokens(x, self.tokens_last)  # [T, B, D]
        if self.head_neuron is not None:
            x = getattr(self, self.head_neuron)(x)  # spikes
        if pre_logits:
            return x.mean(0)
        if self.per_step_logits:
            return self.head(x)  # [T, B, K]
        if self.readout == "head_then_mean":
            return self.head(x).mean(0)
        return self.head(x.mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        time_mean: bool = True,
    ):
        """timm's feature API: the maps of the levels in ``feature_info`` selected by ``indices``
        (an int: the last n; a list: those levels; None: all), each [B, C, H, W] averaged over time,
        or [T, B, C, H, W] with ``time_mean=False``. Returns the list with ``intermediates_only``,
        else (final stream, list). ``norm`` is accepted for the API: these models have no final norm."""
        if output_fmt != "NCHW":
            raise ValueError(f"{type(self).__name__} intermediates support output_fmt='NCHW' only, got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        stages = self.stages()
        at_stage = self._feature_stages([name for name, _ in stages])
        wanted = {at_stage[i]: i for i in take}  # stage index -> level
        height, width = x.shape[-2:]
        maps = {}
        x = self.to_time_sequence(x)
        for s, (_, stage) in enumerate(stages):
            x = self.run_stage(stage, x)
            if s in wanted:
                r = self.feature_info[wanted[s]]["reduction"]
                fmap = stream_to_map(x, height // r, width // r, self.tokens_last)
                maps[wanted[s]] = fmap.mean(0) if time_mean else fmap
            if stop_early and s == at_stage[max_index]:
                break
        intermediates = [maps[i] for i in take]
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what the levels ``indices`` do not need (timm's API, used by ``features_only``): the
        stages after the last level become ``Identity`` and, with ``prune_head``, the classifiers go.
        Returns the absolute level indices kept."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        stages = self.stages()
        last = self._feature_stages([name for name, _ in stages])[max_index]
        for name, stage in stages[last + 1:]:
            if isinstance(stage, nn.Module):
                self.set_submodule(name, nn.Identity())
        if prune_head:
            self.reset_classifier(0)
        return take

    def _feature_stages(self, names: list[str]) -> list[int]:
        """For each level of ``feature_info``: the index of the stage it is taken after, the last
        stage named ``module`` or inside it (``stage1`` covers ``stage1.0``, ``stage1.1``, ...)."""
        at = []
        for info in self.feature_info:
            module = info["module"]
            hits = [i for i, name in enumerate(names) if name == module or name.startswith(module + ".")]
            if not hits:
                raise ValueError(f"{type(self).__name__}.feature_info names {module!r}, which is no stage")
            at.append(hits[-1])
        return at

    # --- timm model API -----------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=self.stem_regex, blocks=r"^block\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in backward instead of keeping its activations (less memory,
        about one extra forward pass of the blocks). Gradients are unchanged."""
        self.grad_checkpointing = enable
        for module in self.modules():
            if hasattr(module, "layer_checkpointing"):
                module.layer_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier(s) for ``num_classes`` (0: none; ``forward`` then returns pooled features)."""
        self.check_global_pool(global_pool, type(self).__name__)
        self.num_classes = num_classes
        for name in self.classifiers:
            if hasattr(self, name):
                setattr(self, name, new_classifier(self, self.num_features, num_classes))


def new_classifier(model: nn.Module, num_features: int, num_classes: int) -> nn.Module:
    """A Linear head (``Identity`` for 0 classes) on the model's device and dtype, in its train/eval mode."""
    if num_classes <= 0:
        return nn.Identity()
    ref = next(model.parameters(), None)
    placement = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
    return nn.Linear(num_features, num_classes, **placement).train(model.training)


def build_spiking_model(model_cls: type[nn.Module], variant: str, pretrained: bool = False,
                        filter_fn=checkpoint_filter_fn, **kwargs) -> nn.Module:
    """timm's builder with verified weights (``hub.build_model``) and feature extraction through
    ``forward_intermediates``: ``features_only=True`` returns every level of ``feature_info``
    (``out_indices`` selects), as ``[B, C, H, W]`` maps averaged over time."""
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    kwargs.pop("feature_cls", None)
    # timm passes device/dtype to the constructor; ours build on the default device, then move
    placement = {k: v for k in ("device", "dtype") if (v := kwargs.pop(k, None)) is not None}
    model = hub.build_model(model_cls, variant, pretrained, filter_fn, **kwargs)
    if placement:
        model = model.to(**placement)
    return as_features(model, out_indices) if features_only else model


def as_features(model: nn.Module, out_indices=None) -> nn.Module:
    """timm's ``features_only`` wrapper around ``forward_intermediates``: every level of
    ``feature_info`` by default, the later stages and the head pruned away."""
    features = FeatureGetterNet(model, out_indices=len(model.feature_info) if out_indices is None else out_indices)
    features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return features


# --- pretrained cfgs and initialisers the families share ----------------------------------------

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# CIFAR-100 too: the official CIFAR-100 configs of every family copy the CIFAR-10 statistics.
CIFAR_CFG = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def dvs_cfg(size: int, num_classes: int) -> dict:
    """Event frames (2 polarities, size × size): no normalisation, no crop."""
    return dict(num_classes=num_classes, input_size=(2, size, size), crop_pct=1.0, mean=(0.0, 0.0), std=(1.0, 1.0))


def spiking_cfg(*layers: dict, **kwargs) -> dict:
    """A timm pretrained cfg: the ImageNet defaults, then each dict of ``layers`` (family, data set,
    weights) and ``kwargs`` in order, later values winning."""
    cfg = dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
               interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               first_conv="patch_embed.proj_conv", classifier="head")
    for layer in layers:
        cfg.update(layer)
    cfg.update(kwargs)
    return cfg


def _trunc_normal_init(m: nn.Module, weighted: type, normed: type) -> None:
    """``weighted`` layers: weight trunc-normal(0.02), bias 0; ``normed`` layers: weight 1, bias 0."""
    if isinstance(m, weighted):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, normed):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_linear_and_layernorm(m: nn.Module) -> None:
    """Linear trunc-normal(0.02) with zero bias, LayerNorm 1/0; convs and BN keep PyTorch's defaults
    (the official init of Spikformer, Spikingformer, QKFormer and SDT v2)."""
    _trunc_normal_init(m, nn.Linear, nn.LayerNorm)


def init_conv_and_bn(m: nn.Module) -> None:
    """Conv2d trunc-normal(0.02) with zero bias, BatchNorm2d 1/0; Linear and Conv1d keep PyTorch's
    defaults (the official init of the Spike-driven Transformer v1)."""
    _trunc_normal_init(m, nn.Conv2d, nn.BatchNorm2d)
