"""Spikingformer: Spike-driven Residual Learning for Transformer-based Spiking Neural Network.

Zhou et al., arXiv:2304.11954 (https://arxiv.org/abs/2304.11954). Semantics follow the official
code exactly: Spikformer's shapes with an SDT-style *membrane
shortcut*: every branch starts with a LIF and ends with a BN, so every conv except the first sees
binary spikes and the residual stream between blocks is real-valued.

- Spiking Tokenizer: stage 0 conv3×3 → BN; stages 1–4 LIF → [MaxPool(3,2,1) on spikes] → conv3×3 →
  BN (channels D/8, D/4, D/2, D, D). No relative position embedding residual.
- Block: x ← x + SSA(x); x ← x + MLP(x). SSA = input LIF (``proj_lif``) → q/k/v Conv1d k1 (no bias)
  → BN1d → LIF → per-head Q Kᵀ V · 0.125 → LIF (v_th 0.5) → Conv1d k1 (bias) → BN1d, no LIF.
  MLP = LIF → Conv2d 1×1 → BN2d → LIF → Conv2d 1×1 → BN2d, ratio 4.
- Head: mean over tokens → mean over T → Linear; no head LIF (the head sees real values).

The official repository has three model files; ``kind`` selects one:

==========  ============================  ==========  ==============  ===  ======  ===========
kind        tokenizer names               pools       SSA product     tau  LN eps  q/k/v heads
==========  ============================  ==========  ==============  ===  ======  ===========
"cifar"     ``block{0..4}_*``             stages 3-4  ((Q Kᵀ) V) · s  2.0  1e-5    views
"imagenet"  ``proj_*``, ``proj{1..4}_*``  stages 1-4  (Q (Kᵀ V)) · s  2.0  1e-5    contiguous
"dvs"       as "imagenet"                 stages 1-4  ((Q Kᵀ) V) · s  1.5  1e-6    views
==========  ============================  ==========  ==============  ===  ======  ===========

s = 0.125 for every head size. Both products are integer-valued in fp32 and s is a power of two, so
the orders agree bit-exactly; each kind keeps its official order (and memory layout of the head-split
q/k/v), so logits, BN buffers and gradients equal the official files' bit for bit in fp32 with the
SpikingJelly neuron backend.
``norm1``/``norm2`` LayerNorms exist in the official model but are never applied; they are kept so
official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from spikeformers.models import hub
from spikeformers.models import layers
from spikeformers.models.base import (
    CIFAR_CFG, SpikingClassifier, build_spiking_model, dvs_cfg, fx_leaf, init_linear_and_layernorm, spiking_cfg,
)
from spikeformers.models.layers import SpikeFirstMlp, seq, split_heads, ssa_product
from spikeformers.models.neurons import LIF

__all__ = ["Spikingformer", "SpikingTokenizer", "SpikingformerSelfAttention", "SpikingTransformerBlock"]

_KINDS = ("cifar", "imagenet", "dvs")
_SSA_ORDER = {"cifar": "qk_v_scale", "imagenet": "q_kv_scale", "dvs": "qk_v_scale"}
_TAU = {"cifar": 2.0, "imagenet": 2.0, "dvs": 1.5}
_NORM_EPS = {"cifar": 1e-5, "imagenet": 1e-5, "dvs": 1e-6}


class SpikingformerSelfAttention(nn.Module):
    """SSA on the real-valued stream [T, B, C, H, W]; returns the BN output (no LIF).

    ``proj_lif`` is the *input* LIF (official name). ``order`` is the product order of
    :func:`spikeformers.models.layers.ssa_product`: ``"qk_v_scale"`` (CIFAR, DVS) or
    ``"q_kv_scale"`` (ImageNet); the scale is 0.125 in both. ``contiguous_heads`` copies the
    head-split q/k/v into contiguous memory before the products, as the official ImageNet file
    does: values are the same either way, but the matmul backward then sums in the same order,
    so gradients match the official ones bit for bit.
    """

    # Declared for analysis tools (energy, SOPs): which attention product this module computes.
    attention_product = "ssa"  # in the order of ``self.order``

    def __init__(self, dim: int, num_heads: int, order: str = "qk_v_scale", lif=LIF,
                 contiguous_heads: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if order not in ("qk_v_scale", "q_kv_scale"):
            raise ValueError(f"unknown SSA order {order!r}")
        self.num_heads, self.order, self.scale = num_heads, order, 0.125
        self.contiguous_heads = contiguous_heads
        self.proj_lif = lif()
        self.q_conv, self.q_bn, self.q_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.k_conv, self.k_bn, self.k_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.v_conv, self.v_bn, self.v_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_conv, self.proj_bn = nn.Conv1d(dim, dim, 1), nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C = x.shape[:3]
        spatial = x.shape[3:]
        s = self.proj_lif(x).flatten(3)  # [T, B, C, N] spikes

        def qkv(conv, bn, lif):  # -> [T, B, h, N, d] spikes
            z = split_heads(lif(seq(s, conv, bn)).transpose(-1, -2), self.num_heads)
            return z.contiguous() if self.contiguous_heads else z

        q = qkv(self.q_conv, self.q_bn, self.q_lif)
        k = qkv(self.k_conv, self.k_bn, self.k_lif)
        v = qkv(self.v_conv, self.v_bn, self.v_lif)
        x = ssa_product(q, k, v, self.scale, self.order)  # [T, B, h, N, d], integers / 8
        x = self.attn_lif(x.transpose(3, 4).reshape(T, B, C, -1))
        return seq(x, self.proj_conv, self.proj_bn).reshape(T, B, C, *spatial)


@fx_leaf
class SpikingTransformerBlock(nn.Module):
    """x ← x + SSA(x); x ← x + MLP(x) (membrane shortcut). ``norm1``/``norm2`` are never applied
    (kept for strict loading); the official DropPath is never called and is not built."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, order: str, norm_eps: float, lif=LIF,
                 contiguous_heads: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)  # unused
        self.attn = SpikingformerSelfAttention(dim, num_heads, order, lif, contiguous_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)  # unused
        self.mlp = SpikeFirstMlp(dim, int(dim * mlp_ratio), "mlp", residual=False, lif=lif)  # LIF first, no residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


@fx_leaf
class SpikingTokenizer(nn.Module):
    """Spiking Tokenizer: [T, B, C_in, H, W] -> real-valued BN output [T, B, D, H', W'].

    Five conv3×3 (stride 1, pad 1, no bias) → BN stages, channels D/8, D/4, D/2, D, D. Stage 0 is
    conv → BN; stage i ≥ 1 is LIF → [MaxPool(3,2,1)] → conv → BN, so pooling acts on spikes.
    ``layout="cifar"``: official names ``block{i}_*``, pools ``block3_mp``/``block4_mp``;
    ``layout="imagenet"`` (also DVS): ``proj_*``, ``proj{i}_*``, pools ``maxpool{1..4}``.
    """

    def __init__(self, in_chans: int, embed_dim: int, layout: str = "imagenet", lif=LIF) -> None:
        super().__init__()
        if layout not in ("cifar", "imagenet"):
            raise ValueError(f"unknown tokenizer layout {layout!r}; expected 'cifar' or 'imagenet'")
        dims = (in_chans, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim, embed_dim)
        if layout == "cifar":
            self.names = tuple(f"block{i}" for i in range(5))
            self.pool_stages = (False, False, False, True, True)
            pool_names = {3: "block3_mp", 4: "block4_mp"}
        else:
            self.names = ("proj", "proj1", "proj2", "proj3", "proj4")
            self.pool_stages = (False, True, True, True, True)
            pool_names = {i: f"maxpool{i}" for i in range(1, 5)}
        self.pool_names = tuple(pool_names.get(i) for i in range(5))
        for i, name in enumerate(self.names):
            if i > 0:
                self.add_module(f"{name}_lif", lif())
            if self.pool_stages[i]:
                self.add_module(pool_names[i], nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            self.add_module(f"{name}_conv", nn.Conv2d(dims[i], dims[i + 1], 3, 1, 1, bias=False))
            self.add_module(f"{name}_bn", nn.BatchNorm2d(dims[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, name in enumerate(self.names):
            if i > 0:
                x = getattr(self, f"{name}_lif")(x)
            stage = [getattr(self, f"{name}_conv"), getattr(self, f"{name}_bn")]
            if self.pool_stages[i]:
                stage.insert(0, getattr(self, self.pool_names[i]))
            x = seq(x, *stage)
        return x


class Spikingformer(SpikingClassifier):
    """Spikingformer backbone + linear head. Input: images [B, C, H, W] (repeated over ``T``) or
    sequences [T, B, C, H, W] (time first; their own length wins). Output: logits [B, K] (mean over
    T of the token-averaged stream, then Linear), or per-step [T, B, K] with
    ``per_step_logits=True`` (TET loss; their mean over T equals the logits).

    ``tau`` defaults to the kind's official value (1.5 for DVS, else 2.0) in every LIF.
    ``drop_rate``/``drop_path_rate`` are accepted for timm compatibility and unused: the official
    model builds DropPath but never applies it.
    """

    unused_parameters = r"^block\.\d+\.norm[12]\."  # built, never applied

    def __init__(
        self,
        kind: str = "imagenet",
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        T: int = 4,
        tau: float | None = None,
        per_step_logits: bool = False,
        backend: str = "auto",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"unknown Spikingformer kind {kind!r}; expected one of {_KINDS}")
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be a multiple of 8 (tokenizer widths D/8..D), got {embed_dim}")
        self.check_global_pool(global_pool, "Spikingformer")
        self.kind, self.T, self.in_chans, self.img_size = kind, T, in_chans, img_size
        self.tau = _TAU[kind] if tau is None else float(tau)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.per_step_logits = per_step_logits
        lif = partial(LIF, tau=self.tau, backend=backend)

        self.patch_embed = SpikingTokenizer(in_chans, embed_dim, "cifar" if kind == "cifar" else "imagenet", lif)
        self.size_multiple = 2 ** sum(self.patch_embed.pool_stages)
        self.block = nn.ModuleList(
            [
                SpikingTransformerBlock(embed_dim, num_heads, mlp_ratio, _SSA_ORDER[kind], _NORM_EPS[kind], lif,
                                        contiguous_heads=kind == "imagenet")
                for _ in range(depth)
            ]
        )
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = self.block_feature_info(embed_dim, self.size_multiple)
        self.apply(self._init_weights)

    _init_weights = staticmethod(init_linear_and_layernorm)  # only the head is a Linear


# Alternative (Spikformer-style) naming seen in the official energy log -> committed naming.
_RENAMES = (
    (re.compile(r"^patch_embed\.proj_(conv|bn)(\d)\."), r"patch_embed.proj\2_\1."),
    (re.compile(r"^patch_embed\.rpe_(conv|bn)\."), r"patch_embed.proj4_\1."),
    (re.compile(r"^(block\.\d+\.mlp)\.fc(\d)_"), r"\1.mlp\2_"),
)
# ImageNet/DVS tokenizer names -> CIFAR tokenizer names (for CIFAR-layout models).
_CIFAR_TOKENIZER = re.compile(r"^patch_embed\.proj(\d?)_(conv|bn)\.")


def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Official Spikingformer checkpoint → our state_dict.

    Unwraps timm-saver / ``model`` dicts and strips ``module.``/``_orig_mod.`` prefixes
    (:func:`spikeformers.models.layers.checkpoint_filter_fn`), then maps the alternative naming
    (``proj_conv{k}``/``proj_bn{k}`` → ``proj{k}_conv``/``proj{k}_bn``, ``rpe_conv``/``rpe_bn`` →
    ``proj4_conv``/``proj4_bn``, ``mlp.fc{k}_`` → ``mlp.mlp{k}_``) onto the committed one. Keys
    already in the committed naming pass unchanged. For a CIFAR-layout ``model`` the tokenizer's
    ``proj*`` names are further mapped onto ``block{0..4}_*``.
    """
    state_dict = layers.checkpoint_filter_fn(state_dict, model)
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        if getattr(model, "kind", None) == "cifar":
            key = _CIFAR_TOKENIZER.sub(lambda m: f"patch_embed.block{m.group(1) or 0}_{m.group(2)}.", key)
        out[key] = value
    return out


def _create_spikingformer(model_name: str, pretrained: bool = False, **kwargs) -> Spikingformer:
    return build_spiking_model(Spikingformer, model_name, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    return spiking_cfg(dict(crop_pct=1.0, paper_ids="arXiv:2304.11954"), kwargs)


def _cifar_cfg(num_classes: int = 10, **kwargs) -> dict:
    return _cfg(**dict(CIFAR_CFG, num_classes=num_classes, first_conv="patch_embed.block0_conv", **kwargs))


def _dvs_cfg(num_classes: int) -> dict:
    return _cfg(**dvs_cfg(128, num_classes))


default_cfgs = generate_default_cfgs(
    {
        "spikingformer_tiny": _cifar_cfg(input_size=(1, 32, 32), mean=(0.5,), std=(0.5,),
                                         notes="own CPU-sized variant; default cfg = digits"),
        "spikingformer_cifar10_4_384.cifar10": _cifar_cfg(**hub.timm_cfg("spikingformer_cifar10_4_384.cifar10")),
        "spikingformer_cifar100_4_384": _cifar_cfg(num_classes=100),
        "spikingformer_cifar10_4_256": _cifar_cfg(),
        "spikingformer_cifar10_2_384": _cifar_cfg(),
        "spikingformer_imagenet_8_384": _cfg(),
        "spikingformer_imagenet_8_512": _cfg(),
        "spikingformer_imagenet_8_768.in1k": _cfg(**hub.timm_cfg("spikingformer_imagenet_8_768.in1k")),
        "spikingformer_cifar10dvs_2_256": _dvs_cfg(10),
        "spikingformer_gesture_2_256": _dvs_cfg(11),
    }
)


def _args(kind: str, depth: int, dim: int, heads: int, **defaults) -> dict:
    return dict(kind=kind, depth=depth, embed_dim=dim, num_heads=heads, **defaults)


_CIFAR = dict(img_size=32, num_classes=10, T=4)
_IMAGENET = dict(img_size=224, num_classes=1000, T=4)
_DVS = dict(img_size=128, in_chans=2, T=16)


@register_model
def spikingformer_tiny(pretrained: bool = False, **kwargs) -> Spikingformer:
    """2 blocks, D=64, 4 heads, CIFAR layout: CPU-sized, for the digits default and tests."""
    args = _args("cifar", 2, 64, 4, **dict(_CIFAR, in_chans=1))
    return _create_spikingformer("spikingformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def spikingformer_cifar10_4_384(pretrained: bool = False, **kwargs) -> Spikingformer:
    """Spikingformer-4-384, CIFAR-10 (cifar10.yml, 12 heads; 9,326,266 params). README: 95.61%."""
    args = _args("cifar", 4, 384, 12, **_CIFAR)
    return _create_spikingformer("spikingformer_cifar10_4_384", pretrained, **dict(args, **kwargs))


@register_model
def spikingformer_cifar100_4_384(pretrained: bool = False, **kwargs) -> Spikingformer:
    """Spikingformer-4-384, CIFAR-100 (cifar100.yml, 8 heads; 9,360,916 params). README: 79.09%."""
    args = _args("cifar", 4, 384, 8, **dict(_CIFAR, num_classes=100))
    return _create_spikingformer("spikingformer_cifar100_4_384", pretrained, **dict(args, **kwargs))


@register_model
def spikingformer_cifar10_4_256(pretrained: bool = False, **kwargs) -> Spikingformer:
    """Spikingformer-4-256, CIFAR-10 (heads 8: not stated officially). README: 94.77%."""
    args = _args("cifar", 4, 256, 8, **_CIFAR)
    return _create_spikingformer("spikingformer_cifar10_4_256", pretrained, **dict(args, **kwargs))


@register_model
def spikingformer_cifar10_2_384(pretrained: bool = False, **kwargs) -> Spikingformer:
    """Spikingformer-2-384, CIFAR-10 (heads 12: not stated officially). README: 95.22%."""
    args = _args("cifar", 2, 384, 12, **_CIFAR)
    return _create_spikingformer("spikingformer_cifar10_2_384", pretrained, **dict(args, **kwargs))


@register_model
def spikingformer_imagenet_8_384(pretrained: bool = False, **kwargs) -> Spikingformer:
    """Spikingformer-8-384, ImageNet-1k (heads 8: not stated officially). README: 72.45%."""
    args = _args("imagenet", 8, 384, 8, **_IMAGENET)
    return _create_spikingformer("spikingformer_imagenet_8_384", pretrained, **dict(args, **kwargs))


@register_model
def spikingformer_imagenet_8_512(pretrained: bool = False, **kwargs) -> Spikingformer:
    """Spikingformer-8-512, ImageNet-1k (29,705,768 params, as in the official log). README: 74.79%."""
    args = _args("imagenet", 8, 512, 8, **_IMAGENET)
    return _create_spikingformer("spikingformer_imagenet_8_512", pretrained, **dict(args, **kwargs))


@register_model
def spikingformer_imagenet_8_768(pretrained: bool = False, **kwargs) -> Spikingformer:
    """Spikingformer-8-768, ImageNet-1k (imagenet.yml, 8 heads; 66,363,208 params). README: 75.85%."""
    args = _args("imagenet", 8, 768, 8, **_IMAGENET)
    return _create_spikingformer("spikingformer_imagenet_8_768", pretrained, **dict(args, **kwargs))


@register_model
def spikingformer_cifar10dvs_2_256(pretrained: bool = False, **kwargs) -> Spikingformer:
    """Spikingformer-2-256, CIFAR10-DVS (2×128×128 frames, 16 heads, tau 1.5, T=16). README: 81.3%."""
    args = _args("dvs", 2, 256, 16, **dict(_DVS, num_classes=10))
    return _create_spikingformer("spikingformer_cifar10dvs_2_256", pretrained, **dict(args, **kwargs))


@register_model
def spikingformer_gesture_2_256(pretrained: bool = False, **kwargs) -> Spikingformer:
    """Spikingformer-2-256, DVS128 Gesture (2×128×128 frames, 11 classes, 16 heads, tau 1.5, T=16). README: 98.3%."""
    args = _args("dvs", 2, 256, 16, **dict(_DVS, num_classes=11))
    return _create_spikingformer("spikingformer_gesture_2_256", pretrained, **dict(args, **kwargs))


# Old name (two families had a SpikingSelfAttention); kept for existing imports.
SpikingSelfAttention = SpikingformerSelfAttention
