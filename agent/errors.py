"""The errors a user or a caller sees, in one place: each carries the one line that says what went wrong.

``AttemptFailed`` (the update job failed), ``CommandFailed`` (a command could not be carried out), ``Refused``
(a command refused once acting could tell, by the reboot plan or a rollback: ``machine.Refuse`` as an exception)
and ``describe``, which turns any exception into the one line ``LastError`` shows.
"""
from __future__ import annotations

from .boot import BootError
from .logind import LogindError
from .slots import SlotError


class AttemptFailed(Exception):
    """The update job failed; the message is the one-line reason (also in ``LastError``)."""


class CommandFailed(Exception):
    """A command could not be carried out; the message is the one line a user sees."""


class Refused(Exception):
    """A command refused once acting could tell (a ``machine.Refuse`` carried as an exception to the owner)."""

    def __init__(self, refuse):
        super().__init__(refuse.reason)
        self.refuse = refuse


EXPECTED = (BootError, SlotError, AttemptFailed, CommandFailed, LogindError)


def describe(exc: BaseException) -> str:
    """One line for ``LastError``: the adapters' own messages as they are, anything else named."""
    if isinstance(exc, EXPECTED):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return f"internal error: {type(exc).__name__}: {str(exc)[:200]}"
