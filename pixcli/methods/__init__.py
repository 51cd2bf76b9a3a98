"""Adaptation methods as plug-ins of the self-training loop: name -> class."""

from __future__ import annotations

from pixcli.methods.base import Method, MethodSetup, StepContext
from pixcli.methods.cpsl import CPSL
from pixcli.methods.distill import Distill
from pixcli.methods.ipixmatch import IPixMatch
from pixcli.methods.pgpc import PGPC
from pixcli.methods.pixl import PiXL

METHODS: dict[str, type[Method]] = {
    "none": Method,
    "cpsl": CPSL,
    "pgpc": PGPC,
    "pixl": PiXL,
    "ipixmatch": IPixMatch,
    "distill": Distill,
}

__all__ = ["METHODS", "Method", "MethodSetup", "StepContext"]
