"""What the command-line tools share, so the five read alike.

Each tool is a ``main(argv: list[str] | None = None) -> int`` in its own module of this package
(``python -m spikeformers.train.<module>`` runs the same function as the console script). It
parses its arguments with argparse and ends on errors the user can fix with
``<prog>: error: <message>`` and exit status 2 (:func:`exit_with_error`), as argparse does.
``spikeformers-train`` is the exception: Hydra owns its command line (multirun, launchers, run
folders).
"""

from __future__ import annotations

import sys
from typing import NoReturn

from omegaconf import DictConfig

__all__ = ["USER_ERRORS", "compose_config", "exit_with_error"]

# Errors that mean "fix the command line or the files it names", not a bug: no traceback.
USER_ERRORS = (ValueError, FileNotFoundError)


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


def exit_with_error(prog: str, error: BaseException | str) -> NoReturn:
    """Print ``error`` the way argparse does and exit with its status (2)."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    raise SystemExit(2)
