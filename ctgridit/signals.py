"""Stopping cleanly on Ctrl-C, SIGTERM and SIGHUP.

Python turns Ctrl-C (SIGINT) into :class:`KeyboardInterrupt`, which unwinds the
stack: every ``with atomic_output(...)``, temporary folder and checkpoint write
removes its half-written files on the way out. SIGTERM and SIGHUP kill the
process on the spot by default, leaving those files behind. Here they raise
:class:`Stopped` (a ``KeyboardInterrupt``) instead, so the three signals end
alike: the same clean-up, one ``error:`` line, exit code ``128 + signal``.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

#: The signals turned into :class:`Stopped`, with the word the error line uses.
HANDLED = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
if hasattr(signal, "SIGHUP"):
    HANDLED[signal.SIGHUP] = "hung up"


class Stopped(KeyboardInterrupt):
    """A stop requested by a signal; ``exit_code`` is ``128 + signal number``."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(HANDLED.get(signum, f"signal {signum}"))
        self.signum = int(signum)

    @property
    def reason(self) -> str:
        return HANDLED.get(self.signum, f"stopped by signal {self.signum}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


#: The last stop a signal asked for (libraries may swallow the exception itself: typer turns it into exit 130).
received: Stopped | None = None


#: Inside :func:`deferred`: how deep, and the stop that arrived meanwhile.
_deferring = 0
_pending: Stopped | None = None


def _raise(signum, frame) -> None:
    global received, _pending
    received = Stopped(signum)
    if _deferring:                       # a few renames that must all happen: stop right after them
        _pending = received
        return
    raise received


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a signal does not interrupt: a stop that arrives inside is raised when it ends (Python runs signal
    handlers in the main thread, so this holds whichever thread the signal reached)."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            stop, _pending = _pending, None
            raise stop


def install_handlers() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Stopped` (in the main thread only)."""
    for signum in HANDLED:
        try:
            signal.signal(signum, _raise)
        except (ValueError, OSError):  # not the main thread, or a platform without the signal
            pass


def stop_of(error: BaseException | None = None) -> Stopped:
    """The :class:`Stopped` behind ``error`` (following causes), else the last one received, else SIGINT."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, Stopped):
            return seen
        seen = seen.__cause__ or seen.__context__
    return received if received is not None else Stopped(signal.SIGINT)
