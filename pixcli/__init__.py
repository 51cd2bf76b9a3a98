"""pixcli: domain-adaptive and label-efficient semantic segmentation from the command line.

``pixcli.load(path)`` gives a :class:`pixcli.predictor.Predictor` for a checkpoint. Importing
``pixcli`` itself is cheap: torch, timm and the training code load only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pixcli.predictor import Predictor

__version__ = "0.1.0"


def load(path: str | Path, device: Any = "auto", **inference: Any) -> Predictor:
    """Load a checkpoint for prediction; see :func:`pixcli.predictor.load` for the options.

    Example: ``mask = pixcli.load("runs/adapt-cpsl/model.pt").predict("street.jpg")``
    """
    from pixcli.predictor import load as load_predictor

    return load_predictor(path, device, **inference)


__all__ = ["__version__", "load"]
