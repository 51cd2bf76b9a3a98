"""What the teacher's pseudo labels are worth during a run (issue 17's diagnostics).

When the unlabelled stream has labels (the built-in benchmark, an oracle study), each step
compares the pseudo labels the student is trained on (after the method's hook: CPSL's
rectified labels, for one) with the true labels of the same crop. Over a window of the last
``window`` steps it reports:

- ``pl_mIoU``: mIoU of the pseudo labels (classes present in the window, as ``eval``);
- ``pl_confident``: the share of pixels whose teacher max-probability exceeds the threshold;
- ``pl_confident_acc``: the accuracy of the pseudo labels on those confident pixels;
- per class (``per_class()``, written to ``train_log.jsonl`` on log steps): IoU.

Pixels without a true label (255, padding) are left out, and so are pixels the method leaves
without a pseudo label (255: CPSL's and distillation's unconfident pixels; they are not
trained on): ``pl_ignored`` is their share of the labelled pixels, reported when there are
any. On a stream without labels the monitor reports nothing.

The loop keeps a second monitor with ``prefix = "pl_teacher"`` for the teacher's own labels
before the method's hook, fed only on steps where the method changed them: with CPSL,
``pl_teacher_mIoU`` against ``pl_mIoU`` says whether the rectification made the labels better
or worse.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.engine.metrics import confusion_matrix


class PseudoLabelMonitor:
    """Sliding-window confusion of pseudo labels against true labels."""

    def __init__(
        self, class_names: Sequence[str], threshold: float, window: int = 20, prefix: str = "pl"
    ) -> None:
        self.class_names = list(class_names)
        self.prefix = prefix  # of every key: pl_mIoU, pl_confident, ... (pl_IoU per class)
        self.threshold = threshold
        self.steps: deque[tuple[Tensor, int, int, int, int]] = deque(maxlen=max(1, window))

    def update(self, pseudo_label: Tensor, confidence: Tensor, label: Tensor) -> None:
        """One step: (B, H, W) pseudo labels, teacher max-probabilities and true labels."""
        known = label != IGNORE_INDEX
        if not bool(known.any()):
            return
        n = len(self.class_names)
        ignored = (pseudo_label == IGNORE_INDEX) & known
        pred = pseudo_label.masked_fill(pseudo_label == IGNORE_INDEX, 0)
        conf = confusion_matrix(pred.cpu(), label.masked_fill(ignored, IGNORE_INDEX).cpu(), n)
        confident = (confidence > self.threshold) & known
        correct = confident & (pseudo_label == label)
        counts = (known.sum(), confident.sum(), correct.sum(), ignored.sum())
        self.steps.append((conf, *(int(c) for c in counts)))

    def _iou(self) -> np.ndarray:
        conf = sum(s[0] for s in self.steps).double().numpy()
        tp = np.diag(conf)
        union = conf.sum(0) + conf.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / union * 100, np.nan)

    def summary(self) -> dict[str, float]:
        """The window's headline figures (empty before any labelled pixel was seen)."""
        if not self.steps:
            return {}
        iou = self._iou()
        known = sum(s[1] for s in self.steps)
        confident = sum(s[2] for s in self.steps)
        correct = sum(s[3] for s in self.steps)
        out = {"confident": 100.0 * confident / known}
        if not np.isnan(iou).all():  # every pixel left without a pseudo label: no mIoU
            out["mIoU"] = float(np.nanmean(iou))
        if confident:
            out["confident_acc"] = 100.0 * correct / confident
        ignored = sum(s[4] for s in self.steps)
        if ignored:
            out["ignored"] = 100.0 * ignored / known
        return {f"{self.prefix}_{k}": v for k, v in out.items()}

    def per_class(self) -> dict[str, float | None]:
        """IoU per class over the window (None for a class absent from it)."""
        if not self.steps:
            return {}
        return {
            name: (None if np.isnan(v) else round(float(v), 2))
            for name, v in zip(self.class_names, self._iou(), strict=True)
        }
