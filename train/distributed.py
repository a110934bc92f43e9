"""Processes: the DDP process group, rank-sharded epoch samples, preemption and interrupt
signals, and what the ranks must agree on (loss sums, BatchNorm statistics)."""

from __future__ import annotations

import math
import os
import signal
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from spikeformers.train.data import sample_seed

__all__ = ["Dist", "EpochSampler", "PreemptionFlag", "StopRequested", "until_stopped", "mean_across", "gather_floats",
           "broadcast_buffers", "check_replicas_in_sync", "available_cpus", "auto_threads", "set_threads"]


# --- CPU threads --------------------------------------------------------------------------------


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, SLURM's cgroup cpuset), capped
    by a cgroup CPU quota (docker --cpus, Kubernetes limits), which ``os.cpu_count()`` ignores."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cgroup_cpu_quota() -> float | None:
    """CPUs granted by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None: no quota."""
    readings = (("/sys/fs/cgroup/cpu.max",), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
    for files in readings:
        try:
            quota, period = " ".join(open(f).read() for f in files).split()[:2]
            return None if quota in ("max", "-1") else int(quota) / int(period)
        except (OSError, ValueError):
            continue
    return None


def auto_threads(cpus: int | None = None, processes: int | None = None) -> int:
    """``trainer.threads=null``: intra-op threads for one process, its share of the available CPUs
    but one (``processes``: training processes on this node, torchrun's LOCAL_WORLD_SIZE); the CPU
    left over serves the data loader, the system and other programs. Oversubscribing is what costs:
    a step's OpenMP threads wait for each other, so one thread that another program pre-empts stalls
    the whole step (on 2 shared CPUs a 2-thread epoch took several times as long as a 1-thread one).
    The choice depends on the machine only, not on its momentary load, so reruns are bit-identical."""
    cpus = available_cpus() if cpus is None else cpus
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if processes is None else processes
    return max(1, (cpus - 1) // max(processes, 1))


def set_threads(threads: int | None) -> int:
    """Apply ``trainer.threads`` (None: :func:`auto_threads`, unless ``OMP_NUM_THREADS`` is set,
    which then wins as it does for torch); returns the number of intra-op threads in use."""
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    count = auto_threads() if threads is None else int(threads)
    torch.set_num_threads(count)
    try:  # inter-op threads can be set once, before any inter-op work has started
        torch.set_num_interop_threads(count)
    except RuntimeError:
        pass
    return torch.get_num_threads()


class Dist:
    """Process-group facts. DDP iff the launcher set WORLD_SIZE > 1 (torchrun, SLURM/submitit)."""

    def __init__(self, device_cfg: str) -> None:
        if "SLURM_JOB_ID" in os.environ and "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export()  # sets RANK, WORLD_SIZE, ...
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_cfg == "auto":
            device_cfg = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{self.local_rank}" if device_cfg == "cuda" else device_cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            # CUDA: NCCL for GPU tensors plus gloo for the few CPU tensors (metrics) we reduce.
            dist.init_process_group("cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo")
        self.primary = self.rank == 0

    def any(self, *flags: bool) -> list[bool]:
        """Logical OR of per-rank flags across ranks (so every rank stops at the same step)."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class EpochSampler(Sampler):
    """Shuffled, rank-sharded indices for one epoch, seeded by (seed, epoch), starting at
    ``start`` (a resumed mid-epoch run skips the samples it already trained on)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int, start_batch: int = 0):
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
        order = torch.randperm(n, generator=g).tolist()
        per_rank = (n // world) // batch_size * batch_size  # equal, whole batches on every rank
        self.indices = order[rank * per_rank : (rank + 1) * per_rank][start_batch * batch_size :]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def mean_across(ctx: Dist, total: float, count: int) -> float:
    if ctx.world > 1:
        t = torch.tensor([total, float(count)], dtype=torch.float64)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


def gather_floats(ctx: Dist, values: list[float]) -> list[list[float]]:
    """Every rank's ``values``, in rank order (each rank gets the whole list)."""
    if ctx.world == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64)  # CPU: the gloo side of the process group
    every = [torch.empty_like(mine) for _ in range(ctx.world)]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


@torch.no_grad()
def broadcast_buffers(ctx: Dist, *modules: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics).

    DDP keeps parameters identical, but each rank's last forward updates its BatchNorm statistics
    with its own shard, so the replicas end an epoch with different buffers. Rank 0's are the
    ones to keep rather than an average: DDP itself makes rank 0's buffers authoritative (it
    broadcasts them at every training forward, ``broadcast_buffers=True``), and they are what the
    checkpoint holds, so an uninterrupted run and a resumed one evaluate the same model.
    """
    if ctx.world == 1:
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def check_replicas_in_sync(ctx: Dist, model: torch.nn.Module) -> None:
    """DDP invariant: every rank ends with the same parameters and buffers (elementwise max == min)."""
    for what, tensors in (("parameters", list(model.parameters())), ("buffers", list(model.buffers()))):
        if tensors and not _same_on_every_rank(ctx, tensors):
            raise RuntimeError(f"DDP replicas diverged: {what} differ across {ctx.world} ranks")
    if ctx.primary:
        print(f"DDP: parameters identical on {ctx.world} ranks, buffers (BatchNorm statistics) too", flush=True)


def _same_on_every_rank(ctx: Dist, tensors: list[torch.Tensor]) -> bool:
    flat = torch.cat([t.detach().flatten().double() for t in tensors])
    if ctx.device.type != "cuda":
        flat = flat.cpu()
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return torch.equal(high, low)


class PreemptionFlag:
    """SIGTERM, SIGUSR1 and SIGUSR2 (schedulers' preemption notices; SIGUSR2 is submitit's
    default) and SIGINT (Ctrl-C) set a flag; the loop checkpoints at the next step boundary (or
    stops an evaluation at the next batch) and exits. A second Ctrl-C stops at once, without a
    checkpoint, as Python's default does."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal: signal.Signals | None = None  # the first one received
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT) rather than by a scheduler."""
        return self.signal == signal.SIGINT

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = self.signal or signal.Signals(signum)

    def pass_on(self) -> None:
        """After the checkpoint: hand a preemption signal to the handler it replaced, when that is
        a Python one. Under submitit that handler requeues the job (and exits); our exit status
        alone would tell it the job is done."""
        previous = self._previous.get(self.signal)
        if self.signal != signal.SIGINT and callable(previous) and previous is not signal.default_int_handler:
            previous(self.signal, None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopRequested(Exception):
    """A stop signal arrived while the model was being evaluated."""


def until_stopped(loader: Iterable, stop: PreemptionFlag, ctx: Dist, batches_on_every_rank: int) -> Iterator:
    """The loader's batches until a stop is requested (then :class:`StopRequested`). The ranks
    agree before each of the first ``batches_on_every_rank`` batches, the ones every rank has, so
    they stop together; a rank's one extra batch runs without asking."""
    for index, batch in enumerate(loader):
        if index < batches_on_every_rank and ctx.any(stop.requested)[0]:
            raise StopRequested
        yield batch
