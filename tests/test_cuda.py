"""Every CUDA path on a real GPU: the CuPy LIF, SDSA and conversion kernels against the CPU
reference code, packed spike storage on CUDA, SpikingJelly's CUDA (Triton) neuron,
``torch.compile`` of a whole model, and bf16/fp16 AMP train steps through the trainer.

These tests skip without a CUDA device; ``benchmarks/gpu_check.py`` runs them on a GPU machine.
Its CPU dry run sets ``SPIKEFORMERS_GPU_CHECK_DEVICE=cpu``, which runs every test that does not
need CuPy on the CPU, on a smaller model and batch (bf16 autocast; fp16 and its GradScaler are
CUDA-only), so the test code itself cannot rot while no GPU is at hand.

Exactness: the kernels are compiled with ``--fmad=false`` and IEEE division, so on float32 they
repeat the CPU reference's rounding. Where an implementation is free to fuse multiply-adds
(SpikingJelly's Triton kernel, Inductor), the inputs are dyadic (k/16): with tau = 2 every charge
H = V + (X - V) / 2 is then exact in any order, so spikes must still agree bit for bit.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from spikeformers.models.neurons import LIF, lif_backward_loop, lif_forward_loop

DRY_RUN = os.environ.get("SPIKEFORMERS_GPU_CHECK_DEVICE") == "cpu"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE != "cuda" and not DRY_RUN,
                                reason="needs a CUDA device (benchmarks/gpu_check.py runs these on a GPU)")
BACKENDS = ("cupy", "torch", "spikingjelly")
HALF = (torch.float16, torch.bfloat16)
# The CPU dry run checks the same code on a smaller model and batch: seconds instead of minutes.
EMBED_DIM, BATCH = (64, 16) if DEVICE == "cuda" else (16, 4)


def needs_cupy(backend: str = "cupy") -> None:
    """On a GPU machine the CuPy kernels must work (a failure, not a skip); the CPU dry run skips them."""
    if backend != "cupy":
        return
    if DEVICE != "cuda":
        pytest.skip("the CuPy kernels need CUDA (CPU dry run)")
    from spikeformers.kernels.cupy_lif import available

    ok, missing = available()
    assert ok, f"CuPy kernels unusable on this GPU machine: {missing}"


def dyadic(shape, generator, low=-16, high=40) -> torch.Tensor:
    """Random multiples of 1/16 in [low/16, high/16): exact in fp32, fp16 and bf16."""
    return torch.randint(low, high, shape, generator=generator).float() / 16


# --- LIF -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lif_hand_computed_spike_train(backend, dtype):
    # X = 1.5 for 4 steps, tau 2, v_th 1, hard reset to 0:
    # H = 0.75 (no spike), 0.75 + 0.75/2 = 1.125 (spike, V = 0), 0.75, 1.125 -> spikes 0, 1, 0, 1.
    needs_cupy(backend)
    x = torch.full((4, 2, 3), 1.5, device=DEVICE, dtype=dtype)
    spikes = LIF(backend=backend)(x)
    expected = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(4, 1, 1).expand(4, 2, 3)
    assert spikes.dtype == dtype and torch.equal(spikes.float().cpu(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lif_hand_computed_gradient(backend):
    # T = 1, X = 1.5: H = 0.75, dX = dS/dH · dH/dX = 4σ(-1)(1 - σ(-1)) · 1/2 (Sigmoid surrogate, alpha 4)
    needs_cupy(backend)
    x = torch.full((1, 5), 1.5, device=DEVICE, requires_grad=True)
    LIF(backend=backend)(x).sum().backward()
    sig = 1 / (1 + math.exp(1.0))
    assert torch.allclose(x.grad.cpu(), torch.full((1, 5), 2 * sig * (1 - sig)), rtol=1e-6, atol=1e-6)


# Every T for float32; the half types at T = 4 (each (T, dtype) is one more compile of the torch backend).
@pytest.mark.parametrize("dtype,T", [(torch.float32, 1), (torch.float32, 4), (torch.float32, 16),
                                     (torch.float16, 4), (torch.bfloat16, 4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lif_backend_matches_cpu_reference_on_dyadic_inputs(backend, dtype, T):
    needs_cupy(backend)
    if backend == "spikingjelly" and dtype in HALF:
        # SpikingJelly keeps the membrane in the input's dtype: after a few halvings it no longer
        # fits fp16/bf16, so only ours (fp32 membrane) match the fp32 reference at T > 1.
        pytest.skip("SpikingJelly's half-precision membrane rounds; the hand-computed spike train covers it")
    g = torch.Generator().manual_seed(T)
    x = dyadic((T, 3, 347), g)  # 1041 neurons: not a multiple of the kernels' block
    grad = torch.randn(T, 3, 347, generator=g)
    ref_spikes, ref_h = lif_forward_loop(x.reshape(T, -1), 2.0, 1.0, 0.0)
    ref_grad = lif_backward_loop(grad.to(dtype).float().reshape(T, -1), ref_h, 2.0, 1.0, 0.0, True, 4.0)
    xd = x.to(DEVICE, dtype).requires_grad_()
    spikes = LIF(backend=backend)(xd)
    spikes.backward(grad.to(DEVICE, dtype))
    assert spikes.dtype == dtype
    assert torch.equal(spikes.float().cpu().reshape(T, -1), ref_spikes), "spikes must be bit-identical"
    assert 0.05 < ref_spikes.mean() < 0.6  # the case fires and stays silent
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(xd.grad.float().cpu().reshape(T, -1), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("tau,v_th,detach", [(2.0, 1.0, True), (3.0, 0.5, False)])
def test_cupy_lif_repeats_cpu_rounding_on_random_fp32(tau, v_th, detach):
    # --fmad=false and IEEE division: the kernel's float32 charge is the CPU loop's, bit for bit.
    needs_cupy()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 4099, generator=g) * 1.5 + 0.6
    grad = torch.randn(8, 4099, generator=g)
    ref_spikes, ref_h = lif_forward_loop(x, tau, v_th, 0.0)
    ref_grad = lif_backward_loop(grad, ref_h, tau, v_th, 0.0, detach, 4.0)
    xd = x.to(DEVICE).requires_grad_()
    spikes = LIF(tau=tau, v_threshold=v_th, detach_reset=detach, backend="cupy")(xd)
    spikes.backward(grad.to(DEVICE))
    assert torch.equal(spikes.cpu(), ref_spikes)
    assert (xd.grad.cpu() - ref_grad).abs().max() <= 1e-6 * max(1.0, ref_grad.abs().max().item())


def test_spikingjelly_runs_its_cuda_kernel():
    # SpikingJelly 2.0 picks its native CUDA extension, else Triton, else its torch loop; the
    # package-index wheel has no native extension, so a GPU run must report Triton (or native).
    if DEVICE != "cuda":
        pytest.skip("SpikingJelly's CUDA implementations need CUDA (CPU dry run)")
    from spikingjelly.activation_based import functional

    chosen = functional.neuron_implementation("lif", torch.device("cuda"))["implementation"]
    assert chosen in ("triton", "cuda"), f"SpikingJelly's LIF on CUDA runs {chosen!r}"


# --- SDSA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdsa_backend_matches_cpu_reference(backend, dtype):
    from spikeformers.models.sdsa import SDSAFunction, sdsa

    needs_cupy(backend)
    g = torch.Generator().manual_seed(3)
    shape = (4, 2, 67, 49)  # [T, B, C, N]
    q, k, v = ((torch.rand(shape, generator=g) < rate).float() for rate in (0.3, 0.2, 0.25))
    # channel 0 of sample 0: one token with K = V = 1 at t = 0 only -> token sum 1, H = 0.5 = v_th:
    # the mask fires at t = 0 (O = Q there), then H = 0 for t >= 1 (O = 0)
    k[:, 0, 0], v[:, 0, 0] = 0.0, 0.0
    k[0, 0, 0, 5], v[0, 0, 0, 5] = 1.0, 1.0
    grad_out = torch.randn(shape, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = SDSAFunction.apply(*leaves, 2.0, 0.5, 0.0, True, 4.0)
    ref.backward(grad_out)
    on_device = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    out = sdsa(*on_device, LIF(v_threshold=0.5, backend=backend))
    out.backward(grad_out.to(DEVICE, dtype))
    assert out.dtype == dtype and torch.equal(out.float().cpu(), ref.detach())
    assert torch.equal(out[0, 0, 0].float().cpu(), q[0, 0, 0]) and not out[1:, 0, 0].any()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, leaf in zip(on_device, leaves):
        torch.testing.assert_close(got.grad.float().cpu(), leaf.grad, rtol=tol, atol=tol)


# --- conversion neurons (kernels/convert.cu) -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conversion_neurons_on_cuda_match_their_torch_code(dtype):
    from spikeformers.kernels import cupy_convert
    from spikeformers.models.ecmt import MultiThresholdNeuron
    from spikeformers.models.qcfs import IFNeuron

    needs_cupy()
    # IF, θ = 1, v(0) = θ/2, z = 0.625: v = 1.125 (fire), 0.75, 1.375 (fire), 1.0 (tie fires) -> 1, 0, 1, 1
    neuron = IFNeuron(1.0).to(DEVICE, dtype)
    neuron.T = 4
    z = torch.full((4, 3), 0.625, dtype=dtype, device=DEVICE)
    assert cupy_convert.usable(z)
    assert torch.equal(neuron(z).cpu(), torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=dtype)[:, None].expand(4, 3))
    g = torch.Generator().manual_seed(1)
    z = (torch.rand(7 * 5, 333, generator=g, dtype=dtype) * 1.2 - 0.2)
    cpu_neuron = IFNeuron(0.8125).to(dtype)
    cpu_neuron.T = neuron.T = 7
    neuron.threshold.fill_(0.8125)
    assert torch.equal(neuron(z.to(DEVICE)).cpu(), cpu_neuron(z))

    # multi-threshold, θ = 0.25, 3 levels (0.25, 0.5, 1 at thresholds 0.125, 0.375, 0.875):
    # x = 0.75 per step -> 0.5, 1.0, 0.5;  x = -0.3125 -> -0.25, -0.5 (tie at 0.375), -0.25
    hand = MultiThresholdNeuron("fc1", 0.25, 0.25, 3)
    x = torch.tensor([0.75, -0.3125], dtype=dtype, device=DEVICE)
    steps = torch.stack([hand(x) for _ in range(3)]).cpu()
    assert torch.equal(steps, torch.tensor([[0.5, -0.25], [1.0, -0.5], [0.5, -0.25]], dtype=dtype))
    on_gpu, on_cpu = MultiThresholdNeuron("fc1", 0.37, 0.05, 8), MultiThresholdNeuron("fc1", 0.37, 0.05, 8)
    for step in torch.randn(6, 517, generator=g, dtype=dtype):
        assert torch.equal(on_gpu(step.to(DEVICE)).cpu(), on_cpu(step))
    assert torch.equal(on_gpu.v.cpu(), on_cpu.v)


# --- packed spike storage --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_storage_round_trip_on_device(dtype):
    from spikeformers.models import memory

    g = torch.Generator().manual_seed(2)
    spikes = (torch.rand(4, 8, 33, 61, generator=g) < 0.3).to(DEVICE, dtype)
    tracked = spikes.clone().requires_grad_() * 1  # packing only keeps tensors with a graph
    saved = memory._pack(tracked)
    # float32 on CUDA: 32 spikes per int32 word (kernels/lif.cu); otherwise 8 per byte
    words = DEVICE == "cuda" and dtype == torch.float32
    assert saved[0] == ("words" if words else "bytes")
    assert saved[1].numel() * saved[1].element_size() == math.ceil(spikes.numel() / (32 if words else 8)) * (4 if words else 1)
    back = memory._unpack(saved)
    assert back.dtype == dtype and back.device == spikes.device and torch.equal(back, spikes)


def _tiny_model(backend: str, **kwargs):
    import timm

    import spikeformers  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    return timm.create_model("sdt_tiny", backend=backend, in_chans=1, num_classes=10, embed_dim=EMBED_DIM,
                             **kwargs).to(DEVICE).train()


def _digits_batch(n: int = BATCH):
    from spikeformers.train.data import Digits

    data = Digits(train=True, augment=False)
    images = torch.stack([data[i][0] for i in range(n)])
    targets = torch.tensor([int(data[i][1]) for i in range(n)])
    return images.to(DEVICE), targets.to(DEVICE)


def _grads(model, images, targets, context=None, autocast_dtype=None):
    from contextlib import nullcontext

    model.zero_grad(set_to_none=True)
    amp = torch.autocast(DEVICE, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with amp, (context or nullcontext)():
        loss = torch.nn.functional.cross_entropy(model(images), targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cupy", "torch"])
def test_packed_storage_gives_the_plain_gradients(backend, autocast_dtype):
    from spikeformers.models.memory import packed_spikes

    needs_cupy(backend)
    model = _tiny_model(backend)
    images, targets = _digits_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, plain = _grads(model, images, targets, autocast_dtype=autocast_dtype)
    model.load_state_dict(state)  # the same BatchNorm statistics for the second pass
    packed_loss, packed = _grads(model, images, targets, packed_spikes, autocast_dtype)
    assert plain.keys() == packed.keys() and len(plain) > 10
    # Bits unpack to the same values, so the gradients are the plain ones: exactly on the CPU; on
    # CUDA within the run-to-run noise of atomic-add convolution and pooling backward kernels
    # (a wrong bit order or shape would be off by the gradients' own size).
    exact = DEVICE == "cpu"
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=0 if exact else 1e-6)
    for name in plain:
        scale = plain[name].abs().max().item()
        torch.testing.assert_close(packed[name], plain[name], rtol=0, atol=0 if exact else 1e-5 * max(scale, 1e-6),
                                   msg=lambda m, name=name: f"{name}: {m}")


# --- SpikingJelly backend and torch.compile on a whole model ---------------------------------------


def test_spikingjelly_backend_trains_like_ours():
    model = _tiny_model("torch")
    images, targets = _digits_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, ours = _grads(model, images, targets)
    sj = _tiny_model("spikingjelly")
    sj.load_state_dict(state)
    sj_loss, theirs = _grads(sj, images, targets)
    # identical arithmetic order, but a Triton kernel may round a charge differently near a threshold:
    # the loss agrees within 1%, and every gradient is finite and points the same way
    assert math.isfinite(sj_loss.item()) and abs(sj_loss.item() - loss.item()) <= 0.01 * loss.item()
    for name, grad in ours.items():
        assert torch.isfinite(theirs[name]).all(), name
    flat = lambda g: torch.cat([t.flatten().float() for t in g.values()])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(ours), flat(theirs), dim=0) > 0.99


def test_torch_compile_of_a_whole_model():
    # On the CPU dry run only Dynamo's capture is checked (backend "eager"): Inductor's CPU code is
    # the CPU suite's concern and takes a minute to build on a small machine.
    model = _tiny_model("torch")
    images, targets = _digits_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, eager = _grads(model, images, targets)
    model.load_state_dict(state)
    compiled = torch.compile(model, backend="inductor" if DEVICE == "cuda" else "eager")
    compiled_loss, grads = _grads(compiled, images, targets)
    assert abs(compiled_loss.item() - loss.item()) <= 0.01 * loss.item()
    norm = lambda g: torch.sqrt(sum((t.float() ** 2).sum() for t in g.values()))  # noqa: E731
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert abs(norm(grads) - norm(eager)) <= 0.02 * norm(eager)


# --- AMP train steps through the trainer ------------------------------------------------------------


@pytest.mark.parametrize("amp_dtype", ["bfloat16", "float16"])
def test_amp_train_steps_have_finite_decreasing_loss(amp_dtype, tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from spikeformers.train import main as trainer
    from spikeformers.train.distributed import Dist

    if amp_dtype == "float16" and DEVICE != "cuda":
        pytest.skip("fp16 convolutions on the CPU take minutes, and the GradScaler is CUDA's (CPU dry run)")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="spikeformers.configs", version_base="1.3"):
        cfg = compose("train", overrides=["trainer.amp=true", f"trainer.amp_dtype={amp_dtype}", f"trainer.device={DEVICE}",
                                          f"model.args={{embed_dim: {EMBED_DIM}}}", "sched.warmup_epochs=0",
                                          f"data.batch_size={2 * BATCH}"])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    torch.manual_seed(0)
    job = trainer.build(cfg, Dist(DEVICE))
    # fp16 on CUDA scales the loss (GradScaler); bf16 needs no scaling; the CPU has no fp16 scaler
    assert job.scaler.is_enabled() == (amp_dtype == "float16" and DEVICE == "cuda")
    images, targets = trainer._training_batch(job, *_digits_batch(2 * BATCH), epoch=0, batch=0)
    progress, losses = trainer.Progress(), []
    for _ in range(16):  # one fixed batch: the loss of a working step must fall
        losses.append(trainer._forward_backward(job, images, targets))
        trainer._optimizer_step(job, progress)
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses
    if job.scaler.is_enabled():
        assert math.isfinite(job.scaler.get_scale()) and job.scaler.get_scale() > 0
