"""ANN→SNN conversion, evaluated over a list of time steps (``spikeformers-convert``).

``spikeformers-convert qcfs --checkpoint RUN/checkpoints/best.pt --T 1,2,4,8,16,32`` converts a
QCFS ANN trained with ``spikeformers-train`` (docs/conversion.md) to IF neurons;
``spikeformers-convert ecmt --checkpoint ... | --model vit_small_patch16_224 --pretrained`` converts
a timm ViT with expectation compensation and multi-threshold neurons (docs/ecmt.md). Both print a table of
top-1 and relative output error against the ANN for every T (every column header names its unit),
plot accuracy against T, and with ``--json FILE`` write ``{"method", "model", "label", "ann_top1",
"snn": [{"T", "top1", "rel_error", "energy_mJ" (QCFS) or "energy_ratio" (ECMT, with --energy)}]}``.
``label`` is the name the user chose (the training run's ``model=`` config, e.g. ``vit_digits``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from spikeformers.models.errors import UserError
from spikeformers.models.factory import build_model, check_model_name, load_model_weights, training_checkpoint
from spikeformers.models.serialization import atomic_write
from spikeformers.train.cli import ArgumentParser, compose_config, positive_int, progress_bar, user_errors

__all__ = ["convert", "calibration_batches", "evaluate_conversion", "main"]

METHODS = ("qcfs", "ecmt")


def convert(method: str, ann: nn.Module, calibration=None, T: int = 4, **options) -> nn.Module:
    """The SNN of ``ann`` for ``method``; ECMT needs ``calibration`` batches (inputs only)."""
    if method == "qcfs":
        from spikeformers.models.qcfs import to_snn

        return to_snn(ann, T=T)
    if method == "ecmt":
        from spikeformers.models import ecmt

        if calibration is None:
            raise ValueError("ECMT conversion needs calibration batches")
        percentile = options.pop("percentile", 0.99)
        thresholds = ecmt.calibrate(ann, calibration, percentile=percentile)
        snn = ecmt.convert(ann, thresholds, **options)
        snn.T = T
        return snn
    raise ValueError(f"unknown conversion method {method!r}; expected one of {', '.join(METHODS)}")


def calibration_batches(train_set, batch_size: int, count: int) -> list[torch.Tensor]:
    """ECMT calibration inputs: the first ``count`` batches of the training set in a fixed
    shuffled order (seed 0), images only."""
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    return [x for _, (x, _) in zip(range(count), loader)]


@torch.no_grad()
def evaluate_conversion(ann: nn.Module, snn: nn.Module, loader, steps: list[int], dtype=torch.float32,
                        device=torch.device("cpu"), max_samples: int | None = None, progress: str | None = None) -> dict:
    """ANN top-1, and for each T in ``steps`` the SNN's top-1 and relative L2 output error
    ‖SNN_T − ANN‖ / ‖ANN‖ over the whole set. Both models are moved to ``device``/``dtype`` in place. One SNN run to max(steps) gives every T, because
    ``forward_steps`` returns the running mean after each step. ``progress``: the label of a
    progress bar over the batches (on a terminal only)."""
    ann.eval().to(device, dtype)
    snn.eval().to(device, dtype)
    t_max = max(steps)
    correct = torch.zeros(t_max, dtype=torch.float64)
    sq_err = torch.zeros(t_max, dtype=torch.float64)
    ann_correct, ann_sq, n = 0, 0.0, 0
    samples = len(loader.dataset) if max_samples is None else min(max_samples, len(loader.dataset))
    batches = progress_bar(loader, total=math.ceil(samples / loader.batch_size), desc=progress) if progress else loader
    for images, target in batches:
        if max_samples is not None and n >= max_samples:
            break
        if max_samples is not None:
            images, target = images[: max_samples - n], target[: max_samples - n]
        x, target = images.to(device, dtype), target.to(device)
        reference = ann(x).double()
        outputs = snn.forward_steps(x, t_max).double()  # [T, B, K]
        ann_correct += int((reference.argmax(1) == target).sum())
        ann_sq += float(reference.pow(2).sum())
        correct += (outputs.argmax(2) == target).sum(1).cpu().double()
        sq_err += (outputs - reference).pow(2).flatten(1).sum(1).cpu()
        n += len(target)
    if n == 0:
        raise ValueError("the evaluation set is empty")
    rows = [{"T": t, "top1": 100 * correct[t - 1].item() / n, "rel_error": math.sqrt(sq_err[t - 1].item() / max(ann_sq, 1e-300))}
            for t in steps]
    return {"ann_top1": 100 * ann_correct / n, "snn": rows, "n_samples": n}


def plot_accuracy(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts = [r["T"] for r in result["snn"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(Ts, [r["top1"] for r in result["snn"]], "o-", label="SNN")
    ax.axhline(result["ann_top1"], color="gray", linestyle="--", label="ANN")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("time steps T")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{result['method'].upper()}: {result.get('label') or result['model']}")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return path


def _data_config(name: str | None, checkpoint_data):
    """The data config: the checkpoint's, or the named data set's defaults (``--data``)."""
    if name is None:
        if checkpoint_data is None:
            raise ValueError("give --data when converting a model that does not come from a spikeformers-train checkpoint")
        return checkpoint_data
    return compose_config("train", [f"data={name}"]).data


def _load_ann(args) -> tuple[nn.Module, str, str, object, object]:
    """(ANN, its model name, the name to show, training split without augmentation, test split).
    The data set is the checkpoint's training run's unless ``--data`` names another; a timm
    ``--model`` needs ``--data``."""
    from omegaconf import OmegaConf

    from spikeformers.train.data import build_datasets
    from spikeformers.train.evaluate import model_label, trained_configs

    state = training_checkpoint(args.checkpoint) if args.checkpoint else None
    model_cfg, trained_data = trained_configs(state) if state is not None else (None, None)
    data_cfg = _data_config(args.data, trained_data) if args.data or state is None else trained_data
    data_cfg = OmegaConf.create(OmegaConf.to_container(data_cfg))
    if args.data_root:
        data_cfg.root = args.data_root
    calib_set, test_set, info = build_datasets(data_cfg, augment=False)
    if state is None:
        import timm

        check_model_name(args.model)
        ann = timm.create_model(args.model, pretrained=args.pretrained, **_model_args(args.model_args))
        return ann, args.model, args.model, calib_set, test_set
    ann = build_model(model_cfg, info)
    load_model_weights(ann, state["ema"] if (args.use_ema and state.get("ema")) else state["model"], args.checkpoint, model_cfg.name)
    return ann, model_cfg.name, model_label(state, args.checkpoint), calib_set, test_set


def _model_args(text: str | None) -> dict:
    """``--model-args``: a JSON object of constructor arguments."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"--model-args must be a JSON object, got {text!r}", hint="""e.g. --model-args '{"num_classes": 10}'""")
    return value


# The energy column of each method, with its unit in the name: QCFS reports the SNN's energy per
# sample (the energy tool's estimate), ECMT the ratio E_SNN / E_ANN of its paper.
ENERGY_FIELD = {"qcfs": "energy_mJ", "ecmt": "energy_ratio"}
# column key -> (header with its unit, number format)
COLUMNS = {"T": ("T (steps)", "{:d}"), "top1": ("top-1 (%)", "{:.2f}"), "rel_error": ("rel. error (ratio)", "{:.4f}"),
           "energy_mJ": ("energy (mJ/sample)", "{:.4f}"), "energy_ratio": ("E_SNN/E_ANN (ratio)", "{:.4f}")}


def _table(result: dict) -> str:
    """The printed result: a title line, then one row per T; every column header names its unit."""
    keys = [key for key in COLUMNS if key in result["snn"][0]]
    widths = [len(COLUMNS[key][0]) for key in keys]
    lines = [f"{result['method'].upper()} {result.get('label') or result['model']}: ANN top-1 {result['ann_top1']:.2f}% "
             f"({result['n_samples']} samples, {result['dtype']})",
             "  ".join(f"{COLUMNS[key][0]:>{w}}" for key, w in zip(keys, widths))]
    for row in result["snn"]:
        lines.append("  ".join(f"{COLUMNS[key][1].format(row[key]):>{w}}" for key, w in zip(keys, widths)))
    return "\n".join(lines)


def _energy(method: str, ann: nn.Module, snn: nn.Module, x: torch.Tensor, steps: list[int]) -> list[float]:
    """Energy per T: E_SNN/E_ANN as the ECMT paper counts it (SOPs against the ANN's operations), or
    the energy tool's SNN energy in mJ per sample (QCFS)."""
    if method == "ecmt":
        from spikeformers.models import ecmt

        ratios = ecmt.energy_ratio(snn, x, max(steps))
        return [ratios[t - 1] for t in steps]
    from spikeformers.train.energy import analyze

    energies = []
    for t in steps:
        snn.T = t
        energies.append(analyze(snn, [x]).total_energy_mJ)
    return energies


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="spikeformers-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=METHODS, help="qcfs (IF neurons for a QCFS ANN) or ecmt (a timm ViT)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoints/{best,last}.pt of a spikeformers-train run")
    source.add_argument("--model", help="a timm model name (ECMT: a ViT/DeiT)")
    parser.add_argument("--pretrained", action="store_true", help="with --model: load timm's pretrained weights")
    parser.add_argument("--model-args", default=None, help='JSON constructor arguments for --model, e.g. \'{"num_classes": 10}\'')
    parser.add_argument("--data", default=None, help="data set (digits, cifar10, ...): default the checkpoint's")
    parser.add_argument("--data-root", default=None, help="folder of the data set (--data's, or the checkpoint's)")
    parser.add_argument("--T", default="1,2,4,8,16,32", help="comma-separated time steps, positive integers")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="precision of ANN and SNN")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="samples per forward pass")
    parser.add_argument("--max-samples", type=positive_int, default=None, help="evaluate on the first N test samples")
    parser.add_argument("--calib-batches", type=positive_int, default=4, help="ECMT: training batches for threshold calibration")
    parser.add_argument("--percentile", type=float, default=0.99, help="ECMT: calibration percentile")
    parser.add_argument("--levels", type=positive_int, default=8, help="ECMT: thresholds per neuron (n) at Linear inputs and v")
    parser.add_argument("--qk-levels", type=positive_int, default=8, help="ECMT: thresholds per neuron at q and k")
    parser.add_argument("--softmax-levels", type=positive_int, default=8, help="ECMT: thresholds per neuron at the softmax output")
    parser.add_argument("--softmax-p", type=float, default=0.0125, help="ECMT: θ_p = θ_n at the softmax output")
    parser.add_argument("--official-vit-fc2", action="store_true",
                        help="ECMT: the official code's fixed fc2 thresholds (0.25, 0.08) for models named *vit*")
    parser.add_argument("--energy", action="store_true", help="also report energy per T on one test batch (QCFS: mJ per sample; ECMT: E_SNN/E_ANN)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="convert a checkpoint's raw weights, not its EMA weights")
    parser.add_argument("--json", default=None, help="write the result as JSON to this file")
    parser.add_argument("--plot", default=None, help="write the accuracy-vs-T plot (PNG) to this file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (it is shown on a terminal only)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (default: the available CPUs but one; docs/training.md)")
    return parser


def _checked_steps(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """The sorted time steps of ``--T``; usage errors end the program as argparse errors."""
    try:
        steps = sorted({int(t) for t in args.T.split(",") if t.strip()})
    except ValueError:
        parser.error(f"--T must be comma-separated integers, got {args.T!r}")
    if not steps or steps[0] < 1:
        parser.error(f"--T needs positive integers, got {args.T!r}")
    if args.method == "qcfs" and args.model and not args.checkpoint and not args.model.startswith("qcfs_"):
        parser.error("qcfs converts an ANN trained with QCFS activations: pass --checkpoint of a qcfs_* run or a qcfs_* --model")
    return steps


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, convert, evaluate for every T, print the table; returns the result."""
    parser = _parser()
    return _run(parser, parser.parse_args(argv))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    steps = _checked_steps(parser, args)
    from spikeformers.train.distributed import set_threads

    set_threads(args.threads)
    ann, model_name, label, calib_set, test_set = _load_ann(args)
    calibration = None
    if args.method == "ecmt":
        calibration = calibration_batches(calib_set, args.batch_size, args.calib_batches)
        options = dict(percentile=args.percentile, n_linear=args.levels, n_qkv=args.qk_levels, n_softmax=args.softmax_levels,
                       softmax_p=args.softmax_p, fc2_override=(0.25, 0.08) if args.official_vit_fc2 else None)
    else:
        options = {}
    snn = convert(args.method, ann, calibration, T=steps[-1], **options)
    dtype = getattr(torch, args.dtype)
    loader = DataLoader(test_set, batch_size=args.batch_size)
    result = {"method": args.method, "model": model_name, "label": label, "dtype": args.dtype,
              **evaluate_conversion(ann, snn, loader, steps, dtype, torch.device(args.device), args.max_samples,
                                    progress=f"{args.method} T=1..{steps[-1]}" if args.progress else None)}
    if args.energy:
        x = next(iter(loader))[0][: args.batch_size].to(args.device, dtype)
        for row, energy in zip(result["snn"], _energy(args.method, ann, snn, x, steps)):
            row[ENERGY_FIELD[args.method]] = energy
    print(_table(result))
    if args.json:
        atomic_write(args.json, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    if args.plot:
        plot_accuracy(result, Path(args.plot))
    return result


def main(argv: list[str] | None = None) -> int:
    """Console script ``spikeformers-convert``; the user's mistakes end as one line (docs/errors.md)."""
    parser = _parser()
    args = parser.parse_args(argv)
    with user_errors(parser.prog, args.debug):
        _run(parser, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
