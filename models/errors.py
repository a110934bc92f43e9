"""The one exception type for mistakes the user can fix (a bad option, file, name or shape).

Defined in the model library so that both the library and the command-line tools (``train/``)
can raise it without the library importing the app. The tools print it as one line,
``<prog>: error: <message>``, plus ``hint: <hint>`` when there is one, and exit with status 2
(docs/errors.md); ``SPIKEFORMERS_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A one-line ``message`` about the user's input and an optional one-line ``hint`` on how to
    fix it. A ``ValueError``, so code that already catches bad values keeps working."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
