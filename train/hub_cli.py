"""``spikeformers-hub``: list, download and verify pretrained weights; convert official checkpoints.

    spikeformers-hub list [--json]
    spikeformers-hub download NAME
    spikeformers-hub verify FILE (--sha256 HEX | --name NAME)
    spikeformers-hub convert FILE --model ARCH [--name NAME] [--out DIR] [--register] [--trust-pickle]

``convert`` reads SDT's timm-saver dicts (``state_dict``/``state_dict_ema``, optional ``module.``
prefix; optimizer and args ignored) and Spikformer ``.pth`` state dicts, checks every key and
shape against our model strictly, and writes ``<name>.safetensors`` plus a JSON model card with
its sha256.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from spikeformers.models import hub
from spikeformers.models.layers import family_filter, state_dims
from spikeformers.models.serialization import atomic_write
from spikeformers.train.cli import ArgumentParser, UserError, user_errors

__all__ = ["main", "convert"]


def _load_official(path: Path, trust_pickle: bool) -> dict:
    """SDT checkpoints pickle an argparse.Namespace (``args``): allow exactly that type."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not trust_pickle:
            reason = (str(err).splitlines() or [""])[0]
            raise ValueError(f"{path} cannot be read with weights_only=True ({type(err).__name__}: {reason}); "
                             "if you trust the file, re-run with --trust-pickle") from None
        return torch.load(path, map_location="cpu", weights_only=False)


def convert(src: str | Path, model_name: str, out_dir: str | Path = ".", name: str | None = None,
            register: bool = False, trust_pickle: bool = False) -> dict:
    """Official checkpoint -> ``<out>/<name>.safetensors`` + ``<name>.json``; returns the card."""
    import timm
    from safetensors.torch import save_file

    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if not timm.is_model(model_name):
        raise ValueError(f"unknown model {model_name!r}")
    raw = _load_official(src, trust_pickle)
    num_classes, in_chans = state_dims(family_filter(model_name)(raw), src, model_name)
    model = timm.create_model(model_name, num_classes=num_classes, in_chans=in_chans)
    state = family_filter(model_name)(raw, model)  # with the model: layout-dependent renames
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{src} does not match {model_name}: missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                         f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, shape mismatches {mismatched[:10]}")
    model.load_state_dict(state, strict=True)
    name = name or f"{model_name}.converted"
    out_dir = Path(out_dir)
    weights_path = out_dir / f"{name}.safetensors"
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(weights_path, lambda tmp: save_file(tensors, str(tmp), metadata={"model": model_name, "source": src.name}))
    card = {"name": name, "model": model_name, "file": weights_path.name, "sha256": hub.sha256_of(weights_path),
            "source_file": src.name, "source_sha256": hub.sha256_of(src), "num_classes": num_classes, "in_chans": in_chans,
            "params": sum(p.numel() for p in model.parameters()), "state_entries": len(tensors)}
    if register:
        card["cached_as"] = str(hub.register_local(name, weights_path))
    atomic_write(out_dir / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(card, indent=2) + "\n"))
    return card


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="spikeformers-hub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="registered pretrained weights")
    p_list.add_argument("--json", action="store_true", help="print JSON records")
    p_dl = sub.add_parser("download", help="fetch and verify registered weights, print the local path")
    p_dl.add_argument("name", help="a registered name, e.g. sdt_tiny.digits (spikeformers-hub list shows them)")
    p_verify = sub.add_parser("verify", help="check a file's sha256")
    p_verify.add_argument("file", help="the file to check")
    group = p_verify.add_mutually_exclusive_group(required=True)
    group.add_argument("--sha256", help="compare with this sha256 (64 hex digits)")
    group.add_argument("--name", help="compare with the registry entry NAME")
    p_conv = sub.add_parser("convert", help="official checkpoint -> safetensors + model card")
    p_conv.add_argument("file", help="an official checkpoint (.pth, .pth.tar)")
    p_conv.add_argument("--model", required=True, help="our architecture name, e.g. sdt_imagenet_8_512")
    p_conv.add_argument("--name", help="output name (default <model>.converted; use the registry name to --register)")
    p_conv.add_argument("--out", default=".", help="output folder")
    p_conv.add_argument("--register", action="store_true", help="cache the result and record its sha256 for pretrained=True")
    p_conv.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of a file you trust")
    return parser


def _list(args: argparse.Namespace) -> int:
    if args.json:
        print(hub.registry_json())
        return 0
    print("\n\n".join(_describe(w) for w in hub.REGISTRY.values()))
    return 0


def _describe(w: hub.Weights) -> str:
    """One entry of ``list``: the full hash, where the file is and where it comes from."""
    top1 = f"{w.top1:.2f}%" if w.top1 is not None else "-"
    local = hub.known_sha256(w.name)
    sha = w.sha256 or (f"{local} (converted on this machine)" if local else
                       "none registered: convert the official file first (docs/pretrained.md)")
    return "\n".join([f"{w.name}  {w.dataset}  T={w.T}  top-1 {top1}", f"  sha256  {sha}",
                      f"  file    {w.record()['url_or_file'] or '-'}", f"  source  {w.source}"])


def _download(args: argparse.Namespace) -> int:
    print(hub.fetch(args.name, progress=True))
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Exit status 1 on a mismatch (a finding, not a usage error)."""
    expected = (args.sha256 or hub.resolve(args.name).sha256 or hub._local_registry().get(args.name, "")).lower()
    if not expected:
        raise ValueError(f"{args.name} has no registered sha256 to verify against")
    actual = hub.sha256_of(args.file)
    if actual != expected:
        print(f"MISMATCH {args.file}: expected {expected}, got {actual}", file=sys.stderr)
        return 1
    print(f"OK {args.file} {actual}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    card = convert(args.file, args.model, args.out, args.name, args.register, args.trust_pickle)
    print(json.dumps(card, indent=2))
    return 0


_COMMANDS = {"list": _list, "download": _download, "verify": _verify, "convert": _convert}


def main(argv: list[str] | None = None) -> int:
    """Console script ``spikeformers-hub``; the user's mistakes, a hash mismatch and an unreachable
    server end as one line (docs/errors.md)."""
    parser = _parser()
    args = parser.parse_args(argv)
    with user_errors(parser.prog, args.debug):
        try:
            return _COMMANDS[args.command](args)
        except (hub.HashMismatchError, ConnectionError) as err:  # not a bug here: say what happened
            raise UserError(str(err)) from err


if __name__ == "__main__":
    sys.exit(main())
