"""Spike-driven Transformer v2 / Meta-SpikeFormer (Yao et al., ICLR 2024).

Paper: https://arxiv.org/abs/2404.03663 ("Spike-driven Transformer V2: Meta Spiking Neural Network
Architecture Inspiring the Design of Next-generation Neuromorphic Chips"). Semantics follow the
official ``classification/models.py`` exactly; key names are the
official ones, so official checkpoints load with ``strict=True``.

A 4-stage hierarchical network with a real-valued membrane-shortcut stream throughout (every branch
starts with a LIF and ends with a BN):

- ``MS_DownSampling`` (``downsample*``): [LIF] → Conv2d (with bias) → BN; no LIF in the first one.
- Two conv stages of ``MS_ConvBlock`` (``ConvBlock*``): x ← x + SepConv(x), SepConv = LIF → 1×1 (C→2C)
  → BN → LIF → depthwise 7×7 → 1×1 (2C→C) → BN; then x ← x + BN(conv3×3(LIF(BN(conv3×3(LIF(x)))))),
  hidden 4C.
- Two transformer stages of ``MS_Block`` (``block3``, ``block4``): x ← x + Attn(x); x ← x + MLP(x).
  Attn: S = LIF(x); Q, K, V = LIF(BN(RepConv(S))); SN₀.₅((Q (Kᵀ V))·0.125) → RepConv → BN (no LIF).
  RepConv = 1×1 → BN-and-pad → depthwise 3×3 (padding 0) → 1×1 → BN, so q/k/v/proj each end in two
  BNs in a row. MLP: LIF → Conv1d (bias) → BN1d → LIF → Conv1d (bias) → BN1d, ratio 4.
- Head: mean over tokens → LIF (``lif``) → Linear per step → mean over T. ``kd=True`` adds a
  distillation head ``head_kd`` on the same spikes: training returns (logits, logits_kd), eval their
  mean. ``head_on_spikes=False`` is the pre-``d95ad13`` reading (``head`` gets the mean itself).

Every Conv/BN runs with T folded into the batch (BN statistics over T·B·pixels). Neurons are reset
at the start of every forward call. :meth:`SpikeDrivenTransformerV2.reparameterize` folds each RepConv
and its outer BN into one 3×3 conv with bias for inference (not in the official code).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from spikeformers.models import hub, layers
from spikeformers.models.base import SpikingClassifier, build_spiking_model, fx_leaf, init_linear_and_layernorm, spiking_cfg
from spikeformers.models.layers import seq
from spikeformers.models.neurons import LIF

__all__ = [
    "SpikeDrivenTransformerV2", "BNAndPadLayer", "RepConv", "SepConv", "MSConvBlock", "MSAttention",
    "MSMlp", "MSBlock", "MSDownSampling",
]


# --- RepConv ------------------------------------------------------------------------------------


class BNAndPadLayer(nn.Module):
    """BatchNorm2d, then pad ``pad_pixels`` on every side with BN(0) of the *running* statistics.

    pad_c = β_c − μ_run,c · γ_c / √(σ²_run,c + ε), with γ and β detached (no gradient through the pad).
    The constant is computed after this call's BN forward, i.e. in training from the running
    statistics this very batch has just updated (official order). In eval mode the padded output
    equals BN applied to a zero-padded input, which is what makes RepConv re-parameterisable.
    The BN is nested (``bn.*`` keys) as in the official model.
    """

    def __init__(self, pad_pixels: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def pad_values(self) -> torch.Tensor:
        """[C] per-channel pad constant from the current running statistics."""
        bn = self.bn
        if bn.affine:
            return bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        return -bn.running_mean / torch.sqrt(bn.running_var + bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W]
        out = self.bn(x)  # updates the running statistics in training ...
        p = self.pad_pixels
        if p > 0:
            pad = self.pad_values().view(1, -1, 1, 1)  # ... so the pad sees the updated ones
            out = F.pad(out, [p] * 4)
            out[:, :, :p, :] = pad
            out[:, :, -p:, :] = pad
            out[:, :, :, :p] = pad
            out[:, :, :, -p:] = pad
        return out


class RepConv(nn.Module):
    """``body`` = 1×1 (C_in→C_in, no bias) → BNAndPad(1) → [depthwise 3×3 pad 0 → 1×1 (C_in→C_out) → BN].

    A 3×3 receptive field whose every conv sees either binary spikes (``body.0``) or a linear
    function of them; in eval mode the chain equals one 3×3 conv with bias (:meth:`fused`).
    """

    def __init__(self, in_channel: int, out_channel: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 1, 1, 0, bias=False),
            BNAndPadLayer(pad_pixels=1, num_features=in_channel),
            nn.Sequential(
                nn.Conv2d(in_channel, in_channel, 3, 1, 0, groups=in_channel, bias=False),
                nn.Conv2d(in_channel, out_channel, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out_channel),
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def merged_conv(self) -> tuple[str, tuple[int, int, int], list[str]]:
        """For analysis tools: this linear chain counts as one 3×3 conv on its spike input —
        (where it is recorded, (kernel, C_in, C_out), the convs inside not counted on their own)."""
        first, (dw, pw, _) = self.body[0], self.body[2]
        return "", (dw.kernel_size[0], first.in_channels, pw.out_channels), ["body.0", "body.2.0", "body.2.1"]

    @torch.no_grad()
    def fused(self, outer_bn: nn.BatchNorm2d | None = None) -> nn.Conv2d:
        """One Conv2d(3×3, padding 1, bias) equal in eval mode to this RepConv (then ``outer_bn``).

        With u = W₀x, BN₁(u) = a₁u + b₁ and pad value b₁ = BN₁(0):
        K[o,i] = a₃a₂[o] Σ_c W₁[o,c] W_dw[c] a₁[c] W₀[c,i],
        bias[o] = a₃[o] (a₂[o] Σ_c W₁[o,c] b₁[c] ΣW_dw[c] + b₂[o]) + b₃[o]  (computed in float64).
        """
        conv1x1, bnpad, (dw, pw, bn2) = self.body[0], self.body[1], self.body[2]
        w0 = conv1x1.weight.double()[:, :, 0, 0]  # [C, C_in]
        wd = dw.weight.double()[:, 0]  # [C, 3, 3]
        w1 = pw.weight.double()[:, :, 0, 0]  # [C_out, C]
        a1, b1 = _bn_affine(bnpad.bn)
        a2, b2 = _bn_affine(bn2)
        kernel = torch.einsum("oc,chw,c,ci->oihw", w1, wd, a1, w0) * a2[:, None, None, None]
        bias = a2 * (w1 @ (b1 * wd.sum((1, 2)))) + b2
        if outer_bn is not None:
            a3, b3 = _bn_affine(outer_bn)
            kernel, bias = kernel * a3[:, None, None, None], a3 * bias + b3
        dtype, device = conv1x1.weight.dtype, conv1x1.weight.device
        conv = nn.Conv2d(w0.shape[1], w1.shape[0], 3, 1, 1, bias=True).to(device=device, dtype=dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        return conv


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = a·x + b (float64)."""
    a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return a, bn.bias.double() - bn.running_mean.double() * a


# --- conv stages --------------------------------------------------------------------------------


class SepConv(nn.Module):
    """Inverted separable conv: LIF → 1×1 (C→2C) → BN → LIF → depthwise 7×7 → 1×1 (2C→C) → BN."""

    def __init__(self, dim: int, expansion_ratio: int = 2, kernel_size: int = 7, padding: int = 3, lif=LIF) -> None:
        super().__init__()
        med = int(expansion_ratio * dim)
        self.lif1 = lif()
        self.pwconv1 = nn.Conv2d(dim, med, kernel_size=1, stride=1, bias=False)
        self.bn1 = nn.BatchNorm2d(med)
        self.lif2 = lif()
        self.dwconv = nn.Conv2d(med, med, kernel_size=kernel_size, padding=padding, groups=med, bias=False)
        self.pwconv2 = nn.Conv2d(med, dim, kernel_size=1, stride=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W]
        x = seq(self.lif1(x), self.pwconv1, self.bn1)
        return seq(self.lif2(x), self.dwconv, self.pwconv2, self.bn2)

    def merged_conv(self) -> tuple[str, tuple[int, int, int], list[str]]:
        """For analysis tools: depthwise k×k → 1×1 counts as one k×k conv on the depthwise conv's
        spike input (see :meth:`RepConv.merged_conv`)."""
        dw = self.dwconv
        return "dwconv", (dw.kernel_size[0], dw.in_channels, self.pwconv2.out_channels), ["pwconv2"]


@fx_leaf
class MSConvBlock(nn.Module):
    """``MS_ConvBlock``: x ← x + SepConv(x); x ← x + BN(conv3×3(LIF(BN(conv3×3(LIF(x)))))), hidden 4C."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, lif=LIF) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.Conv = SepConv(dim, lif=lif)
        self.lif1 = lif()
        self.conv1 = nn.Conv2d(dim, hidden, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.lif2 = lif()
        self.conv2 = nn.Conv2d(hidden, dim, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv(x) + x
        x_feat = x
        x = seq(self.lif1(x), self.conv1, self.bn1)
        x = seq(self.lif2(x), self.conv2, self.bn2)
        return x_feat + x


@fx_leaf
class MSDownSampling(nn.Module):
    """``MS_DownSampling``: [LIF] → Conv2d (bias) → BN; the first one has no LIF (image input)."""

    def __init__(self, in_channels: int, embed_dims: int, kernel_size: int = 3, stride: int = 2,
                 padding: int = 1, first_layer: bool = False, lif=LIF) -> None:
        super().__init__()
        self.encode_conv = nn.Conv2d(in_channels, embed_dims, kernel_size=kernel_size, stride=stride, padding=padding)
        self.encode_bn = nn.BatchNorm2d(embed_dims)
        self.encode_lif = None if first_layer else lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encode_lif is not None:
            x = self.encode_lif(x)
        return seq(x, self.encode_conv, self.encode_bn)


# --- transformer stages -------------------------------------------------------------------------


class MSAttention(nn.Module):
    """``MS_Attention_RepConv_qkv_id``: linear spike-driven attention with RepConv projections.

    S = SN(x); Q, K, V = SN(BN(RepConv(S))); A = SN₀.₅((Q (Kᵀ V)) · 0.125) per head (channel
    c = head·d + j); out = BN(RepConv(A)), no LIF. Returns the branch only (the block adds x).
    """

    # Declared for analysis tools (energy, SOPs): which attention product this module computes.
    attention_product = "ssa_q_kv"  # always Q (Kᵀ V)

    def __init__(self, dim: int, num_heads: int = 8, lif=LIF) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.scale = dim, num_heads, 0.125
        self.head_lif = lif()
        self.q_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))
        self.k_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))
        self.v_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))
        self.q_lif, self.k_lif, self.v_lif = lif(), lif(), lif()
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_conv = nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W] -> [T, B, h, N, d]
        T, B, C = x.shape[:3]
        x = x.flatten(3).transpose(-1, -2).reshape(T, B, -1, self.num_heads, C // self.num_heads)
        return x.permute(0, 1, 3, 2, 4).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W], real-valued
        T, B, C, H, W = x.shape
        x = self.head_lif(x)
        q, k, v = seq(x, self.q_conv), seq(x, self.k_conv), seq(x, self.v_conv)
        q, k, v = self._heads(self.q_lif(q)), self._heads(self.k_lif(k)), self._heads(self.v_lif(v))
        x = k.transpose(-2, -1) @ v  # [T, B, h, d, d]: linear in N
        x = (q @ x) * self.scale  # [T, B, h, N, d]
        x = x.transpose(3, 4).reshape(T, B, C, H * W).contiguous()
        x = self.attn_lif(x).reshape(T, B, C, H, W)
        return seq(x, self.proj_conv)


class MSMlp(nn.Module):
    """``MS_MLP``: LIF → Conv1d k1 (bias) → BN1d → LIF → Conv1d k1 (bias) → BN1d on [T, B, C, N]."""

    def __init__(self, in_features: int, hidden_features: int, lif=LIF) -> None:
        super().__init__()
        self.fc1_conv = nn.Conv1d(in_features, hidden_features, kernel_size=1, stride=1)
        self.fc1_bn = nn.BatchNorm1d(hidden_features)
        self.fc1_lif = lif()
        self.fc2_conv = nn.Conv1d(hidden_features, in_features, kernel_size=1, stride=1)
        self.fc2_bn = nn.BatchNorm1d(in_features)
        self.fc2_lif = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = seq(self.fc1_lif(x.flatten(3)), self.fc1_conv, self.fc1_bn)
        x = seq(self.fc2_lif(x), self.fc2_conv, self.fc2_bn)
        return x.reshape(shape)


@fx_leaf
class MSBlock(nn.Module):
    """``MS_Block``: x ← x + Attn(x); x ← x + MLP(x). No norms; DropPath is never applied officially."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, lif=LIF) -> None:
        super().__init__()
        self.attn = MSAttention(dim, num_heads, lif)
        self.mlp = MSMlp(dim, int(dim * mlp_ratio), lif)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


# --- model --------------------------------------------------------------------------------------


class SpikeDrivenTransformerV2(SpikingClassifier):
    """Meta-SpikeFormer (official ``Spiking_vit_MetaFormer``). Input: images [B, C, H, W] (repeated
    over ``T``) or sequences [T, B, C, H, W]; H, W multiples of 16. Output: logits [B, K] averaged
    over time ([T, B, K] with ``per_step_logits``); with ``kd`` a pair (logits, logits_kd) in training.

    Args:
        embed_dim: channels [C0, C1, C2, C3] of the four stages (stage 1 starts at C0/2).
        depths: blocks in the two transformer stages (official: 6, 2; the conv stages are fixed 1+1+2).
        num_heads: heads of every attention (C2 and C3 must be divisible by it).
        T: time steps for image input; a plain attribute, settable after construction.
        kd: add the distillation head ``head_kd``.
        head_on_spikes: True (official HEAD): ``head`` sees the head-LIF spikes; False: the older
            reading where ``head`` sees the non-spiking token mean and only ``head_kd`` the spikes.
        per_step_logits: return per-step logits [T, B, K] (e.g. for a TET loss).
        img_size, drop_rate, drop_path_rate: accepted for the timm API; unused (the official model
            builds DropPath only for rates > 0 and never applies it).
    """

    # forward order of the stage modules (official attribute names)
    stage_names = ("downsample1_1", "ConvBlock1_1", "downsample1_2", "ConvBlock1_2", "downsample2",
                    "ConvBlock2_1", "ConvBlock2_2", "downsample3", "block3", "downsample4", "block4")

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: tuple[int, int, int, int] = (128, 256, 512, 640),
        depths: tuple[int, int] = (6, 2),
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        T: int = 4,
        kd: bool = False,
        head_on_spikes: bool = True,
        per_step_logits: bool = False,
        backend: str = "auto",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        embed_dim = tuple(int(c) for c in embed_dim)
        if len(embed_dim) != 4 or embed_dim[0] % 2:
            raise ValueError(f"embed_dim must be 4 channel counts [C0, C1, C2, C3] with C0 even, got {embed_dim}")
        if len(depths) != 2:
            raise ValueError(f"depths must give the block counts of the two transformer stages, got {depths}")
        if embed_dim[2] % num_heads or embed_dim[3] % num_heads:
            raise ValueError(f"embed_dim {embed_dim[2]} and {embed_dim[3]} must be divisible by num_heads {num_heads}")
        self.check_global_pool(global_pool, "SpikeDrivenTransformerV2")
        self.T, self.in_chans, self.img_size = T, in_chans, img_size
        self.num_classes = num_classes
        self.embed_dim, self.depths = embed_dim, tuple(depths)
        self.num_features = self.head_hidden_size = embed_dim[3]
        self.kd, self.head_on_spikes, self.per_step_logits = kd, head_on_spikes, per_step_logits
        self.size_multiple = 16  # four stride-2 downsamplings
        lif = partial(LIF, backend=backend)
        c0, c1, c2, c3 = embed_dim

        def conv_stage(dim: int) -> nn.ModuleList:
            return nn.ModuleList([MSConvBlock(dim, mlp_ratio, lif)])

        self.downsample1_1 = MSDownSampling(in_chans, c0 // 2, 7, 2, 3, first_layer=True, lif=lif)
        self.ConvBlock1_1 = conv_stage(c0 // 2)
        self.downsample1_2 = MSDownSampling(c0 // 2, c0, 3, 2, 1, lif=lif)
        self.ConvBlock1_2 = conv_stage(c0)
        self.downsample2 = MSDownSampling(c0, c1, 3, 2, 1, lif=lif)
        self.ConvBlock2_1 = conv_stage(c1)
        self.ConvBlock2_2 = conv_stage(c1)
        self.downsample3 = MSDownSampling(c1, c2, 3, 2, 1, lif=lif)
        self.block3 = nn.ModuleList([MSBlock(c2, num_heads, mlp_ratio, lif) for _ in range(depths[0])])
        self.downsample4 = MSDownSampling(c2, c3, 3, 1, 1, lif=lif)
        self.block4 = nn.ModuleList([MSBlock(c3, num_heads, mlp_ratio, lif) for _ in range(depths[1])])
        self.lif = lif()
        self.head = nn.Linear(c3, num_classes) if num_classes > 0 else nn.Identity()
        if kd:
            self.head_kd = nn.Linear(c3, num_classes) if num_classes > 0 else nn.Identity()
        last = lambda blocks, fallback: blocks if len(getattr(self, blocks)) else fallback  # noqa: E731
        self.feature_info = [
            dict(num_chs=c0, reduction=4, module="ConvBlock1_2"),
            dict(num_chs=c1, reduction=8, module="ConvBlock2_2"),
            dict(num_chs=c2, reduction=16, module=last("block3", "downsample3")),
            dict(num_chs=c3, reduction=16, module=last("block4", "downsample4")),
        ]
        self.apply(self._init_weights)

    _init_weights = staticmethod(init_linear_and_layernorm)  # only the heads are Linear

    # --- timm API ---

    classifiers = ("head", "head_kd")  # reset_classifier rebuilds both

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for layer-wise LR decay: the stem (``downsample1_1``), then every later
        downsampler and block in forward order (coarse: one group per stage module name)."""
        return self.stage_group_matcher(coarse)

    # --- forward (the rest comes from SpikingClassifier) ---

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        # mean over tokens → head LIF → Linear per step → mean over T.
        x = x.flatten(3).mean(3)  # [T, B, C3]
        x_lif = self.lif(x)
        feats = x_lif if self.head_on_spikes else x
        if pre_logits:
            return feats.mean(0)
        reduce = (lambda t: t) if self.per_step_logits else (lambda t: t.mean(0))  # noqa: E731
        logits = reduce(self.head(feats))
        if not self.kd:
            return logits
        logits_kd = reduce(self.head_kd(x_lif))
        if self.training:
            return logits, logits_kd
        return (logits + logits_kd) / 2

    # --- inference-time re-parameterisation (not in the official code) ---

    @torch.no_grad()
    def reparameterize(self) -> SpikeDrivenTransformerV2:
        """Fold every ``Sequential(RepConv, BN)`` (q/k/v/proj of every attention) into one 3×3 conv
        with bias, in place. Eval only: the folded model uses the running statistics, so it equals
        the original in eval mode (not in training). The state_dict keys change accordingly
        (``…q_conv.weight``/``.bias``). Returns ``self``."""
        if self.training:
            raise RuntimeError("reparameterize() folds running BN statistics: call model.eval() first")
        for module in self.modules():
            if isinstance(module, MSAttention):
                for name in ("q_conv", "k_conv", "v_conv", "proj_conv"):
                    branch = getattr(module, name)
                    if isinstance(branch, nn.Sequential):
                        setattr(module, name, branch[0].fused(branch[1]))
        return self


# --- checkpoints, cfgs, registration ------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Official SDT v2 checkpoints → our state_dict (our key names are the official ones).

    Unwraps the training-checkpoint dict (MAE/DeiT saver ``{"model": ..., "optimizer": ..., "args": ...}``,
    timm saver ``state_dict``/``state_dict_ema``) and strips ``module.``/``_orig_mod.`` prefixes.
    With a ``model`` that has a distillation head (``kd=True``) and a state without a fitting
    ``head_kd`` (a T=1 stage-1 checkpoint, or another class count), the model's own freshly
    initialised ``head_kd`` is kept, as the official T=4 fine-tune does (it loads the stage-1
    weights with ``strict=False``); a warning is logged. Plain ``load_state_dict(state,
    strict=False)`` does the same and reports ``head_kd.*`` as missing.
    """
    state = layers.checkpoint_filter_fn(state_dict, model)
    return state if model is None else layers.keep_own_distillation_head(state, model)


def _create(variant: str, pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV2:
    return build_spiking_model(SpikeDrivenTransformerV2, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    # crop 0.875: the official eval resizes to 256 (bicubic) and center-crops 224
    return spiking_cfg(dict(
        first_conv="downsample1_1.encode_conv",
        paper_ids="arXiv:2404.03663",
        paper_name="Spike-driven Transformer V2: Meta Spiking Neural Network Architecture Inspiring "
                   "the Design of Next-generation Neuromorphic Chips (ICLR 2024)",
        origin_url="https://github.com/BICLab/Spike-Driven-Transformer-V2",
    ), kwargs)


default_cfgs = generate_default_cfgs(
    {
        "sdtv2_tiny": _cfg(num_classes=10, input_size=(1, 32, 32), crop_pct=1.0, mean=(0.5,), std=(0.5,)),
        "sdtv2_imagenet_8_384": _cfg(),
        "sdtv2_imagenet_8_512": _cfg(),
        # the official 55M_kd release (T=4 + KD): download, then `spikeformers-hub convert` (hub registry)
        "sdtv2_imagenet_8_512_kd.in1k": _cfg(**hub.timm_cfg("sdtv2_imagenet_8_512_kd.in1k")),
        "sdtv2_imagenet_8_768": _cfg(),
    }
)

_IMAGENET = dict(img_size=224, num_classes=1000, depths=(6, 2), num_heads=8, mlp_ratio=4.0, T=4)


@register_model
def sdtv2_tiny(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV2:
    """CPU-sized Meta-SpikeFormer for the digits default (1×32×32, 10 classes): channels
    [16, 32, 64, 128], the four conv blocks, downsamplers and spiking head, and **no transformer
    blocks** (``depths=(0, 0)``; pass ``depths=(1, 1)`` for them). At 32×32 the transformer stages see
    2×2 tokens, where the linear spike attention is silent at initialisation and its all-zero BN
    inputs blow up the surrogate gradients (docs/sdt_v2.md): the digits recipe then does not converge
    in 15 epochs."""
    args = dict(img_size=32, in_chans=1, num_classes=10, embed_dim=(16, 32, 64, 128), depths=(0, 0), num_heads=4, T=4)
    return _create("sdtv2_tiny", pretrained, **dict(args, **kwargs))


@register_model
def sdtv2_imagenet_8_384(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV2:
    """Official ``metaspikformer_8_384``: [96, 192, 384, 480], 31.3M params (paper: 75.4 T=1 / 77.2 T=4)."""
    return _create("sdtv2_imagenet_8_384", pretrained, **dict(dict(_IMAGENET, embed_dim=(96, 192, 384, 480)), **kwargs))


@register_model
def sdtv2_imagenet_8_512(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV2:
    """Official ``metaspikformer_8_512`` (the "55M" model): [128, 256, 512, 640], 55.35M params."""
    return _create("sdtv2_imagenet_8_512", pretrained, **dict(dict(_IMAGENET, embed_dim=(128, 256, 512, 640)), **kwargs))


@register_model
def sdtv2_imagenet_8_512_kd(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV2:
    """``metaspikformer_8_512(kd=True)``, the T=4 distillation fine-tune (released 55M_kd, 80.0%)."""
    args = dict(_IMAGENET, embed_dim=(128, 256, 512, 640), kd=True)
    return _create("sdtv2_imagenet_8_512_kd", pretrained, **dict(args, **kwargs))


@register_model
def sdtv2_imagenet_8_768(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV2:
    """Official ``metaspikformer_8_768``: [192, 384, 768, 960], 123.7M params (no reported result)."""
    return _create("sdtv2_imagenet_8_768", pretrained, **dict(dict(_IMAGENET, embed_dim=(192, 384, 768, 960)), **kwargs))
