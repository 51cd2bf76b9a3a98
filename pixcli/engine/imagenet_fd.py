"""The frozen ImageNet backbone and the student pass that L_FD needs (DAFormer Eq. 8, PiXL
Eq. 13-14); the maths is in :mod:`pixcli.losses.feature_distance`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pixcli.engine.runtime import unwrap
from pixcli.errors import UserError
from pixcli.losses.feature_distance import feature_distance, thing_mask
from pixcli.models.backbone import create_backbone
from pixcli.models.segmentor import SegOutput


def has_imagenet_weights(model: nn.Module) -> bool:
    """True when ``model`` (possibly DDP-wrapped) was built with ``pretrained`` or
    ``weights_file``: its backbone started from ImageNet weights."""
    cfg = getattr(unwrap(model), "config", None)
    return cfg is not None and bool(cfg.pretrained or cfg.weights_file)


class ImageNetFeatureDistance:
    """A frozen copy of ``model``'s backbone with its ImageNet weights (rebuilt from the
    model's ``pretrained`` / ``weights_file``) and L_FD against it.

    A plain object, not a module: the copy is never trained nor checkpointed. ``name``
    prefixes the error messages (the config key, e.g. ``self_training.fd_thing_classes``).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        thing_classes: tuple[int, ...],
        min_ratio: float = 0.75,
        name: str = "fd_thing_classes",
    ) -> None:
        if not has_imagenet_weights(model):
            raise UserError(
                f"{name}: the ImageNet feature distance needs a model built with "
                "model.pretrained or model.weights_file (ImageNet weights to compare with)"
            )
        cfg = unwrap(model).config
        bad = [c for c in thing_classes if not 0 <= c < cfg.num_classes]
        if bad:
            raise UserError(
                f"{name}: class {bad[0]} is outside the model's {cfg.num_classes} classes; "
                "set the thing classes or turn the feature distance off"
            )
        self.thing_classes, self.min_ratio = tuple(thing_classes), min_ratio
        backbone = create_backbone(
            cfg.backbone, pretrained=cfg.pretrained, weights_file=cfg.weights_file,
            output_stride=cfg.output_stride, kwargs=cfg.backbone_kwargs,
        )  # fmt: skip
        self.backbone = backbone.to(device).eval().requires_grad_(False)

    def __call__(
        self, student: nn.Module, image: Tensor, label: Tensor
    ) -> tuple[SegOutput, Tensor]:
        """The student on ``image`` and L_FD between its last backbone map and the frozen
        ImageNet backbone's, on the thing cells of ``label`` ``(B, H, W)``."""
        captured: list[Tensor] = []
        backbone = unwrap(student).backbone
        handle = backbone.register_forward_hook(lambda _m, _i, out: captured.append(out[-1]))
        try:
            output = student(image)
        finally:
            handle.remove()
        with torch.no_grad():
            reference = self.backbone(image)[-1]
        grid = (reference.shape[-2], reference.shape[-1])
        mask = thing_mask(label, grid, self.thing_classes, self.min_ratio)
        return output, feature_distance(captured[-1], reference, mask)
