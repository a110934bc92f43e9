"""Operation counts of the official ImageNet configurations next to the papers' energy figures.

FLOPs need no weights: each model runs once on a random 224×224 image (T=1; counts are per time
step). For each paper energy E the table gives the uniform input firing rate r that reproduces it
under the formula E = E_MAC·FL_first + E_AC·T·r·FL_rest (T = 4), where FL_rest holds every other
conv/linear and the attention products.

    python -P benchmarks/energy_official.py            # prints a Markdown table
"""

import timm
import torch

import spikeformers  # noqa: F401
from spikeformers.train.energy import EnergyConfig, analyze

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


def main() -> None:
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


if __name__ == "__main__":
    main()
