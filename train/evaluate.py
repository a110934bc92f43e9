"""Evaluation: top-1/top-5, loss and mean firing rate (``spikeformers-eval``).

``spikeformers-eval checkpoint=PATH`` (or ``--checkpoint PATH``) rebuilds the model and data set
from the configuration stored in a training checkpoint; ``model.name=NAME model.pretrained=true``
evaluates registered pretrained weights instead. The other arguments are overrides of
``configs/eval.yaml``; a ``data=``/``data.*`` override replaces the checkpoint's data set.
``--json FILE`` (or ``json=FILE``) writes
``{"model", "checkpoint", "dataset", "top1", "top5", "loss", "firing_rate", "n_samples"}``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler

from spikeformers.models.factory import build_model
from spikeformers.models.neurons import LIF
from spikeformers.models.serialization import atomic_write, load_checkpoint
from spikeformers.train.cli import USER_ERRORS, compose_config, exit_with_error
from spikeformers.train.data import DataInfo, build_datasets

__all__ = ["evaluate", "ShardSampler", "to_model_input", "trained_configs", "run_eval", "main"]


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


def run_eval(cfg: DictConfig, data_from_cli: bool = False) -> dict:
    """Evaluate the configured checkpoint or pretrained model; print a table; write JSON.
    ``data_from_cli``: ``cfg.data`` was chosen on the command line and replaces the checkpoint's."""
    data_cfg, model_cfg, state = cfg.data, cfg.model, None
    if cfg.checkpoint:
        state = load_checkpoint(cfg.checkpoint)
        model_cfg, trained_data = trained_configs(state)
        data_cfg = cfg.data if data_from_cli else trained_data
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
    result = _result(cfg, model_cfg.name, info.name, evaluate(model, loader, info, device))
    width = max(len(k) for k in result)
    print("\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in result.items()))
    if cfg.json:
        atomic_write(cfg.json, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    return result


def _result(cfg: DictConfig, model_name: str, dataset: str, stats: dict) -> dict:
    """The printed and JSON fields (token counts only for adaptive-token models)."""
    converted = f" ({cfg.convert} SNN, T={cfg.convert_T})" if cfg.get("convert") else ""
    result = {"model": model_name + converted, "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None,
              "dataset": dataset, "top1": stats["top1"], "top5": stats["top5"], "loss": stats["loss"],
              "firing_rate": stats["firing_rate"], "n_samples": stats["n_samples"]}
    if stats["tokens_per_image"] is not None:
        result |= {"tokens_per_image": stats["tokens_per_image"], "tokens_baseline": stats["tokens_baseline"]}
    return result


def main(argv: list[str] | None = None) -> int:
    """Console script ``spikeformers-eval``: Hydra-style overrides of ``configs/eval.yaml``, plus
    ``--checkpoint FILE`` and ``--json FILE`` for ``checkpoint=FILE`` and ``json=FILE``."""
    parser = argparse.ArgumentParser(prog="spikeformers-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of configs/eval.yaml, e.g. checkpoint=best.pt data=cifar10 data.root=/data")
    parser.add_argument("--checkpoint", help="same as checkpoint=FILE")
    parser.add_argument("--json", help="same as json=FILE")
    args = parser.parse_intermixed_args(argv)
    # A data set chosen on the command line replaces the checkpoint's.
    data_from_cli = any(o.startswith(("data=", "data.")) for o in args.overrides)
    try:
        cfg = compose_config("eval", args.overrides)
        # file names as given, not parsed by the override grammar
        cfg.checkpoint, cfg.json = args.checkpoint or cfg.checkpoint, args.json or cfg.json
        run_eval(cfg, data_from_cli=data_from_cli)
    except (*USER_ERRORS, ConfigCompositionException) as err:
        exit_with_error(parser.prog, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
