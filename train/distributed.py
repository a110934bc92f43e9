"""Processes: the DDP process group, rank-sharded epoch samples, and preemption signals."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from spikeformers.train.data import sample_seed

__all__ = ["Dist", "EpochSampler", "PreemptionFlag", "mean_across", "check_replicas_in_sync"]


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


def check_replicas_in_sync(ctx: Dist, model: torch.nn.Module) -> None:
    """DDP invariant: every rank ends with the same parameters (elementwise max == min)."""
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    if ctx.device.type != "cuda":
        flat = flat.cpu()
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise RuntimeError(f"DDP replicas diverged: parameters differ across {ctx.world} ranks")
    if ctx.primary:
        print(f"DDP: parameters identical on {ctx.world} ranks", flush=True)


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
