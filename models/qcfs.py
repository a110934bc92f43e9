"""QCFS: quantization clip-floor-shift activations and their conversion to IF spiking networks.

Bu et al., "Optimal ANN-SNN Conversion for High-accuracy and Ultra-low-latency Spiking Neural
Networks", ICLR 2022.

1. Train an ANN whose every ReLU is a :class:`QCFS` activation (``replace_activations`` does this
   to timm/torchvision CNNs and to the CIFAR VGG/ResNets registered here as ``qcfs_*``).
2. :func:`to_snn` swaps each QCFS for an integrate-and-fire neuron with threshold θ = λ, soft
   reset and v(0) = θ/2. The returned :class:`ConvertedSNN` feeds the same analog image at
   every step and averages the logits over steps.

The SNN runs with T folded into the batch ([T·B, ...], like our spiking transformers): conv,
BN (eval), pooling and linear layers are per-sample maps, so only the IF neurons see time.
"""

from __future__ import annotations

import copy

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from spikeformers.models.base import as_features, new_classifier
from torch import nn

__all__ = ["QCFS", "IFNeuron", "ConvertedSNN", "replace_activations", "to_snn", "VGG", "CifarResNet"]

GRADIENTS = ("clamp_first", "round_first")

# Activations that are not ReLU cannot be expressed by an IF neuron's rate; reject them by name.
_UNSUPPORTED_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                            nn.Hardsigmoid, nn.Mish, nn.PReLU, nn.ReLU6, nn.Softmax, nn.GLU, nn.SELU, nn.CELU)


class _FloorSTE(torch.autograd.Function):
    """⌊x⌋ forward, identity backward (straight-through). A Function rather than
    ``x + (⌊x⌋ − x).detach()``, whose rounding error can push a level just below 0 and out of
    the clamp's gradient range."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


floor_ste = _FloorSTE.apply


def clamp01(u: torch.Tensor) -> torch.Tensor:
    """clip(u, 0, 1) whose gradient is 1 on the closed interval [0, 1] and 0 outside, as in the
    official code's PyTorch (torch.clamp now passes no gradient at the bounds themselves, which
    would zero dy/dx for every input rounded to level 0)."""
    inside = (u >= 0) & (u <= 1)
    return torch.where(inside, u, u.detach().clamp(0, 1))


class QCFS(nn.Module):
    """y = λ · clip(⌊x·L/λ + φ⌋ / L, 0, 1), φ = ½, one learnable scalar λ per layer.

    ``gradient="clamp_first"`` (newer official code, default): x/λ is clamped to [0, 1] before
    rounding, so dy/dx = 1 on [0, λ]. ``"round_first"`` (older code): round, then clamp, so
    dy/dx = 1 on [−λ/2L, λ(1 + 1/2L)). Forward values are identical.
    """

    def __init__(self, levels: int = 8, threshold: float = 8.0, shift: float = 0.5, gradient: str = "clamp_first") -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"QCFS needs at least 1 quantization level, got levels={levels}")
        if gradient not in GRADIENTS:
            raise ValueError(f"QCFS gradient must be one of {GRADIENTS}, got {gradient!r}")
        self.levels, self.shift, self.gradient = int(levels), float(shift), gradient
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))  # λ

    def extra_repr(self) -> str:
        return f"levels={self.levels}, shift={self.shift}, gradient={self.gradient!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam, L = self.threshold, self.levels
        if self.gradient == "clamp_first":
            return floor_ste(clamp01(x / lam) * L + self.shift) / L * lam
        return clamp01(floor_ste(x / lam * L + self.shift) / L) * lam


class IFNeuron(nn.Module):
    """Integrate-and-fire with soft reset: v ← v + z_t; s_t = θ·H(v − θ); v ← v − s_t,
    from v(0) = θ/2. Input and output are [T·B, ...] with T folded into the batch; ``T`` is set
    by :class:`ConvertedSNN` before each forward. Spikes carry the amplitude θ (no weight scaling)."""

    neuron_model = "if"  # for analysis tools (NeuroBench metrics, energy): an IF neuron, soft reset by θ

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.T = 1

    def extra_repr(self) -> str:
        return f"threshold={self.threshold.item():.6g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.reshape(self.T, -1, *x.shape[1:])  # [T, B, ...]
        if x.is_cuda:
            from spikeformers.kernels import cupy_convert

            if cupy_convert.usable(x):  # kernels/convert.cu: the same recurrence, one thread per neuron
                return cupy_convert.if_forward(z, self.threshold.item()).reshape(x.shape)
        theta = self.threshold.to(x.dtype)
        v = torch.full_like(z[0], 0.5) * theta
        spikes = []
        for z_t in z:
            v = v + z_t
            s = (v >= theta).to(x.dtype) * theta
            v = v - s
            spikes.append(s)
        return torch.stack(spikes).reshape(x.shape)


# --- ReLU → QCFS ------------------------------------------------------------------------------


class _TorchvisionBasicBlockQCFS(nn.Module):
    """torchvision's BasicBlock applies its one ``relu`` twice; QCFS needs one λ per use,
    so this block keeps the original layers (same state_dict keys) and has ``act1`` after bn1 and
    ``act2`` after the residual sum."""

    def __init__(self, block: nn.Module, make_act) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.downsample = block.downsample
        self.act1, self.act2 = make_act(), make_act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + identity)


class _TorchvisionBottleneckQCFS(nn.Module):
    """torchvision's Bottleneck, with one QCFS per use of its shared ``relu`` (act1..act3)."""

    def __init__(self, block: nn.Module, make_act) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"):
            setattr(self, name, getattr(block, name))
        self.act1, self.act2, self.act3 = make_act(), make_act(), make_act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.act3(self.bn3(self.conv3(out)) + identity)


def _torchvision_block_types() -> dict:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # torchvision is optional for this module
        return {}
    return {BasicBlock: _TorchvisionBasicBlockQCFS, Bottleneck: _TorchvisionBottleneckQCFS}


def replace_activations(model: nn.Module, levels: int = 8, threshold: float = 8.0, gradient: str = "clamp_first") -> nn.Module:
    """In place: every ReLU → its own :class:`QCFS`, every MaxPool2d → AvgPool2d with the same
    kernel/stride/padding. Returns ``model``. Raises ``ValueError`` naming the first
    activation that QCFS cannot replace (GELU, SiLU, ...)."""
    make_act = lambda: QCFS(levels, threshold, gradient=gradient)  # noqa: E731
    block_types = _torchvision_block_types()

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if type(child) in block_types and isinstance(getattr(child, "relu", None), nn.ReLU):
                setattr(parent, name, block_types[type(child)](child, make_act))
                visit(getattr(parent, name), path + ".")
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, make_act())
            elif isinstance(child, nn.MaxPool2d):
                if child.dilation not in (1, (1, 1)) or child.return_indices:
                    raise ValueError(f"layer {path!r}: MaxPool2d with dilation/return_indices has no AvgPool2d equivalent")
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode))
            elif isinstance(child, _UNSUPPORTED_ACTIVATIONS):
                raise ValueError(f"layer {path!r} is {type(child).__name__}: QCFS conversion supports ReLU activations only")
            else:
                visit(child, path + ".")

    visit(model, "")
    _check_single_use(model)
    return model


def _check_single_use(model: nn.Module) -> None:
    """Each QCFS must be applied once per forward (it owns one λ), and no ReLU may remain as a
    function call. Checked on an FX trace when the model is traceable."""
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, QCFS) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception:  # noqa: BLE001  (dynamic control flow: nothing to check statically)
        return
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
        elif node.op in ("call_function", "call_method") and getattr(node.target, "__name__", node.target) in ("relu", "relu_"):
            raise ValueError(f"node {node.name!r} calls relu as a function; QCFS can only replace nn.ReLU modules")
    for name, m in model.named_modules():
        if isinstance(m, QCFS) and uses.get(name, 0) > 1:
            raise ValueError(f"layer {name!r} is applied {uses[name]} times per forward; give each use its own activation module")


# --- QCFS ANN → IF SNN ------------------------------------------------------------------------

# Layers that act on each sample independently (BN in eval mode), so folding T into the batch is exact.
_SNN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
               nn.Flatten, nn.Dropout, nn.Identity, IFNeuron)


class ConvertedSNN(nn.Module):
    """An IF-neuron SNN converted from a QCFS ANN. ``forward(x)`` returns the logits averaged over
    ``T`` steps of constant input; ``forward_steps(x, T)`` returns the running means [T, B, K]
    (entry t−1 = the prediction with T = t, since the neurons are causal)."""

    def __init__(self, network: nn.Module, T: int = 4) -> None:
        super().__init__()
        self.network = network
        self.T = T
        self.neurons = [m for m in network.modules() if isinstance(m, IFNeuron)]

    def forward_steps(self, x: torch.Tensor, T: int) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"ConvertedSNN expects a batch [B, ...], got shape {tuple(x.shape)}")
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        for neuron in self.neurons:
            neuron.T = T
        B = x.shape[0]
        steps = x.unsqueeze(0).expand(T, *x.shape).reshape(T * B, *x.shape[1:])  # constant input
        out = self.network(steps).reshape(T, B, -1)
        counts = torch.arange(1, T + 1, device=out.device, dtype=out.dtype).view(T, 1, 1)
        return out.cumsum(0) / counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_steps(x, self.T)[-1]


def to_snn(model: nn.Module, T: int = 4) -> ConvertedSNN:
    """Copy of a trained QCFS ``model`` with each QCFS → IFNeuron(θ = λ); BN stays an eval-mode
    affine map and biases are injected every step. The input model is not modified.
    Raises ``ValueError`` naming the first layer an IF network cannot run."""
    network = copy.deepcopy(model).eval()
    if not any(isinstance(m, QCFS) for m in network.modules()):
        raise ValueError(f"{type(model).__name__} has no QCFS activations; train it with replace_activations() first")

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if isinstance(child, QCFS):
                setattr(parent, name, IFNeuron(child.threshold.detach().item()))
            elif not any(True for _ in child.children()):
                if not isinstance(child, _SNN_LAYERS):
                    raise ValueError(f"layer {path!r} ({type(child).__name__}) is not supported in an IF-neuron SNN "
                                     f"(supported: {', '.join(t.__name__ for t in _SNN_LAYERS)}, QCFS)")
            else:
                visit(child, path + ".")

    visit(network, "")
    for m in network.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return ConvertedSNN(network, T).eval()


# --- CIFAR networks of the QCFS experiments ---------------------------------------------------

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG_TINY_LAYERS = (32, "M", 64, "M", 128, 128, "M")  # CPU-sized, for the digits preset


def _classifier(num_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()


def _take_intermediates(model: nn.Module, x: torch.Tensor, indices, stop_early: bool, output_fmt: str,
                        intermediates_only: bool):
    """timm's ``forward_intermediates`` for a CNN whose ``feature_stages()`` lists, in forward order,
    (module, level index or None): the maps [B, C, H, W] after the levels ``indices`` selects."""
    if output_fmt != "NCHW":
        raise ValueError(f"{type(model).__name__} intermediates support output_fmt='NCHW' only, got {output_fmt!r}")
    take, max_index = feature_take_indices(len(model.feature_info), indices)
    intermediates = []
    for module, level in model.feature_stages():
        x = module(x)
        if level in take:
            intermediates.append(x)
        if stop_early and level == max_index:
            break
    return intermediates if intermediates_only else (x, intermediates)


class VGG(nn.Module):
    """VGG-16 for 32×32 inputs: conv3×3 → BN → act per layer, pooling after each group; FC1/FC2
    (4096) with activations and dropout, no activation after the last FC.
    Feature levels: the output of every pooling layer."""

    def __init__(self, layers=VGG16_LAYERS, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 hidden: int = 4096, dropout: float = 0.5, global_pool: str = "") -> None:
        super().__init__()
        features, channels, size, self.feature_info = [], in_chans, img_size, []
        for spec in layers:
            if spec == "M":
                features.append(nn.MaxPool2d(2, 2))
                size //= 2
                self.feature_info.append(dict(num_chs=channels, reduction=img_size // size, module=f"features.{len(features) - 1}"))
            else:
                features += [nn.Conv2d(channels, spec, 3, padding=1), nn.BatchNorm2d(spec), nn.ReLU(inplace=True)]
                channels = spec
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * size * size, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), _classifier(hidden, num_classes))
        # pre-logits = the second FC's output
        self.num_classes, self.num_features, self.in_chans = num_classes, hidden, in_chans
        self.head_hidden_size = hidden

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        for i in range(len(self.classifier) - 1):  # indexing, not slicing: FX needs the submodules themselves
            x = self.classifier[i](x)
        return x if pre_logits else self.classifier[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def feature_stages(self):
        pools = {int(f["module"].split(".")[1]): i for i, f in enumerate(self.feature_info)}
        return [(m, pools.get(i)) for i, m in enumerate(self.features)]

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        return _take_intermediates(self, x, indices, stop_early, output_fmt, intermediates_only)

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-decay groups: the first conv, then each conv layer (coarse: each pooling group), the classifier."""
        return dict(stem=r"^features\.0\.", blocks=r"^features\.(\d+)" if not coarse else [(r"^features\.(\d+)", None)])

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.classifier[-1] = new_classifier(self, self.num_features, num_classes)


class BasicBlock(nn.Module):
    """conv3×3 → BN → act → conv3×3 → BN, + shortcut (identity or 1×1 conv + BN), then act."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with a 3×3 stride-1 stem and no max-pool (32×32 inputs): ResNet-18 = widths
    64..512, blocks 2-2-2-2; ResNet-20 = widths 16/32/64, blocks 3-3-3.
    Feature levels: the stem and every stage."""

    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 10, in_chans: int = 3,
                 img_size: int = 32, global_pool: str = "avg") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, channels = [], widths[0]
        self.feature_info = [dict(num_chs=channels, reduction=1, module="stem")]
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stage = [BasicBlock(channels if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*stage))
            channels = width
            self.feature_info.append(dict(num_chs=width, reduction=2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = _classifier(channels, num_classes)
        self.num_classes, self.num_features, self.in_chans = num_classes, channels, in_chans
        self.head_hidden_size = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def feature_stages(self):
        return [(self.stem, 0)] + [(stage, i + 1) for i, stage in enumerate(self.stages)]

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        return _take_intermediates(self, x, indices, stop_early, output_fmt, intermediates_only)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-decay groups: the stem, then each stage (coarse) or residual block, the classifier."""
        return dict(stem=r"^stem\.", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier; ``global_pool=""`` also drops the pooling (``forward`` then returns maps)."""
        self.num_classes = num_classes
        self.fc = new_classifier(self, self.num_features, num_classes)
        if global_pool is not None:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if global_pool else nn.Identity()


def _cfg(**kwargs) -> dict:
    return {"num_classes": 10, "input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear",
            "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616), "paper_ids": "arXiv:2303.04347",
            "first_conv": "", "classifier": "", **kwargs}


default_cfgs = generate_default_cfgs({
    "qcfs_vgg16": _cfg(first_conv="features.0", classifier="classifier.7", pool_size=(1, 1)),
    "qcfs_vgg_tiny": _cfg(first_conv="features.0", classifier="classifier.7", input_size=(1, 32, 32), mean=(0.5,),
                          std=(0.5,), pool_size=(4, 4)),
    "qcfs_resnet18": _cfg(first_conv="stem.0", classifier="fc", pool_size=(4, 4)),
    "qcfs_resnet20": _cfg(first_conv="stem.0", classifier="fc", pool_size=(8, 8)),
})


def _create(cls, name: str, pretrained: bool, levels: int, gradient: str, threshold: float = 8.0, **kwargs) -> nn.Module:
    """``threshold``: initial λ of every QCFS (official 8.0; the official recipes shrink it by weight
    decay over ~10⁵ steps, so short runs should start near the activations' range)."""
    if pretrained:
        raise FileNotFoundError(f"{name} has no pretrained weights; train it with spikeformers-train model={name}")
    features_only, out_indices = kwargs.pop("features_only", False), kwargs.pop("out_indices", None)
    kwargs.pop("feature_cls", None)
    placement = {k: v for k in ("device", "dtype") if (v := kwargs.pop(k, None)) is not None}
    model = build_model_with_cfg(cls, name, pretrained=False, **kwargs)
    model = replace_activations(model, levels=levels, threshold=threshold, gradient=gradient).to(**placement)
    return as_features(model, out_indices) if features_only else model


@register_model
def qcfs_vgg16(pretrained: bool = False, levels: int = 8, gradient: str = "clamp_first", **kwargs) -> nn.Module:
    """VGG-16 (CIFAR layout) with QCFS activations and average pooling."""
    return _create(VGG, "qcfs_vgg16", pretrained, levels, gradient, **kwargs)


@register_model
def qcfs_vgg_tiny(pretrained: bool = False, levels: int = 8, gradient: str = "clamp_first", **kwargs) -> nn.Module:
    """A 4-conv VGG (32-64-128-128, FC 256) with QCFS activations: CPU-sized, for the digits preset."""
    args = dict(layers=VGG_TINY_LAYERS, hidden=256, in_chans=1)
    return _create(VGG, "qcfs_vgg_tiny", pretrained, levels, gradient, **dict(args, **kwargs))


@register_model
def qcfs_resnet18(pretrained: bool = False, levels: int = 8, gradient: str = "clamp_first", **kwargs) -> nn.Module:
    """ResNet-18 (CIFAR stem) with QCFS activations, including the one after each residual sum."""
    return _create(CifarResNet, "qcfs_resnet18", pretrained, levels, gradient, **dict(dict(blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512)), **kwargs))


@register_model
def qcfs_resnet20(pretrained: bool = False, levels: int = 8, gradient: str = "clamp_first", **kwargs) -> nn.Module:
    """CIFAR ResNet-20 (widths 16/32/64, 3 blocks per stage) with QCFS activations."""
    return _create(CifarResNet, "qcfs_resnet20", pretrained, levels, gradient, **dict(dict(blocks=(3, 3, 3), widths=(16, 32, 64)), **kwargs))
