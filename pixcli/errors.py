"""Errors that are the user's to fix.

A :class:`UserError` is printed as one line on stderr and ends the command with exit
code 2 (see ``pixcli.cli``). Anything else is a bug and exits 1 with a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a missing or malformed file, an unknown option value, a mismatch.

    The message must name the file or option and the problem in one line.
    """


class Interrupted(Exception):
    """Ctrl-C during a stage; what was done so far has been saved (exit code 130).

    Defined here rather than in the training loop so that the command line can catch it
    without importing torch (``pixcli --help`` stays fast).
    """
