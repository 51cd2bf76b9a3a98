"""The backbone: any timm model created with ``features_only=True``.

timm gives every model the same contract: ``model(x)`` returns one feature map per stage and
``model.feature_info`` names their channels and strides. :class:`Backbone` adds one thing:
feature maps are always NCHW (timm's Swin and MambaOut return NHWC).

Weights come from timm's registry (``pretrained=True``, needs internet or timm's cache) or
from a local file. A local file goes through timm's own pretrained loader,
``create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``, because that
path applies the model's key remapping: SegFormer/DAFormer ``mit_b*.pth`` files load into
timm's ``pvt_v2_b*`` this way (``pvt_v2_b5`` is MiT-B5). ``checkpoint_path=`` skips the
remapping and fails on those files.

timm loads a file non-strictly into a ``features_only`` model (it logs, not raises, on missing
keys), so a file for another architecture would silently leave the backbone random. We check
that every weight tensor (ndim >= 2) changed from its random initialisation.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from pixcli.errors import UserError

OUTPUT_STRIDES = (8, 16, 32)
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


class Backbone(nn.Module):
    """A timm ``features_only`` model whose outputs are always NCHW.

    Attributes:
        channels: channels of each returned feature map (``feature_info.channels()``).
        reductions: stride of each returned feature map wrt the input
            (``feature_info.reduction()``; accounts for ``output_stride`` dilation).
        nhwc: the timm model returns NHWC maps, permuted here to NCHW.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.channels: list[int] = list(body.feature_info.channels())
        self.reductions: list[int] = list(body.feature_info.reduction())
        fmt = getattr(body, "output_fmt", "NCHW")
        self.nhwc = str(getattr(fmt, "value", fmt)) == "NHWC"

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.body(x)
        if self.nhwc:
            return [f.permute(0, 3, 1, 2) for f in feats]
        return list(feats)


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights_file: str | Path | None = None,
    output_stride: int | None = None,
) -> Backbone:
    """Create timm model ``name`` as a :class:`Backbone`.

    Args:
        name: any timm model name (``timm.list_models()``), optionally with a pretrained tag.
        pretrained: load timm's registry weights (ignored when ``weights_file`` is given).
        weights_file: a local ``.pth``/``.bin``/``.safetensors`` file, loaded with timm's
            key remapping (e.g. SegFormer ``mit_b5.pth`` for ``pvt_v2_b5``).
        output_stride: 8 or 16 dilate the last stages (ResNet-like models); None keeps the
            model's own stride (usually 32).

    Raises:
        UserError: unknown model name, missing or mismatched weights file, weights that
            cannot be fetched, or an ``output_stride`` the model does not support.
    """
    _check_model_name(name)
    kwargs: dict[str, Any] = {"features_only": True}
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    if weights_file is not None:
        return Backbone(_create_from_file(name, Path(weights_file), kwargs))
    if pretrained:
        return Backbone(_create_pretrained(name, kwargs))
    return Backbone(_create(name, kwargs))


def _check_model_name(name: str) -> None:
    if name.startswith(_HUB_PREFIXES) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(
        f"unknown backbone '{name}': {hint}"
        f"list timm models with python -c \"import timm; print(timm.list_models('*{name[:6]}*'))\""
    )


def _create(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with a clear error for an unsupported ``output_stride``."""
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, AssertionError) as err:
        if "output_stride" not in kwargs:
            raise
        raise UserError(
            f"backbone '{name}' does not support output_stride={kwargs['output_stride']} "
            f"(ResNet-like timm models support {OUTPUT_STRIDES}); leave it unset"
        ) from err


def _create_pretrained(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return _create(name, {**kwargs, "pretrained": True})
    except (OSError, RuntimeError) as err:
        raise UserError(
            f"cannot load timm's pretrained weights for backbone '{name}' ({_reason(err)}); "
            "without internet, copy the weights file here and set weights_file"
        ) from err


def _create_from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """Load ``path`` through timm's pretrained loader and check that it filled the model."""
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = _create(name, kwargs).state_dict()
        torch.manual_seed(0)
        try:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
        except Exception as err:  # torch.load/safetensors/load_state_dict raise many types
            raise UserError(
                f"cannot load weights file {path} into backbone '{name}' ({_reason(err)})"
            ) from err
    _check_loaded(model, reference, name, path)
    return model


def _check_loaded(model: nn.Module, reference: dict[str, Tensor], name: str, path: Path) -> None:
    """Raise if some weight tensor still equals its (seeded) random initialisation."""
    weights = {k: v for k, v in model.state_dict().items() if v.ndim >= 2}
    stale = [k for k, v in weights.items() if torch.equal(v, reference[k])]
    if stale:
        raise UserError(
            f"weights file {path} does not fit backbone '{name}': {len(stale)} of "
            f"{len(weights)} weight tensors are not in it (first: {stale[0]})"
        )


def _reason(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line, with its type: ``KeyError: 101``."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
