"""Model configuration → timm model, for every tool (train, eval, energy, convert).

``model_cfg`` is the ``model`` config group (``name``, ``T``, ``backend``, ``pretrained``,
``checkpoint``, ``args``); ``data`` is anything with the data set's ``name``, ``num_classes``,
``in_chans``, ``img_size`` and ``sequence`` (event-frame input) attributes, such as the training
app's ``DataInfo``.

Files the user names are read here too (:func:`read_checkpoint`, :func:`training_checkpoint`,
:func:`load_model_weights`), so an empty, truncated or foreign file, or the checkpoint of another
model, is one :class:`~spikeformers.models.errors.UserError` line rather than a traceback or a
list of state-dict keys (docs/errors.md).
"""

from __future__ import annotations

import difflib
import pickle
import re
from pathlib import Path
from typing import Protocol

import timm
import torch
from omegaconf import DictConfig, OmegaConf

from spikeformers.models import hub
from spikeformers.models.errors import UserError
from spikeformers.models.layers import family_filter, state_dims
from spikeformers.models.serialization import load_weights

__all__ = ["DataShape", "build_model", "check_model_name", "file_overlay", "read_checkpoint", "training_checkpoint",
           "checkpoint_model_name", "check_same_model", "load_model_weights"]

_OUR_MODELS = ["s*former*", "sdt*", "qkformer*", "qcfs*", "atsnn*"]
_EXPECTED_FILE = ("expected checkpoints/{best,last}.pt of a spikeformers-train run or a .safetensors "
                  "weights file (spikeformers-hub download/convert)")


class DataShape(Protocol):
    """What the factory reads about the data set."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    sequence: bool


def build_model(model_cfg: DictConfig, data: DataShape) -> torch.nn.Module:
    """Create the timm model for the data set, failing early on incompatible combinations."""
    name = model_cfg.name
    check_model_name(name)
    _check_input_kind(name, data)
    kwargs = dict(OmegaConf.to_container(model_cfg.args, resolve=True)) if model_cfg.args else {}
    kwargs.update(num_classes=data.num_classes, in_chans=data.in_chans)
    # Spiking models take T and the neuron backend; ANNs (QCFS, ViTs for ECMT) set both to null.
    kwargs.update({k: model_cfg.get(k) for k in ("T", "backend") if model_cfg.get(k) is not None})
    pretrained = bool(model_cfg.pretrained)
    checkpoint = model_cfg.get("checkpoint")
    if checkpoint:
        # Initialise from a file (our checkpoint, safetensors, converted official weights). timm then
        # adapts the first conv to in_chans and re-initialises the head if num_classes differs.
        kwargs["pretrained_cfg_overlay"] = file_overlay(checkpoint, name)
        pretrained = True
    model = _create(name, pretrained, checkpoint, kwargs)
    size_multiple = getattr(model, "size_multiple", 1)
    if data.img_size % size_multiple:
        raise UserError(f"model {name} needs image sizes that are multiples of {size_multiple}, "
                        f"data={data.name} gives {data.img_size}")
    return model


def check_model_name(name: str) -> None:
    """One line for a name timm does not know, with the nearest registered names as the hint."""
    arch, _, tag = str(name).partition(".")
    if timm.is_model(name) and (not tag or name in timm.list_pretrained(f"{arch}.*")):
        return
    if name in hub.REGISTRY:  # registered but not loadable yet: the hub says how to convert it
        return
    if tag and timm.is_model(arch):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise UserError(f"model {arch} has no pretrained tag {tag!r}",
                        hint=f"tags of {arch}: {', '.join(tags)}" if tags else f"{arch} has no pretrained weights")
    close = difflib.get_close_matches(str(name), list(dict.fromkeys(timm.list_models(_OUR_MODELS) + timm.list_models())), n=3)
    raise UserError(f"unknown model {name!r}", hint=f"did you mean {' or '.join(close)}?" if close else
                    "timm.list_models('sdt*') (or 'spikformer*', 'qkformer*', ...) lists the registered names")


def _create(name: str, pretrained: bool, checkpoint: str | None, kwargs: dict) -> torch.nn.Module:
    """``timm.create_model``; a weights file that does not fit becomes one line naming both models."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if not checkpoint or "Error(s) in loading state_dict" not in str(err):
            raise
        holder = _holder_of(checkpoint)
        if holder in (None, name):
            raise UserError(f"model.checkpoint {checkpoint} does not fit {name}: {_load_problems(err)}",
                            hint="model.args (embed_dim, depth, ...) must match those of the run that wrote it") from None
        raise UserError(f"model.checkpoint {checkpoint} holds a {holder} model, not the {name} asked for",
                        hint=_other_model_hint(holder, name)) from None


def _check_input_kind(name: str, data: DataShape) -> None:
    """Event-frame models (2 input channels by default) need sequence data, image models images."""
    default_chans = timm.get_pretrained_cfg(name).input_size[0]
    if (default_chans == 2) != data.sequence:
        kind = "event-frame (DVS) sequences" if default_chans == 2 else "static images"
        raise UserError(f"model {name} is built for {kind}, but data={data.name} provides "
                        f"{'event-frame sequences' if data.sequence else 'static images'}")


def file_overlay(path: str, model_name: str) -> dict:
    """timm ``pretrained_cfg_overlay`` for a local weights file, with its own class/channel count
    (so a head that already fits the data is kept rather than re-initialised)."""
    raw = read_checkpoint(path, "model.checkpoint")
    try:
        num_classes, chans = state_dims(family_filter(model_name)(raw), f"model.checkpoint {path}", model_name)
    except ValueError as err:
        holder = checkpoint_model_name(raw)
        if holder is None or holder == model_name:
            raise UserError(str(err), hint=_EXPECTED_FILE) from None
        raise UserError(f"model.checkpoint {path} holds a {holder} model, not the {model_name} asked for",
                        hint=_other_model_hint(holder, model_name)) from None
    return dict(file=str(path), url="", num_classes=num_classes, input_size=(chans, 32, 32))


# --- files the user names ------------------------------------------------------------------------


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """The dict in a checkpoint or weights file (``torch.save`` or safetensors, read safely); a
    missing, empty, truncated or foreign file raises one line naming ``what`` and the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        inside = path / "checkpoints" / "best.pt"
        raise UserError(f"{what} {path} is a folder, not a file",
                        hint=f"did you mean {inside}?" if inside.is_file() else _EXPECTED_FILE)
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes)", hint=_EXPECTED_FILE)
    try:
        state = load_weights(path)
    except Exception as err:  # torch/safetensors report a bad file as many types; all mean the same
        raise UserError(f"{what} {path} cannot be read: {_why_unreadable(err)}", hint=_EXPECTED_FILE) from None
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} holds a {type(state).__name__}, not a dict of weights", hint=_EXPECTED_FILE)
    return state


def _why_unreadable(err: Exception) -> str:
    text = str(err)
    if "Unsupported operand" in text or "invalid load key" in text:  # bytes that are no pickle at all
        return "not a PyTorch or safetensors file"
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        return "it holds pickled Python objects, which are never loaded (spikeformers-hub convert reads official checkpoints)"
    if "zip archive" in text or "central directory" in text or isinstance(err, EOFError):
        return "the file is truncated or corrupt"
    if "header" in text.lower() and type(err).__name__ == "SafetensorError":
        return "not a valid safetensors file (truncated or corrupt)"
    if isinstance(err, (pickle.UnpicklingError, KeyError, UnicodeDecodeError)):
        return "not a PyTorch or safetensors file"
    return f"{type(err).__name__}: {_first_line(err)}"


def training_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """A checkpoint written by ``spikeformers-train`` (weights, config, model name)."""
    state = read_checkpoint(path, what)
    if not isinstance(state.get("model"), dict) or "config" not in state:
        raise UserError(f"{what} {path} holds weights only, not a spikeformers-train checkpoint (no model/config entries)",
                        hint="give weights files as model.checkpoint=FILE together with model.name=NAME")
    return state


def checkpoint_model_name(state: dict) -> str | None:
    """The model a checkpoint holds, as recorded by ``spikeformers-train`` (None if unrecorded)."""
    name = state.get("model_name")
    if name is None and isinstance(state.get("config"), dict):
        name = (state["config"].get("model") or {}).get("name")
    return name if isinstance(name, str) else None


def check_same_model(state: dict, model_name: str, source: str | Path, hint: str | None = None) -> None:
    """One line when the checkpoint records a model other than ``model_name``."""
    holder = checkpoint_model_name(state)
    if holder is not None and holder != model_name:
        raise UserError(f"{source} holds a {holder} model, not the {model_name} asked for",
                        hint=hint or f"use a checkpoint of {model_name}, or ask for model.name={holder}")


def load_model_weights(model: torch.nn.Module, weights: dict, source: str | Path, model_name: str) -> None:
    """``model.load_state_dict(weights)``; weights of another shape or architecture become one line
    counting the missing, unexpected and mismatched entries (the first of each), not a key list."""
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        expected = model.state_dict()
        missing = [k for k in expected if k not in weights]
        unexpected = [k for k in weights if k not in expected]
        mismatched = [f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
                      if k in weights and hasattr(weights[k], "shape") and weights[k].shape != expected[k].shape]
        parts = [f"{len(found)} {kind} (first: {found[0]})" for kind, found in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)) if found]
        raise UserError(f"{source} does not fit {model_name}: {', '.join(parts)}",
                        hint="the weights come from another architecture or model.args") from None


def _load_problems(err: RuntimeError) -> str:
    """torch's load_state_dict error (one key per line, hundreds of lines) as counts and the
    first key of each kind."""
    text, parts = str(err), []
    for label, kind in (("Missing key(s)", "missing"), ("Unexpected key(s)", "unexpected")):
        found = re.search(re.escape(label) + r" in state_dict: (.*)", text)
        keys = re.findall(r'"([^"]+)"', found.group(1)) if found else []
        if keys:
            parts.append(f"{len(keys)} {kind} (first: {keys[0]})")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, "
                       r"the shape in current model is torch\.Size\((\[.*?\])\)", text)
    if sizes:
        parts.append(f"{len(sizes)} shape mismatches (first: {sizes[0][0]} {sizes[0][1]} vs {sizes[0][2]})")
    return ", ".join(parts) or _first_line(err)


def _other_model_hint(holder: str, asked: str) -> str:
    """What to do about a checkpoint of ``holder`` given to ``asked``; for AT-SNN, which backbone
    the asked model fine-tunes and the model (and fine-tuning preset) that pairs with ``holder``."""
    paired = f"atsnn_{holder}"
    if asked.startswith("atsnn_") and timm.is_model(paired):
        presets = _finetune_presets(paired)
        return (f"{asked} fine-tunes {asked.removeprefix('atsnn_')} checkpoints; a {holder} backbone pairs with "
                f"model.name={paired}" + (f" (experiment={presets[0]})" if presets else ""))
    return "pick the checkpoint of a run of this model, or set model.name to the model it holds"


def _finetune_presets(model_name: str) -> list[str]:
    """The packaged ``experiment=*finetune*`` presets that train ``model_name`` (by their own text
    or the preset they extend)."""
    folder = Path(__file__).resolve().parents[1] / "configs" / "experiment"
    found = []
    for preset in sorted(folder.glob("*finetune*.yaml")):
        text = preset.read_text()
        parents = [folder / f"{p}.yaml" for p in re.findall(r"^\s*-\s*(\w+)\s*$", text, re.M)]
        texts = [text] + [p.read_text() for p in parents if p.is_file()]
        if any(re.search(rf"name:\s*{re.escape(model_name)}\b", t) for t in texts):
            found.append(preset.stem)
    return found


def _holder_of(path: str | Path) -> str | None:
    try:
        return checkpoint_model_name(read_checkpoint(path))
    except (UserError, OSError):
        return None


def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= 160 else line[:159] + "…"
