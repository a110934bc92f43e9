"""QKFormer: Hierarchical Spiking Transformer using Q-K Attention (Zhou et al., NeurIPS 2024).

Paper: https://arxiv.org/abs/2403.16552. Semantics follow the official code exactly: a
hierarchical spiking transformer with three stages (two on DVS), each
opened by a patch embedding with a strided 1×1 shortcut, **Q-K token attention** in the early
stages, Spikformer SSA in the last one, and spike-sum (SEW-ADD) residuals.

- Patch embeddings: conv3×3 (no bias) → BN → [MaxPool(3,2,1) on the *real* BN output] → LIF per
  stage, plus a shortcut 1×1 conv (stride s, no bias) → BN → LIF; output = main spikes + shortcut
  spikes (values in {0, 1, 2}).
- Blocks: x ← x + Attn(x); x ← x + MLP(x). Both branches start from the integer-valued stream
  (no input LIF) and end with a LIF.
- Q-K token attention (``tssa``): Q = SN(BN(Conv1d(x))), K likewise; a per-(head, token) channel
  sum of Q through SN_0.5 gives a binary token mask; out = SN(BN(proj(mask ⊙ K))). O(N·D).
- SSA (``attn`` / ``ssa``): SN_0.5((Q (Kᵀ V)) · 0.125) → proj conv → BN → SN.
- MLP: conv1×1 → BN → SN → conv1×1 → BN → SN (LIF after BN).
- Head: mean over tokens → mean over T → Linear; no head LIF.

The official code has three layouts; ``kind`` selects one:

==========  ============================  =========  ===============  ======================
kind        stages (dim @ reduction)      heads      SSA attribute    MLP names
==========  ============================  =========  ===============  ======================
"imagenet"  D/4 @4 ×1, D/2 @8 ×2, D @16   6/8/12     ``attn``         ``fc1_*``, ``fc2_*``
            ×(L−3)
"cifar"     D/4 @1 ×1, D/2 @2 ×1, D @4    8          ``ssa``          ``mlp1_*``, ``mlp2_*``
            ×(L−2)
"dvs"       D/2 @8 ×1, D @16 ×1           16         ``ssa``          ``mlp1_*``, ``mlp2_*``
==========  ============================  =========  ===============  ======================

**Batch coupling.** The official SSA applies its final ``proj_lif`` to the tensor with T
folded into the batch, [T·B, D, N]; the multi-step neuron then runs over the flattened index
k = t·B + b, so the membrane carries from one sample to the next and outputs depend on the rest of
the batch (in eval mode too). The published accuracies were measured that way.
``legacy_tb_lif=True`` reproduces this bit for bit (needed to reproduce released checkpoints);
the default ``False`` runs that LIF per sample over [T, B, D, N] (the intended model).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from spikeformers.models import layers
from spikeformers.models.base import (
    CIFAR_CFG, SpikingClassifier, build_spiking_model, dvs_cfg, fx_leaf, init_linear_and_layernorm, spiking_cfg,
)
from spikeformers.models.layers import seq, split_heads
from spikeformers.models.neurons import LIF

__all__ = [
    "QKFormer", "QKTokenAttention", "QKFormerSelfAttention", "QKFormerMlp", "QKBlock", "SSABlock",
    "SpikingPatchEmbed", "PatchEmbedInit", "PatchEmbeddingStage",
]

_logger = logging.getLogger(__name__)

_KINDS = ("imagenet", "cifar", "dvs")
# Per kind: stage dims as fractions of D, and the defaults of depth / heads.
_STAGE_DIV = {"imagenet": (4, 2, 1), "cifar": (4, 2, 1), "dvs": (2, 1)}
_DEFAULT_DEPTH = {"imagenet": 10, "cifar": 4, "dvs": 2}
_DEFAULT_HEADS = {"imagenet": 8, "cifar": 8, "dvs": 16}


def _stage_depths(kind: str, depth: int) -> tuple[int, ...]:
    """Blocks per stage: ImageNet 1 + 2 + (L−3), CIFAR 1 + 1 + (L−2), DVS 1 + 1."""
    if kind == "dvs":
        return (1, 1)
    first = (1, 2) if kind == "imagenet" else (1, 1)
    if depth <= sum(first):
        raise ValueError(f"QKFormer kind={kind!r} needs depth > {sum(first)} (blocks {first} + last stage), "
                         f"got {depth}")
    return (*first, depth - sum(first))


# --- attention, MLP, blocks -------------------------------------------------------------------


class QKTokenAttention(nn.Module):
    """Q-K token attention (official ``Token_QK_Attention``) on the stream [T, B, C, H, W].

    q = SN(BN(Conv1d(x))), k likewise (Conv1d k1 without bias, BN1d, LIF v_th 1); per head the
    channel sum of q at each token goes through ``attn_lif`` (v_th 0.5): a binary token mask
    [T, B, h, 1, N] applied to k; then ``proj_conv`` (Conv1d k1, bias) → ``proj_bn`` → ``proj_lif``.
    """

    # Declared for analysis tools (energy, SOPs): which attention product this module computes.
    attention_product = "qk_token"  # token mask from Σ_d Q, then mask ⊙ K: O(N·D)

    def __init__(self, dim: int, num_heads: int, lif=LIF) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_conv, self.q_bn, self.q_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.k_conv, self.k_bn, self.k_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_conv, self.proj_bn, self.proj_lif = nn.Conv1d(dim, dim, 1), nn.BatchNorm1d(dim), lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = x.flatten(3)  # [T, B, C, N]
        h = self.num_heads
        q = self.q_lif(seq(x, self.q_conv, self.q_bn)).reshape(T, B, h, C // h, -1)  # c = head * d + j
        k = self.k_lif(seq(x, self.k_conv, self.k_bn)).reshape(T, B, h, C // h, -1)
        attn = self.attn_lif(q.sum(dim=3, keepdim=True))  # [T, B, h, 1, N] token mask
        x = torch.mul(attn, k).flatten(2, 3)  # [T, B, C, N]
        return self.proj_lif(seq(x, self.proj_conv, self.proj_bn).reshape(T, B, C, H, W))


class QKFormerSelfAttention(nn.Module):
    """Spikformer SSA of the last stage (official ``Spiking_Self_Attention``).

    q/k/v = SN(BN1d(Conv1d k1, no bias)) on the stream; per head x = (Q (Kᵀ V)) · 0.125;
    ``attn_lif`` (v_th 0.5) → ``proj_conv`` (bias) → ``proj_bn`` → ``proj_lif``.

    ``legacy_tb_lif=True``: ``proj_lif`` runs over the [T·B, C, N] tensor, time index k = t·B + b
    and state [C, N], exactly as the official code (batch-coupled); ``False``: per sample
    over [T, B, C, N]. The official output reshape is (…, W, H), which only works for square
    inputs (a non-square one fails in the residual sum); we unflatten to (…, H, W), the same
    tensor for square inputs.
    """

    # Declared for analysis tools (energy, SOPs): which attention product this module computes.
    attention_product = "ssa_q_kv"  # always Q (Kᵀ V)

    def __init__(self, dim: int, num_heads: int, lif=LIF, legacy_tb_lif: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.scale = num_heads, 0.125
        self.legacy_tb_lif = legacy_tb_lif
        self.q_conv, self.q_bn, self.q_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.k_conv, self.k_bn, self.k_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.v_conv, self.v_bn, self.v_lif = nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), lif()
        self.attn_lif = lif(v_threshold=0.5)
        self.proj_conv, self.proj_bn, self.proj_lif = nn.Conv1d(dim, dim, 1), nn.BatchNorm1d(dim), lif()
        # The official ``qkv_mp`` (MaxPool1d(4)) is never called and holds no state: not built.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        x = x.flatten(3)  # [T, B, C, N]

        def heads(conv, bn, lif):  # -> [T, B, h, N, d], contiguous as in the official code
            return split_heads(lif(seq(x, conv, bn)).transpose(-1, -2), self.num_heads).contiguous()

        q = heads(self.q_conv, self.q_bn, self.q_lif)
        k = heads(self.k_conv, self.k_bn, self.k_lif)
        v = heads(self.v_conv, self.v_bn, self.v_lif)
        x = (q @ (k.transpose(-2, -1) @ v)) * self.scale  # [T, B, h, N, d]
        x = self.attn_lif(x.transpose(3, 4).reshape(T, B, C, -1).contiguous())
        x = self.proj_bn(self.proj_conv(x.flatten(0, 1)))  # [T*B, C, N]
        if self.legacy_tb_lif:
            x = self.proj_lif(x)  # official: the neuron's time axis is T*B (k = t*B + b)
        else:
            x = self.proj_lif(x.reshape(T, B, C, -1))
        return x.reshape(T, B, C, H, W)


class QKFormerMlp(nn.Module):
    """conv1×1 (bias) → BN2d → LIF → conv1×1 (bias) → BN2d → LIF on [T, B, C, H, W].
    ``prefix`` gives the official names: ``"fc"`` (ImageNet) or ``"mlp"`` (CIFAR/DVS)."""

    def __init__(self, dim: int, hidden: int, prefix: str = "fc", lif=LIF) -> None:
        super().__init__()
        self.names = (f"{prefix}1", f"{prefix}2")
        for name, (cin, cout) in zip(self.names, ((dim, hidden), (hidden, dim))):
            self.add_module(f"{name}_conv", nn.Conv2d(cin, cout, 1))
            self.add_module(f"{name}_bn", nn.BatchNorm2d(cout))
            self.add_module(f"{name}_lif", lif())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = getattr(self, f"{name}_lif")(seq(x, getattr(self, f"{name}_conv"), getattr(self, f"{name}_bn")))
        return x


@fx_leaf
class QKBlock(nn.Module):
    """Stages 1–2 (official ``TokenSpikingTransformer``): x ← x + QK(x); x ← x + MLP(x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mlp_prefix: str, lif=LIF) -> None:
        super().__init__()
        self.tssa = QKTokenAttention(dim, num_heads, lif)
        self.mlp = QKFormerMlp(dim, int(dim * mlp_ratio), mlp_prefix, lif)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.tssa(x)
        return x + self.mlp(x)


@fx_leaf
class SSABlock(nn.Module):
    """Last stage (official ``SpikingTransformer``): x ← x + SSA(x); x ← x + MLP(x). The attention
    is registered as ``attn_name`` (``"attn"`` on ImageNet, ``"ssa"`` on CIFAR/DVS)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_name: str, mlp_prefix: str,
                 lif=LIF, legacy_tb_lif: bool = False) -> None:
        super().__init__()
        self.attn_name = attn_name
        self.add_module(attn_name, QKFormerSelfAttention(dim, num_heads, lif, legacy_tb_lif))
        self.mlp = QKFormerMlp(dim, int(dim * mlp_ratio), mlp_prefix, lif)

    @property
    def self_attn(self) -> QKFormerSelfAttention:
        return getattr(self, self.attn_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(x)
        return x + self.mlp(x)


# --- patch embeddings ---------------------------------------------------------------------------


@fx_leaf
class SpikingPatchEmbed(nn.Module):
    """Patch embedding with a spiking shortcut, [T, B, C_in, H, W] -> [T, B, E, H/r, W/r].

    ``stages``: (name, in, out, pool name or None) per main-branch stage, each
    ``{name}_conv`` (3×3, no bias) → ``{name}_bn`` → [pool: MaxPool(3,2,1) of the BN output] →
    ``{name}_lif``. The shortcut ``proj_res_conv`` (1×1, stride ``res_stride``, no bias) →
    ``proj_res_bn`` → ``proj_res_lif`` reads the output of stage ``res_from`` (−1: the input).
    Output = main spikes + shortcut spikes.
    """

    def __init__(self, stages, res_from: int, res_stride: int, lif=LIF) -> None:
        super().__init__()
        self.stages = tuple((name, pool) for name, _, _, pool in stages)
        self.res_from = res_from
        for name, cin, cout, pool in stages:
            self.add_module(f"{name}_conv", nn.Conv2d(cin, cout, 3, 1, 1, bias=False))
            self.add_module(f"{name}_bn", nn.BatchNorm2d(cout))
            if pool:
                self.add_module(pool, nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            self.add_module(f"{name}_lif", lif())
        res_in = stages[res_from][2] if res_from >= 0 else stages[0][1]
        self.proj_res_conv = nn.Conv2d(res_in, stages[-1][2], 1, res_stride, 0, bias=False)
        self.proj_res_bn = nn.BatchNorm2d(stages[-1][2])
        self.proj_res_lif = lif()
        self.reduction = 2 ** sum(bool(pool) for _, pool in self.stages)  # spatial reduction of the output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_feat = x
        for i, (name, pool) in enumerate(self.stages):
            modules = [getattr(self, f"{name}_conv"), getattr(self, f"{name}_bn")]
            if pool:
                modules.append(getattr(self, pool))  # pools the real-valued BN output
            x = getattr(self, f"{name}_lif")(seq(x, *modules))
            if i == self.res_from:
                x_feat = x
        x_feat = self.proj_res_lif(seq(x_feat, self.proj_res_conv, self.proj_res_bn))
        return x + x_feat


class PatchEmbedInit(SpikingPatchEmbed):
    """First patch embedding (official ``PatchEmbedInit``) of stage dim ``dim`` = E.

    - imagenet: proj E/2 (pool) → proj1 E (pool) → proj2 E; shortcut E/2→E stride 2 from proj.
    - cifar: proj E/2 → proj1 E, no pooling; shortcut E/2→E stride 1 from proj.
    - dvs: proj E/8 → proj1 E/4 (``maxpool1``) → proj2 E/2 (``maxpool2``) → proj3 E (``maxpool3``);
      shortcut E/4→E stride 4 from proj1.
    """

    def __init__(self, kind: str, in_chans: int, dim: int, lif=LIF) -> None:
        if kind == "imagenet":
            stages = [("proj", in_chans, dim // 2, "proj_maxpool"), ("proj1", dim // 2, dim, "proj1_maxpool"),
                      ("proj2", dim, dim, None)]
            super().__init__(stages, res_from=0, res_stride=2, lif=lif)
        elif kind == "cifar":
            stages = [("proj", in_chans, dim // 2, None), ("proj1", dim // 2, dim, None)]
            super().__init__(stages, res_from=0, res_stride=1, lif=lif)
        else:
            stages = [("proj", in_chans, dim // 8, None), ("proj1", dim // 8, dim // 4, "maxpool1"),
                      ("proj2", dim // 4, dim // 2, "maxpool2"), ("proj3", dim // 2, dim, "maxpool3")]
            super().__init__(stages, res_from=1, res_stride=4, lif=lif)


class PatchEmbeddingStage(SpikingPatchEmbed):
    """Patch embedding between stages (official ``PatchEmbeddingStage``), E/2 → E channels, /2
    spatially; the shortcut (1×1, stride 2) reads the integer-valued stream itself.

    - imagenet: ``proj3`` (``proj3_maxpool``) → ``proj4``.
    - cifar: ``proj3`` → ``proj4`` (``proj4_maxpool``).
    - dvs: ``proj`` → ``proj4`` (``proj4_maxpool``).
    """

    def __init__(self, kind: str, dim: int, lif=LIF) -> None:
        if kind == "imagenet":
            stages = [("proj3", dim // 2, dim, "proj3_maxpool"), ("proj4", dim, dim, None)]
        else:
            first = "proj3" if kind == "cifar" else "proj"
            stages = [(first, dim // 2, dim, None), ("proj4", dim, dim, "proj4_maxpool")]
        super().__init__(stages, res_from=-1, res_stride=2, lif=lif)


# --- model --------------------------------------------------------------------------------------


class QKFormer(SpikingClassifier):
    """QKFormer backbone + linear head. Input: images [B, C, H, W] (repeated over ``T``) or
    sequences [T, B, C, H, W] (time first, e.g. DVS frames; their own length wins). Output: logits
    [B, K] (mean over tokens, then over T, then Linear), or per-step [T, B, K] with
    ``per_step_logits=True`` (TET loss).

    Args:
        kind: official layout, ``"imagenet"``, ``"cifar"`` or ``"dvs"`` (see the module docstring).
        embed_dim: D, the width of the last stage (stages use D/4, D/2, D; DVS D/2, D).
        depth: total blocks (ImageNet 1 + 2 + (L−3), CIFAR 1 + 1 + (L−2)). DVS always builds
            1 + 1, as the official code, which ignores its ``depths`` argument; another value is
            accepted, ignored and logged.
        num_heads: heads in every stage (official: ImageNet 6/8/12; CIFAR and DVS hard-code 8
            and 16 whatever is passed — those are our defaults).
        mlp_ratio: hidden width of every MLP (4; 1 for the official CIFAR10-DVS model).
        legacy_tb_lif: reproduce the official batch-coupled SSA ``proj_lif`` bit for bit.
            Required to reproduce released checkpoints' accuracy; outputs then depend on the
            other samples in the batch and on their order. Default ``False``: per-sample LIF.
        drop_rate, drop_path_rate: accepted for timm compatibility and unused (the official
            models build neither dropout nor DropPath into their blocks).
    """

    def __init__(
        self,
        kind: str = "imagenet",
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        T: int = 4,
        per_step_logits: bool = False,
        legacy_tb_lif: bool = False,
        backend: str = "auto",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"unknown QKFormer kind {kind!r}; expected one of {_KINDS}")
        self.check_global_pool(global_pool, "QKFormer")
        divs = _STAGE_DIV[kind]
        min_multiple = divs[0] * (8 if kind == "dvs" else 2)  # first stage dim must allow E/8 (DVS) or E/2
        if embed_dim % min_multiple:
            raise ValueError(f"embed_dim must be a multiple of {min_multiple} for kind={kind!r}, got {embed_dim}")
        depth = _DEFAULT_DEPTH[kind] if depth is None else int(depth)
        if kind == "dvs" and depth != 2:
            _logger.info("QKFormer kind='dvs' builds 1 + 1 blocks as the official code; depth=%d is ignored", depth)
            depth = 2
        num_heads = _DEFAULT_HEADS[kind] if num_heads is None else int(num_heads)
        self.kind, self.T, self.in_chans, self.img_size = kind, T, in_chans, img_size
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.depth, self.num_heads, self.mlp_ratio = depth, num_heads, mlp_ratio
        self.per_step_logits = per_step_logits
        lif = partial(LIF, backend=backend)
        mlp_prefix = "fc" if kind == "imagenet" else "mlp"
        attn_name = "attn" if kind == "imagenet" else "ssa"
        dims = tuple(embed_dim // d for d in divs)
        depths = _stage_depths(kind, depth)
        self.stage_dims, self.stage_depths = dims, depths

        modules: dict[str, nn.Module] = {}
        reduction, self.feature_info = 1, []
        for i, (dim, n) in enumerate(zip(dims, depths), start=1):
            pe = PatchEmbedInit(kind, in_chans, dim, lif) if i == 1 else PatchEmbeddingStage(kind, dim, lif)
            last = i == len(dims)
            stage = nn.ModuleList(
                [
                    SSABlock(dim, num_heads, mlp_ratio, attn_name, mlp_prefix, lif, legacy_tb_lif) if last
                    else QKBlock(dim, num_heads, mlp_ratio, mlp_prefix, lif)
                    for _ in range(n)
                ]
            )
            modules[f"patch_embed{i}"], modules[f"stage{i}"] = pe, stage
            reduction *= pe.reduction
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stage{i}"))
        self.size_multiple = reduction
        self.num_stages = len(dims)
        # Official registration order (= state_dict order).
        if kind == "dvs":
            order = ["patch_embed1", "stage1", "patch_embed2", "stage2"]
        else:
            order = [f"patch_embed{i}" for i in (1, 2, 3)] + [f"stage{i}" for i in (1, 2, 3)]
        for name in order:
            self.add_module(name, modules[name])
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    _init_weights = staticmethod(init_linear_and_layernorm)  # only the head is a Linear

    @property
    def legacy_tb_lif(self) -> bool:
        """Whether the SSA ``proj_lif`` runs over the T·B-flattened tensor (official, batch-coupled)."""
        return all(m.legacy_tb_lif for m in self.modules() if isinstance(m, QKFormerSelfAttention))

    @legacy_tb_lif.setter
    def legacy_tb_lif(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, QKFormerSelfAttention):
                m.legacy_tb_lif = bool(value)

    # --- timm model API (the rest comes from SpikingClassifier) ---
    stem_regex = r"^patch_embed1\."

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Stem = ``patch_embed1``; then, in forward order, each later patch embedding and each
        block (``coarse``: one group per stage, its patch embedding included)."""
        if coarse:
            return dict(stem=self.stem_regex, blocks=[(r"^patch_embed(\d+)\.", None), (r"^stage(\d+)\.", None)])
        return dict(stem=self.stem_regex, blocks=[(r"^patch_embed(\d+)\.", (-1,)), (r"^stage(\d+)\.(\d+)\.", None)])

    def stages(self):
        """Per stage i: ``patch_embed{i}``, then its blocks ``stage{i}.0``, ``stage{i}.1``, ..."""
        out = []
        for i in range(1, self.num_stages + 1):
            out.append((f"patch_embed{i}", getattr(self, f"patch_embed{i}")))
            out += [(f"stage{i}.{j}", blk) for j, blk in enumerate(getattr(self, f"stage{i}"))]
        return out


def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Official QKFormer checkpoint → our state_dict.

    Our key names are the official ones, so this unwraps the MAE saver dict (``{"model", "optimizer",
    "epoch", "scaler", "args"}``, ImageNet) or the timm saver dict (``state_dict``/``state_dict_ema``,
    CIFAR/DVS), and strips ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes.
    Remember ``legacy_tb_lif=True`` to reproduce the released accuracies.
    """
    return layers.checkpoint_filter_fn(state_dict, model)


def _create_qkformer(variant: str, pretrained: bool = False, **kwargs) -> QKFormer:
    return build_spiking_model(QKFormer, variant, pretrained, checkpoint_filter_fn, **kwargs)


_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_LEGACY_NOTE = ("official release (links removed from the README at HEAD); convert with `spikeformers-hub convert` "
                "or load with pretrained_cfg_overlay=dict(file=...). Needs legacy_tb_lif=True (set automatically "
                "with pretrained=True): README {top1}% top-1 is measured with the batch-coupled SSA (batch 32); "
                "issue #14 reports {fixed}% with batch 1 or the per-sample fix")


def _cfg(**kwargs) -> dict:
    # crop 0.875: the official eval resizes to 256 and center-crops 224
    return spiking_cfg(dict(first_conv="patch_embed1.proj_conv", paper_ids="arXiv:2403.16552"), kwargs)


def _cifar_cfg(num_classes: int = 10, **kwargs) -> dict:
    return _cfg(**dict(CIFAR_CFG, num_classes=num_classes, **kwargs))


def _dvs_cfg(num_classes: int) -> dict:
    return _cfg(**dvs_cfg(128, num_classes))


default_cfgs = generate_default_cfgs(
    {
        "qkformer_tiny.digits": _cifar_cfg(input_size=(1, 32, 32), mean=(0.5,), std=(0.5,),
                                           notes="own CPU-sized variant; default cfg = digits"),
        "qkformer_cifar10_4_384": _cifar_cfg(),
        "qkformer_cifar100_4_384": _cifar_cfg(num_classes=100),
        "qkformer_imagenet_10_384.in1k": _cfg(notes=_LEGACY_NOTE.format(top1=78.80, fixed=74.20)),
        "qkformer_imagenet_10_512.in1k": _cfg(notes=_LEGACY_NOTE.format(top1=82.04, fixed="(not reported)")),
        "qkformer_imagenet_10_768.in1k": _cfg(notes=_LEGACY_NOTE.format(top1=84.22, fixed=78.70)),
        "qkformer_cifar10dvs_2_256": _dvs_cfg(10),
        "qkformer_gesture_2_256": _dvs_cfg(11),
    }
)


def _args(kind: str, depth: int, dim: int, heads: int, **defaults) -> dict:
    return dict(kind=kind, depth=depth, embed_dim=dim, num_heads=heads, **defaults)


_CIFAR = dict(img_size=32, num_classes=10, T=4)
_IMAGENET = dict(img_size=224, num_classes=1000, T=4)
_DVS = dict(img_size=128, in_chans=2, T=16)


def _create_imagenet(variant: str, pretrained: bool, args: dict, kwargs: dict) -> QKFormer:
    if pretrained and "legacy_tb_lif" not in kwargs:
        # The only ImageNet weights are the official ones, trained and evaluated batch-coupled.
        _logger.info("%s: pretrained weights -> legacy_tb_lif=True (official batch-coupled SSA)", variant)
        kwargs = dict(kwargs, legacy_tb_lif=True)
    return _create_qkformer(variant, pretrained, **dict(args, **kwargs))


@register_model
def qkformer_tiny(pretrained: bool = False, **kwargs) -> QKFormer:
    """3 blocks (1 + 1 + 1), D=128 (stages 32/64/128), 4 heads, MLP ratio 1, CIFAR layout:
    CPU-sized, for the digits default and tests."""
    args = _args("cifar", 3, 128, 4, mlp_ratio=1.0, **dict(_CIFAR, in_chans=1))
    return _create_qkformer("qkformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def qkformer_cifar10_4_384(pretrained: bool = False, **kwargs) -> QKFormer:
    """QKFormer-4-384, CIFAR-10 (8 heads; 6,706,234 params). Log: 96.21% best."""
    args = _args("cifar", 4, 384, 8, **_CIFAR)
    return _create_qkformer("qkformer_cifar10_4_384", pretrained, **dict(args, **kwargs))


@register_model
def qkformer_cifar100_4_384(pretrained: bool = False, **kwargs) -> QKFormer:
    """QKFormer-4-384, CIFAR-100 (8 heads; 6,740,884 params). Log: 81.22% best."""
    args = _args("cifar", 4, 384, 8, **dict(_CIFAR, num_classes=100))
    return _create_qkformer("qkformer_cifar100_4_384", pretrained, **dict(args, **kwargs))


@register_model
def qkformer_imagenet_10_384(pretrained: bool = False, **kwargs) -> QKFormer:
    """HST-10-384, ImageNet-1k (6 heads; 16,473,688 params). README: 78.80% (batch-coupled SSA)."""
    return _create_imagenet("qkformer_imagenet_10_384", pretrained, _args("imagenet", 10, 384, 6, **_IMAGENET), kwargs)


@register_model
def qkformer_imagenet_10_512(pretrained: bool = False, **kwargs) -> QKFormer:
    """HST-10-512, ImageNet-1k (8 heads; 29,079,336 params). README: 82.04% (batch-coupled SSA)."""
    return _create_imagenet("qkformer_imagenet_10_512", pretrained, _args("imagenet", 10, 512, 8, **_IMAGENET), kwargs)


@register_model
def qkformer_imagenet_10_768(pretrained: bool = False, **kwargs) -> QKFormer:
    """HST-10-768, ImageNet-1k (12 heads; 64,962,760 params). README: 84.22% at 224 (batch-coupled SSA)."""
    return _create_imagenet("qkformer_imagenet_10_768", pretrained, _args("imagenet", 10, 768, 12, **_IMAGENET), kwargs)


@register_model
def qkformer_cifar10dvs_2_256(pretrained: bool = False, **kwargs) -> QKFormer:
    """QKFormer-2-256, CIFAR10-DVS (2×128×128 frames, 16 heads, mlp ratio 1, T=16; 1,504,138 params). Log: 84.1%."""
    args = _args("dvs", 2, 256, 16, mlp_ratio=1.0, **dict(_DVS, num_classes=10))
    return _create_qkformer("qkformer_cifar10dvs_2_256", pretrained, **dict(args, **kwargs))


@register_model
def qkformer_gesture_2_256(pretrained: bool = False, **kwargs) -> QKFormer:
    """QKFormer-2-256, DVS128 Gesture (2×128×128 frames, 11 classes, 16 heads, mlp ratio 4, T=16;
    1,999,371 params). Paper: 98.6%."""
    args = _args("dvs", 2, 256, 16, mlp_ratio=4.0, **dict(_DVS, num_classes=11))
    return _create_qkformer("qkformer_gesture_2_256", pretrained, **dict(args, **kwargs))


# Old names (two families had a SpikingSelfAttention and a SpikingMlp); kept for existing imports.
SpikingSelfAttention = QKFormerSelfAttention
SpikingMlp = QKFormerMlp
