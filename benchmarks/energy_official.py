"""Operation counts of the official ImageNet configurations next to the papers' energy figures.

FLOPs need no weights: each model runs once on a random 224×224 image (T=1; counts are per time
step). For each paper energy E the table gives the uniform input firing rate r that reproduces it
under the formula E = E_MAC·FL_first + E_AC·T·r·FL_rest (T = 4), where FL_rest holds every other
conv/linear and the attention products.

With ``--v2`` a second table gives each configuration's memory-aware break-even firing rates
(profile mem45-int8, T = 4): the uniform rate r* at which the SNN's energy equals an int8 or fp32
ANN's, which depends on the layer shapes only (random weights, one image; slow on a CPU: the model
runs at T = 4 with every connection layer re-run on binarised operands).

    python -P benchmarks/energy_official.py            # prints a Markdown table
    python -P benchmarks/energy_official.py --v2 sdt_imagenet_8_384
"""

import argparse

import timm
import torch

import spikeformers  # noqa: F401
from spikeformers.train import energy_ma
from spikeformers.train.energy import EnergyConfig, analyze
from spikeformers.train.neurobench import collect

PAPER = {  # model: (reported energy mJ, reported OPs or None)
    "spikformer_imagenet_8_384": (7.734, "6.82G"),
    "spikformer_imagenet_8_512": (11.577, "11.09G"),
    "spikformer_imagenet_10_512": (13.899, "13.67G"),
    "spikformer_imagenet_8_768": (21.477, "22.09G"),
    "sdt_imagenet_8_384": (3.90, None),
    "sdt_imagenet_6_512": (3.56, None),
    "sdt_imagenet_8_512": (4.50, None),
    "sdt_imagenet_10_512": (5.53, None),
    "sdt_imagenet_8_768": (6.09, None),
}


def legacy_table() -> None:
    cfg, T = EnergyConfig(), 4
    print("| model | first conv FLOPs | other FLOPs (incl. attention) | ANN energy (mJ) | paper OPs | paper energy (mJ) | implied rate r |")
    print("|---|---|---|---|---|---|---|")
    for name, (energy, ops) in PAPER.items():
        torch.manual_seed(0)
        model = timm.create_model(name, T=1)
        report = analyze(model, [torch.randn(1, 3, 224, 224)], cfg, model_name=name)
        first = report.layers[0].flops
        rest = sum(r.flops for r in report.layers[1:])
        rate = (energy - cfg.e_mac_pj * first * 1e-9) / (cfg.e_ac_pj * T * rest * 1e-9)
        print(f"| {name} | {first / 1e9:.3f}G | {rest / 1e9:.2f}G | {report.ann_energy_mJ:.2f} | {ops or '—'} | {energy} | {rate:.3f} |")


def break_even_table(names: list[str]) -> None:
    print("| model | SNN at r = 0 (mJ) | ANN int8 naive / reuse (mJ) | r* int8 naive | r* int8 reuse | r* fp32 naive | ρ* int8 naive |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, T=4)
        block = energy_ma.price(collect(model, [torch.randn(1, 3, 224, 224)]), energy_ma.PROFILES["mem45-int8"])
        be = block["break_even_all"]
        fmt = lambda key: "never" if be[key]["uniform_rate"] is None else f"{be[key]['uniform_rate']:.4f}"  # noqa: E731
        rho = be["int8_naive"]["spikes_per_synapse"]
        print(f"| {name} | {block['curve']['A'] / 1e9:.3f} | {block['ann']['int8_naive_pJ'] / 1e9:.3f} / "
              f"{block['ann']['int8_reuse_pJ'] / 1e9:.3f} | {fmt('int8_naive')} | {fmt('int8_reuse')} | {fmt('fp32_naive')} | "
              f"{'—' if rho is None else f'{rho:.3f}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v2", nargs="*", metavar="MODEL", default=None,
                        help="the memory-aware break-even table instead, for MODEL (default: every configuration)")
    args = parser.parse_args()
    if args.v2 is None:
        legacy_table()
    else:
        break_even_table(args.v2 or list(PAPER))


if __name__ == "__main__":
    main()
