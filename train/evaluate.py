"""Evaluation: top-1/top-5, loss and mean firing rate (``spikeformers-eval``).

``spikeformers-eval checkpoint=PATH`` rebuilds the model and data set from the configuration
stored in a training checkpoint; ``model.name=NAME model.pretrained=true`` evaluates registered
pretrained weights instead. Any ``data.*`` override applies, and ``--json FILE`` (or ``json=FILE``)
writes ``{"model", "checkpoint", "dataset", "top1", "top5", "loss", "firing_rate", "n_samples"}``.
"""

from __future__ import annotations

import json
import sys

import hydra
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler

from spikeformers.models.neurons import LIF
from spikeformers.train.checkpoint import atomic_write, load_checkpoint
from spikeformers.train.data import DataInfo, build_datasets

__all__ = ["evaluate", "ShardSampler", "to_model_input", "trained_configs", "main"]


class ShardSampler(Sampler):
    """Rank r takes indices r, r + world, ...: disjoint, unpadded, so sums add up exactly."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def to_model_input(images: torch.Tensor, info: DataInfo, device: torch.device) -> torch.Tensor:
    """Batches of event-frame sequences come as [B, T, C, H, W]; models take time first."""
    images = images.to(device, non_blocking=True).float()
    return images.transpose(0, 1).contiguous() if info.sequence else images


class FiringRate:
    """Firing rates of every LIF (and converted IF) output (spikes / neuron-steps) via forward hooks: overall, per
    block (``patch_embed``, ``block.i``, ``head_lif``), and the layers that were silent (rate 0)
    or saturated (rate 1) over a whole batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.spikes, self.count = 0.0, 0
        self.by_block: dict[str, list[float]] = {}
        self.dead: set[str] = set()
        self.saturated: set[str] = set()
        from spikeformers.models.qcfs import IFNeuron  # converted QCFS networks: spikes of amplitude θ

        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                      if isinstance(m, (LIF, IFNeuron))]

    def _hook(self, name: str):
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] == "block" else parts[0]

        def hook(module, inputs, output) -> None:
            spikes, count = float(output.detach().count_nonzero()), output.numel()
            self.spikes += spikes
            self.count += count
            totals = self.by_block.setdefault(block, [0.0, 0])
            totals[0] += spikes
            totals[1] += count
            if spikes == 0:
                self.dead.add(name)
            elif spikes == count:
                self.saturated.add(name)

        return hook

    def block_rates(self) -> dict[str, float]:
        return {block: s / max(n, 1) for block, (s, n) in self.by_block.items()}

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, info: DataInfo, device: torch.device, world: int = 1) -> dict:
    """Plain cross-entropy, top-1/top-5 (%) and firing rate over the whole loader (all ranks)."""
    was_training, per_step = model.training, getattr(model, "per_step_logits", False)
    model.eval()
    model.per_step_logits = False
    rate = FiringRate(model)
    sums = torch.zeros(5, dtype=torch.float64)  # loss, top1, top5, n, tokens (adaptive-token models)
    baseline = None
    try:
        for images, target in loader:
            images, target = to_model_input(images, info, device), target.to(device)
            logits = model(images).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            correct = top.eq(target[:, None])
            token_stats = getattr(model, "token_stats", None)  # AT-SNN: Σ_(l,t) active tokens per image
            tokens = float(token_stats["tokens"].sum()) if token_stats else 0.0
            baseline = token_stats["baseline"] if token_stats else None
            sums += torch.tensor([F.cross_entropy(logits, target, reduction="sum").item(),
                                  correct[:, :1].sum().item(), correct.sum().item(), len(target), tokens], dtype=torch.float64)
    finally:
        rate.remove()
        model.train(was_training)
        model.per_step_logits = per_step
    fr = torch.tensor([rate.spikes, float(rate.count)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(fr)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
            "firing_rate": fr[0].item() / max(fr[1].item(), 1.0), "n_samples": int(sums[3].item()),
            "tokens_per_image": sums[4].item() / n if baseline else None, "tokens_baseline": baseline,
            "block_rates": rate.block_rates(), "dead_layers": sorted(rate.dead), "saturated_layers": sorted(rate.saturated)}


def trained_configs(state: dict) -> tuple[DictConfig, DictConfig]:
    """(model, data) configs stored in a ``spikeformers-train`` checkpoint. The weights come from
    the checkpoint, so the run's own initialisation (``pretrained``/``checkpoint``) is cleared."""
    trained = OmegaConf.create(state["config"])
    trained.model.pretrained, trained.model.checkpoint = False, None
    return trained.model, trained.data


def run_eval(cfg: DictConfig) -> dict:
    """Evaluate the configured checkpoint or pretrained model; print a table; write JSON."""
    from spikeformers.train.main import build_model

    data_cfg, model_cfg, state = cfg.data, cfg.model, None
    if cfg.checkpoint:
        state = load_checkpoint(cfg.checkpoint)
        model_cfg, trained_data = trained_configs(state)
        # data comes from the checkpoint unless the user chose another data set on the command line
        if not cfg.data_from_cli:
            data_cfg = trained_data
    train_set, test_set, info = build_datasets(data_cfg, augment=False)  # train split: ECMT calibration only
    if state is not None and state["num_classes"] != info.num_classes:
        raise ValueError(f"checkpoint {cfg.checkpoint} has {state['num_classes']} classes but data={info.name} has {info.num_classes}")
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(model_cfg, info).to(device)
    if state is not None:
        weights = state["ema"] if (cfg.use_ema and state.get("ema")) else state["model"]
        model.load_state_dict(weights)
    if cfg.get("convert"):  # evaluate the ANN converted to an SNN (docs/conversion.md)
        from spikeformers.train.convert import calibration_batches, convert

        calibration = calibration_batches(train_set, cfg.batch_size, 4) if cfg.convert == "ecmt" else None
        model = convert(cfg.convert, model.cpu(), calibration, T=cfg.convert_T).to(device)
    loader = DataLoader(test_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    stats = evaluate(model, loader, info, device)
    result = {"model": model_cfg.name + (f" ({cfg.convert} SNN, T={cfg.convert_T})" if cfg.get("convert") else ""), "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None, "dataset": info.name,
              "top1": stats["top1"], "top5": stats["top5"], "loss": stats["loss"],
              "firing_rate": stats["firing_rate"], "n_samples": stats["n_samples"]}
    if stats["tokens_per_image"] is not None:
        result |= {"tokens_per_image": stats["tokens_per_image"], "tokens_baseline": stats["tokens_baseline"]}
    width = max(len(k) for k in result)
    print("\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in result.items()))
    if cfg.json:
        atomic_write(cfg.json, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    return result


@hydra.main(config_path="pkg://spikeformers.configs", config_name="eval", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_eval(cfg)


def main() -> None:
    """Console script ``spikeformers-eval``: also accepts ``--json FILE`` and ``--checkpoint FILE``."""
    args, out = sys.argv[1:], []
    while args:
        arg = args.pop(0)
        if arg in ("--json", "--checkpoint") and args:
            out.append(f"{arg[2:]}={args.pop(0)}")
        elif arg.startswith(("--json=", "--checkpoint=")):
            out.append(arg[2:])
        else:
            out.append(arg)
    # Was a data set chosen on the command line? Then it overrides the checkpoint's.
    data_from_cli = any(a.startswith(("data=", "data.")) for a in out)
    sys.argv = [sys.argv[0], *out] + (["data_from_cli=true"] if data_from_cli else [])
    hydra_main()


if __name__ == "__main__":
    main()
