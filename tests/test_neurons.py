"""LIF neuron: equations, backend equivalence, statelessness, errors."""

import logging
import math

import pytest
import torch

from spikeformers.models import neurons
from spikeformers.models.neurons import LIF, lif_backward_loop, lif_forward_loop, set_backend


def run(lif: LIF, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    spikes = lif(x)
    spikes.backward(grad)
    return spikes.detach(), x.grad


def test_hand_computed_sequence():
    # tau 2, v_th 1: H0 = 0.75 (no spike), H1 = 0.75 + (1.5 - 0.75)/2 = 1.125 (spike, reset to 0),
    # H2 = 0 + 0.4/2 = 0.2, H3 = 0.2 + (1.9 - 0.2)/2 = 1.05 (spike), and a membrane exactly at
    # threshold spikes: H4 = 0 + 2/2 = 1.0.
    x = torch.tensor([1.5, 1.5, 0.4, 1.9, 2.0]).reshape(5, 1)
    for backend in ("torch", "spikingjelly"):
        spikes = LIF(backend=backend)(x)
        assert spikes.flatten().tolist() == [0.0, 1.0, 0.0, 1.0, 1.0], backend


def test_surrogate_gradient_single_step():
    # T=1: dS/dX = (1/tau) * alpha * sig(alpha (H - v_th)) (1 - sig(...)), H = X / tau.
    x = torch.tensor([[0.3, 1.9, 2.0, 4.0]])
    _, grad = run(LIF(backend="torch"), x, torch.ones_like(x))
    sig = torch.sigmoid(4.0 * (x / 2 - 1.0))
    torch.testing.assert_close(grad, 0.5 * 4.0 * sig * (1 - sig), rtol=1e-6, atol=1e-7)


def test_gradient_through_time_matches_autograd_of_reference_loop():
    # BPTT with a detached reset: build the same recurrence from differentiable ops.
    torch.manual_seed(1)
    x = torch.randn(6, 5) + 0.8
    g = torch.randn(6, 5)

    class Spike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            ctx.save_for_backward(u)
            return (u >= 0).float()

        @staticmethod
        def backward(ctx, grad):
            (u,) = ctx.saved_tensors
            s = torch.sigmoid(4.0 * u)
            return grad * 4.0 * s * (1 - s)

    xr = x.clone().requires_grad_()
    v, outs = torch.zeros(5), []
    for t in range(6):
        h = v + (xr[t] - v) / 2.0
        s = Spike.apply(h - 1.0)
        v = h * (1 - s.detach())
        outs.append(s)
    torch.stack(outs).backward(g)
    spikes, grad = run(LIF(backend="torch"), x, g)
    assert torch.equal(spikes, torch.stack(outs).detach())
    torch.testing.assert_close(grad, xr.grad, rtol=1e-5, atol=1e-6)


SHAPES = [(4, 3, 17), (1, 2, 5, 3), (8, 2, 3, 4, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("v_threshold,tau,detach_reset", [(1.0, 2.0, True), (0.5, 2.0, True), (1.0, 3.0, False)])
def test_backends_agree(shape, v_threshold, tau, detach_reset):
    x = torch.randn(shape) * 1.5 + 0.6
    g = torch.randn(shape)
    kwargs = dict(v_threshold=v_threshold, tau=tau, detach_reset=detach_reset)
    s_ref, g_ref = run(LIF(backend="spikingjelly", **kwargs), x, g)
    s_ours, g_ours = run(LIF(backend="torch", **kwargs), x, g)
    assert torch.equal(s_ours, s_ref), "spikes must match bit for bit"
    assert (g_ours - g_ref).abs().max() <= 1e-6
    assert 0.0 < s_ref.mean() < 1.0  # the inputs exercise both spiking and silent neurons


@pytest.mark.parametrize("tau", [1.5, 2.0, 3.0])
def test_gradients_bit_identical_to_spikingjelly(tau):
    """The eager loops round like SpikingJelly's backward, also for tau = 1.5 (Spikingformer DVS);
    the compiled loops may differ in the last bit (checked ≤ 1e-6 above)."""
    x = torch.randn(6, 2000) * 1.5 + 0.6
    g = torch.randn(6, 2000)
    _, g_ref = run(LIF(backend="spikingjelly", tau=tau), x, g)
    _, h_seq = lif_forward_loop(x, tau, 1.0, 0.0)
    assert torch.equal(lif_backward_loop(g, h_seq, tau, 1.0, 0.0, True, 4.0), g_ref)


def test_eager_and_compiled_loops_agree():
    x = torch.randn(4, 1000) + 0.7
    g = torch.randn(4, 1000)
    spikes_e, h_e = lif_forward_loop(x, 2.0, 1.0, 0.0)
    spikes_c, h_c = neurons._Loops.get()[0](x, 2.0, 1.0, 0.0)
    assert torch.equal(spikes_e, spikes_c) and torch.equal(h_e, h_c)
    grad_e = lif_backward_loop(g, h_e, 2.0, 1.0, 0.0, True, 4.0)
    grad_c = neurons._Loops.get()[1](g, h_e, 2.0, 1.0, 0.0, True, 4.0)
    assert (grad_e - grad_c).abs().max() <= 1e-6


def test_threshold_exactly_reached_and_t1():
    x = torch.full((1, 3), 2.0)  # H = 1.0 exactly
    for backend in ("torch", "spikingjelly"):
        assert LIF(backend=backend)(x).eq(1).all()
    x = torch.full((1, 3), 0.999)  # H = 0.4995
    assert LIF(backend="torch")(x).eq(0).all()


def test_non_contiguous_input():
    base = torch.randn(5, 4, 6) + 0.8
    x = base.transpose(1, 2)  # [5, 6, 4], strided
    assert not x.is_contiguous()
    g = torch.randn(5, 6, 4)
    s1, g1 = run(LIF(backend="torch"), x, g)
    s2, g2 = run(LIF(backend="spikingjelly"), x.contiguous(), g)
    assert torch.equal(s1, s2) and (g1 - g2).abs().max() <= 1e-6


def test_binary_dtype_and_no_state():
    lif = LIF()
    x = torch.randn(4, 2, 8) + 0.5
    out1, out2 = lif(x), lif(x)
    assert torch.equal(out1, out2), "state must not leak between calls"
    assert set(out1.unique().tolist()) <= {0.0, 1.0}
    assert lif.state_dict() == {} and list(lif.buffers()) == []
    assert LIF()(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_spikingjelly_backend_is_stateless_too():
    lif = LIF(backend="spikingjelly")
    x = torch.randn(3, 2, 4) + 0.6
    assert torch.equal(lif(x), lif(x))


def test_auto_backend_logs_once(caplog):
    neurons._announced.clear()
    with caplog.at_level(logging.INFO, logger=neurons.__name__):
        LIF(backend="auto")(torch.randn(2, 3))
        LIF(backend="auto")(torch.randn(2, 3))
    messages = [r.message for r in caplog.records if "backend 'auto'" in r.message]
    assert len(messages) == 1 and "'torch'" in messages[0]


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(neurons._Loops, "compiled", (broken, broken))
    monkeypatch.setattr(neurons._Loops, "failed", False)
    x = torch.randn(3, 10) + 0.7
    with caplog.at_level(logging.WARNING, logger=neurons.__name__):
        spikes = LIF(backend="torch")(x)
    assert neurons._Loops.failed
    assert torch.equal(spikes, lif_forward_loop(x, 2.0, 1.0, 0.0)[0])
    assert any("lif_forward_loop failed" in r.message and "running it eagerly" in r.message for r in caplog.records)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown LIF backend 'cuda'"):
        LIF(backend="cuda")
    with pytest.raises(ValueError, match="tau must be > 1"):
        LIF(tau=1.0)
    with pytest.raises(ValueError, match=r"\[T, B, \.\.\.\]"):
        LIF()(torch.randn(5))


def test_set_backend_switches_every_neuron():
    model = torch.nn.Sequential(LIF(), torch.nn.Sequential(LIF(v_threshold=0.5)))
    set_backend(model, "spikingjelly")
    assert {m.backend for m in model.modules() if isinstance(m, LIF)} == {"spikingjelly"}
    with pytest.raises(ValueError):
        set_backend(model, "nope")


def test_extra_repr_names_threshold():
    assert "v_threshold=0.5" in repr(LIF(v_threshold=0.5))
    assert math.isclose(LIF().tau, 2.0)
