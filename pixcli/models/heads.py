"""Decode heads (backbone features -> pixel features) and the projection head.

Every decode head is built from the backbone's ``channels`` and ``reductions`` (timm's
``feature_info``) and ``feature_dim``; it returns decoder pixel features
``B x feature_dim x h x w`` at its ``output_stride``. The classifier (dropout + 1x1 conv) and
the projection head live in :class:`pixcli.models.Segmentor`, so every head shares them.

``HEADS`` maps a head name to its factory; it is the only registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixcli.errors import UserError
from pixcli.models.layers import ASPP, conv_bn_relu, resize

FINE_STRIDE = 4  # stride of the low-level features the decoders fuse (the papers' 1/4 scale)


class DecodeHead(nn.Module):
    """Contract of a decode head: ``forward(features) -> B x out_channels x h x w``."""

    out_channels: int
    output_stride: int


def fine_index(reductions: Sequence[int]) -> int:
    """Index of the highest-resolution stage with stride >= 4 (the last stage if none)."""
    candidates = [i for i, r in enumerate(reductions) if r >= FINE_STRIDE]
    if not candidates:
        return len(reductions) - 1
    return min(candidates, key=lambda i: reductions[i])


class DeepLabV2Head(DecodeHead):
    """DeepLabV2's ASPP (Chen et al., TPAMI 2017), the model of CPSL and ProDA.

    On the last backbone stage, four 3x3 convs with dilations (6, 12, 18, 24), each to
    ``feature_dim`` channels, are summed, then BatchNorm and ReLU give the pixel features.

    Choice: the original DeepLabV2 sums the branches' *class scores*, which leaves no pixel
    features for prototypes; here the branches produce features, summed before the shared
    1x1 classifier. (ProDA's released code, which CPSL builds on, goes further: it
    concatenates a 1x1 branch and the four dilated branches with GroupNorm, an SE block and a
    3x3 bottleneck.) The output stride is the backbone's: use ``output_stride=8`` for the
    papers' dilated ResNet-101.
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        feature_dim: int,
        dilations: Sequence[int] = (6, 12, 18, 24),
    ) -> None:
        super().__init__()
        self.out_channels = feature_dim
        self.output_stride = reductions[-1]
        self.branches = nn.ModuleList(
            nn.Conv2d(channels[-1], feature_dim, 3, padding=d, dilation=d, bias=False)
            for d in dilations
        )
        self.norm = nn.BatchNorm2d(feature_dim)

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = feats[-1]
        summed = self.branches[0](x)
        for branch in self.branches[1:]:
            summed = summed + branch(x)
        return F.relu(self.norm(summed))


def aspp_dilations(stride: int, base: Sequence[int] = (6, 12, 18)) -> tuple[int, ...]:
    """DeepLabV3 dilations for features at ``stride``: (6, 12, 18) at 16, doubled at 8."""
    return tuple(max(1, round(d * 16 / stride)) for d in base)


class DeepLabV3PlusHead(DecodeHead):
    """DeepLabV3+ decoder (Chen et al., ECCV 2018), PiXL's CNN variant and IPixMatch's model.

    ASPP on the last stage (1x1, three 3x3 atrous convs with :func:`aspp_dilations`, image
    pooling; concatenated and projected to 256), upsampled to the stride-4 stage, whose
    features are reduced to 48 channels; concatenation, then two 3x3 conv-BN-ReLU give
    ``feature_dim`` pixel features at stride 4. The plain-conv ASPP follows the ResNet
    DeepLabV3+ of UniMatch, which IPixMatch builds on. ``image_pool = false``
    (``model.head_kwargs``) drops the image-level branch: its global average is a feature of
    the whole image's style, which a domain shift moves for every pixel at once.
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        feature_dim: int,
        aspp_dim: int = 256,
        low_level_dim: int = 48,
        image_pool: bool = True,
    ) -> None:
        super().__init__()
        self.low_index = fine_index(reductions)
        self.out_channels = feature_dim
        self.output_stride = reductions[self.low_index]
        dilations = (1, *aspp_dilations(reductions[-1]))
        self.aspp = ASPP(channels[-1], aspp_dim, dilations, image_pool=image_pool)
        self.low_level = conv_bn_relu(channels[self.low_index], low_level_dim, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(aspp_dim + low_level_dim, feature_dim, 3),
            conv_bn_relu(feature_dim, feature_dim, 3),
        )

    def forward(self, feats: list[Tensor]) -> Tensor:
        low = self.low_level(feats[self.low_index])
        context = resize(self.aspp(feats[-1]), low.shape[-2:])
        return self.fuse(torch.cat([context, low], dim=1))


class DAFormerHead(DecodeHead):
    """DAFormer's context-aware feature fusion decoder (Hoyer et al., CVPR 2022).

    Each stage at stride >= 4 is embedded to ``feature_dim`` by a 1x1 conv (DAFormer's linear
    "MLP" embedding, no norm), upsampled to the stride-4 stage and concatenated; an ASPP of
    depthwise-separable convs with dilations (1, 6, 12, 18) and a 3x3 bottleneck fuses them to
    ``feature_dim`` pixel features at stride 4. With timm's ``pvt_v2_b5`` (= MiT-B5) this is
    DAFormer's model, used by PGPC and PiXL.
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        feature_dim: int,
        dilations: Sequence[int] = (1, 6, 12, 18),
    ) -> None:
        super().__init__()
        first = fine_index(reductions)
        self.in_indices = list(range(first, len(channels)))
        self.out_channels = feature_dim
        self.output_stride = reductions[first]
        self.embed = nn.ModuleList(nn.Conv2d(channels[i], feature_dim, 1) for i in self.in_indices)
        self.fuse = ASPP(
            len(self.in_indices) * feature_dim,
            feature_dim,
            dilations,
            separable=True,
            bottleneck_kernel=3,
        )

    def forward(self, feats: list[Tensor]) -> Tensor:
        size = feats[self.in_indices[0]].shape[-2:]
        embedded = [
            resize(embed(feats[i]), size)
            for i, embed in zip(self.in_indices, self.embed, strict=True)
        ]
        return self.fuse(torch.cat(embedded, dim=1))


class HypercolumnHead(DecodeHead):
    """Hypercolumns (Hariharan et al., CVPR 2015): every stage from stride 4 on, upsampled to
    stride 4, concatenated and fused by one 3x3 conv-BN-ReLU to ``feature_dim``.

    A simple decoder, close to the plain reference's of ``benchmarks/plain_reference.py``,
    which stops at stride 16 (``max_stride``). The CPU recipes (``examples/demo.toml``) use
    it: with colour jitter its 250-iteration from-scratch warm-up on the built-in benchmark is
    level with DeepLabV3+'s (35.3 against 36.7), and on the dusk benchmark it gains from
    self-training where DeepLabV3+ collapsed (14.6 -> 21.1 against 16.7 -> 11.8).

    ``stage_dim > 0`` first projects each stage to that many channels (1x1 conv-BN-ReLU, at the
    stage's own resolution), so the 3x3 fusion reads ``stage_dim`` channels per stage instead
    of the backbone's widths (ResNet-18: 960 at stride 4, two thirds of a forward pass). The
    CPU recipe's ``stage_dim = 64`` makes a training step 1.8x faster
    (``benchmarks/model_speed.py``). 0 (the default) is the plain hypercolumn.
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        feature_dim: int,
        max_stride: int = 32,
        stage_dim: int = 0,
    ) -> None:
        super().__init__()
        first = fine_index(reductions)
        self.in_indices = [
            i for i in range(first, len(channels)) if reductions[i] <= max_stride
        ] or [first]
        self.out_channels = feature_dim
        self.output_stride = reductions[first]
        if stage_dim < 0:
            raise UserError(
                f"model.head_kwargs.stage_dim must be >= 0 (0: no projection), got {stage_dim}"
            )
        self.project = nn.ModuleList(
            conv_bn_relu(channels[i], stage_dim, 1) if stage_dim else nn.Identity()
            for i in self.in_indices
        )
        width = stage_dim * len(self.in_indices) or sum(channels[i] for i in self.in_indices)
        self.fuse = conv_bn_relu(width, feature_dim, 3)

    def forward(self, feats: list[Tensor]) -> Tensor:
        size = feats[self.in_indices[0]].shape[-2:]
        pairs = zip(self.project, self.in_indices, strict=True)
        stages = [resize(project(feats[i]), size) for project, i in pairs]
        return self.fuse(torch.cat(stages, dim=1))


class ProjectionHead(nn.Module):
    """Projection head for pixel contrast (PGPC, PiXL; as in SePiCo/CLUDA).

    1x1 conv -> BN -> ReLU -> 1x1 conv to ``proj_dim``, L2-normalised over channels.
    """

    def __init__(self, in_channels: int, proj_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            conv_bn_relu(in_channels, in_channels, 1),
            nn.Conv2d(in_channels, proj_dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.layers(x), dim=1)


def head_options(name: str) -> list[str]:
    """The keyword arguments head ``name`` takes besides channels, reductions, feature_dim
    (what ``model.head_kwargs`` may set)."""
    params = list(inspect.signature(HEADS[name]).parameters)
    return params[3:]


HeadFactory = Callable[[Sequence[int], Sequence[int], int], DecodeHead]

HEADS: dict[str, HeadFactory] = {
    "deeplabv2": DeepLabV2Head,
    "deeplabv3plus": DeepLabV3PlusHead,
    "daformer": DAFormerHead,
    "hypercolumn": HypercolumnHead,
}
