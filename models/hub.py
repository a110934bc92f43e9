"""Pretrained weights: a registry with full sha256 hashes, verified downloads, safe loading.

Guarantees (docs/pretrained.md):

- Bytes are verified against the registry's sha256 **before** they are used, on every use; a
  cached or packaged file that does not match is never loaded.
- Downloads stream into ``<cache>/<file>.part`` as the bytes arrive (flushed piece by piece, so an
  interrupted transfer keeps everything received), resume with an HTTP Range request when
  possible, and are renamed onto ``<cache>/<file>`` only after the hash matched. A mismatch
  deletes the partial file and raises :class:`HashMismatchError` with the expected and actual hash.
- A file lock (``<file>.lock``) serialises concurrent downloads of the same file across processes.
- A full disk raises :class:`~spikeformers.models.serialization.NoSpaceError` naming the file;
  the ``.part`` file is kept for the resume.
- Offline mode (``SPIKEFORMERS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) never touches the network.
- Loading is safe: safetensors, or ``torch.load(weights_only=True)`` for ``.pth``.
- timm lists (``timm.list_pretrained()``) only the entries that can load on this machine: a
  registered sha256, or a conversion registered locally when the models were imported.

Cache folder: ``SPIKEFORMERS_CACHE``, else ``$TORCH_HOME/spikeformers``, else
``$XDG_CACHE_HOME/torch/spikeformers``, else ``~/.cache/torch/spikeformers``. A mirror
(``SPIKEFORMERS_MIRROR=https://host/path/``) replaces the origin of every download URL.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.resources
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from spikeformers.models.serialization import (NoSpaceError, atomic_write, copy_atomic, load_weights, reporting_full_disk,
                                               sweep_stale_temp_files)

__all__ = [
    "Weights", "REGISTRY", "HashMismatchError", "OfflineError", "cache_dir", "sha256_of", "fetch", "download",
    "load_weights", "resolve", "is_offline", "NoSpaceError", "is_loadable", "known_sha256",
]  # load_weights lives in models/serialization.py; kept here for existing callers

_logger = logging.getLogger(__name__)
_CHUNK = 1 << 20


class HashMismatchError(RuntimeError):
    """The bytes on disk are not the registered ones."""


class OfflineError(FileNotFoundError):
    """Offline mode and the file is not in the cache."""


@dataclass(frozen=True)
class Weights:
    """One pretrained checkpoint. ``file`` is a file name inside the package's ``weights/``
    folder (shipped with the package) or empty; ``url`` is where to download it; ``sha256`` is the
    full hash of the file, or empty while nobody has converted the official file yet."""

    name: str  # "<architecture>.<tag>", e.g. "sdt_tiny.digits"
    filename: str
    sha256: str
    dataset: str
    T: int
    top1: float | None
    source: str
    url: str = ""
    packaged: bool = False
    num_classes: int = 10
    input_size: tuple[int, int, int] = (3, 32, 32)
    notes: str = ""

    def record(self) -> dict:
        """The ``spikeformers-hub list --json`` record."""
        where = self.url or (f"package:spikeformers.models/weights/{self.filename}" if self.packaged else "")
        return {"name": self.name, "url_or_file": where, "sha256": self.sha256 or None, "dataset": self.dataset,
                "T": self.T, "top1": self.top1, "source": self.source}


_SDT_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"
_SDT_SOURCE = "official Spike-driven Transformer release (github.com/BICLab/Spike-Driven-Transformer README)"
_CONVERT_NOTE = ("official file: download it from the url, then `spikeformers-hub convert FILE --model {arch}` "
                 "and load the result with pretrained_cfg_overlay=dict(file=...); sha256 is recorded by the first "
                 "conversion")

_BAIDU_NOTE = " (Baidu Pan, extraction code abcd)"
_SPIKINGFORMER_SOURCE = "official Spikingformer release (github.com/zhouchenlin2096/Spikingformer README)" + _BAIDU_NOTE
_SDTV2_SOURCE = "official Meta-SpikeFormer release (github.com/BICLab/Spike-Driven-Transformer-V2 README, 55M_kd folder)"
_QKFORMER_SOURCE = ("official QKFormer release (github.com/zhouchenlin2096/QKFormer; the links were removed from its README "
                    "in 2026-04, availability unknown)")
_SDTV3_SOURCE = ("official E-SpikeFormer release (github.com/BICLab/Spike-Driven-Transformer-V3 README, Google Drive links; "
                 "no published hashes)")
_SDTV3_URL = "https://github.com/BICLab/Spike-Driven-Transformer-V3"
_SDTV3_83M_NOTE = ("; the released 83M file reportedly has 768-wide rep_conv BNs (official issue #9): convert loads it if its "
                   "rep_conv chain is consistent, else names the layers that do not fit")
_QKFORMER_NOTE = ("; the released weights were trained with the batch-coupled SSA: build with legacy_tb_lif=True "
                  "(the default for pretrained QKFormer ImageNet models) and evaluate at the official batch size")

REGISTRY: dict[str, Weights] = {
    w.name: w
    for w in [
        Weights("sdt_tiny.digits", "sdt_tiny.digits.safetensors",
                "4a18b5cf41bf82b2197e320490b16dabc1fdd19f0606dbbc48c68172258add7e",
                "digits (sklearn load_digits, 32x32, 1 channel)", 4, 99.17,
                "spikeformers-train defaults (docs/training.md)", packaged=True, input_size=(1, 32, 32)),
        Weights("spikformer_tiny.digits", "spikformer_tiny.digits.safetensors",
                "efe27b41c5a0ceba03e5253d0301f6a4e7ccd52bc522fac1b06d7d5de6c288d6",
                "digits (sklearn load_digits, 32x32, 1 channel)", 4, 97.78,
                "spikeformers-train model.name=spikformer_tiny (docs/training.md)", packaged=True, input_size=(1, 32, 32)),
        *[
            Weights(f"sdt_imagenet_{arch}.in1k", f"sdt_imagenet_{arch}.in1k.safetensors", "", "ImageNet-1k", 4, top1,
                    _SDT_SOURCE, url=_SDT_DRIVE.format(drive_id), num_classes=1000, input_size=(3, 224, 224),
                    notes=_CONVERT_NOTE.format(arch=f"sdt_imagenet_{arch}"))
            for arch, top1, drive_id in [
                ("8_384", 72.28, "10oH_zkwB4FDtFLgmZ_lI8e0tFjRzrXyD"),
                ("6_512", 74.11, "1hsShpFBKYpMK2TmpuoyBFORcLAuMHrx7"),
                ("8_512", 74.57, "1n59WNSBgP2VyAW2nfJX2Wvx5rgNJEMXI"),
                ("10_512", 74.66, "1l-c3QY5r4IFmYUmGPZXRHP_W7iC1sdP8"),
                ("8_768", 77.07, "1R-MaeFV8d2Y0pIGBSjklOGWhaF8dLHf4"),
            ]
        ],
        Weights("spikingformer_imagenet_8_768.in1k", "spikingformer_imagenet_8_768.in1k.safetensors", "", "ImageNet-1k", 4,
                75.85, _SPIKINGFORMER_SOURCE, url="https://pan.baidu.com/s/1LsECpFOxh30O3vHWow8OGQ", num_classes=1000,
                input_size=(3, 224, 224), notes=_CONVERT_NOTE.format(arch="spikingformer_imagenet_8_768")),
        Weights("spikingformer_cifar10_4_384.cifar10", "spikingformer_cifar10_4_384.cifar10.safetensors", "",
                "CIFAR-10 (400 epochs)", 4, 95.81, _SPIKINGFORMER_SOURCE, url="https://pan.baidu.com/s/1mjpD2gtz5ZX0M8N3jobjzA",
                notes=_CONVERT_NOTE.format(arch="spikingformer_cifar10_4_384")),
        Weights("sdtv2_imagenet_8_512_kd.in1k", "sdtv2_imagenet_8_512_kd.in1k.safetensors", "", "ImageNet-1k (T=4, KD)", 4,
                80.0, _SDTV2_SOURCE, url="https://drive.google.com/drive/folders/12JcIRG8BF6JcgPsXIetSS14udtHXeSSx",
                num_classes=1000, input_size=(3, 224, 224), notes=_CONVERT_NOTE.format(arch="sdtv2_imagenet_8_512_kd")),
        Weights("sdtv3_tiny.digits", "sdtv3_tiny.digits.safetensors",
                "8139f74e507053198b2b794f499461793498e0a78fabfa570856ff2599de2061",
                "digits (sklearn load_digits, 32x32, 1 channel)", 1, 99.17,
                "spikeformers-train model.name=sdtv3_tiny model.T=1 (docs/sdt_v3.md; D=4)", packaged=True,
                input_size=(1, 32, 32)),
        # E-SpikeFormer: D (1x4 / 1x8) is not in the files; the tags set max_spike_count (models/sdt_v3.py)
        *[
            Weights(f"sdtv3_imagenet_{arch}.{tag}", f"sdtv3_imagenet_{arch}.{tag}.safetensors", "", dataset, 1, top1,
                    _SDTV3_SOURCE, url=_SDTV3_URL, num_classes=1000, input_size=(3, size, size),
                    notes=_CONVERT_NOTE.format(arch=f"sdtv3_imagenet_{arch}")
                    + (_SDTV3_83M_NOTE if arch.startswith("12_512") else ""))
            for arch, tag, dataset, top1, size in [
                ("s", "in1k", "ImageNet-1k (1x4, the 5.1M model)", None, 224),
                ("m", "in1k", "ImageNet-1k (1x4, the 10M model)", 78.5, 224),
                ("l", "in1k", "ImageNet-1k (1x4, the 19M model)", 79.8, 224),
                ("12_512_kd", "in1k_1x4", "ImageNet-1k (1x4, KD, the 83M model)", None, 224),
                ("12_512_kd", "in1k_1x8", "ImageNet-1k (1x8, KD, the 83M model; abstract 84.0%, setting unconfirmed)", None, 224),
                ("12_768_kd", "in1k_1x4", "ImageNet-1k (1x4, KD, the 171M model)", None, 224),
                ("12_768_kd", "in1k_1x8", "ImageNet-1k (1x8, KD, the 171M model)", None, 224),
                ("12_768_kd", "in1k_1x8_384",
                 "ImageNet-1k (1x8, KD, 384x384, the 171M model; abstract 86.2%, setting unconfirmed)", None, 384),
            ]
        ],
        *[
            Weights(f"qkformer_imagenet_{arch}.in1k", f"qkformer_imagenet_{arch}.in1k.safetensors", "", "ImageNet-1k", 4, top1,
                    _QKFORMER_SOURCE, url="https://drive.google.com/drive/folders/1vhq9jmhmuyZ5_RGHuWD4wniza856qF8U",
                    num_classes=1000, input_size=(3, 224, 224),
                    notes=_CONVERT_NOTE.format(arch=f"qkformer_imagenet_{arch}") + _QKFORMER_NOTE)
            for arch, top1 in [("10_384", 78.80), ("10_512", 82.04), ("10_768", 84.22)]
        ],
    ]
}


# --- paths and environment ----------------------------------------------------------------------


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("SPIKEFORMERS_OFFLINE", "HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    if os.environ.get("SPIKEFORMERS_CACHE"):
        return Path(os.environ["SPIKEFORMERS_CACHE"]).expanduser()
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser() / "spikeformers"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "torch" / "spikeformers"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _packaged_path(filename: str) -> Path | None:
    candidate = importlib.resources.files("spikeformers.models").joinpath("weights", filename)
    return Path(str(candidate)) if candidate.is_file() else None


def _mirrored(url: str, filename: str) -> str:
    mirror = os.environ.get("SPIKEFORMERS_MIRROR")
    return f"{mirror.rstrip('/')}/{filename}" if mirror else url


# --- download ------------------------------------------------------------------------------------


def download(url: str, dest: str | Path, sha256: str, progress: bool | None = None, retries: int = 2,
             timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` with resume, lock and sha256 check; returns ``dest``.

    An existing ``dest`` whose hash matches is a cache hit (no network). ``sha256`` is required:
    unverified bytes are never moved into place.
    """
    if not sha256:
        raise ValueError(f"refusing to download {url} without a sha256 to verify it against")
    dest = Path(dest)
    if dest.exists() and sha256_of(dest) == sha256:  # cache hit: no lock needed (read-only caches work)
        return dest
    with reporting_full_disk(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temp_files(dest.parent)  # what killed writes into the cache left behind
        return _download_locked(url, dest, sha256, progress, retries, timeout)


def _download_locked(url: str, dest: Path, sha256: str, progress: bool | None, retries: int, timeout: float) -> Path:
    from filelock import FileLock

    with FileLock(str(dest) + ".lock"):
        if dest.exists():
            if sha256_of(dest) == sha256:
                return dest
            _logger.warning("cached %s does not match its sha256; downloading it again", dest)
            dest.unlink()
        if is_offline():
            raise OfflineError(f"offline mode (SPIKEFORMERS_OFFLINE/HF_HUB_OFFLINE): {dest.name} is not in the cache {dest.parent}")
        part = dest.with_name(dest.name + ".part")
        last_error: Exception | None = None
        for _ in range(retries + 1):
            try:
                _fetch_into(url, part, progress, timeout)
                break
            except NoSpaceError:
                raise  # retrying cannot help
            except urllib.error.HTTPError as err:
                err.close()
                last_error = err
                if err.code == 416:  # the partial file is complete or longer than the remote one
                    part.unlink(missing_ok=True)  # start over rather than resume
                elif 400 <= err.code < 500 and err.code not in (408, 429):
                    raise ConnectionError(f"could not download {url}: HTTP {err.code} {err.reason}") from None
            except (OSError, http.client.HTTPException) as err:  # URLError, resets, timeouts, truncation
                last_error = err  # retry; the next attempt resumes from the partial file
        else:
            raise ConnectionError(f"could not download {url} after {retries + 1} attempts: {last_error}") from last_error
        actual = sha256_of(part)
        if actual != sha256:
            part.unlink()
            raise HashMismatchError(f"sha256 mismatch for {url}: expected {sha256}, got {actual}; the download was deleted")
        os.replace(part, dest)
    return dest


class _Truncated(ConnectionError):
    pass


def _fetch_into(url: str, part: Path, progress: bool | None, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (Range request when ``part`` has bytes)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status != 206:  # the server ignored the Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        from tqdm import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        kept = f"the partial download {part.name} is kept; free some space and run again to resume"
        with reporting_full_disk(part, hint=kept), open(part, "ab" if have else "wb") as f, \
                tqdm(total=expected, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], disable=not show) as bar:
            _stream(response, f, bar)
    if expected is not None and part.stat().st_size != expected:
        raise _Truncated(f"truncated transfer of {url}: {part.stat().st_size} of {expected} bytes")


def _stream(response, f, bar) -> None:
    """Write each piece as it arrives and flush it, so an interrupted transfer keeps every byte
    received for the resume. ``read1`` returns what is available instead of blocking for a full
    block: with ``read(1 MiB)`` a small file cut off mid-way lost all it had received."""
    read = getattr(response, "read1", response.read)
    while chunk := read(_CHUNK):
        f.write(chunk)
        f.flush()
        bar.update(len(chunk))


# --- registry access ----------------------------------------------------------------------------


def resolve(name: str) -> Weights:
    if name not in REGISTRY:
        raise KeyError(f"no pretrained weights named {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def fetch(name: str, progress: bool | None = None) -> Path:
    """A verified local path for the registered weights ``name`` (package, cache or download)."""
    weights = resolve(name)
    if not weights.sha256 and name in _local_registry():  # recorded by `convert --register`
        cached = cache_dir() / weights.filename
        if cached.exists() and sha256_of(cached) == _local_registry()[name]:
            return cached
        raise FileNotFoundError(f"{name}: the converted file registered on this machine is missing or changed in "
                                f"{cache_dir()}; re-run `spikeformers-hub convert FILE --model ... --name {name} --register`")
    if not weights.sha256:
        raise FileNotFoundError(f"{name}: no verified file is registered yet. {weights.notes} "
                                f"(source: {weights.url or weights.source})")
    mirror = os.environ.get("SPIKEFORMERS_MIRROR")
    # the packaged copy is used unless a mirror is asked for explicitly (and is online)
    packaged = _packaged_path(weights.filename) if weights.packaged and (not mirror or is_offline()) else None
    if packaged is not None:
        actual = sha256_of(packaged)
        if actual != weights.sha256:
            raise HashMismatchError(f"packaged {packaged.name}: expected sha256 {weights.sha256}, got {actual}")
        return packaged
    cached = cache_dir() / weights.filename
    url = _mirrored(weights.url, weights.filename)
    if not url:
        if cached.exists() and sha256_of(cached) == weights.sha256:
            return cached
        raise FileNotFoundError(f"{name}: not packaged, not cached in {cache_dir()}, and no url to download it from")
    return download(url, cached, weights.sha256, progress=progress)


def registry_json() -> str:
    return json.dumps([w.record() for w in REGISTRY.values()], indent=2)


def _local_registry() -> dict[str, str]:
    """name -> sha256 of files this machine converted itself (``<cache>/local_registry.json``)."""
    path = cache_dir() / "local_registry.json"
    return json.loads(path.read_text()) if path.exists() else {}


def register_local(name: str, path: str | Path) -> Path:
    """Copy a converted file into the cache under the registry's file name and record its hash,
    so ``pretrained=True`` finds it; returns the cached path."""
    weights = resolve(name)
    dest = cache_dir() / weights.filename
    copy_atomic(path, dest)
    entries = _local_registry() | {name: sha256_of(dest)}
    atomic_write(cache_dir() / "local_registry.json", lambda tmp: tmp.write_text(json.dumps(entries, indent=2) + "\n"))
    return dest


# --- timm integration ---------------------------------------------------------------------------

HUB_SCHEME = "spikeformers-hub://"


def known_sha256(name: str) -> str:
    """The registry's sha256 of ``name``, else the one recorded by a conversion on this machine
    (``convert --register``), else ``""``."""
    if resolve(name).sha256:
        return resolve(name).sha256
    try:
        return _local_registry().get(name, "")
    except (OSError, ValueError):  # an unreadable local registry must not break importing the models
        return ""


def is_loadable(name: str) -> bool:
    """Whether ``pretrained=True`` can load ``name`` on this machine."""
    return bool(known_sha256(name))


def timm_cfg(name: str, **kwargs) -> dict:
    """Fields for a ``default_cfgs`` entry whose weights live in this registry. The url is a
    marker: :func:`build_model` replaces it with the verified local file before timm loads it.
    Entries that cannot load here get no url, so timm does not list them as pretrained
    (``timm.list_pretrained()``); ``pretrained=True`` on them still explains what to do."""
    w = resolve(name)
    loadable = is_loadable(name)
    status = f"sha256={w.sha256}" if w.sha256 else ("converted on this machine" if loadable else
                                                   "NOT LOADABLE until converted: spikeformers-hub convert")
    return dict(url=HUB_SCHEME + name if loadable else "", num_classes=w.num_classes, input_size=w.input_size,
                notes=f"{status}; {w.source}", **kwargs)


def _registry_name(cfg) -> str | None:
    """The registry entry behind a resolved timm cfg (``<architecture>.<tag>``), if any."""
    if (cfg.url or "").startswith(HUB_SCHEME):
        return cfg.url[len(HUB_SCHEME):]
    name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else None
    return name if name in REGISTRY and not cfg.url else None


def build_model(model_cls, model_name: str, pretrained: bool, filter_fn, **kwargs):
    """``timm.models.build_model_with_cfg`` that loads only verified weights.

    With ``pretrained=True`` and a registry-backed cfg, the weights are fetched (package, cache or
    download) and handed to timm as a local file; timm then filters them, adapts the first conv to
    ``in_chans`` and drops the head when ``num_classes`` differs. A user's own
    ``pretrained_cfg_overlay=dict(file=...)`` is loaded as given.
    """
    from timm.models import build_model_with_cfg
    from timm.models._builder import resolve_pretrained_cfg

    if pretrained:
        cfg = resolve_pretrained_cfg(model_name, pretrained_cfg=kwargs.pop("pretrained_cfg", None),
                                     pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None))
        registered = _registry_name(cfg)
        if not cfg.file and not cfg.state_dict and registered:
            path = fetch(registered)  # verified; explains what to do when nothing is registered
            cfg = replace(cfg, file=str(path), url="")
        elif not (cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id):
            raise FileNotFoundError(f"{model_name} has no pretrained weights; available: {', '.join(sorted(REGISTRY))}")
        kwargs["pretrained_cfg"] = cfg
    return build_model_with_cfg(model_cls, model_name, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
