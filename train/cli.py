"""What the command-line tools share, so the five read alike.

Each tool is a ``main(argv: list[str] | None = None) -> int`` in its own module of this package
(``python -m spikeformers.train.<module>`` runs the same function as the console script).
Mistakes the user can fix end the program with one line, ``<prog>: error: <message>``, at most one
``hint: ...`` line and exit status 2, as argparse does (:func:`user_errors`); the traceback
appears only with ``SPIKEFORMERS_DEBUG=1`` or ``--debug``. docs/errors.md lists the cases.
``spikeformers-train`` is the exception in one way: Hydra owns its command line (multirun,
launchers, run folders), so it checks the overrides with :func:`check_hydra_overrides` before
Hydra starts the job.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from typing import Iterator, NoReturn

from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from spikeformers.models.errors import UserError

__all__ = ["USER_ERRORS", "UserError", "DEBUG_ENV", "ArgumentParser", "compose_config", "exit_with_error",
           "error_lines", "user_errors", "debugging", "positive_int", "check_fields", "check_hydra_overrides",
           "TRAIN_FIELDS", "EVAL_FIELDS", "progress_bar"]

DEBUG_ENV = "SPIKEFORMERS_DEBUG"

# Errors that mean "fix the command line or the files it names", not a bug: no traceback. Models
# raise one-line ValueErrors for bad input (shape, T); Hydra raises the composition and override
# errors; OSErrors name the path the user gave.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
               ConfigCompositionException, OverrideParseException, MissingMandatoryValue)

_MAX_CHARS = 400  # longer messages (lists of state-dict keys, ...) are cut; the debug switch shows all


def debugging(flag: bool = False) -> bool:
    """True when the user asked for tracebacks (``--debug`` or ``SPIKEFORMERS_DEBUG=1``)."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_lines(prog: str, error: BaseException | str) -> list[str]:
    """``["<prog>: error: <message>"]`` plus ``"hint: <hint>"`` when there is one."""
    message, hint = _message_and_hint(error)
    return [f"{prog}: error: {message}"] + ([f"hint: {hint}"] if hint else [])


def exit_with_error(prog: str, error: BaseException | str) -> NoReturn:
    """Print ``error`` as :func:`error_lines` and exit with argparse's usage-error status (2)."""
    print("\n".join(error_lines(prog, error)), file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def user_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn the user's mistakes raised inside the block into :func:`exit_with_error`; with
    :func:`debugging` on they propagate with their traceback."""
    quiet_cuda_probe()
    try:
        yield
    except USER_ERRORS as error:
        if debugging(debug):
            raise
        exit_with_error(prog, error)
    except KeyError as error:  # a name the user gave that a registry does not hold (hub, presets)
        if debugging(debug) or not _names_user_input(error):
            raise
        exit_with_error(prog, error)
    except OSError as error:  # naming a path (full disk, read-only folder): the user can act on it
        if debugging(debug) or error.filename is None:
            raise
        exit_with_error(prog, error)


def quiet_cuda_probe() -> None:
    """On a machine without a CUDA runtime, torch's extension loader (imported when the neurons are
    compiled) warns "No CUDA runtime is found, using CUDA_HOME=..." at every run; nothing is wrong
    for a CPU run, so the tools do not show it there."""
    import torch

    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def progress_bar(iterable=None, total: int | None = None, desc: str = "", enabled: bool = True):
    """The tools' progress bar (tqdm, on stderr): shown only on a terminal, as training's per-step
    bar, and cleared when done, so logs and pipes get the results alone."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=not (enabled and sys.stderr.isatty()))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the tools' error style: usage errors are one line plus a hint pointing at
    ``--help`` (not the whole usage block), and every tool gets ``--debug``."""

    def __init__(self, *args, debug_flag: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if debug_flag:
            self.add_argument("--debug", action="store_true",
                              help=f"show the full traceback of errors (same as {DEBUG_ENV}=1)")

    def error(self, message: str) -> NoReturn:
        exit_with_error(self.prog, UserError(message, hint=f"{self.prog} --help lists the options"))


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (time steps, sample counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """The packaged Hydra config ``config_name`` with command-line style ``overrides``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="spikeformers.configs", version_base="1.3"):
            return compose(config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


# --- typed config fields -------------------------------------------------------------------------

# What each numeric or choice field of the packaged configs must hold. Checked on the composed
# config before anything is built, so ``trainer.epochs=abc`` fails at once and names the field.
_DATA_FIELDS = {
    "data.batch_size": "positive int", "data.eval_batch_size": "positive int", "data.num_workers": "non-negative int",
    "data.img_size": "positive int", "data.smoothing": "fraction", "data.frames": "optional positive int",
    "data.frame_size": "optional positive int",
}
TRAIN_FIELDS = {
    "seed": "int", "model.T": "optional positive int", "model.pretrained": "bool", "overwrite": "bool",
    "trainer.epochs": "positive int", "trainer.threads": "optional positive int", "trainer.max_steps_per_epoch": "optional positive int",
    "trainer.save_every_steps": "optional positive int", "trainer.grad_clip": "optional positive number",
    "trainer.memory": ("plain", "checkpoint", "packed"), "trainer.amp_dtype": ("bfloat16", "float16"),
    "trainer.amp": "bool", "trainer.compile": "bool", "trainer.channels_last": "bool", "trainer.sync_bn": "bool",
    "trainer.deterministic": "bool", "trainer.freeze_backbone": "bool", "trainer.ema.enable": "bool",
    "trainer.ema.decay": "fraction", "trainer.distill.alpha": "fraction", "trainer.tet.enable": "bool",
    "trainer.tet.lam": "number", "trainer.tet.phi": "number",
    "optim.lr": "positive number", "optim.weight_decay": "non-negative number",
    "optim.layer_decay": "optional positive number",
    "sched.warmup_epochs": "non-negative int", "sched.cooldown_epochs": "non-negative int",
    "sched.warmup_lr": "non-negative number", "sched.min_lr": "non-negative number",
    **_DATA_FIELDS,
}
EVAL_FIELDS = {
    "batch_size": "positive int", "num_workers": "non-negative int", "use_ema": "bool", "threads": "optional positive int",
    "progress": "bool",
    "convert": (None, "qcfs", "ecmt"), "convert_T": "positive int", "model.T": "optional positive int",
    "model.pretrained": "bool", **_DATA_FIELDS,
}


def check_fields(cfg: DictConfig, fields: dict) -> None:
    """Raise :class:`UserError` naming a required value the config leaves open (``???``, such as a
    preset's ``finetune_from``), or the first field of ``fields`` whose value does not fit its
    kind; fields the config lacks, and values that only resolve inside a Hydra run, are skipped."""
    required = _required(OmegaConf.to_container(cfg, resolve=False))
    if required:
        raise UserError(f"{required[0]} is required: the config leaves it open (???)",
                        hint=f"add {required[0]}=... to the command line")
    for path, kind in fields.items():
        try:
            value = OmegaConf.select(cfg, path, default=None, throw_on_missing=False)
        except Exception:  # an interpolation such as ${hydra:...} outside a run: nothing to check
            continue
        problem = _field_problem(value, kind)
        if problem:
            raise UserError(f"{path} must be {problem}, got {value!r}",
                            hint=f"fix the override {path}=... (or the config that sets it)")


def _required(container, prefix: str = "") -> list[str]:
    """Paths of the ``???`` values in a config read without resolving interpolations."""
    found = []
    for key, value in (container.items() if isinstance(container, dict) else enumerate(container)):
        path = f"{prefix}{key}"
        if value == "???":
            found.append(path)
        elif isinstance(value, (dict, list)):
            found += _required(value, path + ".")
    return found


def _field_problem(value, kind) -> str | None:
    """What ``value`` should have been (as words), or None when it fits ``kind``."""
    if isinstance(kind, tuple):
        return None if value in kind else "one of " + ", ".join(str(k) for k in kind)
    if value is None:
        return None if kind.startswith("optional") else _words(kind)
    base = kind.removeprefix("optional ")
    is_bool = isinstance(value, bool)
    if base == "bool":
        return None if is_bool else "true or false"
    is_int = isinstance(value, int) and not is_bool
    is_number = (is_int or isinstance(value, float)) and not is_bool
    fits = {"int": is_int, "positive int": is_int and value >= 1, "non-negative int": is_int and value >= 0,
            "number": is_number, "positive number": is_number and value > 0,
            "non-negative number": is_number and value >= 0, "fraction": is_number and 0 <= value <= 1}[base]
    return None if fits else _words(kind)


def _words(kind: str) -> str:
    words = {"int": "an integer", "positive int": "a positive integer", "non-negative int": "an integer >= 0",
             "number": "a number", "positive number": "a positive number", "non-negative number": "a number >= 0",
             "fraction": "a number between 0 and 1", "bool": "true or false"}
    optional = kind.startswith("optional ")
    text = words[kind.removeprefix("optional ")]
    return f"{text} or null" if optional else text


# --- Hydra command lines -------------------------------------------------------------------------


def check_hydra_overrides(config_name: str, argv: list[str], fields: dict) -> None:
    """Compose ``config_name`` with the overrides of a Hydra command line ``argv`` (multirun
    sweeps: their first value) and check ``fields``, raising the user's errors before Hydra
    creates a run folder. Command lines this cannot mirror (help, ``--cfg``, ``-cp``/``-cd``,
    unusual sweeps) are left to Hydra."""
    from hydra._internal.utils import get_args_parser  # what @hydra.main parses argv with

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args, unknown = get_args_parser().parse_known_args(argv)
        except SystemExit:
            return
    if unknown or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion \
            or args.config_path or args.config_dir or args.experimental_rerun:
        return
    overrides = _first_of_each_sweep(args.overrides) if args.multirun else args.overrides
    if overrides is None:
        return
    check_fields(compose_config(args.config_name or config_name, overrides), fields)


def _first_of_each_sweep(overrides: list[str]) -> list[str] | None:
    """The overrides of a multirun's first job, or None when a sweep is not a simple list."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        return [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
                for o in parsed]
    except Exception:  # the parse error itself is Hydra's to report, with its full grammar hint
        return None


# --- messages ------------------------------------------------------------------------------------


def _message_and_hint(error: BaseException | str) -> tuple[str, str | None]:
    if isinstance(error, str):
        return _cut(error), None
    if isinstance(error, (ConfigCompositionException, OverrideParseException)):
        return _hydra_message(error)
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
    hint = getattr(error, "hint", None)
    if hint is None and (len(lines) > 1 or len(lines[0]) > _MAX_CHARS):
        hint = f"set {DEBUG_ENV}=1 for the full message and traceback"
    return _cut(lines[0]), hint


def _hydra_message(error: BaseException) -> tuple[str, str | None]:
    """Hydra's multi-line messages as one line: the first line plus the first line of its cause
    (``Key 'x' is not in struct``); the rest (``To append ... use +x=1``, the available options of
    a config group, the grammar page) becomes the hint."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0].rstrip(".")
    cause = (str(error.__cause__).strip().splitlines() or [""])[0] if error.__cause__ else ""
    if cause and cause not in message:
        message = f"{message}: {cause}"
    rest = lines[1:]
    if rest and rest[0].startswith("Available options"):
        options = [line for line in rest[1:] if not line.startswith(("Config search path", "provider="))]
        return _cut(message), _cut(f"{rest[0]} {', '.join(options)}")
    return _cut(message), (_cut(rest[0]) if rest else None)


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 1] + "…"


def _names_user_input(error: KeyError) -> bool:
    """KeyErrors that carry a sentence (``KeyError("unknown weights 'x'; ...")``) come from a
    look-up of a name the user gave; a bare key (``KeyError('model')``) is a bug."""
    return bool(error.args) and isinstance(error.args[0], str) and " " in error.args[0]
