"""Building blocks shared by the decode heads: conv-BN-ReLU, separable convs, ASPP, resize."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    dilation: int = 1,
    groups: int = 1,
) -> nn.Sequential:
    """Conv (same padding, no bias) -> BatchNorm -> ReLU, as mmcv's ``ConvModule``."""
    padding = dilation * (kernel_size - 1) // 2
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=False,
    )
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def separable_conv_bn_relu(in_channels: int, out_channels: int, dilation: int) -> nn.Sequential:
    """Depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU (mmcv's
    ``DepthwiseSeparableConvModule``, used by DAFormer's fusion ASPP)."""
    return nn.Sequential(
        conv_bn_relu(in_channels, in_channels, 3, dilation, groups=in_channels),
        conv_bn_relu(in_channels, out_channels, 1),
    )


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize to ``size`` (align_corners=False); a no-op when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ImagePool(nn.Module):
    """ASPP image-level branch: global average -> 1x1 conv -> ReLU, broadcast to the input size.

    No BatchNorm here, unlike DeepLabV3: on a 1x1 map BatchNorm raises in training when the
    per-device batch is one (large crops, or a batch of 2 split over 2 GPUs).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return pooled.expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with concatenated branches and a bottleneck conv.

    One branch per dilation (1x1 conv for dilation 1, else a 3x3 atrous conv, depthwise
    separable when ``separable``), an optional image-pooling branch, then concatenation and a
    ``bottleneck_kernel`` conv to ``out_channels``. DeepLabV3+ (Chen et al., ECCV 2018) uses
    plain convs, image pooling and a 1x1 bottleneck; DAFormer's fusion (Hoyer et al., CVPR
    2022) uses separable convs, no pooling and a 3x3 bottleneck.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilations: Sequence[int],
        *,
        separable: bool = False,
        image_pool: bool = False,
        bottleneck_kernel: int = 1,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [
            self._branch(in_channels, out_channels, d, separable) for d in dilations
        ]
        if image_pool:
            branches.append(ImagePool(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.bottleneck = conv_bn_relu(
            len(branches) * out_channels, out_channels, bottleneck_kernel
        )

    @staticmethod
    def _branch(in_channels: int, out_channels: int, dilation: int, separable: bool) -> nn.Module:
        if dilation == 1:
            return conv_bn_relu(in_channels, out_channels, 1)
        if separable:
            return separable_conv_bn_relu(in_channels, out_channels, dilation)
        return conv_bn_relu(in_channels, out_channels, 3, dilation)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))
