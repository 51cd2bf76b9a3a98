"""Forward passes that must not move BatchNorm's running statistics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Inside the block, every BatchNorm of ``model`` (SyncBatchNorm included) still
    normalises a training forward with its batch's statistics, but leaves its running mean
    and variance (what evaluation uses) as they were: momentum 0 for the duration.

    For auxiliary forwards whose inputs are deliberately off-distribution, e.g. UniMatch's
    feature-perturbation stream, whose dropout-scaled features would otherwise pull the
    decoder's running statistics away from the clean features seen at test time.
    """
    saved: list[tuple[_BatchNorm, float | None, Tensor | None]] = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            count = module.num_batches_tracked
            saved.append((module, module.momentum, None if count is None else count.clone()))
            module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum, count in saved:
            module.momentum = momentum
            if count is not None:  # momentum=None (cumulative average) counts forwards
                assert module.num_batches_tracked is not None
                module.num_batches_tracked.copy_(count)


@contextmanager
def target_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Inside the block, every BatchNorm of ``model`` normalises with the statistics of the
    batch it is given, even in eval mode, and its running statistics stay as they were.

    AdaBN (Li et al., "Revisiting batch normalization for practical domain adaptation", ICLR
    workshop 2017) applied per batch: a teacher in eval mode that sees a target batch
    normalises it by the target's own statistics instead of the source-dominated running ones.
    Dropout and every other module keep their mode.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    modes = [m.training for m in norms]
    with frozen_norm_statistics(model):
        for module in norms:
            module.train()
        try:
            yield
        finally:
            for module, mode in zip(norms, modes, strict=True):
                module.train(mode)
