"""The backbone: any timm model created with ``features_only=True``, or a plain ViT.

timm gives every model the same contract: ``model(x)`` returns one feature map per stage and
``model.feature_info`` names their channels and strides. :class:`Backbone` adds one thing:
feature maps are always NCHW (timm's Swin and MambaOut return NHWC). Plain ViTs (DINOv2,
DINOv3, any model of timm's vision_transformer and eva families) have one scale; they are
built whole and given a four-level pyramid by :class:`pixcli.models.vit.ViTBackbone`.

Weights come from timm's registry (``pretrained=True``, needs internet or timm's cache) or
from a local file. A local file goes through timm's own pretrained loader,
``create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``, because that
path applies the model's key remapping: SegFormer/DAFormer ``mit_b*.pth`` files load into
timm's ``pvt_v2_b*`` this way (``pvt_v2_b5`` is MiT-B5). ``checkpoint_path=`` skips the
remapping and fails on those files.

timm loads a file non-strictly into a ``features_only`` model (it logs, not raises, on missing
keys), so a file for another architecture would silently leave the backbone random. We check
that every weight tensor (ndim >= 2) changed from its random initialisation.

Registry weights come from the Hugging Face Hub. Offline, huggingface_hub retries for about a
minute before failing; so before asking timm, a weights file missing from the local cache is
looked for with one request of at most :data:`HUB_PROBE_TIMEOUT` seconds, and a failure is
one line saying how to give the file instead (``HF_HUB_OFFLINE=1`` fails at once).
"""

from __future__ import annotations

import difflib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from pixcli.errors import UserError
from pixcli.models.vit import ViTBackbone, vit_architecture

OUTPUT_STRIDES = (8, 16, 32)
HUB_PROBE_TIMEOUT = 3.0  # seconds: the one request that tells whether the Hub is reachable
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")

# The field's names for timm models: name -> (timm name, what it is).
ALIASES: dict[str, tuple[str, str]] = {
    **{
        f"{family}_b{k}": (f"pvt_v2_b{k}", f"timm's name for MiT-B{k}, SegFormer's encoder")
        for family in ("mit", "segformer")
        for k in range(6)
    },
    **{
        f"dinov2_vit{s}14{reg}": (
            f"vit_{size}_patch14{'_reg4' if reg else ''}_dinov2",
            f"DINOv2 ViT-{s.upper()}/14{' with registers' if reg else ''}",
        )
        for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
        for reg in ("", "_reg")
    },
    **{
        f"dinov3_vit{s}16{plus}": (
            f"vit_{size}_patch16_dinov3",
            f"DINOv3 ViT-{s.upper()}{'+' if plus else ''}/16",
        )
        for s, plus, size in (
            ("s", "", "small"),
            ("s", "plus", "small_plus"),
            ("b", "", "base"),
            ("l", "", "large"),
            ("h", "plus", "huge_plus"),
            ("7b", "", "7b"),
        )
    },
}


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
    kwargs: dict[str, Any] | None = None,
) -> Backbone | ViTBackbone:
    """Create timm model ``name`` as a :class:`Backbone` (a plain ViT as a
    :class:`~pixcli.models.vit.ViTBackbone`).

    Args:
        name: any timm model name (``timm.list_models()``), optionally with a pretrained tag,
            or ``hf-hub:ORG/REPO``.
        pretrained: load timm's registry weights (ignored when ``weights_file`` is given).
        weights_file: a local ``.pth``/``.bin``/``.safetensors`` file, loaded with timm's
            key remapping (e.g. SegFormer ``mit_b5.pth`` for ``pvt_v2_b5``).
        output_stride: 8 or 16 dilate the last stages (ResNet-like models); None keeps the
            model's own stride (usually 32). Not for ViTs (their pyramid is 4-32).
        kwargs: more keyword arguments for ``timm.create_model`` (e.g. ``drop_path_rate``,
            or ``depth``/``embed_dim`` for a smaller model of a family).

    Raises:
        UserError: unknown model name, missing or mismatched weights file, weights that
            cannot be fetched, or an ``output_stride`` the model does not support.
    """
    _check_model_name(name)
    vit = vit_architecture(name) is not None
    options: dict[str, Any] = dict(kwargs or {})
    if vit:
        if output_stride is not None:
            raise UserError(
                f"backbone '{name}' is a ViT: its pyramid has strides 4-32; leave "
                "model.output_stride unset"
            )
        options.update(dynamic_img_size=True, num_classes=0)
    else:
        options["features_only"] = True
        if output_stride is not None:
            options["output_stride"] = output_stride
    if name.startswith(_HUB_PREFIXES[:2]):
        _require_hub(name, name.split(":", 1)[1], ("config.json",))
    if weights_file is not None:
        body = _create_from_file(name, Path(weights_file), options)
    elif pretrained:
        body = _create_pretrained(name, options)
    else:
        body = _create(name, options)
    return _wrap(name, body, vit)


def _wrap(name: str, body: nn.Module, vit: bool) -> Backbone | ViTBackbone:
    if not vit:
        return Backbone(body)
    if not hasattr(body, "forward_intermediates"):
        raise UserError(f"backbone '{name}': this timm ViT cannot return its blocks' outputs")
    try:
        return ViTBackbone(body)
    except ValueError as err:
        raise UserError(f"backbone '{name}': {err}") from None


def _check_model_name(name: str) -> None:
    if name.startswith(_HUB_PREFIXES) or timm.is_model(name):
        return
    close = suggestions(name)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(
        f"unknown backbone '{name}': {hint}"
        f"list timm models with python -c \"import timm; print(timm.list_models('*{name[:6]}*'))\""
    )


def suggestions(name: str) -> list[str]:
    """timm names for an unknown ``name``: the field's alias first (``segformer_b2`` ->
    ``pvt_v2_b2``, ``dinov2_vits14`` -> ``vit_small_patch14_dinov2``), then close names."""
    key = name.lower().replace("-", "_").split(".", 1)[0]
    alias = [f"{ALIASES[key][0]} ({ALIASES[key][1]})"] if key in ALIASES else []
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    return alias + [c for c in close if not alias or c != ALIASES[key][0]][: 3 - len(alias)]


def _create(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with a clear error for an unsupported ``output_stride``."""
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, AssertionError) as err:
        if "output_stride" not in kwargs:
            raise UserError(f"cannot create backbone '{name}' ({_reason(err)})") from err
        raise UserError(
            f"backbone '{name}' does not support output_stride={kwargs['output_stride']} "
            f"(ResNet-like timm models support {OUTPUT_STRIDES}); leave it unset"
        ) from err


def _create_pretrained(name: str, kwargs: dict[str, Any]) -> nn.Module:
    cfg = None if name.startswith(_HUB_PREFIXES) else timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        _require_hub(name, cfg.hf_hub_id, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else None)
    try:
        return _create(name, {**kwargs, "pretrained": True})
    except (OSError, RuntimeError) as err:
        raise UserError(
            f"cannot load timm's pretrained weights for backbone '{name}' ({_reason(err)}); "
            "without internet, copy the weights file here and set weights_file"
        ) from err


def _require_hub(name: str, repo_id: str, files: tuple[str, ...] | None) -> None:
    """Return when one of ``files`` of Hub repo ``repo_id`` is cached or the Hub answers
    within :data:`HUB_PROBE_TIMEOUT`; else one line saying how to give a local file."""
    from huggingface_hub import constants, try_to_load_from_cache

    for file in files or _HUB_WEIGHT_FILES:
        if isinstance(try_to_load_from_cache(repo_id, file), str):
            return
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        try:
            request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
            urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT).close()
            return
        except urllib.error.HTTPError as err:  # something answered, not the Hub's 200
            why = f"{constants.ENDPOINT} answered HTTP {err.code}"
        except (OSError, ValueError) as err:
            why = f"{constants.ENDPOINT} unreachable: {_reason(getattr(err, 'reason', err), 80)}"
    file = (files or _HUB_WEIGHT_FILES)[0]
    raise UserError(
        f"cannot download the weights of backbone '{name}' ({why}); fetch "
        f"{constants.ENDPOINT}/{repo_id}/resolve/main/{file} elsewhere and give it with "
        "--weights-file FILE (model.weights_file), or set HF_HOME to a cache holding it"
    )


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
