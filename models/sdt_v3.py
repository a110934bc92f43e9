"""Spike-driven Transformer v3 / E-SpikeFormer (Yao, Qiu et al., IEEE TPAMI 2025): base and large models.

Paper: https://arxiv.org/abs/2411.16061 ("Scaling Spike-driven Transformer with Efficient Spike
Firing Approximation Training"). Semantics follow the official ``Model_Base/models.py``
(``Spiking_vit_MetaFormer_Spike_SepConv``, the base models) and ``Model_Large/spikformer.py``
(``Spikformer``, the large models, below the base ones in this file); key names are the official
ones, so official checkpoints load with ``strict=True``.

Spike Firing Approximation: every neuron emits an **integer count** S ∈ {0, …, D} per time step
instead of a binary spike; at inference a count is meant to run as D binary spikes over D virtual
steps. The released classification code runs one real time step, where the integer neuron is a
stateless quantiser of its input (no membrane, no reset):

    S(x) = R(clamp(x, 0, D)),   output S/D (hidden neurons) or S (the head neuron)

R rounds half to even in the base models and half up in the large ones (their gradient windows
differ too: :class:`SpikeCountNeuron`). Base models: a 4-stage hierarchical network (the SDT v2
layout) with a real-valued membrane-shortcut stream (every branch starts with a neuron and ends
with a BN):

- Downsamplers (``downsample*``): [neuron] → Conv2d (with bias) → BN; no neuron in the first one.
- Two conv stages of ConvBlocks (``ConvBlock*``): x ← x + SepConv₇(x);
  x ← x + BN(conv3×3(SN(BN(conv3×3(SN(x)))))), hidden 4C, no conv bias.
  SepConv = SN → 1×1 (C→2C) → BN → SN → depthwise k×k → BN → SN → 1×1 (2C→C) → BN: all three
  convs fed by a neuron (SDT v2 had none between depthwise and the last 1×1).
- Two transformer stages (``block3``, ``block4``): x ← x + SepConv₃(x); x ← x + Attn(x);
  x ← x + MLP(x). Attn: S = SN(x); Q, K = SN(BN(1×1(S))) (C wide), V = SN(BN(1×1(S))) (4C wide);
  Y = (Q Kᵀ) V · 2/√(C//h) per head, no softmax (an N×N map); out = BN(1×1(SN(Y))), 4C → C.
  MLP: SN → Conv1d (bias) → BN1d → SN → Conv1d (bias) → BN1d, ratio 4.
- Head: mean over positions → head neuron (the raw count S, not divided by D) → Linear.

Large models (:class:`SpikeDrivenTransformerV3Large`): three stages, conv blocks without SepConv,
12 blocks of linear attention Q (Kᵀ V)·0.125 with RepConv projections and layer scales, whole-batch
drop path, and an optional distillation head (``head`` on the real token mean, ``head_kd`` on its
count; training returns both logits, eval their mean).

The time axis is the one every family here has: images are repeated over ``T`` (official: 1) and
every conv/BN runs with T folded into the batch. The official neurons are stateless, so T > 1
repeats identical steps; ``tau`` turns every neuron into the paper's I-LIF over real time steps
(membrane with soft reset, :func:`ilif_counts`).
"""

from __future__ import annotations

import logging

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from torch import nn

from spikeformers.models import hub, layers
from spikeformers.models.base import (
    SpikingClassifier, build_spiking_model, fx_leaf, init_linear_and_layernorm, positive_int, spiking_cfg,
)
from spikeformers.models.errors import UserError
from spikeformers.models.layers import seq

__all__ = [
    "SpikeCountNeuron", "SpikeCountFunction", "ilif_counts", "SepConv", "ConvBlock", "Attention", "Mlp", "TransformerBlock",
    "DownSampling", "SpikeCountClassifier", "SpikeDrivenTransformerV3", "LargeConvBlock", "RepConv1d", "LinearAttention",
    "LargeBlock", "SpikeDrivenTransformerV3Large",
]

_logger = logging.getLogger(__name__)

ROUNDINGS = ("half_even", "half_up")
GRAD_WINDOWS = ("closed", "open")


# --- the integer neuron ---------------------------------------------------------------------------


class SpikeCountFunction(torch.autograd.Function):
    """S = R(clamp(x, 0, D)) with a straight-through gradient inside the window.

    R rounds half to even (``torch.round``) or half up (floor(v + 0.5)); the gradient is
    ∂S/∂x = 1 for 0 ≤ x ≤ D (``closed``) or 0 < x < D (``open``), else 0. The official large
    models use half up with the open window; the base models' variant (half to even, closed) is
    SpikingJelly's ``MultiLevelSpikeCount``, which :class:`SpikeCountNeuron` uses for it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, max_spike_count: int, half_up: bool, open_window: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.max_spike_count, ctx.open_window = max_spike_count, open_window
        v = x.clamp(0, max_spike_count)
        return torch.floor(v + 0.5) if half_up else torch.round(v)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        d = ctx.max_spike_count
        inside = (x > 0) & (x < d) if ctx.open_window else (x >= 0) & (x <= d)
        return grad_out * inside.to(grad_out.dtype), None, None, None


def ilif_counts(x: torch.Tensor, count, decay: float) -> torch.Tensor:
    """The paper's I-LIF over real time steps (as in SpikeYOLO, ECCV 2024): x [T, ...] -> counts [T, ...].

    U[t] = H[t−1] + X[t],  S[t] = count(U[t]) ∈ {0..D},  H[t] = β·(U[t] − S[t]),  H[−1] = 0

    A membrane with leak β = 1 − 1/τ and a soft reset by the emitted count (threshold 1). ``count``
    is the quantiser with its straight-through gradient; the gradient also flows through the reset
    (SpikingJelly's ``ILIFNode`` default, ``detach_reset=False``). At T = 1 this is ``count(x)``.
    """
    h = torch.zeros_like(x[0])
    counts = []
    for x_t in x:
        u = h + x_t
        s = count(u)
        h = decay * (u - s)
        counts.append(s)
    return torch.stack(counts)


@fx_leaf
class SpikeCountNeuron(nn.Module):
    """Integer spike-count neuron (the paper's I-LIF at one time step): S/n with
    S = R(clamp(x, 0, D)) ∈ {0, …, D}, n = D (``normalize=True``, hidden neurons) or 1 (the head
    neuron, whose raw count feeds the classifier).

    Stateless and elementwise: any input shape, e.g. [T, B, C, H, W]; no parameters, no buffers,
    so it adds nothing to a state_dict. ``max_spike_count`` (D) may be changed after construction.

    Args:
        max_spike_count: D, the largest count (official 1×4: 4; 1×8: 8).
        normalize: divide the count by D (every neuron but the head neuron).
        rounding: ``"half_even"`` (official base models: 0.5 → 0, 2.5 → 2) or ``"half_up"``
            (official large models: 0.5 → 1, 2.5 → 3).
        grad_window: where the straight-through gradient 1/n passes: ``"closed"`` [0, D] (base) or
            ``"open"`` (0, D) (large).
        tau: ``None`` (official): stateless, each time step quantised on its own. A number τ ≥ 1:
            the paper's I-LIF over the real time steps of the input's first axis (membrane with leak
            β = 1 − 1/τ and soft reset, :func:`ilif_counts`); τ = 4/3 (β = 0.25) is the authors'
            SpikeYOLO default. The state lives within one call (no ``reset_net`` needed).
    """

    neuron_model = "count"  # for analysis tools: a stateless activation (sparsity counted, no membrane)

    def __init__(self, max_spike_count: int = 4, normalize: bool = True, rounding: str = "half_even",
                 grad_window: str = "closed", tau: float | None = None) -> None:
        super().__init__()
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if grad_window not in GRAD_WINDOWS:
            raise ValueError(f"grad_window must be one of {GRAD_WINDOWS}, got {grad_window!r}")
        self.max_spike_count = max_spike_count
        self.normalize, self.rounding, self.grad_window = normalize, rounding, grad_window
        self.tau = tau

    @property
    def tau(self) -> float | None:
        return self._tau

    @tau.setter
    def tau(self, value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1):
            raise ValueError(f"tau must be None (stateless) or a number >= 1 (I-LIF leak 1 - 1/tau), got {value!r}")
        self._tau = None if value is None else float(value)

    @property
    def max_spike_count(self) -> int:
        return self._max_spike_count

    @max_spike_count.setter
    def max_spike_count(self, value: int) -> None:
        self._max_spike_count = positive_int(value, "max_spike_count (D)")

    def extra_repr(self) -> str:
        return (f"max_spike_count={self.max_spike_count}, normalize={self.normalize}, "
                f"rounding={self.rounding!r}, grad_window={self.grad_window!r}, tau={self.tau}")

    def count(self, x: torch.Tensor) -> torch.Tensor:
        """The integer count S ∈ {0, …, D} (as x's dtype), with its straight-through gradient."""
        d = self.max_spike_count
        if self.rounding == "half_even" and self.grad_window == "closed":
            from spikingjelly.activation_based.quantize import multi_level_spike_count

            return multi_level_spike_count(x, d)  # bit-identical to the official base quantiser
        return SpikeCountFunction.apply(x, d, self.rounding == "half_up", self.grad_window == "open")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, ...] (time first when tau is set)
        s = self.count(x) if self.tau is None else ilif_counts(x, self.count, 1 - 1 / self.tau)
        return s / self.max_spike_count if self.normalize else s


# --- conv stages ----------------------------------------------------------------------------------


def conv_bn(conv: nn.Module, channels: int) -> nn.Sequential:
    """(conv, BN2d) under the official indices ``.0`` / ``.1``."""
    return nn.Sequential(conv, nn.BatchNorm2d(channels))


class SepConv(nn.Module):
    """Inverted separable conv: SN → 1×1 (C→2C) → BN → SN → depthwise k×k → BN → SN → 1×1 (2C→C) → BN.

    Official keys ``pwconv1.{0,1}``, ``dwconv.{0,1}``, ``pwconv2.{0,1}``; no conv has a bias."""

    def __init__(self, dim: int, kernel_size: int, neuron) -> None:
        super().__init__()
        med = 2 * dim
        self.spike1 = neuron()
        self.pwconv1 = conv_bn(nn.Conv2d(dim, med, 1, bias=False), med)
        self.spike2 = neuron()
        self.dwconv = conv_bn(nn.Conv2d(med, med, kernel_size, padding=kernel_size // 2, groups=med, bias=False), med)
        self.spike3 = neuron()
        self.pwconv2 = conv_bn(nn.Conv2d(med, dim, 1, bias=False), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W] real -> same
        x = seq(self.spike1(x), self.pwconv1)
        x = seq(self.spike2(x), self.dwconv)
        return seq(self.spike3(x), self.pwconv2)


@fx_leaf
class ConvBlock(nn.Module):
    """``MS_ConvBlock_spike_SepConv``: x ← x + SepConv₇(x); x ← x + BN(conv3×3(SN(BN(conv3×3(SN(x)))))),
    hidden 4C, convs without bias."""

    def __init__(self, dim: int, neuron, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.Conv = SepConv(dim, kernel_size=7, neuron=neuron)
        self.spike1 = neuron()
        self.conv1 = nn.Conv2d(dim, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.spike2 = neuron()
        self.conv2 = nn.Conv2d(hidden, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W]
        x = x + self.Conv(x)
        y = seq(self.spike1(x), self.conv1, self.bn1)
        return x + seq(self.spike2(y), self.conv2, self.bn2)


@fx_leaf
class DownSampling(nn.Module):
    """[SN] → Conv2d (with bias) → BN; the first one sees the image and has no neuron."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 neuron=None) -> None:
        super().__init__()
        self.encode_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.encode_bn = nn.BatchNorm2d(out_channels)
        self.encode_spike = neuron() if neuron is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C_in, H, W] -> [T, B, C_out, H/s, W/s]
        if self.encode_spike is not None:
            x = self.encode_spike(x)
        return seq(x, self.encode_conv, self.encode_bn)


# --- transformer stages ---------------------------------------------------------------------------


class Attention(nn.Module):
    """``MS_Attention_linear`` of the base models, which despite its name builds the N×N map.

    S = SN(x); Q = SN(BN(W_q S)), K = SN(BN(W_k S)) (C wide), V = SN(BN(W_v S)) (4C wide), all 1×1
    convs without bias; per head (channel c = head·d + j, d = C/h):
    Y = (Q Kᵀ) V · 2·(C//h)^(-1/2)  (the official scale (C//h)^(-1/2), doubled; no softmax);
    out = BN(W_proj SN(Y)), 4C → C. Returns the branch only (the block adds x).
    """

    def __init__(self, dim: int, num_heads: int, neuron, v_ratio: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = 2 * (dim // num_heads) ** -0.5
        self.head_spike = neuron()
        self.q_conv = conv_bn(nn.Conv2d(dim, dim, 1, bias=False), dim)
        self.q_spike = neuron()
        self.k_conv = conv_bn(nn.Conv2d(dim, dim, 1, bias=False), dim)
        self.k_spike = neuron()
        self.v_conv = conv_bn(nn.Conv2d(dim, dim * v_ratio, 1, bias=False), dim * v_ratio)
        self.v_spike = neuron()
        self.attn_spike = neuron()
        self.proj_conv = conv_bn(nn.Conv2d(dim * v_ratio, dim, 1, bias=False), dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C', H, W] -> [T, B, h, N, C'/h]
        T, B, C = x.shape[:3]
        return x.flatten(3).transpose(2, 3).reshape(T, B, -1, self.num_heads, C // self.num_heads).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W] real
        T, B, _, H, W = x.shape
        s = self.head_spike(x)
        q = self._heads(self.q_spike(seq(s, self.q_conv)))  # [T, B, h, N, d]
        k = self._heads(self.k_spike(seq(s, self.k_conv)))
        v = self._heads(self.v_spike(seq(s, self.v_conv)))  # [T, B, h, N, 4d]
        y = ((q @ k.transpose(-2, -1)) @ v) * self.scale  # the N×N map first, as the official code
        y = y.transpose(3, 4).reshape(T, B, -1, H * W)  # [T, B, 4C, N], channel = head·4d + j
        y = self.attn_spike(y).reshape(T, B, -1, H, W)
        return seq(y, self.proj_conv)


class Mlp(nn.Module):
    """``MS_MLP``: SN → Conv1d k1 (bias) → BN1d → SN → Conv1d k1 (bias) → BN1d on the [T, B, C, N] tokens."""

    def __init__(self, dim: int, hidden: int, neuron) -> None:
        super().__init__()
        self.fc1_spike = neuron()
        self.fc1_conv = nn.Conv1d(dim, hidden, 1)
        self.fc1_bn = nn.BatchNorm1d(hidden)
        self.fc2_spike = neuron()
        self.fc2_conv = nn.Conv1d(hidden, dim, 1)
        self.fc2_bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W]
        shape = x.shape
        x = seq(self.fc1_spike(x.flatten(3)), self.fc1_conv, self.fc1_bn)  # BN1d over T·B·N
        x = seq(self.fc2_spike(x), self.fc2_conv, self.fc2_bn)
        return x.reshape(shape)


@fx_leaf
class TransformerBlock(nn.Module):
    """``MS_Block_Spike_SepConv``: x ← x + SepConv₃(x); x ← x + Attn(x); x ← x + MLP(x).
    No norms, no layer scale; DropPath is never applied officially."""

    def __init__(self, dim: int, num_heads: int, neuron, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.conv = SepConv(dim, kernel_size=3, neuron=neuron)
        self.attn = Attention(dim, num_heads, neuron)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), neuron)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv(x)
        x = x + self.attn(x)
        return x + self.mlp(x)


def init_linear_xavier(m: nn.Module) -> None:
    """The large models' init: Linear xavier-uniform with zero bias (the official comment: "following
    official JAX ViT"); convs and BN keep PyTorch's defaults."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --- large models: conv stages and transformer blocks ---------------------------------------------


def conv_bn_container(conv: nn.Module, channels: int) -> nn.Sequential:
    """The official ``SeqToANNContainer(nn.Sequential(conv, BN2d))``: a Sequential that holds one
    (conv, BN) Sequential, hence the keys ``.0.0`` (conv) and ``.0.1`` (BN)."""
    return nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(channels)))


@fx_leaf
class LargeConvBlock(nn.Module):
    """``MS_ConvBlock`` of the large models: x ← x + BN(conv3×3(SN(BN(conv3×3(SN(x)))))), hidden 4C,
    convs **with** bias, no SepConv. Keys ``conv1.0.0.*`` (conv), ``conv1.0.1.*`` (BN), same for ``conv2``."""

    def __init__(self, dim: int, neuron, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.neuron1 = neuron()
        self.conv1 = conv_bn_container(nn.Conv2d(dim, hidden, 3, padding=1), hidden)
        self.neuron2 = neuron()
        self.conv2 = conv_bn_container(nn.Conv2d(hidden, dim, 3, padding=1), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W] real -> same
        y = seq(self.neuron1(x), self.conv1)
        return x + seq(self.neuron2(y), self.conv2)


class RepConv1d(nn.Module):
    """Two bias-free 1×1 Conv1d, each followed by a BN1d: ``conv1`` = (C_in → hidden, BN),
    ``conv2`` = (hidden → C_out, BN). Only ``conv1`` is fed by spikes; the chain is linear, so in
    eval mode it is one 1×1 conv with bias (the paper's re-parameterisation). The attention
    projections use hidden = 1.5·C, the 83M model's ``rep_conv`` hidden = C."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(in_channels, hidden, 1, bias=False), nn.BatchNorm1d(hidden))
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, out_channels, 1, bias=False), nn.BatchNorm1d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T·B, C_in, N] -> [T·B, C_out, N]
        return self.conv2(self.conv1(x))


def projection(dim: int) -> nn.Sequential:
    """q/k/v/proj of the large attention: RepConv1d(C → 1.5C → C) then BN1d(C), three BNs in all
    (keys ``0.conv1.1``, ``0.conv2.1``, ``1``)."""
    return nn.Sequential(RepConv1d(dim, dim, int(dim * 1.5)), nn.BatchNorm1d(dim))


class LinearAttention(nn.Module):
    """``MS_Attention_Conv_qkv_id`` of the large models: linear in the number of tokens.

    S = SN(x); Q = SN(P_q(S)), K = SN(P_k(S)), V = SN(P_v(S)), P = :func:`projection` (all C wide);
    per head (channel c = head·d + j, d = C/h): Y = Q (Kᵀ V) · 0.125 (a fixed scale for every width,
    Kᵀ V is d × d, no softmax); out = P_proj(SN(Y)). Returns the branch only (the block adds it).
    """

    def __init__(self, dim: int, num_heads: int, neuron, scale: float = 0.125) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.scale = num_heads, scale
        self.head_lif = neuron()
        self.q_conv = projection(dim)
        self.q_lif = neuron()
        self.k_conv = projection(dim)
        self.k_lif = neuron()
        self.v_conv = projection(dim)
        self.v_lif = neuron()
        self.attn_lif = neuron()
        self.proj_conv = projection(dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, N] -> [T, B, h, N, d]
        T, B, C, N = x.shape
        return x.reshape(T, B, self.num_heads, C // self.num_heads, N).transpose(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, N] real
        T, B, C, N = x.shape
        s = self.head_lif(x)
        q = self._heads(self.q_lif(seq(s, self.q_conv)))
        k = self._heads(self.k_lif(seq(s, self.k_conv)))
        v = self._heads(self.v_lif(seq(s, self.v_conv)))
        y = (q @ (k.transpose(-2, -1) @ v)) * self.scale  # Kᵀ V first: [T, B, h, d, d]
        y = y.transpose(3, 4).reshape(T, B, C, N)  # channel = head·d + j
        return seq(self.attn_lif(y), self.proj_conv)


@fx_leaf
class LargeBlock(nn.Module):
    """``MS_Block`` of the large models (built with ``finetune=True``), on the [T, B, C, N] tokens:

    x ← x + RepConv1d(SN(x))        only with ``rep_conv`` (the 83M model; neuron ``lif``)
    x ← x + DropPath(Attn(x) · γ₁)  γ = layer scales [C] (``layer_scale1``/``2``), init 1e-6
    x ← x + DropPath(MLP(x) · γ₂)

    DropPath is timm's on the time-first tensor, so its keep-mask is [T, 1, 1, 1]: one coin per
    time step drops the branch of the **whole batch** (the official behaviour), not per sample.
    """

    def __init__(self, dim: int, num_heads: int, neuron, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 rep_conv: bool = False, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.layer_scale1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.layer_scale2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.lif = neuron()  # built in every block (as officially), used by rep_conv only
        self.rep_conv = RepConv1d(dim, dim, dim) if rep_conv else None
        self.attn = LinearAttention(dim, num_heads, neuron)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), neuron)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W] real -> same
        shape = x.shape
        x = x.flatten(3)  # [T, B, C, N]
        if self.rep_conv is not None:
            x = x + seq(self.lif(x), self.rep_conv)
        x = x + self.drop_path(self.attn(x) * self.layer_scale1.unsqueeze(-1))
        x = x + self.drop_path(self.mlp(x) * self.layer_scale2.unsqueeze(-1))
        return x.reshape(shape)



# --- model ----------------------------------------------------------------------------------------


class SpikeCountClassifier(SpikingClassifier):
    """What every E-SpikeFormer model adds to the shared base: D of its integer neurons."""

    max_spike_count: int

    def set_max_spike_count(self, max_spike_count: int) -> SpikeCountClassifier:
        """Set D of every neuron (e.g. 8 for a 1×8 checkpoint); hidden neurons then output S/D with
        the new D. Returns ``self``."""
        for module in self.modules():
            if isinstance(module, SpikeCountNeuron):
                module.max_spike_count = max_spike_count
        self.max_spike_count = max_spike_count
        return self

    spike_mode = "integer"

    def set_spike_mode(self, mode: str) -> SpikeCountClassifier:
        """``"binary"``: spike-driven inference in eval mode (every neuron-fed conv/linear runs on D
        binary planes with its bias added once, spike products expanded; docs/spike_driven.md);
        ``"integer"``: the trained network. Parameters and state_dict are untouched. Returns ``self``."""
        from spikeformers.models.spike_driven import set_spike_mode  # spike_driven imports this module

        return set_spike_mode(self, mode)


class SpikeDrivenTransformerV3(SpikeCountClassifier):
    """E-SpikeFormer base model (official ``Spiking_vit_MetaFormer_Spike_SepConv``). Input: images
    [B, C, H, W] (repeated over ``T``) or sequences [T, B, C, H, W]; H, W multiples of 16 (no
    position embedding: any such size). Output: logits [B, K] ([T, B, K] with ``per_step_logits``).

    Args:
        embed_dim: channels [C0, C1, C2, C3] of the four stages (stage 1 starts at C0/2).
        depths: blocks of the two transformer stages (official 6, 2; the conv stages are 1+1+2).
        num_heads: heads of every attention (C2 and C3 must be divisible by it).
        max_spike_count: D, the largest integer count of every neuron (1×4: 4, 1×8: 8); not stored
            in the state_dict, so a 1×8 checkpoint needs ``max_spike_count=8``. Change it on a built
            model with :meth:`set_max_spike_count`.
        tau: ``None`` (official): stateless neurons, so the T steps of an image input are identical.
            A number τ ≥ 1: every neuron is the paper's I-LIF over the real time steps (leak
            β = 1 − 1/τ, soft reset by the count; τ = 4/3 is β = 0.25), so T×D settings with T > 1
            differ from 1×D.
        T: time steps for image input (official 1).
        per_step_logits: return per-step logits [T, B, K] (e.g. for a TET loss).
        spike_mode: ``"integer"`` (the trained network) or ``"binary"`` (spike-driven inference in eval
            mode, the same function; docs/spike_driven.md). Switch later with :meth:`set_spike_mode`.
        img_size, backend, drop_rate, drop_path_rate: accepted for the timm API and the configs;
            unused (the integer neuron has one implementation; the official blocks never apply
            DropPath).
    """

    readout = "head_then_mean"
    head_neuron = "head_spike"
    # forward order of the stage modules (official attribute names)
    stage_names = ("downsample1_1", "ConvBlock1_1", "downsample1_2", "ConvBlock1_2", "downsample2",
                    "ConvBlock2_1", "ConvBlock2_2", "downsample3", "block3", "downsample4", "block4")

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: tuple[int, int, int, int] = (64, 128, 256, 360),
        depths: tuple[int, int] = (6, 2),
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        max_spike_count: int = 4,
        tau: float | None = None,
        T: int = 1,
        per_step_logits: bool = False,
        backend: str = "auto",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        spike_mode: str = "integer",
    ) -> None:
        super().__init__()
        embed_dim = tuple(int(c) for c in embed_dim)
        if len(embed_dim) != 4 or embed_dim[0] % 2:
            raise ValueError(f"embed_dim must be 4 channel counts [C0, C1, C2, C3] with C0 even, got {embed_dim}")
        if len(depths) != 2:
            raise ValueError(f"depths must give the block counts of the two transformer stages, got {depths}")
        self.check_global_pool(global_pool, "SpikeDrivenTransformerV3")
        self.T, self.in_chans, self.img_size = T, in_chans, img_size
        self.num_classes, self.per_step_logits = num_classes, per_step_logits
        self.embed_dim, self.depths = embed_dim, tuple(depths)
        self.num_features = self.head_hidden_size = embed_dim[3]
        self.size_multiple = 16  # four stride-2 downsamplings
        self.max_spike_count = max_spike_count
        c0, c1, c2, c3 = embed_dim

        self.tau = tau

        def neuron() -> SpikeCountNeuron:
            return SpikeCountNeuron(max_spike_count, tau=tau)

        self.downsample1_1 = DownSampling(in_chans, c0 // 2, 7, 2, 3)  # the image: no neuron
        self.ConvBlock1_1 = nn.ModuleList([ConvBlock(c0 // 2, neuron, mlp_ratio)])
        self.downsample1_2 = DownSampling(c0 // 2, c0, 3, 2, 1, neuron)
        self.ConvBlock1_2 = nn.ModuleList([ConvBlock(c0, neuron, mlp_ratio)])
        self.downsample2 = DownSampling(c0, c1, 3, 2, 1, neuron)
        self.ConvBlock2_1 = nn.ModuleList([ConvBlock(c1, neuron, mlp_ratio)])
        self.ConvBlock2_2 = nn.ModuleList([ConvBlock(c1, neuron, mlp_ratio)])
        self.downsample3 = DownSampling(c1, c2, 3, 2, 1, neuron)
        self.block3 = nn.ModuleList([TransformerBlock(c2, num_heads, neuron, mlp_ratio) for _ in range(depths[0])])
        self.downsample4 = DownSampling(c2, c3, 3, 1, 1, neuron)
        self.block4 = nn.ModuleList([TransformerBlock(c3, num_heads, neuron, mlp_ratio) for _ in range(depths[1])])
        # the head sees the raw count S ∈ {0..D} of the pooled stream, not S/D
        self.head_spike = SpikeCountNeuron(max_spike_count, normalize=False, tau=tau)
        self.head = nn.Linear(c3, num_classes) if num_classes > 0 else nn.Identity()
        last = lambda blocks, fallback: blocks if len(getattr(self, blocks)) else fallback  # noqa: E731
        self.feature_info = [
            dict(num_chs=c0, reduction=4, module="ConvBlock1_2"),
            dict(num_chs=c1, reduction=8, module="ConvBlock2_2"),
            dict(num_chs=c2, reduction=16, module=last("block3", "downsample3")),
            dict(num_chs=c3, reduction=16, module=last("block4", "downsample4")),
        ]
        self.apply(init_linear_and_layernorm)  # official: Linear trunc-normal(0.02); convs, BN default
        self.set_spike_mode(spike_mode)

    # --- timm API ---

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for layer-wise LR decay: the stem (``downsample1_1``), then every later
        downsampler and block in forward order (coarse: one group per stage module name)."""
        return self.stage_group_matcher(coarse)


class SpikeDrivenTransformerV3Large(SpikeCountClassifier):
    """E-SpikeFormer large model (official ``Model_Large/spikformer.py``, class ``Spikformer``).
    Input: images [B, C, H, W] (repeated over ``T``) or sequences [T, B, C, H, W]; H, W multiples of
    16. Output: logits [B, K]; with ``kd`` the pair (logits, logits_kd) in training and their mean in
    eval mode ([T, B, K] each with ``per_step_logits``).

    Three stages: the conv stages of :class:`LargeConvBlock` (1 + 1 + 2 blocks) and ``depth``
    :class:`LargeBlock` s at 1/16 resolution. Every neuron is the large-model variant of
    :class:`SpikeCountNeuron` (round half up, open gradient window).

    Head: x̄ = mean over tokens [T, B, C2]; ``head`` reads the **real-valued** x̄, ``head_kd``
    (``kd=True``) the raw count of the neuron ``lif`` (S ∈ {0..D}); each per step, then mean over T.

    Args:
        embed_dim: channels [C0, C1, C2] of the three stages (stage 1 starts at C0/2).
        depth: transformer blocks (official 12).
        rep_conv: the extra ``x + RepConv1d(SN(x))`` branch at the start of every block (the 83M
            model, official ``choice="base"``).
        kd: add the distillation head ``head_kd``; ``num_classes`` sets both heads.
        drop_path_rate: the last block's DropPath rate, linear from 0 over the blocks (official
            default 0.1, active in training; whole-batch drop per time step, see :class:`LargeBlock`).
        layer_scale_init: initial value of the layer scales (official 1e-6).
        max_spike_count: D (1×4: 4, 1×8: 8); not in the state_dict.
        tau: ``None`` (official, stateless) or τ ≥ 1 for the paper's I-LIF over real time steps
            (see :class:`SpikeDrivenTransformerV3`).
        T: time steps for image input (official 1).
        per_step_logits: per-step logits [T, B, K].
        spike_mode: ``"integer"`` or ``"binary"`` (see :class:`SpikeDrivenTransformerV3`).
        img_size, backend, drop_rate: accepted for the timm API and the configs; unused.
    """

    classifiers = ("head", "head_kd")  # reset_classifier rebuilds both
    stage_names = ("downsample1_1", "ConvBlock1_1", "downsample1_2", "ConvBlock1_2", "downsample2",
                    "ConvBlock2_1", "ConvBlock2_2", "downsample3", "block3")

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: tuple[int, int, int] = (128, 256, 512),
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        rep_conv: bool = False,
        kd: bool = False,
        max_spike_count: int = 4,
        tau: float | None = None,
        T: int = 1,
        per_step_logits: bool = False,
        layer_scale_init: float = 1e-6,
        drop_path_rate: float = 0.1,
        backend: str = "auto",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        spike_mode: str = "integer",
    ) -> None:
        super().__init__()
        embed_dim = tuple(int(c) for c in embed_dim)
        if len(embed_dim) != 3 or embed_dim[0] % 2:
            raise ValueError(f"embed_dim must be 3 channel counts [C0, C1, C2] with C0 even, got {embed_dim}")
        self.check_global_pool(global_pool, "SpikeDrivenTransformerV3Large")
        self.T, self.in_chans, self.img_size = T, in_chans, img_size
        self.num_classes, self.per_step_logits, self.kd = num_classes, per_step_logits, kd
        self.embed_dim, self.depth = embed_dim, depth
        self.num_features = self.head_hidden_size = embed_dim[2]
        self.size_multiple = 16  # four stride-2 downsamplings
        self.max_spike_count = max_spike_count
        c0, c1, c2 = embed_dim

        self.tau = tau

        def neuron(normalize: bool = True) -> SpikeCountNeuron:
            return SpikeCountNeuron(max_spike_count, normalize, rounding="half_up", grad_window="open", tau=tau)

        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.downsample1_1 = DownSampling(in_chans, c0 // 2, 7, 2, 3)  # the image: no neuron
        self.ConvBlock1_1 = nn.ModuleList([LargeConvBlock(c0 // 2, neuron, mlp_ratio)])
        self.downsample1_2 = DownSampling(c0 // 2, c0, 3, 2, 1, neuron)
        self.ConvBlock1_2 = nn.ModuleList([LargeConvBlock(c0, neuron, mlp_ratio)])
        self.downsample2 = DownSampling(c0, c1, 3, 2, 1, neuron)
        self.ConvBlock2_1 = nn.ModuleList([LargeConvBlock(c1, neuron, mlp_ratio)])
        self.ConvBlock2_2 = nn.ModuleList([LargeConvBlock(c1, neuron, mlp_ratio)])
        self.downsample3 = DownSampling(c1, c2, 3, 2, 1, neuron)
        self.block3 = nn.ModuleList([
            LargeBlock(c2, num_heads, neuron, mlp_ratio, rates[i], rep_conv, layer_scale_init) for i in range(depth)
        ])
        self.lif = neuron(normalize=False)  # head_kd sees the raw count S ∈ {0..D}
        self.head = nn.Linear(c2, num_classes) if num_classes > 0 else nn.Identity()
        if kd:
            self.head_kd = nn.Linear(c2, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=c0, reduction=4, module="ConvBlock1_2"),
            dict(num_chs=c1, reduction=8, module="ConvBlock2_2"),
            dict(num_chs=c2, reduction=16, module="block3" if depth else "downsample3"),
        ]
        self.apply(init_linear_xavier)  # official: Linear xavier-uniform, bias 0; convs, BN default
        self.set_spike_mode(spike_mode)

    def set_rep_conv_hidden(self, hidden: int) -> SpikeDrivenTransformerV3Large:
        """Rebuild every block's ``rep_conv`` with hidden width ``hidden`` (freshly initialised, on the
        model's device and dtype): the official code's RepConv2 had a 1.5·C hidden BN until
        2025-03-12, and a checkpoint of that time needs it. Returns ``self``."""
        ref = next(self.parameters())
        for block in self.block3:
            if block.rep_conv is not None:
                dim = block.rep_conv.conv1[0].in_channels
                block.rep_conv = RepConv1d(dim, dim, hidden).to(device=ref.device, dtype=ref.dtype).train(self.training)
        return self

    # --- timm API ---

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-decay groups of the official large fine-tune: every conv stage and downsampler is
        layer 0, ``block3.i`` layer i + 1, the heads come last (so with decay 0.75 the conv stages get
        0.75^13, block3.i 0.75^(12 − i) and the heads 1)."""
        return dict(stem=r"^(?:downsample|ConvBlock)", blocks=r"^block3\.(\d+)")

    # --- forward (the rest comes from SpikingClassifier) ---

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        pooled = x.flatten(3).mean(3)  # [T, B, C2]: the real-valued token mean, ``head``'s input
        if pre_logits or self.num_classes == 0:
            return pooled.mean(0)
        reduce = (lambda t: t) if self.per_step_logits else (lambda t: t.mean(0))  # noqa: E731
        logits = reduce(self.head(pooled))
        if not self.kd:
            return logits
        logits_kd = reduce(self.head_kd(self.lif(pooled)))
        if self.training:
            return logits, logits_kd
        return (logits + logits_kd) / 2


# --- cfgs, registration ---------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Official E-SpikeFormer checkpoints → our state_dict (our key names are the official ones).

    Unwraps the official saver's ``{"model", "optimizer", "epoch", "scaler", "args"}`` (and timm's
    ``state_dict``/``state_dict_ema``) and strips ``module.``/``_orig_mod.`` prefixes. With a
    ``model``:

    - a distillation model (``kd=True``) and a state without a fitting ``head_kd`` (the fine-tuned
      checkpoint the official distillation stage starts from) keeps its own freshly initialised
      ``head_kd``; a warning is logged;
    - a large model with ``rep_conv`` and a state whose ``rep_conv`` chains are consistently wider
      (hidden width h ≠ C in ``conv1.0``, ``conv1.1`` and ``conv2.0``: the earlier code's 1.5·C
      RepConv) gets its ``rep_conv`` rebuilt at that width, so the state loads strictly;
    - a ``rep_conv`` whose conv and BN widths do not fit together (no version of the code can run it)
      raises a one-line :class:`UserError` naming those layers.
    """
    state = layers.checkpoint_filter_fn(state_dict, model)
    if model is None:
        return state
    if isinstance(model, SpikeDrivenTransformerV3Large):
        _fit_rep_conv(state, model)
    return layers.keep_own_distillation_head(state, model)


def _fit_rep_conv(state: dict, model: SpikeDrivenTransformerV3Large) -> None:
    """Rebuild ``model``'s ``rep_conv`` chains at the state's hidden width when the state's chain is
    consistent, else raise one line naming the layers that do not fit (see checkpoint_filter_fn)."""
    widths, broken = set(), []
    for i, block in enumerate(model.block3):
        prefix = f"block3.{i}.rep_conv."
        if block.rep_conv is None or f"{prefix}conv1.0.weight" not in state:
            continue
        conv1 = state[f"{prefix}conv1.0.weight"].shape  # [h, C, 1]
        bn1 = {state[k].shape[0] for k in (f"{prefix}conv1.1.{p}" for p in ("weight", "bias", "running_mean", "running_var"))
               if k in state}
        conv2 = state[f"{prefix}conv2.0.weight"].shape if f"{prefix}conv2.0.weight" in state else None  # [C, h, 1]
        if bn1 == {conv1[0]} and conv2 is not None and conv2[1] == conv1[0]:
            widths.add(conv1[0])
        else:
            broken.append((i, tuple(conv1), sorted(bn1), tuple(conv2) if conv2 is not None else None))
    if broken:
        i, conv1, bn1, conv2 = broken[0]
        never_run = all(int(state.get(f"block3.{j}.rep_conv.conv1.1.num_batches_tracked", torch.ones(()))) == 0
                        for j, *_ in broken)
        raise UserError(
            f"the checkpoint's rep_conv layers do not fit together in {len(broken)} of {len(model.block3)} blocks: "
            f"block3.{i}.rep_conv.conv1.1.{{weight,bias,running_mean,running_var}} {bn1} after "
            f"block3.{i}.rep_conv.conv1.0.weight {list(conv1)} (conv2.0.weight {list(conv2) if conv2 else 'missing'}); "
            "no version of the official code can run them",
            hint="this is the released 83M file's known defect (official issue #9)"
                 + (": its rep_conv BNs were never updated (num_batches_tracked 0)" if never_run else ""))
    for hidden in widths:
        if hidden != model.block3[0].rep_conv.conv1[0].out_channels:
            _logger.warning("checkpoint rep_conv hidden width %d (an earlier official version): rebuilding the model's", hidden)
            model.set_rep_conv_hidden(hidden)


def _create(variant: str, pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV3:
    return build_spiking_model(SpikeDrivenTransformerV3, variant, pretrained, checkpoint_filter_fn,
                               **_with_tag_spike_count(kwargs))


def _cfg(**kwargs) -> dict:
    # crop 224/232: the official eval resizes to 232 (bicubic) and center-crops 224
    return spiking_cfg(dict(
        crop_pct=224 / 232,
        first_conv="downsample1_1.encode_conv",
        paper_ids="arXiv:2411.16061",
        paper_name="Scaling Spike-driven Transformer with Efficient Spike Firing Approximation Training "
                   "(IEEE TPAMI 2025)",
        origin_url="https://github.com/BICLab/Spike-Driven-Transformer-V3",
    ), kwargs)


default_cfgs = generate_default_cfgs(
    {
        "sdtv3_tiny.digits": _cfg(**hub.timm_cfg("sdtv3_tiny.digits", crop_pct=1.0, mean=(0.5,), std=(0.5,))),
        "sdtv3_imagenet_t": _cfg(),
        # the official releases: download, then `spikeformers-hub convert` (hub registry)
        "sdtv3_imagenet_s.in1k": _cfg(**hub.timm_cfg("sdtv3_imagenet_s.in1k")),
        "sdtv3_imagenet_m.in1k": _cfg(**hub.timm_cfg("sdtv3_imagenet_m.in1k")),
        "sdtv3_imagenet_l.in1k": _cfg(**hub.timm_cfg("sdtv3_imagenet_l.in1k")),
        "sdtv3_imagenet_12_512": _cfg(),
        "sdtv3_imagenet_12_512_kd.in1k_1x4": _cfg(**hub.timm_cfg("sdtv3_imagenet_12_512_kd.in1k_1x4")),
        "sdtv3_imagenet_12_512_kd.in1k_1x8": _cfg(**hub.timm_cfg("sdtv3_imagenet_12_512_kd.in1k_1x8")),
        "sdtv3_imagenet_12_768": _cfg(),
        "sdtv3_imagenet_12_768_kd.in1k_1x4": _cfg(**hub.timm_cfg("sdtv3_imagenet_12_768_kd.in1k_1x4")),
        "sdtv3_imagenet_12_768_kd.in1k_1x8": _cfg(**hub.timm_cfg("sdtv3_imagenet_12_768_kd.in1k_1x8")),
        # 384² eval: no position embedding, so the same weights; the official eval crops 384 directly
        "sdtv3_imagenet_12_768_kd.in1k_1x8_384": _cfg(**hub.timm_cfg("sdtv3_imagenet_12_768_kd.in1k_1x8_384", crop_pct=1.0)),
    }
)

# D of the released files (not stored in them): a 1×8 file run with D = 4 is silently wrong
SPIKE_COUNT_OF_TAG = {"in1k": 4, "in1k_1x4": 4, "in1k_1x8": 8, "in1k_1x8_384": 8, "digits": 4}


def _with_tag_spike_count(kwargs: dict) -> dict:
    """``max_spike_count`` of the pretrained tag the model is created with (``create_model("….in1k_1x8")``),
    unless given explicitly."""
    tag = kwargs.get("pretrained_cfg")
    tag = getattr(tag, "tag", tag)
    if isinstance(tag, str) and tag in SPIKE_COUNT_OF_TAG and "max_spike_count" not in kwargs:
        return dict(kwargs, max_spike_count=SPIKE_COUNT_OF_TAG[tag])
    return kwargs

_IMAGENET = dict(img_size=224, num_classes=1000, depths=(6, 2), num_heads=8, mlp_ratio=4.0, T=1)


def _imagenet(variant: str, embed_dim: tuple[int, int, int, int], pretrained: bool, kwargs: dict):
    return _create(variant, pretrained, **dict(dict(_IMAGENET, embed_dim=embed_dim), **kwargs))


@register_model
def sdtv3_tiny(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV3:
    """CPU-sized E-SpikeFormer for the digits default (1×32×32, 10 classes): channels
    [16, 32, 64, 128], the conv stages, downsamplers and counting head, and **no transformer
    blocks** (``depths=(0, 0)``; pass ``depths=(1, 1)`` for them): at 32×32 the transformer stages
    see 2×2 tokens, where the attention of an untrained model rounds to zero counts."""
    args = dict(img_size=32, in_chans=1, num_classes=10, embed_dim=(16, 32, 64, 128), depths=(0, 0), num_heads=4, T=1)
    return _create("sdtv3_tiny", pretrained, **dict(args, **kwargs))


@register_model
def sdtv3_imagenet_t(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV3:
    """Official ``Efficient_Spiking_Transformer_t``: [24, 48, 96, 128], 2,702,048 params (not reported)."""
    return _imagenet("sdtv3_imagenet_t", (24, 48, 96, 128), pretrained, kwargs)


@register_model
def sdtv3_imagenet_s(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV3:
    """Official ``Efficient_Spiking_Transformer_s`` (the "5.1M" model): [32, 64, 128, 192], 5,105,608 params."""
    return _imagenet("sdtv3_imagenet_s", (32, 64, 128, 192), pretrained, kwargs)


@register_model
def sdtv3_imagenet_m(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV3:
    """Official ``Efficient_Spiking_Transformer_m`` (the "10M" model, 78.5% reported): [48, 96, 192, 240],
    10,023,112 params."""
    return _imagenet("sdtv3_imagenet_m", (48, 96, 192, 240), pretrained, kwargs)


@register_model
def sdtv3_imagenet_l(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV3:
    """Official ``Efficient_Spiking_Transformer_l`` (the "19M" model, 79.8% reported): [64, 128, 256, 360],
    18,987,504 params."""
    return _imagenet("sdtv3_imagenet_l", (64, 128, 256, 360), pretrained, kwargs)


_LARGE = dict(img_size=224, num_classes=1000, depth=12, num_heads=8, mlp_ratio=4.0, T=1)


def _large(variant: str, embed_dim: tuple[int, int, int], rep_conv: bool, kd: bool, pretrained: bool, kwargs: dict):
    args = dict(_LARGE, embed_dim=embed_dim, rep_conv=rep_conv, kd=kd)
    return build_spiking_model(SpikeDrivenTransformerV3Large, variant, pretrained, checkpoint_filter_fn,
                               **_with_tag_spike_count(dict(args, **kwargs)))


@register_model
def sdtv3_imagenet_12_512(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV3Large:
    """Official ``spikformer12_512(kd=False)``: [128, 256, 512], 12 blocks with ``rep_conv``,
    82,502,952 params (with the upstream fix that lets its forward run)."""
    return _large("sdtv3_imagenet_12_512", (128, 256, 512), True, False, pretrained, kwargs)


@register_model
def sdtv3_imagenet_12_512_kd(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV3Large:
    """Official ``spikformer12_512()`` (factory default kd=True; the "83M" model, 84.0% reported):
    + ``head_kd``, 83,015,952 params."""
    return _large("sdtv3_imagenet_12_512_kd", (128, 256, 512), True, True, pretrained, kwargs)


@register_model
def sdtv3_imagenet_12_768(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV3Large:
    """Official ``spikformer12_768(kd=False)``: [196, 384, 768] (stage 1 starts at 98 channels), 12
    blocks without ``rep_conv``, 170,971,714 params."""
    return _large("sdtv3_imagenet_12_768", (196, 384, 768), False, False, pretrained, kwargs)


@register_model
def sdtv3_imagenet_12_768_kd(pretrained: bool = False, **kwargs) -> SpikeDrivenTransformerV3Large:
    """Official ``spikformer12_768()`` (the "171M" model; the abstract's 86.2% "173M"): + ``head_kd``,
    171,740,714 params."""
    return _large("sdtv3_imagenet_12_768_kd", (196, 384, 768), False, True, pretrained, kwargs)
