"""Ctrl-C and SIGTERM during training: stop at a step boundary.

A signal that lands inside a step (after ``optimizer.step()``, before the loop counts the
step) would leave weights one update ahead of the saved step, and the resumed run would
differ from an uninterrupted one. So while :class:`StopRequest` is active the first SIGINT
or SIGTERM only records itself; the loop finishes the step, saves ``last.pt`` and stops. A
second signal stops at once (for a step that hangs). Outside the main thread (where Python
allows no handlers) nothing changes.

Under torchrun a signal may reach one rank only (``kill`` of one process, a scheduler that
signals the process it started) or reach the ranks in different steps. A rank that stopped
alone would leave the others waiting in their next collective forever, so the decision is
taken together: :meth:`StopRequest.agree` runs after every step on every rank, shares what
each has received (an ``all_reduce``) and all ranks stop after the same step, where rank 0
saves ``last.pt``.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from pixcli.engine.runtime import Runtime
from pixcli.errors import Terminated


class StopRequest:
    """Context manager: ``signum`` is the first SIGINT/SIGTERM received while active."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.agreed = False  # every rank decided to stop after the same step (agree)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second one: at once
            if signum == signal.SIGTERM:
                raise Terminated(f"terminated by signal {signum}")
            raise KeyboardInterrupt
        self.signum = signum

    def agree(self, runtime: Runtime) -> bool:
        """Stop after this step? The same answer on every rank: under torchrun each rank's
        signal number (0 for none) is ``all_reduce``-d with MAX, so that a signal on any rank
        stops all of them, SIGTERM (15) winning over SIGINT (2). Every rank must call it
        after the same steps (it is a collective)."""
        if runtime.distributed:
            flag = torch.tensor([self.signum or 0], dtype=torch.int32, device=runtime.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        self.agreed = self.requested
        return self.agreed

    @property
    def requested(self) -> bool:
        """A signal has arrived: stop after this step."""
        return self.signum is not None

    @property
    def terminated(self) -> bool:
        """The signal was SIGTERM (exit code 143) rather than Ctrl-C (130)."""
        return self.signum == signal.SIGTERM
