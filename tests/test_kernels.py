"""CUDA kernels (kernels/*.cu) without a GPU: nvcc compile checks, and the same sources built for
the host (kernels/host_shim.cuh + tests/kernel_host.cpp) compared with the torch reference."""

import ctypes
import importlib.resources
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from spikeformers.models.neurons import LIF, lif_backward_loop, lif_forward_loop

KERNELS = Path(str(importlib.resources.files("spikeformers.kernels")))
CU_FILES = sorted(KERNELS.glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_for(source, arch, tmp_path):
    out = subprocess.run(["nvcc", "--cubin", "-gencode", f"arch=compute_{arch},code=sm_{arch}", f"-I{KERNELS}",
                          str(source), "-o", str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    lib = tmp_path_factory.mktemp("kernels") / "kernels_host.so"
    harness = Path(__file__).with_name("kernel_host.cpp")
    # -ffp-contract=off: no FMA contraction, the same IEEE operations as the torch reference.
    out = subprocess.run(["g++", "-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", f"-I{KERNELS}",
                          str(harness), "-o", str(lib)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return ctypes.CDLL(str(lib))


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def host_forward(host, x, tau=2.0, v_th=1.0, v_reset=0.0, block=128):
    T, M = x.shape
    spikes, h = torch.empty_like(x), torch.empty(x.shape, dtype=torch.float32)
    getattr(host, f"host_lif_forward_{SUFFIX[x.dtype]}")(
        _ptr(x), _ptr(spikes), _ptr(h), ctypes.c_longlong(T), ctypes.c_longlong(M), ctypes.c_float(tau),
        ctypes.c_float(v_th), ctypes.c_float(v_reset), ctypes.c_uint(block))
    return spikes, h


def host_backward(host, grad, h, tau=2.0, v_th=1.0, v_reset=0.0, detach=True, alpha=4.0, block=128):
    T, M = grad.shape
    grad_x = torch.empty_like(grad)
    getattr(host, f"host_lif_backward_{SUFFIX[grad.dtype]}")(
        _ptr(grad), _ptr(h), _ptr(grad_x), ctypes.c_longlong(T), ctypes.c_longlong(M), ctypes.c_float(tau),
        ctypes.c_float(v_th), ctypes.c_float(v_reset), ctypes.c_int(int(detach)), ctypes.c_float(alpha),
        ctypes.c_uint(block))
    return grad_x


@pytest.mark.parametrize("T,M", [(4, 1000), (1, 37), (8, 129), (3, 1)])
@pytest.mark.parametrize("tau,v_th,detach", [(2.0, 1.0, True), (2.0, 0.5, True), (3.0, 1.0, False)])
def test_host_lif_matches_torch_reference(host, T, M, tau, v_th, detach):
    torch.manual_seed(T * 1000 + M)
    x = torch.randn(T, M) * 1.5 + 0.6
    x[0, : min(M, 3)] = 2.0 * v_th  # H exactly at threshold at t = 0 (tau 2) / below it (tau 3)
    spikes, h = host_forward(host, x, tau, v_th)
    ref_spikes, ref_h = lif_forward_loop(x, tau, v_th, 0.0)
    assert torch.equal(spikes, ref_spikes), "spikes must be bit-identical"
    assert torch.equal(h, ref_h)
    grad = torch.randn(T, M)
    grad_x = host_backward(host, grad, h, tau, v_th, 0.0, detach)
    ref_grad = lif_backward_loop(grad, ref_h, tau, v_th, 0.0, detach, 4.0)
    assert (grad_x - ref_grad).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_host_lif_half_precision_inputs(host, dtype):
    torch.manual_seed(1)
    x = (torch.randn(4, 517) * 1.5 + 0.6).to(dtype)
    spikes, h = host_forward(host, x)
    lif = LIF(backend="torch")
    xr = x.clone().requires_grad_()
    ref = lif(xr)
    assert spikes.dtype == dtype and torch.equal(spikes, ref.detach())
    grad = torch.randn(4, 517).to(dtype)
    ref.backward(grad)
    grad_x = host_backward(host, grad, h)
    torch.testing.assert_close(grad_x.float(), xr.grad.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000])
def test_host_spike_packing_round_trip(host, n):
    spikes = (torch.rand(n) < 0.3).float()
    words = torch.zeros((n + 31) // 32, dtype=torch.int32)
    host.host_pack_spikes(_ptr(spikes), _ptr(words), ctypes.c_longlong(n), ctypes.c_uint(64))
    bits = np.zeros(len(words) * 32, dtype=np.uint8)
    bits[:n] = spikes.numpy().astype(np.uint8)
    expected = np.packbits(bits.reshape(-1, 32), axis=1, bitorder="little").view("<u4").ravel()
    assert np.array_equal(words.numpy().view(np.uint32), expected)
    back = torch.empty(n)
    host.host_unpack_spikes(_ptr(words), _ptr(back), ctypes.c_longlong(n), ctypes.c_uint(64))
    assert torch.equal(back, spikes)
    assert words.numel() * 4 * 8 < spikes.numel() * 4 * 8 or n < 32  # 32x smaller than float32


def test_cupy_backend_errors_clearly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="LIF backend 'cupy' needs CUDA tensors and CuPy: no CUDA device"):
        LIF(backend="cupy")(torch.randn(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and CuPy")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cupy_backend_matches_torch_backend_on_gpu(dtype):
    pytest.importorskip("cupy")
    torch.manual_seed(0)
    x = (torch.randn(4, 8, 333, device="cuda") * 1.5 + 0.6).to(dtype)
    grad = torch.randn_like(x)
    outs = {}
    for backend in ("cupy", "torch"):
        xr = x.clone().requires_grad_()
        spikes = LIF(backend=backend)(xr)
        spikes.backward(grad)
        outs[backend] = (spikes.detach(), xr.grad)
    assert torch.equal(outs["cupy"][0], outs["torch"][0])
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(outs["cupy"][1].float(), outs["torch"][1].float(), rtol=tol, atol=tol)


# --- conversion neurons (kernels/convert.cu) against models.qcfs / models.ecmt -------------------

CONVERT_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M,block", [(1000, 128), (33, 32), (1, 64)])
def test_if_neuron_kernel_matches_qcfs_reference(host, dtype, M, block):
    from spikeformers.models.qcfs import IFNeuron

    T, theta = 7, 0.8125
    z = torch.rand(T, M, dtype=dtype) * 1.2 - 0.2
    z[2, 0] = theta / 2  # v = θ exactly at step 3 for neuron 0 when it has not fired: a tie fires
    spikes = torch.empty_like(z)
    getattr(host, f"host_if_forward_{CONVERT_SUFFIX[dtype]}")(
        _ptr(z), _ptr(spikes), ctypes.c_longlong(T), ctypes.c_longlong(M), ctypes.c_double(theta), ctypes.c_uint(block))
    neuron = IFNeuron(theta).to(dtype)
    neuron.T = T
    reference = neuron(z.reshape(T * M)).reshape(T, M)
    assert torch.equal(spikes, reference)
    assert 0 < (spikes != 0).float().mean() < 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("theta_p,theta_n,levels", [(0.1, 0.1, 4), (0.37, 0.05, 8), (0.2, -0.1, 3)])
def test_multi_threshold_kernel_matches_ecmt_reference(host, dtype, theta_p, theta_n, levels):
    from spikeformers.models.ecmt import MultiThresholdNeuron

    M, steps = 517, 6
    xs = torch.randn(steps, M, dtype=dtype)
    xs[0, :4] = torch.tensor([theta_p * 1.5, -theta_n * 0.5, theta_p * 2 ** (levels - 1) * 3, 0.0], dtype=dtype)  # ties, saturation
    reference = MultiThresholdNeuron("fc1", theta_p, theta_n, levels)
    v = torch.zeros(M, dtype=dtype)
    for x in xs:
        spikes = torch.empty_like(x)
        getattr(host, f"host_multi_threshold_step_{CONVERT_SUFFIX[dtype]}")(
            _ptr(x), _ptr(v), _ptr(spikes), ctypes.c_longlong(M), ctypes.c_double(theta_p), ctypes.c_double(theta_n),
            ctypes.c_int(levels), ctypes.c_uint(128))
        expected = reference(x)
        assert torch.equal(spikes, expected)
        assert torch.equal(v, reference.v)
    assert (spikes != 0).any()


# --- fused SDSA (kernels/sdsa.cu) against models.sdsa ---------------------------------------------


def host_sdsa(host, q, k, v, grad_out, tau=2.0, v_th=0.5, detach=True, alpha=4.0, block=128):
    """Forward and backward of the host-built SDSA kernels on [T, R, N] tensors."""
    T, R, N = q.shape
    sfx, size = SUFFIX[q.dtype], (ctypes.c_longlong(T), ctypes.c_longlong(R), ctypes.c_longlong(N))
    out, h = torch.empty_like(q), torch.empty(T, R)
    getattr(host, f"host_sdsa_forward_{sfx}")(_ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(h), *size, ctypes.c_float(tau),
                                              ctypes.c_float(v_th), ctypes.c_float(0.0), ctypes.c_uint(block))
    grads = [torch.empty_like(q) for _ in range(3)]
    getattr(host, f"host_sdsa_backward_{sfx}")(_ptr(grad_out), _ptr(q), _ptr(k), _ptr(v), _ptr(h), *map(_ptr, grads), *size,
                                               ctypes.c_float(tau), ctypes.c_float(v_th), ctypes.c_float(0.0),
                                               ctypes.c_int(int(detach)), ctypes.c_float(alpha), ctypes.c_uint(block))
    return out, h, grads


def _spikes(shape, rate, generator):
    return (torch.rand(shape, generator=generator) < rate).float()


@pytest.mark.parametrize("T,R,N", [(4, 300, 64), (1, 37, 16), (8, 129, 1), (3, 1, 5)])
@pytest.mark.parametrize("tau,detach", [(2.0, True), (3.0, False)])
def test_host_sdsa_matches_torch_fused_operator(host, T, R, N, tau, detach):
    from spikeformers.models.sdsa import SDSAFunction

    g = torch.Generator().manual_seed(T * 100 + R + N)
    q, k, v = (_spikes((T, R, N), rate, g) for rate in (0.3, 0.2, 0.25))
    edge = min(R, 3)
    k[0, :edge], v[0, :edge] = 0.0, 0.0
    k[0, :edge, 0], v[0, :edge, 0] = 1.0, 1.0  # token sum 1: H = 0.5 exactly at v_th 0.5 (tau 2) fires
    grad_out = torch.randn(T, R, N, generator=g)
    out, h, (gq, gk, gv) = host_sdsa(host, q, k, v, grad_out, tau=tau, detach=detach)

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = SDSAFunction.apply(qr.unsqueeze(1), kr.unsqueeze(1), vr.unsqueeze(1), tau, 0.5, 0.0, detach, 4.0).squeeze(1)
    ref.backward(grad_out)
    assert torch.equal(out, ref.detach()), "outputs (q masked by spikes) must be bit-identical"
    assert torch.equal(h, _ref_h(k, v, tau))
    if tau == 2.0:
        assert torch.equal(h[0, :edge], torch.full((edge,), 0.5)) and torch.equal(out[0, :edge], q[0, :edge])
    # dQ is exact; dK, dV pass through Σ_n dO·Q, a float sum whose order differs from torch's:
    # within 1e-6 of the gradient's scale (|dK| reaches ~5 here, so 1e-6 absolute is below an ulp).
    assert torch.equal(gq, qr.grad)
    for got, want in ((gk, kr.grad), (gv, vr.grad)):
        assert (got - want).abs().max() <= 1e-6 * max(1.0, want.abs().max().item())


def _ref_h(k, v, tau):
    return lif_forward_loop((k * v).sum(-1), tau, 0.5, 0.0)[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_host_sdsa_half_precision(host, dtype):
    from spikeformers.models.sdsa import SDSAFunction

    g = torch.Generator().manual_seed(5)
    q, k, v = (_spikes((4, 77, 49), 0.3, g).to(dtype) for _ in range(3))
    grad_out = torch.randn(4, 77, 49, generator=g).to(dtype)
    out, h, grads = host_sdsa(host, q, k, v, grad_out)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = SDSAFunction.apply(qr[:, None], kr[:, None], vr[:, None], 2.0, 0.5, 0.0, True, 4.0)[:, 0]
    ref.backward(grad_out)
    assert out.dtype == dtype and torch.equal(out, ref.detach())
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and CuPy")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cupy_sdsa_matches_torch_sdsa_on_gpu(dtype):
    pytest.importorskip("cupy")
    from spikeformers.models.sdsa import sdsa

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (4, 8, 96, 49)
    q, k, v = ((torch.rand(shape, device="cuda", generator=g) < 0.3).to(dtype) for _ in range(3))
    grad = torch.randn(shape, device="cuda", generator=g).to(dtype)
    outs = {}
    for backend in ("cupy", "torch"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sdsa(*leaves, LIF(v_threshold=0.5, backend=backend))
        out.backward(grad)
        outs[backend] = (out.detach(), *(t.grad for t in leaves))
    assert torch.equal(outs["cupy"][0], outs["torch"][0])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(outs["cupy"][1:], outs["torch"][1:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
