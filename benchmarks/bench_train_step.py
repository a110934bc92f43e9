"""Train-step benchmark: SpikingJelly's LIFNode vs our fused torch LIF, side by side.

What is measured, per (model, backend):

- one train step = forward + cross-entropy + backward + ``SGD(lr=0).step()`` (the optimizer
  step is real but leaves the weights unchanged, so every step does identical work), on a fixed
  random batch (``--batch`` images of the model's input size, CIFAR: 3x32x32) with ``--T`` time
  steps. Models are built with the same seed, and the inputs come from their own seeded
  generator, so both backends see the same weights and the same batch.
- neuron-only rows ``lif[TxBx...]``: ``LIF(backend=...)`` forward + backward (with a fixed random
  output gradient) on [T, B, 64, 384], [T, B, 64, 1536] and [T, B, 48, 32, 32]: Spikformer-4-384's
  token neurons, its MLP hidden neurons and its first patch-splitting stage. ``gb_per_s`` is the
  bandwidth the LIF reaches (24 bytes per neuron-step in fp32, see ``LIF_BYTES_PER_ELEMENT``); the
  ``copy`` row moves the same bytes with one tensor copy, the memory-bound limit for the neuron.
- ``sdsa`` rows (``--models sdsa``): the SDSA operator alone, forward + backward, on SDT-2-512's
  [T, B, 512, 64] spikes: the official unfused op order against the fused ``models/sdsa.py``.
- ``--checkpointing`` / ``--packed`` add the torch backend with gradient checkpointing
  (``torch+ckpt``) or packed spike storage (``torch+packed``); ``--limit`` the identity neurons.
- ``--options`` (CPU speed options, train/speed.py): per model, ONE worker builds every listed
  variant from the same weights and times their steps interleaved (variant 1, 2, ..., 1, 2, ...),
  so that load from other processes hits all of them alike; each record has ``speedup`` (the
  median over rounds of plain's step time / the variant's, wall clock), ``cpu_speedup`` (the same
  with process CPU time, steadier on a loaded machine) and ``max_logit_diff`` /
  ``max_grad_rel_diff`` (the largest |difference| of the logits, and of each parameter's gradient
  relative to its largest plain entry, against the plain model on the same batch). Variants:
  ``plain``, one option or several joined by ``+`` (``onednn_linear+bn_rows``), ``default``
  (``DEFAULT_OPTIONS``), ``bf16`` (``torch.autocast`` bfloat16 with fp32 weights, what
  ``trainer.amp=true`` does on the CPU; not exact), ``compile`` (``torch.compile`` of every stage:
  patch embedding and each block).
- ``--official spikformer=DIR,sdt=DIR`` (CPU; the official code is never copied into this
  repository): per model of that family, the same worker also imports the official model file
  from DIR (Spikformer: ``model.py`` in the official ``cifar10/`` or ``imagenet/`` folder; SDT:
  ``model/spikeformer.py`` in the repository root, next to ``module/``; DIR goes on ``sys.path`` inside the
  worker only, so their own imports of ``module`` and timm work; their ``spikingjelly.clock_driven``
  imports get SpikingJelly 2.0's neurons, see ``install_clock_driven_names``), builds the official
  class (``Spikformer`` / ``SpikeDrivenTransformer``, our class names are the official ones) with
  our model's configuration, loads our weights into it (our keys are the official keys;
  ``official_keys_loaded`` counts them), and times its step as one more variant, ``official``,
  resetting its neurons after every step as the official training loop does. Every variant's
  record then has ``vs_official`` / ``cpu_vs_official``: the median over rounds of official's step
  time / the variant's (how many times faster ours is), and the official row has the logit and
  gradient differences against the first variant. Without ``--options`` the variants are
  ``plain,official``.

Every configuration runs in a fresh subprocess of this script (one JSON line back on stdout),
one after the other in the same run: a model's two backends run back to back.

Steps, per configuration:

1. the first call, timed on its own (``first_call_s``): torch.compile of the LIF loops for the
   torch backend (~20 s cold, a few seconds when Inductor's on-disk cache in
   /tmp/torchinductor_$USER already has them), lazy imports and initialisation for both;
2. one untimed step that measures the memory (``peak_mb``, below);
3. ``--warmup`` - 2 more untimed steps, then ``--iters`` timed ones: ``ms_per_step`` is their
   median (CUDA is synchronized around every timed step).

Memory (``peak_mb``, MB) is what one steady-state step adds on top of the model, its inputs and
the libraries: activations kept for backward, gradients, temporaries.
On the CPU it is the subprocess's peak resident set size during step 2 minus its RSS just
before it: the peak (VmHWM in /proc/self/status, what ``getrusage().ru_maxrss`` reports) is
reset through ``/proc/self/clear_refs``. RSS only means something if freed memory goes back to
the OS, so the worker first tells glibc's malloc (``mallopt``) to serve every block of 64 KiB or
more with its own mmap; before the timed steps it switches to fixed large thresholds (mmap
32 MiB, trim 64 MiB, about where glibc's own dynamic ones settle), so freed blocks are reused
from the heap and the timed steps take no extra page faults.
Without glibc (macOS) it is the growth of ``ru_maxrss`` over steps 1 and 2, one-time costs
included, a rough upper bound (``mem_method`` in the JSON says which). On CUDA (``--device
cuda``) it is ``torch.cuda.max_memory_allocated()`` during step 2 minus
``torch.cuda.memory_allocated()`` before it. The JSON also has ``first_call_peak_mb``, the same
measure over step 1 (with the one-time compile), and ``ms_all``, every timed step.

Run (a few minutes on a 2-core CPU):

    python -P benchmarks/bench_train_step.py --json bench.json
    python -P benchmarks/bench_train_step.py --models sdt_cifar_2_512,lif --iters 10 --device cuda
    python -P benchmarks/bench_train_step.py --models spikformer_cifar_4_384 --options plain,default --json speed.json
    python -P benchmarks/bench_train_step.py --models spikformer_cifar_4_384,sdt_cifar_2_512 --options plain,default \
        --official spikformer=spikformer/cifar10,sdt=Spike-Driven-Transformer --json official.json

The Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spikeformers.models.errors import UserError

DEFAULT_MODELS = ("spikformer_cifar_4_384", "sdt_cifar_2_512", "lif")
# One configuration per later family (`--models families`); SDT v2 is ImageNet-only, so time it with
# a CPU-sized input (`--img-size 32`).
FAMILY_MODELS = ("spikingformer_cifar10_4_384", "qkformer_cifar10_4_384", "sdtv2_imagenet_8_384")
BACKENDS = ("spikingjelly", "torch")
# "identity": every LIF replaced by the identity, so only convs, GEMMs, BN and pooling are left:
# the limit no neuron implementation can beat (models only, with --limit).
LIMIT = "identity"
CHECKPOINTED = "torch+ckpt"  # torch backend with gradient checkpointing over blocks (--checkpointing)
PACKED = "torch+packed"  # torch backend, spikes saved for backward stored as bits (--packed)
# LIF rows, bandwidth: fp32 forward reads X and writes S and H, backward reads dS and H and writes dX:
# 6 x 4 bytes per neuron-step. "copy" moves the same bytes with one tensor copy (12 B read, 12 B
# written per element): the machine's memory bandwidth for this access pattern, the LIF's limit.
LIF_BYTES_PER_ELEMENT = 24
COPY = "copy"
LIF_FEATURES = ((64, 384), (64, 1536), (48, 32, 32))  # per-sample shapes after [T, B]
COLUMNS = ("model", "backend", "T", "batch", "ms_per_step", "peak_mb", "first_call_s")


# --- memory -----------------------------------------------------------------------------------

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _glibc():
    """ctypes handle on glibc (for mallopt), or None elsewhere."""
    if not sys.platform.startswith("linux") or not os.path.exists("/proc/self/clear_refs"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _proc_status_mb(key):
    """VmRSS (current) or VmHWM (peak) of this process from /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


class CpuMemory:
    """Peak RSS added by a step (see the module docstring). Create it before any tensor."""

    def __init__(self):
        self.libc = _glibc()
        self.method = "rss" if self.libc else "ru_maxrss"
        if self.libc:
            # Every block >= 64 KiB gets its own mmap and goes back to the OS when freed, so RSS
            # follows the live tensors instead of what malloc keeps around.
            self.libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)

    def start(self):
        if self.libc:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            self.base = _proc_status_mb("VmRSS")
        elif not hasattr(self, "base"):  # the peak cannot be reset: count from the first step
            self.base = self._maxrss_mb()

    def peak(self):
        return (_proc_status_mb("VmHWM") if self.libc else self._maxrss_mb()) - self.base

    def done(self):
        """For the timing: blocks < 32 MiB reused from the heap, as glibc ends up doing itself."""
        if self.libc:
            self.libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024**2)
            self.libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024**2)

    @staticmethod
    def _maxrss_mb():  # high-water mark since process start; KB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024**2 if sys.platform == "darwin" else rss / 1024


class CudaMemory:
    method = "cuda_max_memory_allocated"

    def __init__(self, torch):
        self.cuda = torch.cuda

    def start(self):
        self.cuda.synchronize()
        self.cuda.reset_peak_memory_stats()
        self.base = self.cuda.memory_allocated()

    def peak(self):
        self.cuda.synchronize()
        return (self.cuda.max_memory_allocated() - self.base) / 1024**2

    def done(self):
        pass


# --- one configuration (runs in a worker subprocess) ------------------------------------------


def make_model_step(torch, name, backend, args, device):
    import timm

    import spikeformers  # noqa: F401  (registers the models with timm)

    from spikeformers.models.neurons import LIF

    torch.manual_seed(0)
    model = timm.create_model(name, backend="torch" if backend in (LIMIT, CHECKPOINTED, PACKED) else backend,
                              T=args.T).to(device).train()
    if backend == CHECKPOINTED:
        model.set_grad_checkpointing(True)
    if backend == LIMIT:
        for module in model.modules():
            if isinstance(module, LIF):
                module.forward = lambda x: x
    gen = torch.Generator().manual_seed(0)
    chans, height, width = model.pretrained_cfg["input_size"]
    if args.img_size:  # e.g. ImageNet configs at a CPU-sized input
        height = width = args.img_size
    x = torch.randn(args.batch, chans, height, width, generator=gen).to(device)
    y = torch.randint(0, model.num_classes, (args.batch,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    from contextlib import nullcontext

    from spikeformers.models.memory import packed_spikes

    storage = packed_spikes if backend == PACKED else nullcontext

    def step():
        with storage():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# --- CPU speed options, interleaved in one worker (--options) -----------------------------------

PLAIN = "plain"
OFFICIAL = "official"
# Our model class -> (--official key, the official class of the same name in the official model.py).
OFFICIAL_FAMILIES = {"Spikformer": "spikformer", "SpikeDrivenTransformer": "sdt"}
# --official key -> the official model file in its folder (Spikformer: cifar10/ or imagenet/; SDT: the root).
OFFICIAL_FILES = {"spikformer": "model.py", "sdt": "model/spikeformer.py"}
USER_ERROR = "bench_train_step: error: "  # a worker's one-line user error, raised again by the driver


def parse_official(spec):
    """``spikformer=DIR,sdt=DIR`` -> {family: Path}; every folder must hold its official model file."""
    dirs = {}
    for item in (i.strip() for i in spec.split(",") if i.strip()):
        family, sep, folder = item.partition("=")
        if not sep or family not in OFFICIAL_FAMILIES.values():
            raise UserError(f"--official: expected FAMILY=DIR with FAMILY in {', '.join(OFFICIAL_FAMILIES.values())}, "
                            f"got {item!r}")
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"--official {family}: no such folder {folder!r}")
        if not (path / OFFICIAL_FILES[family]).is_file():
            raise UserError(f"--official {family}: {folder!r} has no {OFFICIAL_FILES[family]} (the official model file)")
        dirs[family] = path
    if not dirs:
        raise UserError("--official is empty")
    return dirs


def official_kwargs(model, T, height, width):
    """Our model's configuration as the official constructor's arguments (same names, same meaning)."""
    block = model.block[0]
    hidden = next(p for n, p in block.mlp.named_parameters() if n.startswith("fc1") and p.ndim >= 2).shape[0]
    kwargs = dict(img_size_h=height, img_size_w=width, patch_size=16 if height >= 224 else 4,
                  in_channels=model.in_chans, num_classes=model.num_classes, embed_dims=model.embed_dim,
                  num_heads=block.attn.num_heads, mlp_ratios=hidden // model.embed_dim, depths=len(model.block),
                  qkv_bias=False, T=T)
    if OFFICIAL_FAMILIES[type(model).__name__] == "spikformer":
        return dict(kwargs, sr_ratios=1)
    return dict(kwargs, pooling_stat=model.pooling_stat, spike_mode="lif", dvs_mode=model.dvs_mode, TET=False)


def install_clock_driven_names():
    """The SpikingJelly 0.0.0.0.12 names the official files import, on SpikingJelly 2.0.

    Both official repositories import ``spikingjelly.clock_driven`` (``neuron.MultiStepLIFNode``,
    ``MultiStepParametricLIFNode``, ``functional``, ...), which SpikingJelly 2.0 no longer has. When
    it is missing, this registers it as aliases of ``spikingjelly.activation_based``, the multi-step
    neurons as the 2.0 neurons with ``step_mode="m"``: the same charge H = V + (X - V) / tau, fire
    S = (H >= v_th), hard reset to 0 and Sigmoid(alpha=4) surrogate, so the official files run
    unmodified. ``backend`` ("cupy" in the official files) is dropped: the 2.0 neurons run the
    recurrence in torch on the CPU."""
    import importlib
    import types

    try:
        importlib.import_module("spikingjelly.clock_driven.neuron")
        return
    except ModuleNotFoundError:
        pass
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    class MultiStepLIFNode(neuron.LIFNode):
        def __init__(self, *args, backend=None, lynchip=None, **kwargs):
            super().__init__(*args, step_mode="m", **kwargs)

    class MultiStepParametricLIFNode(neuron.ParametricLIFNode):
        def __init__(self, *args, backend=None, **kwargs):
            super().__init__(*args, step_mode="m", **kwargs)

    legacy_neuron = types.ModuleType("spikingjelly.clock_driven.neuron")
    legacy_neuron.__dict__.update(vars(neuron))
    legacy_neuron.MultiStepLIFNode = MultiStepLIFNode
    legacy_neuron.MultiStepParametricLIFNode = MultiStepParametricLIFNode
    package = types.ModuleType("spikingjelly.clock_driven")
    package.__path__ = []
    modules = dict(neuron=legacy_neuron, functional=functional, layer=layer, surrogate=surrogate)
    for name, module in modules.items():
        setattr(package, name, module)
        sys.modules[f"spikingjelly.clock_driven.{name}"] = module
    sys.modules["spikingjelly.clock_driven"] = package


def build_official(torch, model, folder, T, height, width):
    """The official class from its file in ``folder``, configured as ``model`` and loaded with its weights.

    Returns (official model, forward returning logits, neuron reset, "loaded/official keys")."""
    import importlib.util

    family = OFFICIAL_FAMILIES[type(model).__name__]
    class_name = type(model).__name__
    sys.path.insert(0, str(folder))  # the official files import their siblings (SDT: `from module import *`)
    install_clock_driven_names()
    path = folder / OFFICIAL_FILES[family]
    spec = importlib.util.spec_from_file_location(f"official_{family}_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # timm's @register_model in the official file looks its module up there
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"--official {family}: {path} defines no class {class_name}")
    official = cls(**official_kwargs(model, T, height, width)).train()
    ours, theirs = model.state_dict(), official.state_dict()
    matching = {k: v for k, v in ours.items() if k in theirs and theirs[k].shape == v.shape}
    official.load_state_dict(matching, strict=False)
    # SpikingJelly neurons keep their membrane between calls: the official loop resets them after each batch.
    resettable = [m for m in official.modules() if callable(getattr(m, "reset", None))]

    def forward(x):
        out = official(x)
        return out[0] if isinstance(out, tuple) else out  # SDT returns (logits, firing-rate hook)

    def reset():
        for m in resettable:
            m.reset()

    return official, forward, reset, f"{len(matching)}/{len(theirs)}"


def make_variant(torch, model, variant):
    """``model`` (a fresh copy) prepared as ``variant``; returns the callable that runs it."""
    from spikeformers.train import speed

    if variant == PLAIN:
        return model
    if variant == "bf16":
        def autocast_forward(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)
        return autocast_forward
    if variant == "compile":
        for _, stage in model.stages():
            if isinstance(stage, torch.nn.Module):
                stage.compile()
        return model
    options = speed.DEFAULT_OPTIONS if variant == "default" else variant.split("+")
    return speed.apply_cpu_speed(model, options)


def run_options_worker(torch, name, variants, args):
    """Every variant of ``name`` from the same weights and batch, steps timed round-robin; with
    ``--official``, the official model of its family as the last variant."""
    import copy

    import timm

    import spikeformers  # noqa: F401

    torch.manual_seed(0)
    base = timm.create_model(name, backend="torch", T=args.T).train()
    gen = torch.Generator().manual_seed(0)
    chans, height, width = base.pretrained_cfg["input_size"]
    if args.img_size:
        height = width = args.img_size
    x = torch.randn(args.batch, chans, height, width, generator=gen)
    y = torch.randint(0, base.num_classes, (args.batch,), generator=gen)
    official_keys = None
    if args.official:
        family = OFFICIAL_FAMILIES.get(type(base).__name__)
        folder = parse_official(args.official).get(family)
        if folder is not None:
            variants = [*variants, OFFICIAL]
        elif len(variants) < 2:  # nothing to compare with
            raise UserError(f"--official has no {family or 'official'} folder for {name} (a {type(base).__name__}); "
                            f"families: {', '.join(OFFICIAL_FAMILIES.values())}")
    steps, checks, first = {}, {}, {}
    for variant in variants:
        reset = None
        if variant == OFFICIAL:
            model, forward, reset, official_keys = build_official(torch, base, folder, args.T, height, width)
        else:
            model = copy.deepcopy(base)
            forward = make_variant(torch, model, variant)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        t0 = time.perf_counter()
        logits = forward(x)  # exactness check: logits and gradients of one loss on the same batch
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        checks[variant] = (logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None})
        opt.zero_grad(set_to_none=True)
        if reset:
            reset()

        def step(forward=forward, opt=opt, reset=reset):
            torch.nn.functional.cross_entropy(forward(x).float(), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if reset:
                reset()

        for _ in range(args.warmup - 1):
            step()
        first[variant] = time.perf_counter() - t0
        steps[variant] = step
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    from spikeformers.train import speed

    retained = None
    for _ in range(args.iters):
        for variant in variants:
            # malloc_retain acts on the whole process: on only while the variants that have it run
            wanted = "malloc_retain" in (speed.DEFAULT_OPTIONS if variant == "default" else variant.split("+"))
            if wanted != retained:
                retained = speed.retain_freed_memory(wanted) and wanted
                steps[variant]()  # one untimed step after a switch: the heap settles to the new rule
            c0, t0 = time.process_time(), time.perf_counter()
            steps[variant]()
            wall[variant].append(time.perf_counter() - t0)
            cpu[variant].append(time.process_time() - c0)
    ref = variants[0]
    ref_logits, ref_grads = checks[ref]
    records = []
    for variant in variants:
        logits, grads = checks[variant]
        grad_diff = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                        for n, g in ref_grads.items() if n in grads)
        record = dict(
            model=name, backend="torch", option=variant, T=args.T, batch=args.batch,
            ms_per_step=round(1000 * statistics.median(wall[variant]), 2),
            cpu_ms_per_step=round(1000 * statistics.median(cpu[variant]), 2),
            speedup=round(statistics.median(a / b for a, b in zip(wall[ref], wall[variant])), 3),
            cpu_speedup=round(statistics.median(a / b for a, b in zip(cpu[ref], cpu[variant])), 3),
            max_logit_diff=float(f"{(logits - ref_logits).abs().max().item():.3g}"),
            max_grad_rel_diff=float(f"{grad_diff:.3g}"),
            first_call_s=round(first[variant], 2), baseline=ref,
            ms_all=[round(1000 * t, 2) for t in wall[variant]],
            device="cpu", threads=torch.get_num_threads(),
            loadavg_1m=round(os.getloadavg()[0], 2),
        )
        if OFFICIAL in wall:  # how many times faster than the official step, round by round
            record["vs_official"] = round(statistics.median(a / b for a, b in zip(wall[OFFICIAL], wall[variant])), 3)
            record["cpu_vs_official"] = round(statistics.median(a / b for a, b in zip(cpu[OFFICIAL], cpu[variant])), 3)
            record["official_keys_loaded"] = official_keys
        records.append(record)
    print(json.dumps(records))


SDSA_FEATURES = (512, 64)  # SDT-2-512 on CIFAR: C channels, N tokens
SDSA_BACKENDS = ("unfused", "torch")  # official op order (k⊙v, sum, LIF, q⊙mask) vs models/sdsa.py


def make_sdsa_step(torch, features, backend, args, device):
    """The SDSA operator alone, forward + backward, on random spikes [T, B, C, N]."""
    from spikeformers.models.neurons import LIF
    from spikeformers.models.sdsa import sdsa, sdsa_reference

    lif = LIF(v_threshold=0.5, backend="torch")
    gen = torch.Generator().manual_seed(0)
    shape = (args.T, args.batch, *features)
    q, k, v = ((torch.rand(shape, generator=gen) < 0.2).float().to(device).requires_grad_() for _ in range(3))
    grad_out = torch.randn(shape, generator=gen).to(device)
    op = sdsa if backend == "torch" else sdsa_reference

    def step():
        for t in (q, k, v):
            t.grad = None
        op(q, k, v, lif).backward(grad_out)

    return step


def make_lif_step(torch, features, backend, args, device):
    from spikeformers.models.neurons import LIF

    shape = (args.T, args.batch, *features)
    if backend == COPY:  # the same bytes as one LIF forward + backward, moved by one copy
        src = torch.rand(3, *shape, device=device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    lif = LIF(backend=backend)
    gen = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(shape, generator=gen)).to(device).requires_grad_()
    grad_out = torch.randn(shape, generator=gen).to(device)

    def step():
        x.grad = None
        lif(x).backward(grad_out)

    return step


def run_worker(args):
    """Measure one configuration and print its record as one JSON line on stdout."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker[0] == "options":  # no memory measurement: glibc's default malloc for the timing
        try:
            return run_options_worker(torch, args.worker[1], args.worker[2].split(","), args)
        except UserError as e:  # one line for the driver to raise again
            print(USER_ERROR + str(e), file=sys.stderr)
            return 2
    device = torch.device(args.device)
    memory = CudaMemory(torch) if device.type == "cuda" else CpuMemory()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    kind, name, backend = args.worker
    if kind in ("lif", "sdsa"):
        features = tuple(int(d) for d in name.split("x"))
        step = (make_lif_step if kind == "lif" else make_sdsa_step)(torch, features, backend, args, device)
        label = f"{kind}[" + "x".join(str(d) for d in (args.T, args.batch, *features)) + "]"
    else:
        step = make_model_step(torch, name, backend, args, device)
        label = name

    def timed_step():
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    memory.start()
    first_call_s = timed_step()  # includes torch.compile (torch backend), lazy imports, ...
    first_call_mb = memory.peak()
    memory.start()
    step()  # second warm-up step: the steady-state memory
    peak_mb = memory.peak()
    memory.done()
    for _ in range(args.warmup - 2):
        step()
    times = [timed_step() for _ in range(args.iters)]
    record = dict(
        model=label, backend=backend, T=args.T, batch=args.batch,
        ms_per_step=round(1000 * statistics.median(times), 2),
        peak_mb=round(peak_mb, 1),
        first_call_s=round(first_call_s, 2),
        first_call_peak_mb=round(first_call_mb, 1),
        ms_all=[round(1000 * t, 2) for t in times],
        device=args.device, threads=torch.get_num_threads(), mem_method=memory.method,
        loadavg_1m=round(os.getloadavg()[0], 2),  # other processes on the machine skew timings
    )
    if kind == "lif":
        elements = args.T * args.batch * math.prod(features)
        record["gb_per_s"] = round(LIF_BYTES_PER_ELEMENT * elements / statistics.median(times) / 1e9, 2)
    print(json.dumps(record))


# --- driver -----------------------------------------------------------------------------------


def configurations(models, limit=False, checkpointing=False, packed=False):
    """(kind, name, backend) triples: per model (or LIF shape) every backend, consecutively."""
    for model in models:
        if model == "lif":
            for features in LIF_FEATURES:
                for backend in BACKENDS + (COPY,):
                    yield "lif", "x".join(map(str, features)), backend
        elif model == "sdsa":
            for backend in SDSA_BACKENDS:
                yield "sdsa", "x".join(map(str, SDSA_FEATURES)), backend
        else:
            extra = (CHECKPOINTED,) * checkpointing + (PACKED,) * packed + (LIMIT,) * limit
            for backend in BACKENDS + extra:
                yield "model", model, backend


def run_config(config, args):
    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--worker", *config,
           "--batch", str(args.batch), "--T", str(args.T), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--device", args.device] + (["--img-size", str(args.img_size)] if args.img_size else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.official:
        cmd += ["--official", args.official]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if proc.returncode == 2 and line.startswith(USER_ERROR):
            raise UserError(line[len(USER_ERROR):])
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        print(f"FAILED {' '.join(config[1:])}:\n{tail}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


OPTION_COLUMNS = ("model", "option", "T", "batch", "threads", "ms_per_step", "speedup", "cpu_speedup",
                  "max_logit_diff", "max_grad_rel_diff", "first_call_s")


def options_markdown(records):
    """The --options table: one row per (model, variant), speedups against the first variant (and
    against the official step with --official), then one line per model: ours vs official."""
    columns = OPTION_COLUMNS + (("vs_official", "cpu_vs_official") if any("vs_official" in r for r in records) else ())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in records]
    official = {r["model"]: r for r in records if r["option"] == OFFICIAL}
    for r in records:
        if r["option"] != OFFICIAL and r["model"] in official:
            lines.append(f"ours vs official {r['model']} ({r['option']}): {r['vs_official']:.2f}x wall, "
                         f"{r['cpu_vs_official']:.2f}x CPU, max |dlogit| {official[r['model']]['max_logit_diff']:.3g} "
                         f"(official vs {official[r['model']]['baseline']}), "
                         f"official keys loaded {r['official_keys_loaded']}")
    return "\n".join(lines)


def markdown(records):
    if records and all("option" in r for r in records):
        return options_markdown(records)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in records]
    by_key = {(r["model"], r["backend"], r["T"]): r for r in records}
    lines.append("")
    for model, T in dict.fromkeys((r["model"], r["T"]) for r in records):
        sj, ours, limit = (by_key.get((model, b, T)) for b in ("spikingjelly", "torch", LIMIT))
        unfused = by_key.get((model, "unfused", T))
        if unfused and ours:
            lines.append(f"speedup (unfused/fused) {model} T={T}: {unfused['ms_per_step'] / ours['ms_per_step']:.2f}x, "
                         f"memory {ours['peak_mb'] / max(unfused['peak_mb'], 0.1):.2f}x")
        if sj and ours:
            speedup = sj["ms_per_step"] / ours["ms_per_step"]
            line = f"speedup (spikingjelly/torch) {model} T={T}: {speedup:.2f}x"
            if limit:
                line += f"; torch / identity-neuron limit: {ours['ms_per_step'] / limit['ms_per_step']:.2f}x"
            for option, label in ((CHECKPOINTED, "checkpointing"), (PACKED, "packed spikes")):
                if other := by_key.get((model, option, T)):
                    line += (f"; {label}: {other['peak_mb'] / ours['peak_mb']:.2f}x memory, "
                             f"{other['ms_per_step'] / ours['ms_per_step']:.2f}x time")
            copy = by_key.get((model, COPY, T))
            if copy:
                line += (f"; bandwidth: torch {ours['gb_per_s']} GB/s = {ours['gb_per_s'] / copy['gb_per_s']:.2f}x "
                         f"of a copy of the same bytes ({copy['gb_per_s']} GB/s)")
            lines.append(line)
    return "\n".join(lines)


def write_json(path, records):
    """Atomic: a temp file in the target's directory, then os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bench_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(records, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma list of timm model names; 'lif' adds the neuron-only rows, 'families' one config of each later family "
                             "(default: %(default)s)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps before them (min 2): the first call (first_call_s), "
                             "the memory step, then plain ones (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=None, help="input height = width (default: the model's cfg)")
    parser.add_argument("--T", default="4", help="time steps, or a comma list such as 1,2,4,8 (default: %(default)s)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also time the torch backend with gradient checkpointing over blocks")
    parser.add_argument("--packed", action="store_true",
                        help="also time the torch backend with packed spike storage (models/memory.py)")
    parser.add_argument("--limit", action="store_true",
                        help="also time each model with identity neurons (the convs/GEMMs-only limit)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--options", metavar="LIST",
                        help="CPU speed variants timed interleaved in one process per model, e.g. "
                             "plain,onednn_linear,bn_rows,channels_last,default,bf16,compile (first = baseline)")
    parser.add_argument("--official", metavar="FAMILY=DIR,...",
                        help="also time the official model, e.g. spikformer=DIR,sdt=DIR: DIR holds the official model "
                             "file (Spikformer: cifar10/model.py's folder; SDT: the repository root, with "
                             "model/spikeformer.py and module/); with --options or plain alone")
    parser.add_argument("--json", metavar="FILE", help="also write the records as a JSON list")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # internal: one config
    args = parser.parse_args(argv)

    try:
        t_values = [int(t) for t in str(args.T).split(",") if t.strip()]
    except ValueError:
        parser.error(f"--T must be integers separated by commas, got {args.T!r}")
    if not t_values or min(t_values) < 1:
        parser.error(f"--T values must be >= 1, got {args.T!r}")
    args.T = t_values[0]
    for flag in ("iters", "batch", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be >= 1, got {value}")
    if args.warmup < 2:
        parser.error(f"--warmup must be >= 2 (the first call compiles), got {args.warmup}")
    if args.worker:
        return run_worker(args)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: no such directory")

    import timm
    import torch

    import spikeformers  # noqa: F401

    ours = [n for n in timm.list_models()
            if timm.models.model_entrypoint(n).__module__.startswith("spikeformers.")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    models = [name for m in models for name in (FAMILY_MODELS if m == "families" else (m,))]
    if not models:
        parser.error("--models is empty")
    for m in models:
        if m not in ("lif", "sdsa") and m not in ours:
            parser.error(f"unknown model {m!r}; expected 'lif', 'sdsa' or a spikeformers model "
                         f"such as {', '.join(DEFAULT_MODELS[:2])}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")

    records, failed = [], False
    if args.official:
        parse_official(args.official)  # the folders and their model.py, before any worker starts
        args.options = args.options or PLAIN
    if args.options:
        from spikeformers.train.speed import OPTIONS

        variants = [v.strip() for v in args.options.split(",") if v.strip()]
        known = (PLAIN, "default", "bf16", "compile")
        for v in variants:
            if v not in known and not all(o in OPTIONS for o in v.split("+")):
                parser.error(f"--options: unknown variant {v!r}; expected {', '.join(known)} or options "
                             f"joined by '+' from {', '.join(OPTIONS)}")
        if args.device != "cpu" or len(variants) < 2 - bool(args.official) or any(m in ("lif", "sdsa") for m in models):
            parser.error("--options needs --device cpu, at least two variants (one with --official) "
                         "and model names only")
        for T in t_values:
            args.T = T
            for model in models:
                print(f"running {model} / {','.join(variants)} / T={T} ...", file=sys.stderr, flush=True)
                result = run_config(("options", model, ",".join(variants)), args)
                failed |= result is None
                records += result or []
        print(markdown(records))
        if args.json:
            write_json(args.json, records)
        return 1 if failed else 0
    for T in t_values:
        args.T = T
        for config in configurations(models, args.limit, args.checkpointing, args.packed):
            kind, name, backend = config
            label = f"{kind}[{name}]" if kind in ("lif", "sdsa") else name
            print(f"running {label} / {backend} / T={T} ...", file=sys.stderr, flush=True)
            record = run_config(config, args)
            failed |= record is None
            if record:
                records.append(record)
    print(markdown(records))
    if args.json:
        write_json(args.json, records)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
