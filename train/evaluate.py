"""Evaluation: top-1/top-5, loss and mean firing rate (``spikeformers-eval``).

``spikeformers-eval checkpoint=PATH`` (or ``--checkpoint PATH``) rebuilds the model and data set
from the configuration stored in a training checkpoint (``data=NAME`` replaces its data set,
``data.KEY=V`` changes one field of it; ``model`` overrides are refused); a ``.safetensors``
weights file is evaluated as the model its metadata names (or ``model.name``);
``model.name=NAME model.pretrained=true`` evaluates registered pretrained weights. With none of
these there is nothing to evaluate, and the tool says so. The other arguments are overrides of
``configs/eval.yaml``.
``--json FILE`` (or ``json=FILE``) writes
``{"model", "checkpoint", "dataset", "top1", "top5", "loss", "firing_rate", "n_samples"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler

from spikeformers.models.errors import UserError
from spikeformers.models.factory import build_model, checkpoint_model_name, load_model_weights, read_checkpoint, training_checkpoint
from spikeformers.models.neurons import LIF
from spikeformers.models.serialization import atomic_write
from spikeformers.train.cli import EVAL_FIELDS, ArgumentParser, check_fields, compose_config, progress_bar, user_errors
from spikeformers.train.data import DataInfo, build_datasets
from spikeformers.train.distributed import set_threads

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


def spike_total(neuron: torch.nn.Module, output: torch.Tensor) -> float:
    """Spikes in one neuron output, in units of neuron-steps: a binary neuron fires 0 or 1 per step.
    An integer spike-count neuron (``neuron_model = "count"``, E-SpikeFormer) emits S ∈ {0..D} per
    step as S/n (n = D, or 1 for a raw-count head), which is S spikes over D virtual steps: it counts
    S/D, so its rate is the paper's spikes per neuron per virtual step and stays within [0, 1]."""
    if getattr(neuron, "neuron_model", None) == "count":
        per_unit = neuron.max_spike_count if neuron.normalize else 1
        return float(output.detach().sum()) * per_unit / neuron.max_spike_count
    return float(output.detach().count_nonzero())


class FiringRate:
    """Firing rates of every neuron output (spikes / neuron-steps, see :func:`spike_total`) via forward hooks: overall, per
    block (``patch_embed``, ``block.i``, ``head_lif``), and the layers that were silent (rate 0)
    or saturated (rate 1) over a whole batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.spikes, self.count = 0.0, 0
        self.by_block: dict[str, list[float]] = {}
        self.dead: set[str] = set()
        self.saturated: set[str] = set()
        from spikeformers.models.qcfs import IFNeuron  # converted QCFS networks: spikes of amplitude θ

        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                      if isinstance(m, (LIF, IFNeuron)) or getattr(m, "neuron_model", None) == "count"]

    def _hook(self, name: str):
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] == "block" else parts[0]

        def hook(module, inputs, output) -> None:
            spikes, count = spike_total(module, output), output.numel()
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
def evaluate(model: torch.nn.Module, loader: DataLoader, info: DataInfo, device: torch.device, world: int = 1,
             progress: str | None = None) -> dict:
    """Plain cross-entropy, top-1/top-5 (%) and firing rate over the whole loader (all ranks).
    ``progress``: the label of a progress bar over the batches (on a terminal only)."""
    was_training, per_step = model.training, getattr(model, "per_step_logits", False)
    model.eval()
    model.per_step_logits = False
    rate = FiringRate(model)
    sums = torch.zeros(5, dtype=torch.float64)  # loss, top1, top5, n, tokens (adaptive-token models)
    baseline = None
    try:
        batches = progress_bar(loader, total=len(loader), desc=progress) if progress else loader
        for images, target in batches:
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


def model_label(state: dict, path: str | Path | None = None) -> str:
    """The model's name as the user chose it: the ``model=`` config of the training run when that
    config names this model (``vit_digits (vit_tiny_patch16_224)``, not the timm name alone), else
    the model name. The choice comes from the checkpoint, or for older checkpoints from the run
    folder's ``.hydra/hydra.yaml``."""
    name = checkpoint_model_name(state) or state["config"]["model"]["name"]
    choice = (state.get("choices") or _run_folder_choices(path)).get("model")
    if not choice or choice == name:
        return name
    try:
        named = OmegaConf.load(resources.files("spikeformers.configs") / "model" / f"{choice}.yaml").get("name")
    except (OSError, ValueError):
        return name
    return f"{choice} ({name})" if named == name else name


def _run_folder_choices(path: str | Path | None) -> dict:
    """``hydra.runtime.choices`` of the run folder that holds ``path`` (RUN/checkpoints/x.pt)."""
    if path is None:
        return {}
    hydra_yaml = Path(path).resolve().parent.parent / ".hydra" / "hydra.yaml"
    try:
        return dict(OmegaConf.load(hydra_yaml).hydra.runtime.choices)
    except Exception:  # no run folder around the file, or not Hydra's: the model name is shown
        return {}


def run_eval(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Evaluate the configured checkpoint, weights file or pretrained model; print a table; write
    JSON. ``overrides`` are the command line's: ``data=NAME`` replaces a checkpoint's data set,
    ``data.KEY=V`` changes only that field of it, and ``model`` overrides, which a checkpoint
    cannot honour (its model is fixed), are refused."""
    model_cfg, data_cfg, state = _what_to_evaluate(cfg, list(overrides))
    train_set, test_set, info = build_datasets(data_cfg, augment=False)  # train split: ECMT calibration only
    if state is not None and state.get("num_classes", info.num_classes) != info.num_classes:
        raise UserError(f"checkpoint {cfg.checkpoint} has {state['num_classes']} classes but data={info.name} has {info.num_classes}",
                        hint="evaluate on the data set the checkpoint was trained on (drop data=...)")
    set_threads(cfg.get("threads"))
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(model_cfg, info).to(device)
    if state is not None:
        weights = state["ema"] if (cfg.use_ema and state.get("ema")) else state["model"]
        load_model_weights(model, weights, cfg.checkpoint, model_cfg.name)
    if cfg.get("convert"):  # evaluate the ANN converted to an SNN (docs/conversion.md)
        from spikeformers.train.convert import calibration_batches, convert

        calibration = calibration_batches(train_set, cfg.batch_size, 4) if cfg.convert == "ecmt" else None
        model = convert(cfg.convert, model.cpu(), calibration, T=cfg.convert_T).to(device)
    loader = DataLoader(test_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    stats = evaluate(model, loader, info, device, progress=f"eval {info.name}" if cfg.get("progress", True) else None)
    result = _result(cfg, model_cfg.name, info.name, stats)
    width = max(len(k) for k in result)
    print("\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in result.items()))
    if cfg.json:
        atomic_write(cfg.json, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    return result


def _what_to_evaluate(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, DictConfig, dict | None]:
    """(model config, data config, training checkpoint or None) for a training checkpoint, a
    weights file (``.safetensors`` as ``spikeformers-hub download`` prints), or pretrained weights."""
    if "convert_T" in _keys(overrides, "convert_T") and not cfg.get("convert"):
        raise UserError("convert_T cannot apply without convert=qcfs|ecmt", hint="add convert=qcfs (or ecmt), or drop convert_T")
    weights_file = bool(cfg.checkpoint) and _is_weights_file(cfg.checkpoint)
    if _keys(overrides, "use_ema") and not (cfg.checkpoint and not weights_file):
        raise UserError("use_ema applies only to a spikeformers-train checkpoint (--checkpoint RUN/checkpoints/best.pt)",
                        hint="drop use_ema=...")
    if weights_file:
        return _weights_file_configs(cfg, overrides) + (None,)
    if cfg.checkpoint:
        state = training_checkpoint(cfg.checkpoint)
        model_keys = _keys(overrides, "model")
        if model_keys:
            raise UserError(f"{model_keys[0]} cannot apply to checkpoint {cfg.checkpoint}: its model "
                            f"({checkpoint_model_name(state)}) and settings come from the checkpoint",
                            hint="drop the model override, or evaluate registered weights without a checkpoint")
        model_cfg, trained_data = trained_configs(state)
        return model_cfg, _data_on_top_of(trained_data, cfg, overrides), state
    if not cfg.model.pretrained and not cfg.model.get("checkpoint"):
        raise UserError("nothing to evaluate: no checkpoint and no pretrained weights (a random network's accuracy means nothing)",
                        hint="give --checkpoint RUN/checkpoints/best.pt, or model.name=NAME.TAG model.pretrained=true "
                             "(spikeformers-hub list shows the tags)")
    return cfg.model, cfg.data, None


def _is_weights_file(path: str) -> bool:
    """A safetensors file, or a plain state dict: weights without a training run's config."""
    if str(path).endswith(".safetensors"):
        return True
    state = read_checkpoint(path)
    return "config" not in state and all(isinstance(v, torch.Tensor) for v in state.values())


def _weights_file_configs(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, DictConfig]:
    """The model is ``model.name`` (default: the one the file's metadata names), initialised from
    the file; the data set is ``data=`` (default: the one the metadata names, else digits)."""
    meta = _safetensors_metadata(cfg.checkpoint)
    model_cfg, data_cfg = cfg.model.copy(), cfg.data
    named = meta.get("model")
    if named and _keys(overrides, "model.name", "model") and named != model_cfg.name:
        raise UserError(f"{cfg.checkpoint} holds a {named} model, not the {model_cfg.name} asked for",
                        hint=f"drop model.name=... or set model.name={named}")
    model_cfg.name = named or model_cfg.name
    model_cfg.pretrained, model_cfg.checkpoint = False, str(cfg.checkpoint)
    if meta.get("T") and not _keys(overrides, "model.T"):
        model_cfg.T = int(meta["T"])
    if meta.get("dataset") and not _keys(overrides, "data") and meta["dataset"] != data_cfg.name:
        data_cfg = compose_config("eval", [f"data={meta['dataset']}"]).data
    return model_cfg, data_cfg


def _safetensors_metadata(path: str) -> dict:
    if not str(path).endswith(".safetensors"):
        return {}
    read_checkpoint(path)  # one line for an empty, truncated or foreign file
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _data_on_top_of(trained: DictConfig, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The checkpoint's data config; ``data=NAME`` replaces it, each ``data.KEY=V`` changes one field."""
    if "data" in _keys(overrides, "data"):
        return cfg.data
    data = trained.copy()
    for key in _keys(overrides, "data"):
        OmegaConf.update(data, key.removeprefix("data."), OmegaConf.select(cfg, key), force_add=True)
    return data


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _keys(overrides: list[str], *groups: str) -> list[str]:
    """The keys of ``overrides`` that set one of ``groups`` or a field inside it."""
    keys = [_key(o) for o in overrides if "=" in o]
    return [k for k in keys if any(k == g or k.startswith(g + ".") for g in groups)]


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
    parser = ArgumentParser(prog="spikeformers-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of configs/eval.yaml, e.g. checkpoint=best.pt data=cifar10 data.root=/data")
    parser.add_argument("--checkpoint", help="same as checkpoint=FILE: a training checkpoint or a .safetensors weights file")
    parser.add_argument("--json", help="same as json=FILE")
    args = parser.parse_intermixed_args(argv)
    with user_errors(parser.prog, args.debug):
        cfg = compose_config("eval", args.overrides)
        # file names as given, not parsed by the override grammar
        cfg.checkpoint, cfg.json = args.checkpoint or cfg.checkpoint, args.json or cfg.json
        check_fields(cfg, EVAL_FIELDS)
        run_eval(cfg, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
