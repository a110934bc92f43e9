"""Spikformer: When Spiking Neural Network Meets Transformer (Zhou et al., ICLR 2023).

Paper: https://arxiv.org/abs/2209.15425. Semantics follow the official code exactly:
SPS patch embedding, spiking self-attention (SSA) without softmax,
spike-sum residuals, and a head on spike counts averaged over tokens and time.

The official repository has three model files whose layers differ in type (and so in state_dict
shapes); ``kind`` selects one:

==========  =================  ====================  ===============  ==========================
kind     pools (SPS stages) q/k/v/proj layers     MLP layers       SSA product, scale
==========  =================  ====================  ===============  ==========================
"cifar"     stages 2, 3        Linear (+ bias)       Linear           ((Q Kᵀ) s) V, s = 0.125
"imagenet"  all four           Conv1d k1 (no bias)   Conv2d 1×1       Q (Kᵀ V) s,   s = 0.125
"dvs"       all four           Conv1d k1 (no bias)   Conv1d k1        ((Q Kᵀ) V) s, s = 0.25
==========  =================  ====================  ===============  ==========================

All three products are integer-valued in fp32 and s is a power of two, so the orders agree
bit-exactly; we keep each kind's order anyway so fp16 rounding matches the official code too.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from spikeformers.models import hub
from spikeformers.models.base import (
    CIFAR_CFG, SpikingClassifier, build_spiking_model, dvs_cfg, fx_leaf, init_linear_and_layernorm, spiking_cfg,
)
from spikeformers.models.layers import checkpoint_filter_fn, seq, split_heads, ssa_product
from spikeformers.models.neurons import LIF

__all__ = ["Spikformer"]

_KINDS = ("cifar", "imagenet", "dvs")


class SSALinear(nn.Module):
    """SSA of the CIFAR model: Linear q/k/v/proj with bias, tokens in [T, B, N, C] layout."""

    # Declared for analysis tools (energy, SOPs): which attention product this module computes.
    attention_product, tokens_last = "ssa", True

    def __init__(self, dim: int, num_heads: int, lif=LIF) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = 0.125
        self.q_linear, self.q_bn, self.q_lif = nn.Linear(dim, dim), nn.BatchNorm1d(dim), lif()
        self.k_linear, self.k_bn, self.k_lif = nn.Linear(dim, dim), nn.BatchNorm1d(dim), lif()
        self.v_linear, self.v_bn, self.v_lif = nn.Linear(dim, dim), nn.BatchNorm1d(dim), lif()
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_linear, self.proj_bn = nn.Linear(dim, dim), nn.BatchNorm1d(dim)
        self.proj_lif = lif()

    @staticmethod
    def _linear_bn(linear, bn, x):
        """Linear on [T*B, N, C], BatchNorm1d over channels ([T*B, C, N]) -> [T, B, N, C]."""
        T, B = x.shape[:2]
        y = linear(x.flatten(0, 1))
        return bn(y.transpose(-1, -2)).transpose(-1, -2).reshape(T, B, *y.shape[1:]).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, N, C]
        T, B, N, C = x.shape
        q = split_heads(self.q_lif(self._linear_bn(self.q_linear, self.q_bn, x)), self.num_heads)
        k = split_heads(self.k_lif(self._linear_bn(self.k_linear, self.k_bn, x)), self.num_heads)
        v = split_heads(self.v_lif(self._linear_bn(self.v_linear, self.v_bn, x)), self.num_heads)
        x = ssa_product(q, k, v, self.scale, "qk_scale_v")  # [T, B, h, N, d]
        x = self.attn_lif(x.transpose(2, 3).reshape(T, B, N, C))
        return self.proj_lif(self._linear_bn(self.proj_linear, self.proj_bn, x))


class SSAConv(nn.Module):
    """SSA of the ImageNet/DVS models: Conv1d k1 q/k/v (no bias), proj with bias; [T, B, C, *S]."""

    # Declared for analysis tools (energy, SOPs): which attention product this module computes.
    attention_product = "ssa"  # in the order of ``self.order``

    def __init__(self, dim: int, num_heads: int, scale: float, order: str, lif=LIF) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.scale, self.order = num_heads, scale, order
        self.q_conv, self.q_bn, self.q_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.k_conv, self.k_bn, self.k_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.v_conv, self.v_bn, self.v_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_conv, self.proj_bn = nn.Conv1d(dim, dim, 1), nn.BatchNorm1d(dim)
        self.proj_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, *S], S = (H, W) or (N,)
        T, B, C = x.shape[:3]
        spatial = x.shape[3:]
        x = x.flatten(3)  # [T, B, C, N]

        def qkv(conv, bn, lif):  # -> [T, B, h, N, d]
            return split_heads(lif(seq(x, conv, bn)).transpose(-1, -2), self.num_heads)

        q = qkv(self.q_conv, self.q_bn, self.q_lif)
        k = qkv(self.k_conv, self.k_bn, self.k_lif)
        v = qkv(self.v_conv, self.v_bn, self.v_lif)
        x = ssa_product(q, k, v, self.scale, self.order)  # [T, B, h, N, d]
        x = self.attn_lif(x.transpose(3, 4).reshape(T, B, C, -1))
        x = self.proj_lif(seq(x, self.proj_conv, self.proj_bn))
        return x.reshape(T, B, C, *spatial)


class MlpLinear(nn.Module):
    """MLP of the CIFAR model on [T, B, N, C]: fc1 → BN → LIF → fc2 → BN → LIF."""

    def __init__(self, dim: int, hidden: int, lif=LIF) -> None:
        super().__init__()
        self.fc1_linear, self.fc1_bn, self.fc1_lif = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), lif()
        self.fc2_linear, self.fc2_bn, self.fc2_lif = nn.Linear(hidden, dim), nn.BatchNorm1d(dim), lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1_lif(SSALinear._linear_bn(self.fc1_linear, self.fc1_bn, x))
        return self.fc2_lif(SSALinear._linear_bn(self.fc2_linear, self.fc2_bn, x))


class MlpConv(nn.Module):
    """MLP of the ImageNet (Conv2d 1×1 + BN2d) and DVS (Conv1d k1 + BN1d) models on [T, B, C, *S]."""

    def __init__(self, dim: int, hidden: int, spatial_dims: int, lif=LIF) -> None:
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if spatial_dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.fc1_conv, self.fc1_bn, self.fc1_lif = conv(dim, hidden, 1), bn(hidden), lif()
        self.fc2_conv, self.fc2_bn, self.fc2_lif = conv(hidden, dim, 1), bn(dim), lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1_lif(seq(x, self.fc1_conv, self.fc1_bn))
        return self.fc2_lif(seq(x, self.fc2_conv, self.fc2_bn))


@fx_leaf
class Block(nn.Module):
    """x ← x + SSA(x); x ← x + MLP(x). ``norm1``/``norm2`` exist in the official model but are
    never applied; they are kept so official checkpoints load with ``strict=True``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kind: str, norm_eps: float, lif=LIF):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)  # unused
        if kind == "cifar":
            self.attn = SSALinear(dim, num_heads, lif)
        elif kind == "imagenet":
            self.attn = SSAConv(dim, num_heads, 0.125, "q_kv_scale", lif)
        else:
            self.attn = SSAConv(dim, num_heads, 0.25, "qk_v_scale", lif)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)  # unused
        if kind == "cifar":
            self.mlp = MlpLinear(dim, hidden, lif)
        else:
            self.mlp = MlpConv(dim, hidden, spatial_dims=2 if kind == "imagenet" else 1, lif=lif)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


@fx_leaf
class SpikingPatchSplitting(nn.Module):
    """SPS: four conv3×3 → BN → LIF stages (D/8, D/4, D/2, D), MaxPool(3,2,1) on the spikes
    of the stages in ``pool_stages``, then a relative position embedding: out = LIF(BN(conv(x))) + x.

    [T, B, C_in, H, W] -> [T, B, D, H', W'] with values in {0, 1, 2}.
    """

    def __init__(self, in_chans: int, embed_dim: int, pool_stages: tuple[bool, ...], lif=LIF):
        super().__init__()
        dims = (in_chans, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim)
        self.suffixes = ("", "1", "2", "3")  # official names: proj_conv, proj_conv1, ...
        self.pool_stages = tuple(bool(p) for p in pool_stages)
        for i, s in enumerate(self.suffixes):
            self.add_module(f"proj_conv{s}", nn.Conv2d(dims[i], dims[i + 1], 3, 1, 1, bias=False))
            self.add_module(f"proj_bn{s}", nn.BatchNorm2d(dims[i + 1]))
            self.add_module(f"proj_lif{s}", lif())
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.rpe_conv = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(embed_dim)
        self.rpe_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s, pool in zip(self.suffixes, self.pool_stages):
            conv, bn = getattr(self, f"proj_conv{s}"), getattr(self, f"proj_bn{s}")
            x = getattr(self, f"proj_lif{s}")(seq(x, conv, bn))
            if pool:
                x = seq(x, self.maxpool)
        x_feat = x
        x = self.rpe_lif(seq(x, self.rpe_conv, self.rpe_bn))
        return x + x_feat


class Spikformer(SpikingClassifier):
    """Spikformer backbone + linear head. Input: images [B, C, H, W] (repeated over ``T``) or
    sequences [T, B, C, H, W]. Output: logits [B, K] averaged over time, or per-step [T, B, K]
    with ``per_step_logits=True`` (TET loss)."""

    unused_parameters = r"^(block\.\d+\.norm[12]\.|norm\.|pos_embed$)"  # built, never applied

    def __init__(
        self,
        kind: str = "cifar",
        img_size: int = 32,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 384,
        depth: int = 4,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        T: int = 4,
        per_step_logits: bool = False,
        backend: str = "auto",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"unknown Spikformer kind {kind!r}; expected one of {_KINDS}")
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be a multiple of 8 (SPS widths D/8..D), got {embed_dim}")
        self.check_global_pool(global_pool, "Spikformer")
        # drop_rate / drop_path_rate: accepted for timm compatibility; the official model creates
        # DropPath but never applies it, so they have no effect here either.
        self.kind, self.T, self.in_chans, self.img_size = kind, T, in_chans, img_size
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.per_step_logits = per_step_logits
        self.tokens_last = kind == "cifar"  # the CIFAR model's Linear layers run on [T, B, N, D]
        lif = partial(LIF, backend=backend)
        pool_stages = (False, False, True, True) if kind == "cifar" else (True, True, True, True)
        self.size_multiple = 2 ** sum(pool_stages)
        norm_eps = 1e-6 if kind == "imagenet" else 1e-5

        if kind == "dvs":  # unused in the official model, kept for strict loading
            self.pos_embed = nn.Parameter(torch.zeros(1, 64, embed_dim))
        self.patch_embed = SpikingPatchSplitting(in_chans, embed_dim, pool_stages, lif)
        self.block = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, kind, norm_eps, lif) for _ in range(depth)]
        )
        if kind == "dvs":
            self.norm = nn.LayerNorm(embed_dim)  # unused
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = self.block_feature_info(embed_dim, self.size_multiple)
        self.apply(self._init_weights)
        if kind == "dvs":
            trunc_normal_(self.pos_embed, std=0.02)

    _init_weights = staticmethod(init_linear_and_layernorm)

    # --- timm model API (the rest comes from SpikingClassifier) ---
    stem_regex = r"^pos_embed|^patch_embed"

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if self.kind == "dvs" else set()

    def stages(self):
        """patch_embed → token layout → blocks."""
        return [("patch_embed", self.patch_embed), ("tokens", self.to_tokens)] + super().stages()[1:]

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """SPS maps [T, B, D, H', W'] -> the kind's block stream: [T, B, N, D] (cifar), [T, B, D, N]
        (dvs) or unchanged (imagenet). The head averages over tokens."""
        if self.kind == "cifar":
            return x.flatten(3).transpose(-1, -2).contiguous()
        return x.flatten(3) if self.kind == "dvs" else x


def _create_spikformer(model_name: str, pretrained: bool = False, **kwargs) -> Spikformer:
    return build_spiking_model(Spikformer, model_name, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    return spiking_cfg(dict(crop_pct=1.0, paper_ids="arXiv:2209.15425"), kwargs)


def _cifar_cfg(**kwargs) -> dict:
    return _cfg(**dict(CIFAR_CFG, **kwargs))


default_cfgs = generate_default_cfgs(
    {
        "spikformer_tiny.digits": _cfg(**hub.timm_cfg("spikformer_tiny.digits", crop_pct=1.0, mean=(0.5,), std=(0.5,))),
        "spikformer_cifar_4_384": _cifar_cfg(),
        "spikformer_cifar_4_256": _cifar_cfg(),
        "spikformer_cifar_2_384": _cifar_cfg(),
        "spikformer_imagenet_8_384": _cfg(),
        "spikformer_imagenet_8_512": _cfg(),
        "spikformer_imagenet_10_512": _cfg(),
        "spikformer_imagenet_8_768": _cfg(),
        "spikformer_cifar10dvs_2_256": _cfg(**dvs_cfg(128, 10)),
    }
)


def _args(kind: str, depth: int, dim: int, heads: int, **defaults) -> dict:
    return dict(kind=kind, depth=depth, embed_dim=dim, num_heads=heads, **defaults)


@register_model
def spikformer_tiny(pretrained: bool = False, **kwargs) -> Spikformer:
    """2 blocks, D=64, 4 heads, CIFAR layout: CPU-sized, for the digits default and tests."""
    args = _args("cifar", 2, 64, 4, img_size=32, num_classes=10)
    return _create_spikformer("spikformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def spikformer_cifar_4_384(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-4-384, CIFAR-10/100 (9,330,874 params with 10 classes)."""
    args = _args("cifar", 4, 384, 12, img_size=32, num_classes=10)
    return _create_spikformer("spikformer_cifar_4_384", pretrained, **dict(args, **kwargs))


@register_model
def spikformer_cifar_4_256(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-4-256, CIFAR (heads 8: not stated officially; heads change no weights)."""
    args = _args("cifar", 4, 256, 8, img_size=32, num_classes=10)
    return _create_spikformer("spikformer_cifar_4_256", pretrained, **dict(args, **kwargs))


@register_model
def spikformer_cifar_2_384(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-2-384, CIFAR."""
    args = _args("cifar", 2, 384, 12, img_size=32, num_classes=10)
    return _create_spikformer("spikformer_cifar_2_384", pretrained, **dict(args, **kwargs))


@register_model
def spikformer_imagenet_8_384(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-8-384, ImageNet (heads 12: not stated officially)."""
    args = _args("imagenet", 8, 384, 12, img_size=224, num_classes=1000)
    return _create_spikformer("spikformer_imagenet_8_384", pretrained, **dict(args, **kwargs))


@register_model
def spikformer_imagenet_8_512(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-8-512, ImageNet: the officially registered model (29,705,768 params)."""
    args = _args("imagenet", 8, 512, 8, img_size=224, num_classes=1000)
    return _create_spikformer("spikformer_imagenet_8_512", pretrained, **dict(args, **kwargs))


@register_model
def spikformer_imagenet_10_512(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-10-512, ImageNet."""
    args = _args("imagenet", 10, 512, 8, img_size=224, num_classes=1000)
    return _create_spikformer("spikformer_imagenet_10_512", pretrained, **dict(args, **kwargs))


@register_model
def spikformer_imagenet_8_768(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-8-768, ImageNet (heads 12: not stated officially)."""
    args = _args("imagenet", 8, 768, 12, img_size=224, num_classes=1000)
    return _create_spikformer("spikformer_imagenet_8_768", pretrained, **dict(args, **kwargs))


@register_model
def spikformer_cifar10dvs_2_256(pretrained: bool = False, **kwargs) -> Spikformer:
    """Spikformer-2-256, CIFAR10-DVS (2×128×128 frames, T=16 from the data)."""
    args = _args("dvs", 2, 256, 16, img_size=128, in_chans=2, num_classes=10, T=16)
    return _create_spikformer("spikformer_cifar10dvs_2_256", pretrained, **dict(args, **kwargs))
