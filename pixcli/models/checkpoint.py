"""A :class:`~pixcli.models.Segmentor` rebuilt from a pixcli checkpoint (``model.pt``)."""

from __future__ import annotations

from pathlib import Path

from pixcli.artifacts import check_finite, load_checkpoint
from pixcli.errors import UserError
from pixcli.models.segmentor import Segmentor, SegmentorConfig, build_segmentor


def segmentor_from_checkpoint(path: Path) -> tuple[Segmentor, dict]:
    """The model stored in ``path`` (on the CPU, in eval mode) and the checkpoint dict.

    The stored configuration keeps ``pretrained`` / ``weights_file`` (L_FD's ImageNet copy
    needs them), but the checkpoint's weights replace the backbone's, so neither is loaded:
    a checkpoint made elsewhere needs neither internet nor the original weights file. Any
    problem is a one-line :class:`UserError` naming ``path``.
    """
    ckpt = load_checkpoint(path)
    try:
        cfg = SegmentorConfig.from_dict(ckpt["model_config"])
    except (TypeError, KeyError) as exc:
        raise UserError(f"{path}: checkpoint has an unknown model configuration ({exc})") from None
    if len(ckpt["classes"]) != cfg.num_classes:
        raise UserError(
            f"{path}: names {len(ckpt['classes'])} classes but its model predicts "
            f"{cfg.num_classes}; the checkpoint is inconsistent"
        )
    check_finite(path, ckpt["state_dict"])
    model = build_segmentor(cfg, load_weights=False)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path}: weights do not fit the stored architecture ({first})") from None
    return model.eval(), ckpt
