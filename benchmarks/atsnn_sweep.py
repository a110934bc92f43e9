"""AT-SNN sweep report: accuracy against tokens for a set of training runs (docs/atsnn.md).

Reads each run directory's ``config.yaml`` and ``metrics.csv`` (written by spikeformers-train) and
prints a Markdown table of the final epoch: top-1, tokens per image and both relative
to the baseline run; ``--plot`` draws top-1 against tokens, one marker per run, by family.

    python -P benchmarks/atsnn_sweep.py --baseline runs/off --runs runs/ft_* runs/scratch_* --plot sweep.png
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import yaml


def final_row(run: Path) -> dict:
    """The last epoch of a run, with its settings: {top1, best_top1, tokens, alpha, center, ...}."""
    metrics, config = run / "metrics.csv", run / "config.yaml"
    if not metrics.is_file() or not config.is_file():
        raise SystemExit(f"{run}: not a spikeformers-train run directory (no metrics.csv/config.yaml)")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("test_top1")]
    if not rows:
        raise SystemExit(f"{run}: metrics.csv has no evaluated epoch")
    cfg = yaml.safe_load(config.read_text())
    atsnn = cfg.get("atsnn") or {}
    halting = atsnn.get("halting", False) or atsnn.get("merge_r", 0)
    return dict(
        run=run.name, epochs=len(rows), top1=float(rows[-1]["test_top1"]),
        best_top1=max(float(r["test_top1"]) for r in rows), tokens=float(rows[-1]["tokens_per_image"]),
        start="fine-tune" if cfg["model"].get("checkpoint") else "scratch", lr=cfg["optim"]["lr"],
        alpha=atsnn.get("ponder_alpha") if halting else None, center=atsnn.get("gate_center") if halting else None,
        bn=atsnn.get("bn_stats", "plain") if halting else "-",
    )


def table(base: dict, rows: list[dict]) -> str:
    lines = ["| run | start | lr | α_p | c | BN stats | epochs | top-1 (final) | Δ top-1 | tokens / image | tokens vs baseline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [base] + rows:
        lines.append(f"| {r['run']} | {r['start']} | {r['lr']:g} | {r['alpha'] if r['alpha'] is not None else '-'} | "
                     f"{r['center'] if r['center'] is not None else '-'} | {r['bn']} | {r['epochs']} | {r['top1']:.2f}% | "
                     f"{r['top1'] - base['top1']:+.2f} | {r['tokens']:.0f} | {100 * (r['tokens'] / base['tokens'] - 1):+.1f}% |")
    return "\n".join(lines)


def plot(base: dict, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(base["top1"] - 1, color="grey", ls=":", lw=1, label="baseline − 1 point")
    ax.axvline(0.6 * base["tokens"], color="grey", ls="--", lw=1, label="−40% tokens")
    ax.scatter([base["tokens"]], [base["top1"]], marker="*", s=160, color="black", label="baseline (atsnn=off)")
    recipes = dict.fromkeys(f"{r['start']}, lr {r['lr']:g}, BN {r['bn']}" for r in rows)
    for recipe, marker in zip(recipes, "soD^v"):
        group = [r for r in rows if f"{r['start']}, lr {r['lr']:g}, BN {r['bn']}" == recipe]
        if group:
            ax.plot([r["tokens"] for r in group], [r["top1"] for r in group], marker=marker, ls="", label=recipe)
            for r in group:
                ax.annotate(f"α={r['alpha']:g}, c={r['center']:g}", (r["tokens"], r["top1"]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("tokens processed per image (Σ over blocks and time steps)")
    ax.set_ylabel("test top-1 (%), final epoch")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".png")
    os.close(fd)
    try:  # atomic: a temp file, then rename
        fig.savefig(tmp, dpi=120)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, type=Path, help="run directory of the backbone without AT-SNN")
    parser.add_argument("--runs", nargs="+", required=True, type=Path, help="AT-SNN run directories")
    parser.add_argument("--plot", help="write the accuracy-vs-tokens plot here (PNG)")
    args = parser.parse_args(argv)
    base, rows = final_row(args.baseline), [final_row(r) for r in args.runs]
    print(table(base, sorted(rows, key=lambda r: (r["start"], -r["tokens"]))))
    if args.plot:
        plot(base, rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
