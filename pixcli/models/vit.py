"""Plain ViT backbones (DINOv2, DINOv3, any timm ViT/EVA) as a four-level feature pyramid.

A ViT has one scale: tokens at the patch stride (14 for DINOv2, 16 for DINOv3). The decode
heads want a pyramid at strides 4, 8, 16 and 32 (the DeepLabV3+ and DAFormer heads fuse the
stride-4 map). :class:`ViTBackbone` builds one the way ViTDet does (Li et al., ECCV 2022,
"simple feature pyramid"), with one change: each level comes from a different block, as
DPT/UniMatch V2 read their four levels (blocks 3, 6, 9, 12 of a 12-block ViT: the evenly
spaced quarters of the depth), instead of all four from the last block.

- stride 4: the block's map upsampled 4x by two 2x2 transposed convs (LayerNorm + GELU
  between), to ``D/4`` channels; stride 8: one transposed conv to ``D/2``; stride 16: the
  map itself (``D``); stride 32: 2x2 max-pooling (``D``). ``D`` is the embedding width.
- Any input size: the image is zero-padded at the bottom/right to the patch multiple (zero is
  the mean colour after normalisation), the model runs with ``dynamic_img_size=True`` (timm
  interpolates DINOv2's absolute position embeddings to the grid; DINOv3's RoPE is computed
  for it), and each level is cropped to ``ceil(H / stride) x ceil(W / stride)`` of the
  unpadded input. With patch 16 the levels are exact; with patch 14 a level at 3.5/7/14/28
  is first resampled (bilinear) to the 4/8/16/32 grid of the padded input.
- The blocks' outputs go through the model's final norm (``norm=True``), as DINOv2's
  ``get_intermediate_layers`` gives them to its segmentation heads.

The neck (``levels``: transposed convs, norms) is new, randomly initialised, and trains with
the heads (:meth:`pixcli.models.Segmentor.param_groups`); the ViT itself is ``body``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models import is_model, model_entrypoint
from torch import Tensor, nn

VIT_MODULES = ("timm.models.vision_transformer", "timm.models.eva")
PYRAMID_STRIDES = (4, 8, 16, 32)


def vit_architecture(name: str) -> str | None:
    """The timm architecture of ``name`` (a tag like ``.lvd142m`` and an ``hf-hub:org/``
    prefix removed) when it is a plain ViT (timm's vision_transformer or eva families),
    else None."""
    arch = name.split(":", 1)[1].rsplit("/", 1)[-1] if name.startswith("hf") else name
    arch = arch.split(".", 1)[0]
    if not is_model(arch):
        return None
    return arch if model_entrypoint(arch).__module__ in VIT_MODULES else None


def pyramid_blocks(depth: int) -> list[int]:
    """The blocks the four levels come from: the ends of the depth's four quarters
    (``[2, 5, 8, 11]`` for 12 blocks, ``[5, 11, 17, 23]`` for 24)."""
    return [max(0, depth * (k + 1) // 4 - 1) for k in range(4)]


def _upsample(channels: int, times: int) -> nn.Sequential:
    """``times`` 2x2 stride-2 transposed convs, each halving the channels; LayerNorm + GELU
    between two of them (ViTDet)."""
    layers: list[nn.Module] = []
    for k in range(times):
        if k:
            layers += [LayerNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels // 2, 2, stride=2))
        channels //= 2
    return nn.Sequential(*layers)


class ViTBackbone(nn.Module):
    """A timm ViT (``body``) and a simple pyramid neck: four NCHW maps at strides 4-32.

    Attributes:
        channels: ``[D/4, D/2, D, D]``.
        reductions: ``[4, 8, 16, 32]``.
        nhwc: False (the maps are NCHW).
        blocks: indices of the blocks feeding the levels.
        patch_size: the ViT's patch size.
        depth: the ViT's number of blocks.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        dim = int(body.embed_dim)
        if dim % 4:
            raise ValueError(f"embedding width {dim} is not a multiple of 4")
        self.patch_size = int(body.patch_embed.patch_size[0])
        self.depth = len(body.blocks)
        self.blocks = pyramid_blocks(self.depth)
        self.channels: list[int] = [dim // 4, dim // 2, dim, dim]
        self.reductions: list[int] = list(PYRAMID_STRIDES)
        self.nhwc = False
        self.levels = nn.ModuleList(
            [_upsample(dim, 2), _upsample(dim, 1), nn.Identity(), nn.MaxPool2d(2, ceil_mode=True)]
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        h, w = x.shape[-2:]
        p = self.patch_size
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        unique = sorted(set(self.blocks))
        maps = self.body.forward_intermediates(
            x, indices=unique, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        by_block = dict(zip(unique, maps, strict=True))
        out = []
        for level, block, stride in zip(self.levels, self.blocks, self.reductions, strict=True):
            y = level(by_block[block])
            grid = (math.ceil((h + pad_h) / stride), math.ceil((w + pad_w) / stride))
            if tuple(y.shape[-2:]) != grid:
                y = F.interpolate(y, size=grid, mode="bilinear", align_corners=False)
            out.append(y[..., : math.ceil(h / stride), : math.ceil(w / stride)])
        return out

    def layer_id(self, name: str) -> int:
        """Layer of the body's parameter ``name`` for layer-wise lr decay (BEiT's rule):
        patch/position embeddings and tokens 0, block ``i`` ``i + 1``, the final norm
        ``depth + 1``."""
        first = name.split(".", 1)[0]
        if first == "blocks":
            return int(name.split(".")[1]) + 1
        if first in ("norm", "fc_norm", "head", "head_drop"):
            return self.depth + 1
        return 0

    @property
    def num_layers(self) -> int:
        """Number of layer ids (``depth + 2``)."""
        return self.depth + 2
