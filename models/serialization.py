"""Files written atomically and weights read safely.

Writes go to a temp file in the same folder and are moved into place with one ``os.replace``, so
an interrupted write never leaves a half-written file behind; the previous version survives.
Temp files are named ``.<target>.<host>.<pid>.<random>.tmp``: a write removes the ones that a
killed writer (a process of this host that no longer runs) left behind for the same target, and
never touches one whose writer is alive. A full disk raises :class:`NoSpaceError`, one line
naming the file. Reads never unpickle arbitrary objects: safetensors, or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = [
    "NoSpaceError", "reporting_full_disk", "atomic_write", "copy_atomic", "remove_stale_temp_files", "sweep_stale_temp_files",
    "save_checkpoint", "load_checkpoint", "load_weights",
]


class NoSpaceError(OSError):
    """The disk (or quota) is full while writing ``filename``; ``errno`` is ``ENOSPC``. The
    message is one line; ``hint`` says what was kept (the command-line tools print it below)."""

    def __init__(self, path: str | Path, hint: str | None = None):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))
        self.hint = hint

    def __str__(self) -> str:
        return f"no space left on device while writing {self.filename}"


def _is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain: libraries with their own writers (safetensors, torch's C++
    writer) wrap it in their own exception types and keep only the text."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        text = str(err)
        if "No space left on device" in text or "os error 28" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def reporting_full_disk(path: str | Path, hint: str | None = None):
    """Turn any full-disk error raised inside into a :class:`NoSpaceError` naming ``path``."""
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as err:
        if not _is_disk_full(err):
            raise
        raise NoSpaceError(path, hint) from err


# --- temp files ----------------------------------------------------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}.{os.getpid()}."


def _temp_pattern(name: str) -> re.Pattern:
    """Temp files of the target ``name`` written on this host; the pid is what liveness is judged by."""
    return re.compile(rf"\.{name}\.{re.escape(_HOST)}\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")


def _is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of ours may be writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete the temp files a killed writer of the file ``path`` left (writer's pid no longer
    running on this host); returns what was removed. Files of live writers and of other hosts
    are kept: a pid can only be checked on its own host."""
    path = Path(path)
    return _remove_dead_writers(path.parent, f".{glob.escape(path.name)}.*.tmp", _temp_pattern(re.escape(path.name)))


def sweep_stale_temp_files(folder: str | Path) -> list[Path]:
    """:func:`remove_stale_temp_files` for every target in ``folder`` (a run folder or cache at start)."""
    return _remove_dead_writers(Path(folder), ".*.tmp", _temp_pattern(".+"))


def _remove_dead_writers(folder: Path, glob_pattern: str, pattern: re.Pattern) -> list[Path]:
    removed = []
    try:
        candidates = list(folder.glob(glob_pattern))
    except OSError:
        return removed
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match and not _is_alive(int(match["pid"])):
            try:
                candidate.unlink()
                removed.append(candidate)
            except FileNotFoundError:
                pass  # another process cleaned it up first
    return removed


# --- writes --------------------------------------------------------------------------------------


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename."""
    path = Path(path)
    with reporting_full_disk(path, hint=f"the previous {path.name}, if any, is unchanged"):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(Path(tmp))
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """``torch.save`` of tensors and plain Python types, atomically."""
    return atomic_write(path, lambda tmp: _torch_save(state, tmp))


def _torch_save(state: dict, tmp: Path) -> None:
    # through a Python file: torch's own path writer reports a full disk as a RuntimeError without errno
    with open(tmp, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | Path) -> dict:
    """A file written by :func:`save_checkpoint`, read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Safe loading: safetensors, or ``torch.load(weights_only=True)`` for anything else."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
