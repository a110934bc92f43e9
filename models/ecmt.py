"""ECMT: ANN→SNN conversion of vision transformers with Expectation Compensation Modules and
Multi-Threshold neurons.

Huang et al., "Towards High-performance Spiking Transformers from ANN to SNN Conversion",
ACM MM 2024, arXiv:2502.21193. The conversion is post-training:

1. :func:`calibrate` runs the ANN once per batch with a probe at every Linear input and every
   matrix-product operand and keeps running means of the 99th-percentile pair (θ_p, θ_n) of
   each probe.
2. :func:`convert` copies the ANN and swaps every probe for a :class:`MultiThresholdNeuron`,
   every LayerNorm, softmax and GELU for an :class:`ECM`, and q·kᵀ and attn·v for AtNeurons
   (:class:`AtNeuron`). Patch embedding, class/distillation tokens, position embeddings, LayerScale and residual adds stay analog: they are linear, so
   running them every step on the same image is exact.
3. :meth:`SpikingTransformer.forward_steps` feeds the same image every step and returns the
   running mean of the head output after each step ([T, B, K]); :func:`energy_ratio` gives
   E_SNN/E_ANN per step from synaptic-operation counts.

Supported: timm ``VisionTransformer`` (vit_*, deit_*; ``VisionTransformerDistilled`` too) with
pre-norm ``Block``, ``Attention`` and ``Mlp``, and timm ``Eva`` (EVA-1 ``eva_giant_*``, rotary
position embeddings included) with ``EvaBlock``, ``EvaAttention`` and a plain ``Mlp``. Anything
else raises a one-line ``ValueError`` naming the layer: attention pooling, max pooling, gated
attention, SwiGLU MLPs (EVA-02), post-norm or parallel blocks.

The network runs one time step per call of the converted timm model; every stateful module
(neuron, ECM, AtNeuron) keeps its own state, which :meth:`SpikingTransformer.reset` clears.
Float64 is supported end to end (the ECMT dynamics are chaotic in float32).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from timm.layers import GELU, GELUTanh, QuickGELU, apply_rot_embed_cat
from timm.layers import Attention as TimmAttention
from timm.layers import Mlp as TimmMlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

__all__ = ["ECM", "AtNeuron", "MultiThresholdNeuron", "ThresholdProbe", "SpikingAttention", "SpikingMlp",
           "SpikingTransformer", "calibrate", "convert", "energy_ratio", "op_counts"]

ATTENTION_SITES = ("fc_qkv", "q", "k", "v", "s", "fc_out")  # probe sites per block table
MLP_SITES = ("fc1", "fc2")
E_AC, E_MAC = 0.9, 4.6  # pJ per accumulate / multiply-accumulate

# Elementwise activations an ECM wraps exactly (any f works in principle; these are the ones timm
# ViTs use, so an unexpected module is rejected rather than silently run as if linear).
_ACTIVATIONS = (nn.GELU, GELU, GELUTanh, QuickGELU, nn.SiLU, nn.ReLU, nn.Tanh)


# --- the algorithm as pure functions --------------------------------------------------------------


def percentile_pair(x: torch.Tensor, percentile: float) -> tuple[float, float]:
    """(p_hi, p_lo) of one batch: the k-th smallest entry with k = ⌊q·numel⌋ and
    minus the k-th smallest with k = ⌊(1 − q)·numel⌋ (k ≥ 1, so tiny tensors still work)."""
    flat = x.detach().reshape(-1)  # every entry of the probe's input, batch included
    n = flat.numel()
    k_hi = min(max(int(percentile * n), 1), n)
    k_lo = min(max(int((1 - percentile) * n), 1), n)
    return flat.kthvalue(k_hi).values.item(), -flat.kthvalue(k_lo).values.item()


def ecm_step(f: Callable, total: torch.Tensor, t: int, scaled_before: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of an expectation compensation module, given S_t = ``total`` and
    (t−1)·f(S_{t−1}/(t−1)) = ``scaled_before`` (None at t = 1). Returns (O_t, t·f(S_t/t)) with
    O_t = t·f(S_t/t) − (t−1)·f(S_{t−1}/(t−1)), so Σ_{i≤t} O_i = t·f(mean input): rate out = f(rate in)."""
    scaled = f(total / t) * t
    return (scaled if scaled_before is None else scaled - scaled_before), scaled


def product_step(a: torch.Tensor, b: torch.Tensor, sum_a: torch.Tensor, sum_b: torch.Tensor, product: torch.Tensor,
                 t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step t ≥ 2 of the AtNeuron: a [..., N, d] and b [..., d, M] are this step's spiking
    operands, sum_a/sum_b their sums up to t−1, product P = Σ_{i,j<t} A_i B_j. Returns
    (O_t, S_A(t), S_B(t), P_t) with Σ_{i≤t} O_i = S_A(t)·S_B(t)/t: rate out = rate A · rate B.
    A_t S_B and S_A B_t multiply spikes with sums, i.e. additions only."""
    ab = a @ b  # [..., N, M]
    product = product + ab + a @ sum_b + sum_a @ b  # P_t = P_{t−1} + A_t B_t + A_t S_B(t−1) + S_A(t−1) B_t
    sum_a, sum_b = sum_a + a, sum_b + b
    # = S_A(t)S_B(t)/t − S_A(t−1)S_B(t−1)/(t−1), written as the official code does
    out = (a @ sum_b + sum_a @ b - ab) / (t - 1) - product / (t * (t - 1))
    return out, sum_a, sum_b, product


def fire(v: torch.Tensor, theta_p: float, theta_n: float, levels: int) -> torch.Tensor:
    """Spike of a multi-threshold neuron with membrane ``v``, same shape as v: the first
    level k = n−1 … 0 where v ≥ θ_p·2^k − θ_p/2 (emit +θ_p·2^k) or −v ≥ θ_n·2^k − θ_n/2
    (emit −θ_n·2^k); 0 if none. At most one spike per neuron and step: with θ_p, θ_n > 0 the
    two sides need v ≥ θ_p/2 and v ≤ −θ_n/2. The −θ/2 offset rounds to the nearest level like
    QCFS's φ = ½. A side whose base threshold is ≤ 0 (calibration saw no entries of that sign
    beyond the percentile) stays silent rather than emitting spikes of the wrong sign."""
    spike = torch.zeros_like(v)
    for theta, sign, u in ((theta_p, 1.0, v), (theta_n, -1.0, -v)):
        if theta <= 0:
            continue
        # The thresholds rise with k, so the first level reached from the top is the number of
        # thresholds ≤ u, minus one: one binary search instead of n comparisons. (The official
        # code tests (v − θ·2^k) + θ/2 ≥ 0, which differs only within rounding of a threshold.)
        thresholds = torch.tensor([theta * 2**k - theta / 2 for k in range(levels)], dtype=v.dtype, device=v.device)
        emitted = torch.tensor([0.0] + [sign * theta * 2**k for k in range(levels)], dtype=v.dtype, device=v.device)
        spike = spike + emitted[torch.bucketize(u, thresholds, right=True)]  # right: u equal to a threshold fires
    return spike


def neuron_settings(place: str, calibrated: tuple[float, float], n_linear: int, n_qkv: int, n_softmax: int,
                    softmax_p: float, fc2_override: tuple[float, float] | None) -> tuple[float, float, int]:
    """(θ_p, θ_n, n) of the neuron at a probe site. v takes n_linear, as in the
    official code (its q/k/v name test lists q twice); the softmax output uses softmax_p on both
    sides; fc2 takes ``fc2_override`` when given (the official rule for models named *vit*)."""
    theta_p, theta_n = calibrated
    if place == "s":
        return softmax_p, softmax_p, n_softmax
    if place in ("q", "k"):
        return theta_p, theta_n, n_qkv
    if place == "fc2" and fc2_override is not None:
        return float(fc2_override[0]), float(fc2_override[1]), n_linear
    return theta_p, theta_n, n_linear


def linear_ops(x: torch.Tensor, out_features: int) -> tuple[int, int]:
    """(SOP, OPS) of a Linear on input x [..., in]: every non-zero input entry drives
    ``out_features`` accumulates; the dense layer does numel·out_features MACs."""
    return int(torch.count_nonzero(x)) * out_features, x.numel() * out_features


def binary_product_ops(x: torch.Tensor, y: torch.Tensor) -> int:
    """Σ over all entries of 1[x≠0] @ 1[y≠0] for x [..., N, d], y [..., d, M]: the accumulates of
    the binarised matrix product, Σ_k colsum_k(1[x≠0]) · rowsum_k(1[y≠0])."""
    return int(((x != 0).sum(-2, dtype=torch.int64) * (y != 0).sum(-1, dtype=torch.int64)).sum())


def product_ops(a: torch.Tensor, b: torch.Tensor, sum_a: torch.Tensor, sum_b: torch.Tensor) -> tuple[int, int]:
    """(SOP, OPS) of one AtNeuron step for a [..., N, d], b [..., d, M]: the totals of
    1[A≠0]·1[B≠0] + 1[A≠0]·1[S_B≠0] + 1[S_A≠0]·1[B≠0] (binary matrix products), against one
    dense product (numel(a)·M MACs)."""
    return binary_product_ops(a, b) + binary_product_ops(a, sum_b) + binary_product_ops(sum_a, b), a.numel() * b.shape[-1]


def energy_ratios(sops: list[int], ops: list[int]) -> list[float]:
    """E_SNN/E_ANN after each step t: t · (E_AC/E_MAC) · Σ_{i≤t} SOP_i / Σ_{i≤t} OPS_i."""
    ratios, sop_total, ops_total = [], 0, 0
    for t, (sop, op) in enumerate(zip(sops, ops), start=1):
        sop_total, ops_total = sop_total + sop, ops_total + op
        ratios.append(t * (E_AC / E_MAC) * sop_total / ops_total)
    return ratios


# --- stateful modules -----------------------------------------------------------------------------


class ECM(nn.Module):
    """Expectation compensation module around a nonlinearity f (LayerNorm, softmax, GELU):
    O_t = t·f(S_t/t) − (t−1)·f(S_{t−1}/(t−1)), S_t the sum of its inputs so far."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.reset()

    def reset(self) -> None:
        self.total, self.scaled, self.t = None, None, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.total = x.clone() if self.total is None else self.total + x  # copy: never alias the caller's tensor
        out, self.scaled = ecm_step(self.f, self.total, self.t, self.scaled)
        return out


class AtNeuron(nn.Module):
    """Matrix product of two spiking operands (q·kᵀ, attn·v) whose output rate is the product
    of the input rates. State: S_A, S_B and P = Σ_{i,j} A_i B_j. ``product_kind`` names it for
    analysis tools: ``"qk"`` (scores, operands [..., N, d] and [..., d, N]) or ``"av"`` (scores
    times values)."""

    # for analysis tools: a weightless product with state, one call per time step; its operands are
    # the call's two arguments and its sums through the step S_A, S_B (``sum_a``, ``sum_b``), so a
    # step costs the binary products A·B, A·S_B and S_A·B (:func:`product_ops`)
    attention_product = "at_neuron"

    def __init__(self, product_kind: str = "qk") -> None:
        super().__init__()
        if product_kind not in ("qk", "av"):
            raise ValueError(f"product_kind must be 'qk' or 'av', got {product_kind!r}")
        self.product_kind = product_kind
        self.reset()

    def extra_repr(self) -> str:
        return f"product_kind={self.product_kind!r}"

    def reset(self) -> None:
        self.sum_a, self.sum_b, self.product, self.t = None, None, None, 0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.t += 1
        if self.t == 1:
            ab = a @ b
            # copies: the official first step aliases its inputs as accumulators
            self.sum_a, self.sum_b, self.product = a.clone(), b.clone(), ab.clone()
            return ab
        out, self.sum_a, self.sum_b, self.product = product_step(a, b, self.sum_a, self.sum_b, self.product, self.t)
        return out


class MultiThresholdNeuron(nn.Module):
    """Two-sided multi-threshold neuron: v(0) = 0; per step v ← v + x, emit the largest
    reached level ±θ·2^k (k = n−1 … 0), soft reset v ← v − spike. The output is the sum of its 2n
    spike trains (at most one non-zero), which the next Linear or product consumes: Σ_k (λ_k W) s_k
    with binary s_k is the paper's parallel parameter normalization."""

    neuron_model = "multi_threshold"  # for analysis tools: one call per time step, membrane in ``v``

    def __init__(self, place: str, theta_p: float, theta_n: float, levels: int) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"a multi-threshold neuron needs at least 1 level, got n={levels} at {place}")
        self.place, self.theta_p, self.theta_n, self.levels = place, float(theta_p), float(theta_n), int(levels)
        self.reset()

    def extra_repr(self) -> str:
        return f"place={self.place!r}, theta_p={self.theta_p:.6g}, theta_n={self.theta_n:.6g}, levels={self.levels}"

    def reset(self) -> None:
        self.v = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: q/k/v arrive as permuted views, and the threshold search wants dense rows
        if x.is_cuda:
            from spikeformers.kernels import cupy_convert

            if cupy_convert.usable(x):  # kernels/convert.cu: the same step, one thread per neuron
                if self.v is None:
                    self.v = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
                return cupy_convert.multi_threshold_step(x, self.v, self.theta_p, self.theta_n, self.levels)
        self.v = x.clone(memory_format=torch.contiguous_format) if self.v is None else self.v + x
        spike = fire(self.v, self.theta_p, self.theta_n, self.levels)
        self.v = self.v - spike
        return spike


class ThresholdProbe(nn.Module):
    """Calibration probe: the identity, recording running means over batches of
    the percentile pair, θ ← (θ·m + p)/(m + 1) after m batches."""

    def __init__(self, place: str, percentile: float) -> None:
        super().__init__()
        self.place, self.percentile = place, percentile
        self.theta_p, self.theta_n, self.batches = 0.0, 0.0, 0  # statistics span batches: never reset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p_hi, p_lo = percentile_pair(x, self.percentile)
        m = self.batches
        self.theta_p = (self.theta_p * m + p_hi) / (m + 1)
        self.theta_n = (self.theta_n * m + p_lo) / (m + 1)
        self.batches += 1
        return x


NeuronFactory = Callable[[str, str], nn.Module]  # (module path, place) -> probe or neuron


class SpikingAttention(nn.Module):
    """timm ``Attention`` / ``EvaAttention`` with spiking Linear inputs and product operands:
    fc_qkv → qkv Linear → [q/k norm ECM] → [rope] → q, k, v neurons → AtNeuron(q, kᵀ)·scale →
    softmax ECM → s neuron → AtNeuron(s, v) → [norm ECM] → fc_out neuron → proj Linear."""

    def __init__(self, attn: TimmAttention | EvaAttention, path: str, make_neuron: NeuronFactory) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = attn.num_heads * attn.head_dim
        self.num_prefix_tokens = getattr(attn, "num_prefix_tokens", 0)  # tokens rope leaves alone (Eva)
        self.rotate_half = getattr(attn, "rotate_half", False)
        self.qkv, self.q_proj, self.k_proj, self.v_proj = _qkv_linears(attn)
        self.q_norm, self.k_norm, self.norm = (_ecm(m) for m in (attn.q_norm, attn.k_norm, attn.norm))
        self.proj = attn.proj
        self.softmax = ECM(nn.Softmax(dim=-1))
        self.qk, self.sv = AtNeuron("qk"), AtNeuron("av")
        self.neurons = nn.ModuleDict({p: make_neuron(f"{path}.neurons.{p}", p) for p in ATTENTION_SITES})

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ECMT attention does not support attention masks")
        B, N, _ = x.shape
        x = self.neurons["fc_qkv"](x)  # [B, N, C] spikes
        if self.qkv is not None:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (proj(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)  # [B, H, N, d]
        if rope is not None:  # a fixed rotation per position: linear, so it commutes with the rate
            n = self.num_prefix_tokens
            q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=self.rotate_half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=self.rotate_half)], dim=2).type_as(v)
        q, k, v = self.neurons["q"](q), self.neurons["k"](k), self.neurons["v"](v)
        attn = self.qk(q, k.transpose(-2, -1)) * self.scale  # [B, H, N, N]; scale after the product, as officially
        attn = self.neurons["s"](self.softmax(attn))
        x = self.sv(attn, v).transpose(1, 2).reshape(B, N, self.attn_dim)  # [B, N, H·d]
        x = self.neurons["fc_out"](self.norm(x))
        return self.proj(x)


class SpikingMlp(nn.Module):
    """timm ``Mlp`` with spiking Linear inputs: fc1 neuron → fc1 → GELU ECM → [norm ECM] →
    fc2 neuron → fc2."""

    def __init__(self, mlp: TimmMlp, path: str, make_neuron: NeuronFactory) -> None:
        super().__init__()
        self.fc1, self.act, self.norm, self.fc2 = mlp.fc1, ECM(mlp.act), _ecm(mlp.norm), mlp.fc2
        self.neurons = nn.ModuleDict({p: make_neuron(f"{path}.neurons.{p}", p) for p in MLP_SITES})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.neurons["fc1"](x)))
        return self.fc2(self.neurons["fc2"](self.norm(x)))


class SpikingTransformer(nn.Module):
    """The converted network: ``model`` is the timm ViT/Eva with spiking modules swapped in;
    each call of it is one time step. ``forward`` returns the mean head output over ``T`` steps."""

    def __init__(self, model: nn.Module, T: int | None = None) -> None:
        super().__init__()
        self.model, self.T = model, T

    def reset(self) -> None:
        """Clear every neuron, ECM and AtNeuron (between samples/batches)."""
        for m in self.model.modules():
            if isinstance(m, (ECM, AtNeuron, MultiThresholdNeuron)):
                m.reset()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One time step: this step's head output O_t (the running sum's increment)."""
        return self.model(x)

    @torch.no_grad()
    def forward_steps(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """[T, B, K]: entry t−1 is the running mean of the head output over steps 1..t, i.e. the
        SNN's prediction at T = t. The same analog image feeds every step."""
        if T < 1:
            raise ValueError(f"T must be at least 1, got {T}")
        self.reset()
        total, means = None, []
        try:
            for t in range(1, T + 1):
                out = self.step(x)
                total = out if total is None else total + out
                means.append(total / t)
        finally:
            self.reset()  # free the state tensors
        return torch.stack(means)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.T is None:
            raise ValueError("set SpikingTransformer.T (time steps) or call forward_steps(x, T)")
        return self.forward_steps(x, self.T)[-1]


# --- building the spiking network ---------------------------------------------------------------


def _ecm(module: nn.Module) -> nn.Module:
    return module if isinstance(module, nn.Identity) else ECM(module)


def _qkv_linears(attn: TimmAttention | EvaAttention) -> tuple[nn.Linear | None, ...]:
    """(qkv, q_proj, k_proj, v_proj) as plain Linears. EVA keeps its q/v biases outside the fused
    qkv Linear (k has none); fold them in so every Linear is a module (and counted)."""
    q_bias = getattr(attn, "q_bias", None)
    if attn.qkv is None:
        return None, attn.q_proj, attn.k_proj, attn.v_proj
    if q_bias is None:
        return attn.qkv, None, None, None
    fused = nn.Linear(attn.qkv.in_features, attn.qkv.out_features, bias=True, device=q_bias.device, dtype=q_bias.dtype)
    fused.weight = attn.qkv.weight
    fused.bias = nn.Parameter(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach().clone())
    return fused, None, None, None


def _check_supported(model: nn.Module) -> None:
    """Raise a one-line ValueError naming the first layer ECMT cannot convert, and why."""
    kind = type(model).__name__
    if type(model) not in (VisionTransformer, VisionTransformerDistilled, Eva):
        raise ValueError(f"model ({kind}): ECMT converts timm VisionTransformer, VisionTransformerDistilled and Eva models only")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"attn_pool ({type(model.attn_pool).__name__}): attention pooling (global_pool='map'/'prr') is not supported")
    if model.global_pool not in ("", "token", "avg"):
        raise ValueError(f"global_pool={model.global_pool!r}: max pooling is not linear; use 'token' or 'avg'")
    block_type, attn_type = (EvaBlock, EvaAttention) if isinstance(model, Eva) else (Block, TimmAttention)
    for i, block in enumerate(model.blocks):
        path = f"blocks.{i}"
        if type(block) is not block_type:
            raise ValueError(f"{path} ({type(block).__name__}): only pre-norm {block_type.__name__} blocks are supported")
        if type(block.attn) is not attn_type:
            raise ValueError(f"{path}.attn ({type(block.attn).__name__}): only timm {attn_type.__name__} is supported")
        if getattr(block.attn, "gate", None) is not None:
            raise ValueError(f"{path}.attn.gate: gated attention multiplies two analog branches; not supported")
        mlp = block.mlp
        if type(mlp) is not TimmMlp:
            raise ValueError(f"{path}.mlp ({type(mlp).__name__}): only timm Mlp (fc1 → activation → fc2) is supported; "
                             "gated MLPs (SwiGLU, GLU) multiply two analog branches")
        if not isinstance(mlp.fc1, nn.Linear):
            raise ValueError(f"{path}.mlp.fc1 ({type(mlp.fc1).__name__}): only Linear layers are supported")
        if not isinstance(mlp.act, _ACTIVATIONS):
            raise ValueError(f"{path}.mlp.act ({type(mlp.act).__name__}): unsupported activation")


def _spiking_copy(model: nn.Module, make_neuron: NeuronFactory) -> SpikingTransformer:
    """A deep copy of ``model`` (eval mode) with ECMs, AtNeurons and a neuron/probe from
    ``make_neuron`` at every probe site; the caller's model is left untouched."""
    _check_supported(model)
    net = copy.deepcopy(model).eval()
    net.grad_checkpointing = False  # checkpointed blocks would be re-run, stepping their state twice
    for name in ("norm_pre", "norm", "fc_norm"):  # final norm included; patch_embed.norm sees a constant input
        setattr(net, name, _ecm(getattr(net, name)))
    for i, block in enumerate(net.blocks):
        block.norm1, block.norm2 = ECM(block.norm1), ECM(block.norm2)
        block.attn = SpikingAttention(block.attn, f"blocks.{i}.attn", make_neuron)
        block.mlp = SpikingMlp(block.mlp, f"blocks.{i}.mlp", make_neuron)
    return SpikingTransformer(net)


def _modules_of(snn: SpikingTransformer, kind: type) -> dict[str, nn.Module]:
    return {name: m for name, m in snn.model.named_modules() if isinstance(m, kind)}


def _inputs(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch  # (images, labels) batches too


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, percentile: float = 0.99) -> dict[str, tuple[float, float]]:
    """Per-probe thresholds {module path: (θ_p, θ_n)}: each probe's running mean over
    ``batches`` (input tensors [B, C, H, W], or (input, label) pairs) of the ``percentile`` pair.
    One ANN pass per batch: at step 1 an ECM is f and an AtNeuron the plain product."""
    if not 0.5 < percentile < 1:
        raise ValueError(f"percentile must lie in (0.5, 1), got {percentile}")
    probed = _spiking_copy(model, lambda path, place: ThresholdProbe(place, percentile))
    param = next(model.parameters())
    n_batches = 0
    for batch in batches:
        probed.reset()
        probed.step(_inputs(batch).to(param.device, param.dtype))
        n_batches += 1
    if n_batches == 0:
        raise ValueError("calibration needs at least one batch")
    return {name: (p.theta_p, p.theta_n) for name, p in _modules_of(probed, ThresholdProbe).items()}


def convert(model: nn.Module, thresholds: dict[str, tuple[float, float]], n_linear: int = 8, n_qkv: int = 8,
            n_softmax: int = 8, softmax_p: float = 0.0125,
            fc2_override: tuple[float, float] | None = None) -> SpikingTransformer:
    """The ECMT SNN of ``model`` with thresholds from :func:`calibrate` and the
    settings: n_linear levels at fc_qkv, fc_out, fc1, fc2 and v; n_qkv at q, k; n_softmax and
    θ_p = θ_n = softmax_p at the softmax output. ``fc2_override=(0.25, 0.08)`` reproduces the
    official rule for models named *vit*; None keeps the calibrated fc2 thresholds."""

    def make_neuron(path: str, place: str) -> MultiThresholdNeuron:
        if path not in thresholds:
            raise ValueError(f"{path}: no calibrated threshold (thresholds come from another model?)")
        settings = neuron_settings(place, thresholds[path], n_linear, n_qkv, n_softmax, softmax_p, fc2_override)
        return MultiThresholdNeuron(place, *settings)

    return _spiking_copy(model, make_neuron)


@torch.no_grad()
def op_counts(snn: SpikingTransformer, x: torch.Tensor, T: int) -> tuple[list[int], list[int]]:
    """(SOP_t, OPS_t) for t = 1..T on input x: every Linear (the head too) and every
    AtNeuron; patch embedding, norms, softmax, GELU and ECM arithmetic are not counted."""
    counts = [0, 0]

    def on_linear(module: nn.Linear, inputs, output) -> None:
        sop, ops = linear_ops(inputs[0], module.out_features)
        counts[0], counts[1] = counts[0] + sop, counts[1] + ops

    def on_product(module: AtNeuron, inputs, output) -> None:
        sop, ops = product_ops(inputs[0], inputs[1], module.sum_a, module.sum_b)  # sums include step t
        counts[0], counts[1] = counts[0] + sop, counts[1] + ops

    hooks = [m.register_forward_hook(on_linear) for m in _modules_of(snn, nn.Linear).values()]
    hooks += [m.register_forward_hook(on_product) for m in _modules_of(snn, AtNeuron).values()]
    sops, ops = [], []
    try:
        snn.reset()
        for _ in range(T):
            before = list(counts)
            snn.step(x)
            sops.append(counts[0] - before[0])
            ops.append(counts[1] - before[1])
    finally:
        for h in hooks:
            h.remove()
        snn.reset()
    return sops, ops


def energy_ratio(snn: SpikingTransformer, x: torch.Tensor, T: int) -> list[float]:
    """E_SNN/E_ANN after each step t = 1..T: t · (E_AC/E_MAC) · ΣSOP / ΣOPS."""
    return energy_ratios(*op_counts(snn, x, T))
