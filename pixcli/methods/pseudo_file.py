"""What methods reading ``pseudo.h5`` share: opening it for the unlabelled data, and cutting
each image's soft labels to the training crop its batch shows."""

from __future__ import annotations

import torch
from torch import Tensor

from pixcli.data.training_set import geometry_from_tensor
from pixcli.engine.progress import console
from pixcli.errors import UserError
from pixcli.methods.base import MethodSetup, StepContext
from pixcli.pseudo_labels import PseudoLabelFile


class PseudoSoftLabels:
    """The ``pseudo.h5`` of ``setup``, checked against the unlabelled dataset.

    Refused (UserError): no file or no unlabelled data, a file made from other target data
    (its ``dataset_fingerprint``), other classes than the target's, a target image without
    pseudo labels. A file made by another checkpoint than the run's gets a warning (it may
    be on purpose: labels from a stronger model), unless ``from_other_model`` says that is
    the design (distillation: the teacher's labels, the student's checkpoint).
    ``rows[i]`` is the file's row of dataset index ``i``.
    """

    def __init__(self, setup: MethodSetup, method: str, from_other_model: bool = False) -> None:
        if setup.pseudo is None or setup.unlabelled is None:
            raise UserError(
                f"--method {method} needs --pseudo pseudo.h5 and unlabelled target data"
            )
        self.file = PseudoLabelFile(setup.pseudo)
        made_from = self.file.header
        if setup.target_fingerprint and made_from.dataset_fingerprint != setup.target_fingerprint:
            raise UserError(
                f"{setup.pseudo}: made from target data with fingerprint "
                f"{made_from.dataset_fingerprint} ({made_from.dataset}), but this run's target "
                f"has fingerprint {setup.target_fingerprint}; run pixcli pseudolabel on it"
            )
        other = (
            setup.checkpoint_fingerprint and made_from.checkpoint != setup.checkpoint_fingerprint
        )
        if other and not from_other_model:
            console.print(
                f"warning: {setup.pseudo} was made by checkpoint {made_from.checkpoint}, not by "
                f"--checkpoint ({setup.checkpoint_fingerprint})",
                highlight=False,
                soft_wrap=True,
            )
        if list(self.file.classes) != [str(c) for c in setup.unlabelled.taxonomy.classes]:
            raise UserError(f"{setup.pseudo}: made for other classes than the target's")
        names = [item[2] for item in setup.unlabelled.items]
        known = set(self.file.names)
        missing = [n for n in names if n not in known]
        if missing:
            raise UserError(f"{setup.pseudo}: no pseudo label for target image '{missing[0]}'")
        self.rows = [self.file.index(n) for n in names]

    def crops(self, ctx: StepContext) -> Tensor:
        """The soft labels of the step's unlabelled images, each cut to its training crop
        (``PseudoLabelFile.soft_crop``): ``B x C x h x w``; padding pixels are all zero."""
        assert ctx.unlabelled_index is not None and ctx.unlabelled_geometry is not None
        assert ctx.unlabelled_image is not None
        maps = []
        for index, row in zip(ctx.unlabelled_index, ctx.unlabelled_geometry, strict=True):
            g = geometry_from_tensor(row)
            maps.append(
                self.file.soft_crop(
                    self.rows[int(index)],
                    g.resized,
                    g.top,
                    g.left,
                    g.crop,
                    g.flip,
                    ctx.unlabelled_image.device,
                )  # fmt: skip
            )
        return torch.stack(maps)
