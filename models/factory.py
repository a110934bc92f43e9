"""Model configuration → timm model, for every tool (train, eval, energy, convert).

``model_cfg`` is the ``model`` config group (``name``, ``T``, ``backend``, ``pretrained``,
``checkpoint``, ``args``); ``data`` is anything with the data set's ``name``, ``num_classes``,
``in_chans``, ``img_size`` and ``sequence`` (event-frame input) attributes, such as the training
app's ``DataInfo``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import timm
import torch
from omegaconf import DictConfig, OmegaConf

from spikeformers.models.layers import family_filter, state_dims
from spikeformers.models.serialization import load_weights

__all__ = ["DataShape", "build_model", "file_overlay"]

_OUR_MODELS = ["s*former*", "sdt*", "qkformer*", "qcfs*", "atsnn*"]


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
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(timm.list_models(_OUR_MODELS))}")
    _check_input_kind(name, data)
    kwargs = dict(OmegaConf.to_container(model_cfg.args, resolve=True)) if model_cfg.args else {}
    kwargs.update(num_classes=data.num_classes, in_chans=data.in_chans)
    # Spiking models take T and the neuron backend; ANNs (QCFS, ViTs for ECMT) set both to null.
    kwargs.update({k: model_cfg.get(k) for k in ("T", "backend") if model_cfg.get(k) is not None})
    pretrained = bool(model_cfg.pretrained)
    if model_cfg.get("checkpoint"):
        # Initialise from a file (our checkpoint, safetensors, converted official weights). timm then
        # adapts the first conv to in_chans and re-initialises the head if num_classes differs.
        kwargs["pretrained_cfg_overlay"] = file_overlay(model_cfg.checkpoint, name)
        pretrained = True
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    size_multiple = getattr(model, "size_multiple", 1)
    if data.img_size % size_multiple:
        raise ValueError(f"model {name} needs image sizes that are multiples of {size_multiple}, "
                         f"data={data.name} gives {data.img_size}")
    return model


def _check_input_kind(name: str, data: DataShape) -> None:
    """Event-frame models (2 input channels by default) need sequence data, image models images."""
    default_chans = timm.get_pretrained_cfg(name).input_size[0]
    if (default_chans == 2) != data.sequence:
        kind = "event-frame (DVS) sequences" if default_chans == 2 else "static images"
        raise ValueError(f"model {name} is built for {kind}, but data={data.name} provides "
                         f"{'event-frame sequences' if data.sequence else 'static images'}")


def file_overlay(path: str, model_name: str) -> dict:
    """timm ``pretrained_cfg_overlay`` for a local weights file, with its own class/channel count
    (so a head that already fits the data is kept rather than re-initialised)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.checkpoint not found: {path}")
    num_classes, chans = state_dims(family_filter(model_name)(load_weights(path)), f"model.checkpoint {path}", model_name)
    return dict(file=str(path), url="", num_classes=num_classes, input_size=(chans, 32, 32))
