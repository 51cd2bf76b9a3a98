"""Errors that are the user's to fix.

A :class:`UserError` is printed as one line on stderr and ends the command with exit
code 2 (see ``pixcli.cli``). Anything else is a bug and exits 1 with a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a missing or malformed file, an unknown option value, a mismatch.

    The message must name the file or option and the problem in one line. Raised in a
    DataLoader worker, it reaches the main process as the same one line: torch re-raises
    it there as ``UserError("Caught UserError in DataLoader worker ... Traceback ...")``,
    and the original message is taken back out of that traceback's last line.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(_from_worker(str(message)))


def _from_worker(message: str) -> str:
    """The original message of a UserError re-raised from a DataLoader worker, else
    ``message`` unchanged."""
    if not message.startswith("Caught UserError") or "Traceback" not in message:
        return message
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    lines = message.rstrip().splitlines()
    for k in range(len(lines) - 1, -1, -1):
        if lines[k].startswith(marker):
            return " ".join([lines[k][len(marker) :], *lines[k + 1 :]]).strip()
    return lines[-1].strip()


class Interrupted(Exception):
    """Ctrl-C during a stage; what was done so far has been saved (exit code 130).

    Defined here rather than in the training loop so that the command line can catch it
    without importing torch (``pixcli --help`` stays fast). ``terminated``: it was SIGTERM
    (exit code 143), not Ctrl-C.
    """

    def __init__(self, message: str = "", terminated: bool = False) -> None:
        super().__init__(message)
        self.terminated = terminated


class Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM preemption, ``kill``), raised where Ctrl-C would raise
    ``KeyboardInterrupt`` once :func:`sigterm_as_interrupt` is installed, so that every stage
    saves its work the same way; the command then exits 143 (128 + SIGTERM) instead of 130."""


EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


def exit_code(exc: BaseException) -> int:
    """143 for a SIGTERM (directly or as the cause of an ``Interrupted``), else 130."""
    terminated = isinstance(exc, Terminated) or (isinstance(exc, Interrupted) and exc.terminated)
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def sigterm_as_interrupt() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (like Ctrl-C)."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, handler)
