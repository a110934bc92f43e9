"""One-command GPU check: every CUDA path tested and timed in one prepared run.

    python -P benchmarks/gpu_check.py --out DIR [--dry-run] [--budget-s 480] [--parts tests,ddp]

GPU time comes in short windows, so everything a GPU must prove runs from this one command, in
parts. Each part is a subprocess with a hard time limit (its share of ``--budget-s``; time a part
leaves unused goes to the later ones); a part that fails, crashes or runs out of time is recorded
as such and the next one starts.

- ``tests``: pytest on every test that needs CUDA (:data:`CUDA_TESTS`: tests/test_cuda.py and the
  GPU tests of tests/test_kernels.py), one line per test in the report.
- ``lif``: the LIF forward + backward per backend (cupy, spikingjelly, torch) at T = 1, 4, 8, 16
  (float32; bfloat16 at T = 4), with the bandwidth it reaches against the device's copy bandwidth
  measured in the same process.
- ``sdsa``: the SDSA operator forward + backward per backend on SDT-8-512's attention shape.
- ``train``: a train step (forward, loss, backward, AdamW step) of sdt_imagenet_8_512 and
  spikformer_imagenet_8_384 at 224×224, T = 4, bf16 autocast, per backend, and with the memory
  options (gradient checkpointing, packed spikes): images/s and peak memory.
- ``ddp``: the trainer under torchrun (1 process per GPU, 2 steps, then ``resume=auto`` for a
  second epoch), and a DDP step over an NCCL process group (world size 1).

Outputs in DIR: ``gpu_check.json`` (everything), ``gpu_check.md`` (the tables, the device named)
and ``log_<part>.txt`` per part. ``--parts`` reruns only the named parts and keeps the other parts'
results from the ``gpu_check.json`` already in DIR (or from ``--merge FILE``).

``--dry-run`` runs every part on the CPU at tiny sizes in a minute or two (CUDA hidden, the CuPy
rows recorded as skipped, gloo instead of NCCL, tiny models at 32×32 instead of the ImageNet
ones, the LIF loops run eagerly), so the script is exercised in CI
(tests/test_gpu_check.py) while no GPU is at hand. A GPU machine needs a few wheels besides its
own packages: see benchmarks/gpu_check_wheels.sh.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Every test that needs a CUDA device (they skip without one). tests/test_gpu_check.py checks
#: that no other test in tests/ skips for want of CUDA, so a new GPU test cannot be left out.
CUDA_TESTS = (
    "tests/test_cuda.py",
    "tests/test_kernels.py::test_cupy_backend_matches_torch_backend_on_gpu",
    "tests/test_kernels.py::test_cupy_sdsa_matches_torch_sdsa_on_gpu",
)
#: Parts in run order and their share of the budget.
PARTS = {"tests": 0.33, "lif": 0.12, "sdsa": 0.06, "train": 0.33, "ddp": 0.16}
LIF_BACKENDS = ("cupy", "spikingjelly", "torch")
LIF_T = (1, 4, 8, 16)
# Minimal traffic of one fused LIF forward + backward per neuron-step: X in, S and H (fp32) out,
# then dS and H in, dX out. float32: 6 × 4 bytes; fp16/bf16 inputs: 4 × 2 + 2 × 4 bytes.
LIF_BYTES = {"float32": 24, "bfloat16": 16}
# SDSA forward reads Q, K, V and writes O; backward reads dO, Q, K, V and writes dQ, dK, dV: 11
# tensors of [T, B, C, N] (the mask LIF's H, [T, B, C], is negligible).
SDSA_TENSORS = 11
TRAIN_MODELS = {"sdt_imagenet_8_512": 48, "spikformer_imagenet_8_384": 24}  # official batch per GPU
DRY_TRAIN_MODELS = {"sdt_tiny": 2, "spikformer_tiny": 2}


# --- the package, importable from a plain checkout ---------------------------------------------


def ensure_package() -> str:
    """Make ``import spikeformers`` work. The repository root is the package, so a checkout that
    is not pip-installed (a GPU machine) gets a link named ``spikeformers`` to it in a temporary
    folder on sys.path and PYTHONPATH (for the subprocesses). Returns where it was found."""
    try:
        import spikeformers

        return str(Path(spikeformers.__file__).resolve().parent)
    except ImportError:
        pass
    folder = Path(tempfile.gettempdir()) / f"spikeformers_gpu_check_{os.getuid()}"
    folder.mkdir(exist_ok=True)
    link = folder / "spikeformers"
    if link.is_symlink() and os.readlink(link) != str(REPO):
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    import spikeformers

    return str(Path(spikeformers.__file__).resolve().parent)


# --- measuring -------------------------------------------------------------------------------------


class Clock:
    """Wall time of a callable on the device: CUDA is synchronised around each call."""

    def __init__(self, torch, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def median_ms(self, fn, min_iters: int, min_s: float, max_iters: int = 200) -> tuple[float, int]:
        """Median over at least ``min_iters`` calls and ``min_s`` seconds (at most ``max_iters``)."""
        times, start = [], time.perf_counter()
        while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_s):
            times.append(self.once(fn))
        return 1000 * statistics.median(times), len(times)


def copy_gb_per_s(torch, device, nbytes: int, clock: Clock) -> float:
    """The device's copy bandwidth: one ``copy_`` of ``nbytes``, counting bytes read and written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms, _ = clock.median_ms(lambda: dst.copy_(src), min_iters=10, min_s=0.2)
    del src, dst
    return 2 * nbytes / ms / 1e6


def sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny dry-run numbers keep their precision)."""
    return float(f"{x:.{digits}g}")


def peak_memory(torch, device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_process_max_rss"


def free(torch, device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Records:
    """Results of a worker, one JSON line each, flushed at once: a part killed at its time limit
    keeps everything measured before."""

    def __init__(self, path: str, deadline: float) -> None:
        self.file = open(path, "a")
        self.deadline = deadline

    def add(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def time_left(self) -> float:
        return self.deadline - time.time()


def attempt(records: Records, torch, device, margin_s: float, fields: dict, measure) -> None:
    """Run ``measure()`` (-> dict of results) and record it with ``fields``; an exception, an
    out-of-memory or too little time left is recorded instead."""
    if records.time_left() < margin_s:
        records.add(**fields, status="skipped", reason=f"less than {margin_s:.0f} s left in the part")
        return
    try:
        records.add(**fields, status="ok", **measure())
    except Exception as err:  # noqa: BLE001  (one failure is a row, not the end of the part)
        status = "oom" if type(err).__name__ == "OutOfMemoryError" else "error"
        records.add(**fields, status=status, reason=f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
    finally:
        free(torch, device)


def unavailable(backend: str, device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend != "cupy":
        return None
    if device.type != "cuda":
        return "CuPy kernels need CUDA"
    from spikeformers.kernels.cupy_lif import available

    ok, missing = available()
    return None if ok else missing


# --- parts (each runs in its own worker process) -----------------------------------------------------


def part_lif(args, records: Records, torch, device) -> None:
    from spikeformers.models.neurons import LIF

    clock = Clock(torch, device)
    batch, features, copy_bytes = ((2, (16, 64), 2**23) if args.dry_run else (32, (196, 2048), 2**31))
    copy = copy_gb_per_s(torch, device, copy_bytes, clock)
    records.add(section="copy", status="ok", gb_per_s=sig(copy), bytes=copy_bytes)
    cases = [("float32", T) for T in LIF_T] + [("bfloat16", 4)]
    for dtype_name, T in cases:
        dtype = getattr(torch, dtype_name)
        shape = (T, batch, *features)
        for backend in LIF_BACKENDS:
            fields = dict(section="lif", backend=backend, T=T, dtype=dtype_name, shape=list(shape))
            if reason := unavailable(backend, device):
                records.add(**fields, status="skipped", reason=reason)
                continue

            def measure(backend=backend, shape=shape, dtype=dtype, T=T, dtype_name=dtype_name):
                g = torch.Generator(device=device).manual_seed(0)
                x = (2 * torch.randn(shape, device=device, generator=g)).to(dtype).requires_grad_()
                grad = torch.randn(shape, device=device, generator=g).to(dtype)
                lif = LIF(backend=backend)

                def step():
                    x.grad = None
                    lif(x).backward(grad)

                first = clock.once(step)
                step()
                ms, iters = clock.median_ms(step, min_iters=5, min_s=0.05 if args.dry_run else 0.2)
                gbps = LIF_BYTES[dtype_name] * math.prod(shape) / ms / 1e6
                return dict(ms=sig(ms), iters=iters, first_call_s=round(first, 2), gb_per_s=sig(gbps),
                            of_copy=sig(gbps / copy, 3))

            attempt(records, torch, device, 3 if args.dry_run else 8, fields, measure)


def part_sdsa(args, records: Records, torch, device) -> None:
    from spikeformers.models.neurons import LIF
    from spikeformers.models.sdsa import sdsa

    clock = Clock(torch, device)
    shape, copy_bytes = ((4, 2, 16, 8), 2**23) if args.dry_run else ((4, 48, 512, 196), 2**31)  # [T, B, C, N]
    copy = copy_gb_per_s(torch, device, copy_bytes, clock)
    records.add(section="copy", status="ok", gb_per_s=sig(copy), bytes=copy_bytes)
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        for backend in LIF_BACKENDS:  # the mask LIF's backend picks the operator (spikingjelly: unfused)
            fields = dict(section="sdsa", backend=backend, T=shape[0], dtype=dtype_name, shape=list(shape))
            if reason := unavailable(backend, device):
                records.add(**fields, status="skipped", reason=reason)
                continue

            def measure(backend=backend, dtype=dtype):
                g = torch.Generator(device=device).manual_seed(0)
                q, k, v = ((torch.rand(shape, device=device, generator=g) < 0.2).to(dtype).requires_grad_() for _ in range(3))
                grad = torch.randn(shape, device=device, generator=g).to(dtype)
                lif = LIF(v_threshold=0.5, backend=backend)

                def step():
                    for t in (q, k, v):
                        t.grad = None
                    sdsa(q, k, v, lif).backward(grad)

                first = clock.once(step)
                step()
                ms, iters = clock.median_ms(step, min_iters=5, min_s=0.05 if args.dry_run else 0.2)
                gbps = SDSA_TENSORS * q.element_size() * q.numel() / ms / 1e6
                return dict(ms=sig(ms), iters=iters, first_call_s=round(first, 2), gb_per_s=sig(gbps),
                            of_copy=sig(gbps / copy, 3))

            attempt(records, torch, device, 3 if args.dry_run else 8, fields, measure)


def train_configs(device) -> list[tuple[str, str]]:
    """(backend, memory option) pairs: every backend plain, then the memory options on the
    default backend of the device ("auto": cupy on CUDA with CuPy, torch otherwise)."""
    return [(b, "plain") for b in LIF_BACKENDS] + [("auto", "checkpoint"), ("auto", "packed")]


def part_train(args, records: Records, torch, device) -> None:
    import timm

    import spikeformers  # noqa: F401  (registers the models)
    from spikeformers.models.memory import packed_spikes
    from spikeformers.models.neurons import resolve_backend

    clock = Clock(torch, device)
    models = DRY_TRAIN_MODELS if args.dry_run else TRAIN_MODELS
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    for name, batch in models.items():
        if args.batch:
            batch = args.batch
        for backend, memory in train_configs(device):
            concrete = resolve_backend(backend, device)
            fields = dict(section="train", model=name, backend=concrete, memory=memory, batch=batch, T=4, amp="bfloat16")
            if reason := unavailable(concrete, device):
                records.add(**fields, status="skipped", reason=reason)
                continue

            def measure(name=name, batch=batch, concrete=concrete, memory=memory):
                free(torch, device)
                torch.manual_seed(0)
                model = timm.create_model(name, backend=concrete, T=4).to(device).train()
                chans, _, size = model.pretrained_cfg["input_size"]  # 3×224×224 for the ImageNet models
                model.set_grad_checkpointing(memory == "checkpoint")
                storage = packed_spikes if memory == "packed" else nullcontext
                g = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(batch, chans, size, size, device=device, generator=g)
                y = torch.randint(0, model.num_classes, (batch,), device=device, generator=g)
                opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # real update arithmetic, unchanged weights
                losses = []

                def step():
                    with torch.autocast(device.type, dtype=torch.bfloat16), storage():
                        loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(loss.detach())

                first = clock.once(step)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                step()
                peak_mb, method = peak_memory(torch, device)
                ms, iters = clock.median_ms(step, min_iters=3 if args.dry_run else 5, min_s=0.0 if args.dry_run else 1.0,
                                            max_iters=20)
                loss = losses[-1].float().item()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss {loss}")
                return dict(img_size=size, ms=sig(ms), iters=iters, images_per_s=sig(1000 * batch / ms),
                            peak_mb=round(peak_mb, 1), mem_method=method, first_call_s=round(first, 2),
                            loss=round(loss, 4))

            attempt(records, torch, device, 5 if args.dry_run else 20, fields, measure)


def part_nccl_step(args, records: Records, torch, device) -> None:
    """Run by torchrun (world size 1): a DDP step over the process group the trainer uses on
    GPUs ("cpu:gloo,cuda:nccl"; gloo alone on the CPU), then the trainer's replica check."""
    from types import SimpleNamespace

    import timm
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import spikeformers  # noqa: F401
    from spikeformers.train.distributed import check_replicas_in_sync

    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    try:
        torch.manual_seed(0)
        model = timm.create_model("sdt_tiny", in_chans=3, num_classes=10).to(device).train()
        ddp = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None,
                                      static_graph=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(8, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (8,), device=device)
        losses = []
        for _ in range(2):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        check_replicas_in_sync(SimpleNamespace(device=device, world=dist.get_world_size(), primary=dist.get_rank() == 0),
                               model)
        if dist.get_rank() == 0:  # one row, however many GPUs torchrun started
            records.add(section="ddp", step="nccl_ddp_step", status="ok" if all(map(math.isfinite, losses)) else "error",
                        backend=str(dist.get_backend()), world=dist.get_world_size(), all_reduce=total.item(),
                        losses=[round(v, 4) for v in losses])
    finally:
        dist.destroy_process_group()


def part_ddp(args, records: Records, torch, device) -> None:
    """The trainer under torchrun, 2 steps, then resumed for a second epoch; then a DDP step over
    NCCL. Each launch is a subprocess limited to what is left of the part's time."""
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_check_ddp_")) / "run"
    overrides = [f"trainer.device={device.type}", "trainer.max_steps_per_epoch=2", "trainer.save_every_steps=1",
                 "trainer.progress=false", f"hydra.run.dir={run_dir}", "data.eval_batch_size=360"]
    if args.dry_run:
        overrides.append("model.args={embed_dim: 16}")
    else:
        overrides += ["trainer.amp=true", "trainer.amp_dtype=bfloat16"]
    nproc = max(torch.cuda.device_count(), 1) if device.type == "cuda" else 1
    torchrun = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    launches = [
        ("train", torchrun + ["-m", "spikeformers.train.main", "trainer.epochs=1", *overrides]),
        ("resume", torchrun + ["-m", "spikeformers.train.main", "trainer.epochs=2", "resume=auto", *overrides]),
        ("nccl_ddp_step", torchrun + [os.path.abspath(__file__), "--worker", "nccl_step", "--records", records.file.name,
                                      "--deadline", str(records.deadline)] + ["--dry-run"] * args.dry_run),
    ]
    for step, cmd in launches:
        started = time.time()
        try:
            proc = subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=max(records.time_left() - 2, 1))
            output, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as err:
            output, rc = f"{err.stdout or ''}{err.stderr or ''}", "timeout"
        print(f"--- {step}: {' '.join(cmd)}\n{output}", flush=True)
        wall = round(time.time() - started, 1)
        if step == "nccl_ddp_step":
            if rc != 0:
                records.add(section="ddp", step=step, status="error", rc=rc, wall_s=wall, reason=_last_line(output))
            continue
        rows = _csv_rows(run_dir / "metrics.csv")
        expected = 1 if step == "train" else 2
        ok = rc == 0 and rows == expected and (step == "train" or "resumed from" in output)
        records.add(section="ddp", step=step, status="ok" if ok else "error", rc=rc, wall_s=wall, nproc=nproc,
                    epochs_in_metrics=rows, reason=None if ok else _last_line(output))


def _csv_rows(path: Path) -> int:
    return max(len(path.read_text().splitlines()) - 1, 0) if path.exists() else 0


_EXCEPTION = re.compile(r"^(?:\[rank\d+\]: )?((?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*|.*: error: .*)$")


def _last_line(text: str) -> str:
    """The last exception line of ``text`` (torchrun's own summary follows it), else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [m.group(1) for line in lines if (m := _EXCEPTION.match(line)) and "ChildFailedError" not in line]
    return (errors or lines or [""])[-1][:300]


WORKERS = {"lif": part_lif, "sdsa": part_sdsa, "train": part_train, "ddp": part_ddp, "nccl_step": part_nccl_step}


def run_worker(args) -> int:
    ensure_package()
    import torch

    if args.worker == "nccl_step":
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    records = Records(args.records, args.deadline)
    WORKERS[args.worker](args, records, torch, device)
    return 0


# --- the tests part ------------------------------------------------------------------------------------

_OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_SHORT = re.compile(r"^(FAILED|ERROR) (tests/\S+::\S+)(?: - (.*))?$")


def pytest_command(limit_s: float) -> list[str]:
    cmd = [sys.executable, "-P", "-m", "pytest", "-v", "-rfE", "--durations=15", "-p", "no:cacheprovider", *CUDA_TESTS]
    import importlib.util

    if importlib.util.find_spec("pytest_timeout"):  # one hung test must not take the others with it
        cmd.append(f"--timeout={max(int(limit_s * 0.6), 60)}")  # room for a cold torch.compile
    return cmd


def parse_pytest(output: str) -> list[dict]:
    """One entry per test from pytest -v lines; failure messages from the short summary."""
    tests, messages = {}, {}
    for line in output.splitlines():
        if m := _OUTCOME.match(line):
            tests[m.group(1)] = m.group(2).lower()
        elif m := _SHORT.match(line):
            messages[m.group(2)] = (m.group(3) or "")[:300]
    return [dict(id=t, outcome=o, **({"message": messages[t]} if t in messages else {})) for t, o in tests.items()]


# --- driver ----------------------------------------------------------------------------------------


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def run_limited(cmd: list[str], log_path: Path, limit_s: float, env: dict) -> tuple[object, float]:
    """Run ``cmd`` with its output in ``log_path``; killed with its children after ``limit_s``.
    Returns (exit code or "timeout", seconds)."""
    started = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            rc = "timeout"
    return rc, round(time.time() - started, 1)


def run_part(part: str, args, limit_s: float, env: dict, work: Path) -> dict:
    log_path = Path(args.out) / f"log_{part}.txt"
    result = dict(limit_s=round(limit_s, 1))
    if part == "tests":
        rc, wall = run_limited(pytest_command(limit_s), log_path, limit_s, env)
        tests = parse_pytest(log_path.read_text(errors="replace"))
        counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
        bad = counts["failed"] + counts["error"]
        status = "timeout" if rc == "timeout" else ("passed" if rc == 0 and not bad and tests else "failed")
        return dict(result, status=status, rc=rc, wall_s=wall, counts=counts, tests=tests)
    records_path = work / f"{part}.jsonl"
    records_path.unlink(missing_ok=True)
    deadline = time.time() + limit_s - 1
    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--worker", part, "--records", str(records_path),
           "--deadline", str(deadline)] + ["--dry-run"] * args.dry_run + (["--batch", str(args.batch)] if args.batch else [])
    rc, wall = run_limited(cmd, log_path, limit_s, env)
    rows = [json.loads(line) for line in records_path.read_text().splitlines()] if records_path.exists() else []
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    status = "timeout" if rc == "timeout" else ("passed" if rc == 0 and rows and not bad else "failed")
    if rc not in (0, "timeout"):
        result["reason"] = _last_line(log_path.read_text(errors="replace"))
    return dict(result, status=status, rc=rc, wall_s=wall, rows=rows)


def device_facts(dry_run: bool) -> dict:
    import torch

    facts = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                 cuda_available=torch.cuda.is_available(), dry_run=dry_run, host=platform.node())
    for name, dists in (("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy")), ("spikingjelly", ("spikingjelly",)),
                        ("triton", ("triton",)), ("timm", ("timm",))):
        facts[name] = next((v for v in map(_version, dists) if v), None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(name=props.name, gpus=torch.cuda.device_count(), memory_gb=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
        try:
            from spikingjelly.activation_based import functional

            facts["spikingjelly_lif_cuda"] = functional.neuron_implementation("lif", torch.device("cuda"))["implementation"]
        except Exception as err:  # noqa: BLE001
            facts["spikingjelly_lif_cuda"] = f"unavailable ({type(err).__name__})"
        from spikeformers.kernels.cupy_lif import available

        facts["cupy_kernels"] = available()[0] or available()[1]
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                    if line.startswith("model name")), platform.processor() or platform.machine())
        facts.update(name=f"CPU ({cpu}, {os.cpu_count()} cores)" + (", dry run" if dry_run else ""), gpus=0)
    return facts


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def part_limits(parts: list[str], budget: float, spent: float) -> float:
    """The next part's limit: what is left of the budget, shared in proportion among the parts still to run."""
    left = budget - spent
    return max(left * PARTS[parts[0]] / sum(PARTS[p] for p in parts), 5.0)


def run_all(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    if args.dry_run:
        # CPU only, even on a GPU machine; eager LIF loops (Inductor's CPU build of them takes
        # minutes on a small CI machine); test_cuda.py runs its device-independent tests on the CPU;
        # one thread: on a shared machine, OpenMP threads waiting on each other make tiny steps 100x slower.
        env.update(CUDA_VISIBLE_DEVICES="", SPIKEFORMERS_LIF_COMPILE="0", SPIKEFORMERS_GPU_CHECK_DEVICE="cpu",
                   OMP_NUM_THREADS="1")
    previous = {}
    earlier = Path(args.merge) if args.merge else out / "gpu_check.json"
    if args.parts and earlier.exists():  # a rerun of some parts keeps the others' results
        previous = json.loads(earlier.read_text()).get("parts", {})
    todo = args.parts or list(PARTS)
    started = time.time()
    report = dict(device=device_facts(args.dry_run), package=ensure_package(), budget_s=args.budget_s,
                  started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), parts=dict(previous))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for i, part in enumerate(todo):
            limit = part_limits(todo[i:], args.budget_s, time.time() - started)
            print(f"[gpu_check] {part}: limit {limit:.0f} s", file=sys.stderr, flush=True)
            result = run_part(part, args, limit, env, Path(work))
            print(f"[gpu_check] {part}: {result['status']} in {result['wall_s']} s", file=sys.stderr, flush=True)
            report["parts"][part] = result
            report["wall_s"] = round(time.time() - started, 1)
            write_outputs(out, report)  # after every part: a run cut short keeps what it has
    report["parts"] = {p: report["parts"][p] for p in PARTS if p in report["parts"]}
    write_outputs(out, report)
    return report


def write_outputs(out: Path, report: dict) -> None:
    for name, text in (("gpu_check.json", json.dumps(report, indent=1) + "\n"), ("gpu_check.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


# --- the report ----------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join("—" if v is None else str(v) for v in row) + " |" for row in rows]


def _value(row: dict, key: str):
    return row.get(key) if row["status"] == "ok" else row["status"] + (f": {row['reason']}" if row.get("reason") else "")


def markdown(report: dict) -> str:
    dev = report["device"]
    what = dev["name"] + (f", {dev['memory_gb']} GiB" if dev.get("memory_gb") else "")
    lines = [f"# GPU check: {what}", "",
             f"torch {dev['torch']} (CUDA {dev['cuda']}), CuPy {dev['cupy']}, SpikingJelly {dev['spikingjelly']}"
             + (f" (LIF on CUDA: {dev['spikingjelly_lif_cuda']})" if dev.get("spikingjelly_lif_cuda") else "")
             + f", Triton {dev['triton']}, timm {dev['timm']}; budget {report['budget_s']} s, took {report.get('wall_s')} s.", "",
             "| part | status | seconds (limit) |", "|---|---|---|"]
    parts = report["parts"]
    lines += [f"| {p} | {parts[p]['status']} | {parts[p]['wall_s']} ({parts[p]['limit_s']}) |" for p in PARTS if p in parts]
    if "tests" in parts:
        t = parts["tests"]
        lines += ["", "## CUDA tests", "",
                  f"{t['counts']['passed']} passed, {t['counts']['failed']} failed, {t['counts']['error']} errors, "
                  f"{t['counts']['skipped']} skipped."]
        bad = [x for x in t["tests"] if x["outcome"] in ("failed", "error")]
        if bad:
            lines += [""] + _table(["test", "outcome", "message"], [[x["id"], x["outcome"], x.get("message", "")] for x in bad])
    for part, title in (("lif", "LIF forward + backward"), ("sdsa", "SDSA forward + backward")):
        if part not in parts:
            continue
        rows = parts[part]["rows"]
        copy = next((r["gb_per_s"] for r in rows if r["section"] == "copy"), None)
        ops = [r for r in rows if r["section"] == part]
        shape = "×".join(map(str, ops[0]["shape"][1:])) if ops else ""
        lines += ["", f"## {title}", "", f"[T, {shape}], device copy bandwidth {copy} GB/s (bytes read + written).", ""]
        lines += _table(["backend", "T", "dtype", "ms", "GB/s", "of copy", "first call s"],
                        [[r["backend"], r["T"], r["dtype"], _value(r, "ms"), r.get("gb_per_s"), r.get("of_copy"),
                          r.get("first_call_s")] for r in ops])
    if "train" in parts:
        rows = [r for r in parts["train"]["rows"] if r["section"] == "train"]
        lines += ["", "## Train step (forward, loss, backward, AdamW), bf16 autocast, T = 4", ""]
        lines += _table(["model", "backend", "memory", "batch", "img", "ms / step", "images/s", "peak MB", "first call s"],
                        [[r["model"], r["backend"], r["memory"], r["batch"], r.get("img_size"), _value(r, "ms"),
                          r.get("images_per_s"), r.get("peak_mb"), r.get("first_call_s")] for r in rows])
        methods = {r["mem_method"] for r in rows if r.get("mem_method")}
        lines += ["", "Peak MB: " + ("torch.cuda.max_memory_allocated() over one step (weights, gradients and "
                                     "optimizer state included)" if methods == {"cuda_max_memory_allocated"}
                                     else "the process's peak resident memory (CPU), libraries included")
                  + "; images/s = batch / median step time; the first call includes compiles."]
    if "ddp" in parts:
        rows = [r for r in parts["ddp"]["rows"] if r["section"] == "ddp"]
        lines += ["", "## Trainer under torchrun, and DDP", ""]
        lines += _table(["step", "status", "detail"],
                        [[r["step"], r["status"], r.get("reason") or ", ".join(
                            f"{k} {r[k]}" for k in ("nproc", "epochs_in_metrics", "backend", "world", "losses", "wall_s") if k in r)]
                         for r in rows])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="folder for gpu_check.json, gpu_check.md and the logs")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes (CI)")
    parser.add_argument("--budget-s", type=float, default=480, help="total time for all parts (default: %(default)s)")
    parser.add_argument("--parts", help=f"comma list of parts to (re)run, from {', '.join(PARTS)} (default: all)")
    parser.add_argument("--merge", metavar="JSON", help="with --parts: keep the other parts' results from this "
                        "gpu_check.json (default: the one already in --out)")
    parser.add_argument("--batch", type=int, help="train part: batch size for every model (default: the official batch per GPU)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--records", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parts is not None:
        args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = [p for p in args.parts if p not in PARTS]
        if unknown or not args.parts:
            parser.error(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
        args.parts = [p for p in PARTS if p in args.parts]
    if args.budget_s < 30:
        parser.error(f"--budget-s must be at least 30, got {args.budget_s:g}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if not args.out and not args.worker:
        parser.error("--out DIR is required")
    if args.merge and not (args.parts and Path(args.merge).is_file()):
        parser.error(f"--merge {args.merge}: " + ("needs --parts" if not args.parts else "no such file"))
    if args.dry_run:  # CPU only, even on a GPU machine (set before anything imports torch)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.worker:
        return run_worker(args)
    ensure_package()
    report = run_all(args)
    print(markdown(report))
    return 0 if all(p["status"] == "passed" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
