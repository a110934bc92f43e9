"""The fused SDSA operator (models/sdsa.py): equal to the official unfused order, in SDT too."""

import pytest
import timm
import torch

import spikeformers  # noqa: F401  (registers the models)
from spikeformers.models.neurons import LIF
from spikeformers.models.sdsa import SDSAFunction, sdsa, sdsa_reference
from spikeformers.models.sdt import from_heads, to_heads


def _spikes(shape, rate, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < rate).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 2, 16, 64), (1, 3, 5, 1), (8, 1, 7, 9)])
def test_fused_equals_unfused_forward_and_backward(shape, dtype):
    q, k, v = (_spikes(shape, rate, seed, dtype) for seed, rate in enumerate((0.3, 0.2, 0.25)))
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    results = []
    for fused in (True, False):
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        lif = LIF(v_threshold=0.5, backend="torch")
        out = SDSAFunction.apply(qr, kr, vr, 2.0, 0.5, 0.0, True, 4.0) if fused else sdsa_reference(qr, kr, vr, lif)
        out.backward(grad)
        results.append((out.detach(), qr.grad, kr.grad, vr.grad))
    (out, gq, gk, gv), (ref, rq, rk, rv) = results
    assert torch.equal(out, ref)
    assert 0 < out.count_nonzero() < out.numel() or shape[-1] == 1
    assert torch.equal(gq, rq)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(gk, rk, rtol=tol, atol=tol)
    torch.testing.assert_close(gv, rv, rtol=tol, atol=tol)


def test_fused_equals_head_layout_of_the_official_code():
    """The official code sums K ⊙ V over tokens per head ([T, B, h, N, d]); per channel it is the same."""
    T, B, C, H, W, heads = 2, 3, 8, 4, 4, 2
    q, k, v = (_spikes((T, B, C, H, W), 0.4, seed) for seed in range(3))
    lif = LIF(v_threshold=0.5, backend="torch")
    qh, kh, vh = (to_heads(t, heads) for t in (q, k, v))
    official = from_heads(qh.mul(lif(kh.mul(vh).sum(dim=-2, keepdim=True))), H, W)
    fused = sdsa(q.flatten(3), k.flatten(3), v.flatten(3), lif).reshape(q.shape)
    assert torch.equal(fused, official)


def test_sdt_block_same_with_fused_and_reference_paths():
    torch.manual_seed(0)
    model = timm.create_model("sdt_tiny", num_classes=10, backend="torch").train()
    x = torch.randn(2, 1, 32, 32)
    out_fused = model(x)
    out_fused.sum().backward()
    grads_fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    calls = []
    hooks = [m.talking_heads_lif.register_forward_hook(lambda *a: calls.append(1))  # a hook forces the reference
             for m in model.modules() if hasattr(m, "talking_heads_lif")]
    out_ref = model(x)
    out_ref.sum().backward()
    for h in hooks:
        h.remove()
    assert len(calls) == len(hooks) > 0, "a watched mask LIF must be called (firing-rate/energy monitors)"
    assert torch.equal(out_fused, out_ref)
    # Float sums in another order: within 2e-6 of the largest gradient. Conv biases before a BN
    # have true gradient 0, so their values (~1e-6) are rounding noise and only an absolute bound fits.
    scale = max(g.abs().max().item() for g in grads_fused.values())
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert (grads_fused[name] - p.grad).abs().max() <= 2e-6 * scale, name


def test_sdsa_rejects_mismatched_shapes():
    q = torch.zeros(2, 1, 4, 8)
    with pytest.raises(ValueError, match=r"sdsa expects q, k, v of one shape \[T, B, C, N\]"):
        sdsa(q, q[..., :4], q, LIF(v_threshold=0.5))
