"""Spike-driven Transformer (SDT v1; Yao et al., NeurIPS 2023).

Paper: https://arxiv.org/abs/2307.01694. Semantics follow the official code exactly:

- MS_SPS patch embedding: conv3×3 → BN → LIF (→ MaxPool) for stages 0–2; stage 3 pools the
  real-valued BN output; a relative position embedding is added to it. No LIF at the output.
- Membrane-shortcut blocks: the residual stream is real-valued; every branch starts with a LIF,
  so each conv sees binary spikes.
- Spike-driven self-attention (SDSA), mask-and-add: Q ⊙ SN_0.5(Σ_tokens K ⊙ V); linear in N and D.
- Head: mean over tokens → LIF → Linear per step → mean over T.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from spikeformers.models import hub
from spikeformers.models.base import (
    CIFAR_CFG, SpikingClassifier, build_spiking_model, dvs_cfg, fx_leaf, init_conv_and_bn, spiking_cfg,
)
from spikeformers.models.layers import SpikeFirstMlp, checkpoint_block, checkpoint_filter_fn, seq
from spikeformers.models.neurons import LIF
from spikeformers.models.sdsa import sdsa

__all__ = ["SpikeDrivenTransformer"]


def to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[T, B, C, H, W] -> [T, B, h, N, d], head-major channels (c = head * d + j)."""
    T, B, C = x.shape[:3]
    return x.flatten(3).transpose(-1, -2).reshape(T, B, -1, num_heads, C // num_heads).permute(0, 1, 3, 2, 4)


def from_heads(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, B, h, N, d] -> [T, B, C, H, W], the inverse of :func:`to_heads`."""
    T, B, h, N, d = x.shape
    return x.transpose(3, 4).reshape(T, B, h * d, height, width)


class SpikeDrivenSelfAttention(nn.Module):
    """SDSA (``MS_SSA_Conv``) with its own membrane shortcut: x + proj(Q ⊙ SN(Σ_N K ⊙ V)).

    The operator Q ⊙ SN(Σ_N K ⊙ V) runs fused (models/sdsa.py) on [T, B, C, N].
    ``talking_heads`` (Conv1d h→h) exists in the official model but is never called; it is kept
    for strict checkpoint loading. In ``dvs_mode`` a parameter-free 3×3 max-pool is applied to
    k and v, to k⊙v and to q⊙kv, as in the official CIFAR10-DVS model.
    """

    # Declared for analysis tools (energy, SOPs): which attention product this module computes.
    attention_product = "sdsa"  # Q ⊙ SN(Σ_N K ⊙ V): mask-and-add, O(N·D)

    def __init__(self, dim: int, num_heads: int = 8, dvs_mode: bool = False, lif=LIF) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dvs_mode = num_heads, dvs_mode
        self.shortcut_lif = lif()
        self.q_conv, self.q_bn, self.q_lif = nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), lif()
        self.k_conv, self.k_bn, self.k_lif = nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), lif()
        self.v_conv, self.v_bn, self.v_lif = nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), lif()
        self.talking_heads = nn.Conv1d(num_heads, num_heads, 1, bias=False)  # unused
        self.talking_heads_lif = lif(v_threshold=0.5)
        self.proj_conv, self.proj_bn = nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim)
        # On [T, B, C, H, W] this is a 3×3 spatial max; on [T, B, h, N, d] a 3×3 max over (N, d).
        self.pool = nn.MaxPool3d((1, 3, 3), stride=1, padding=(0, 1, 1)) if dvs_mode else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W], real-valued
        H, W = x.shape[-2:]
        identity = x
        x = self.shortcut_lif(x)
        q = self.q_lif(seq(x, self.q_conv, self.q_bn))
        k = self.k_lif(seq(x, self.k_conv, self.k_bn))
        v = self.v_lif(seq(x, self.v_conv, self.v_bn))
        if not self.dvs_mode:  # fused operator, per channel over tokens; heads need no reshaping
            x = sdsa(q.flatten(3), k.flatten(3), v.flatten(3), self.talking_heads_lif).reshape(q.shape)
            return seq(x, self.proj_conv, self.proj_bn) + identity
        k, v = self.pool(k), self.pool(v)
        q, k, v = (to_heads(t, self.num_heads) for t in (q, k, v))  # [T, B, h, N, d]
        kv = self.pool(k.mul(v))
        kv = self.talking_heads_lif(kv.sum(dim=-2, keepdim=True))  # [T, B, h, 1, d] binary mask
        x = self.pool(q.mul(kv))
        x = seq(from_heads(x, H, W), self.proj_conv, self.proj_bn)
        return x + identity


@fx_leaf
class Block(nn.Module):
    """x ← MLP(SDSA(x)); each sub-module holds its own residual. No norms, no DropPath."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dvs_mode: bool, lif=LIF):
        super().__init__()
        self.attn = SpikeDrivenSelfAttention(dim, num_heads, dvs_mode, lif)
        self.mlp = SpikeFirstMlp(dim, int(dim * mlp_ratio), "fc", residual=True, lif=lif)  # MS_MLP_Conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


@fx_leaf
class MembraneShortcutPatchEmbed(nn.Module):
    """``MS_SPS``: [T, B, C_in, H, W] -> real-valued [T, B, D, H', W'].

    MaxPool(3,2,1) after stage i iff ``pooling_stat[i] == "1"``; stages 0–2 pool spikes, stage 3
    pools its BN output (x_feat). Output = BN(rpe_conv(LIF(x_feat))) + x_feat.
    """

    def __init__(self, in_chans: int, embed_dim: int, pooling_stat: str, lif=LIF):
        super().__init__()
        if len(pooling_stat) != 4 or set(pooling_stat) - {"0", "1"}:
            raise ValueError(f"pooling_stat must be 4 characters of 0/1, got {pooling_stat!r}")
        dims = (in_chans, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim)
        self.suffixes = ("", "1", "2", "3")  # official names: proj_conv, proj_conv1, ...
        self.pool_stages = tuple(c == "1" for c in pooling_stat)
        for i, s in enumerate(self.suffixes):
            self.add_module(f"proj_conv{s}", nn.Conv2d(dims[i], dims[i + 1], 3, 1, 1, bias=False))
            self.add_module(f"proj_bn{s}", nn.BatchNorm2d(dims[i + 1]))
            self.add_module(f"proj_lif{s}", lif())
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.rpe_conv = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(embed_dim)

    layer_checkpointing = False  # set by the model's set_grad_checkpointing: recompute layer by layer

    def _spiking_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        s = self.suffixes[i]
        x = getattr(self, f"proj_lif{s}")(seq(x, getattr(self, f"proj_conv{s}"), getattr(self, f"proj_bn{s}")))
        return seq(x, self.maxpool) if self.pool_stages[i] else x

    def _last_stage(self, x: torch.Tensor) -> torch.Tensor:
        x = seq(x, self.proj_conv3, self.proj_bn3)
        if self.pool_stages[3]:
            x = seq(x, self.maxpool)  # on the real-valued BN output, before the LIF
        return seq(self.proj_lif3(x), self.rpe_conv, self.rpe_bn) + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With layer checkpointing each stage keeps only its input (spikes after stage 0) and is
        # recomputed alone in backward: the full-resolution maps never all exist at once.
        layered = self.layer_checkpointing and self.training and torch.is_grad_enabled()
        run = (lambda fn, x: checkpoint_block(self, x, fn)) if layered else (lambda fn, x: fn(x))
        for i in range(3):
            x = run(partial(self._spiking_stage, i), x)
        return run(self._last_stage, x)


class SpikeDrivenTransformer(SpikingClassifier):
    """SDT v1 backbone + head. Input: images [B, C, H, W] (repeated over ``T``) or sequences
    [T, B, C, H, W] (time first). Output: logits [B, K] averaged over time, or per-step
    [T, B, K] with ``per_step_logits=True`` (TET loss).

    Head: mean over tokens → head LIF → Linear per step → mean over T after the Linear."""

    readout, head_neuron = "head_then_mean", "head_lif"
    unused_parameters = r"^block\.\d+\.attn\.talking_heads\."  # built, never called

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        T: int = 4,
        pooling_stat: str = "1111",
        dvs_mode: bool = False,
        per_step_logits: bool = False,
        backend: str = "auto",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be a multiple of 8 (MS_SPS widths D/8..D), got {embed_dim}")
        self.check_global_pool(global_pool, "SpikeDrivenTransformer")
        # drop_path_rate: the official model creates DropPath but never applies it.
        self.T, self.in_chans, self.img_size = T, in_chans, img_size
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.per_step_logits = per_step_logits
        self.pooling_stat, self.dvs_mode = pooling_stat, dvs_mode
        lif = partial(LIF, backend=backend)

        self.patch_embed = MembraneShortcutPatchEmbed(in_chans, embed_dim, pooling_stat, lif)
        self.size_multiple = 2 ** sum(self.patch_embed.pool_stages)
        self.block = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, dvs_mode, lif) for _ in range(depth)]
        )
        self.head_lif = lif()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = self.block_feature_info(embed_dim, self.size_multiple)
        self.apply(self._init_weights)

    _init_weights = staticmethod(init_conv_and_bn)  # head Linear and talking_heads keep defaults


def _create_sdt(model_name: str, pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    return build_spiking_model(SpikeDrivenTransformer, model_name, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    return spiking_cfg(dict(crop_pct=0.95, paper_ids="arXiv:2307.01694"), kwargs)


def _cifar_cfg(**kwargs) -> dict:
    return _cfg(**dict(CIFAR_CFG, **kwargs))


def _dvs_cfg(size: int, num_classes: int) -> dict:
    return _cfg(**dvs_cfg(size, num_classes))


default_cfgs = generate_default_cfgs(
    {
        "sdt_tiny.digits": _cfg(**hub.timm_cfg("sdt_tiny.digits", crop_pct=1.0, mean=(0.5,), std=(0.5,))),
        "sdt_cifar_2_256": _cifar_cfg(),
        "sdt_cifar_2_512": _cifar_cfg(),
        "sdt_cifar10dvs_2_256": _dvs_cfg(64, 10),
        "sdt_gesture_2_256": _dvs_cfg(128, 11),
        "sdt_imagenet_8_384.in1k": _cfg(**hub.timm_cfg("sdt_imagenet_8_384.in1k")),
        "sdt_imagenet_6_512.in1k": _cfg(**hub.timm_cfg("sdt_imagenet_6_512.in1k")),
        "sdt_imagenet_8_512.in1k": _cfg(**hub.timm_cfg("sdt_imagenet_8_512.in1k")),
        "sdt_imagenet_10_512.in1k": _cfg(**hub.timm_cfg("sdt_imagenet_10_512.in1k")),
        "sdt_imagenet_8_768.in1k": _cfg(**hub.timm_cfg("sdt_imagenet_8_768.in1k")),
    }
)


def _args(depth: int, dim: int, **defaults) -> dict:
    return dict(depth=depth, embed_dim=dim, num_heads=8, **defaults)


_CIFAR = dict(img_size=32, num_classes=10, pooling_stat="0011", T=4)
_IMAGENET = dict(img_size=224, num_classes=1000, pooling_stat="1111", T=4)


@register_model
def sdt_tiny(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    """2 blocks, D=64, 4 heads, CIFAR layout: CPU-sized, for the digits default and tests."""
    args = dict(_CIFAR, depth=2, embed_dim=64, num_heads=4)
    return _create_sdt("sdt_tiny", pretrained, **dict(args, **kwargs))


@register_model
def sdt_cifar_2_256(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    """SDT-2-256, CIFAR-10/100 (conf/cifar10/2_256_300E_t4)."""
    return _create_sdt("sdt_cifar_2_256", pretrained, **dict(_args(2, 256, **_CIFAR), **kwargs))


@register_model
def sdt_cifar_2_512(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    """SDT-2-512, CIFAR-10/100 (10,233,546 params with 10 classes)."""
    return _create_sdt("sdt_cifar_2_512", pretrained, **dict(_args(2, 512, **_CIFAR), **kwargs))


@register_model
def sdt_cifar10dvs_2_256(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    """SDT-2-256, CIFAR10-DVS: 2×64×64 frames, T=10, dvs_mode, TET in the official recipe."""
    args = _args(2, 256, img_size=64, in_chans=2, num_classes=10, pooling_stat="0011", T=10, dvs_mode=True)
    return _create_sdt("sdt_cifar10dvs_2_256", pretrained, **dict(args, **kwargs))


@register_model
def sdt_gesture_2_256(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    """SDT-2-256, DVS128 Gesture: 2×128×128 frames, T=10 (or 16), 11 classes."""
    args = _args(2, 256, img_size=128, in_chans=2, num_classes=11, pooling_stat="0111", T=10)
    return _create_sdt("sdt_gesture_2_256", pretrained, **dict(args, **kwargs))


@register_model
def sdt_imagenet_8_384(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    """SDT-8-384, ImageNet-1k (72.28% top-1 reported)."""
    return _create_sdt("sdt_imagenet_8_384", pretrained, **dict(_args(8, 384, **_IMAGENET), **kwargs))


@register_model
def sdt_imagenet_6_512(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    """SDT-6-512, ImageNet-1k (74.11%)."""
    return _create_sdt("sdt_imagenet_6_512", pretrained, **dict(_args(6, 512, **_IMAGENET), **kwargs))


@register_model
def sdt_imagenet_8_512(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    """SDT-8-512, ImageNet-1k (74.57%)."""
    return _create_sdt("sdt_imagenet_8_512", pretrained, **dict(_args(8, 512, **_IMAGENET), **kwargs))


@register_model
def sdt_imagenet_10_512(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    """SDT-10-512, ImageNet-1k (74.66%; official config file is named 10_384 but has dim 512)."""
    return _create_sdt("sdt_imagenet_10_512", pretrained, **dict(_args(10, 512, **_IMAGENET), **kwargs))


@register_model
def sdt_imagenet_8_768(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformer:
    """SDT-8-768, ImageNet-1k (77.07% at 288×288 test input)."""
    return _create_sdt("sdt_imagenet_8_768", pretrained, **dict(_args(8, 768, **_IMAGENET), **kwargs))
