"""``pixcli`` with every BatchNorm of the trained model replaced by an identity (a test tool).

    torchrun --nproc-per-node 2 tests/no_batchnorm_cli.py warmup ...

In training, BatchNorm normalises with the statistics of each process's own batch (on the
CPU, where SyncBatchNorm does not work), so N processes with batch b cannot compute what
one process with batch N * b does. Without it they can, up to float rounding: that is what
``test_distributed.py`` checks, through the real command line under torchrun.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's pixcli

from pixcli.models import Segmentor, SegmentorConfig, build_segmentor  # noqa: E402


def without_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with each ``nn.BatchNorm2d`` child replaced by ``nn.Identity`` (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.Identity())
    return model


def build_without_batchnorm(cfg: SegmentorConfig) -> Segmentor:
    return without_batchnorm(build_segmentor(cfg))  # type: ignore[return-value]


def main() -> None:
    from pixcli.cli import main as pixcli_main
    from stages import warmup

    warmup.build_segmentor = build_without_batchnorm  # type: ignore[assignment]
    pixcli_main()


if __name__ == "__main__":
    main()
