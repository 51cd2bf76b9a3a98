"""Thing-class ImageNet feature distance (DAFormer, Hoyer et al., CVPR 2022, Sec. 3.3, Eq. 8;
PiXL Eq. 13-14 reuses it), as pure tensor functions.

The frozen ImageNet backbone these compare against is built by
:class:`pixcli.engine.imagenet_fd.ImageNetFeatureDistance`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# DAFormer's thing classes of the 19 Cityscapes classes (traffic light, traffic sign, person,
# rider, car, truck, bus, train, motorcycle, bicycle), the classes L_FD is applied to.
CITYSCAPES_THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def thing_mask(
    labels: Tensor, grid: tuple[int, int], thing_classes: tuple[int, ...], min_ratio: float = 0.75
) -> Tensor:
    """The thing mask of DAFormer Eq. 8 (PiXL Eq. 14's I) on a feature grid: cells where one
    thing class covers at least ``min_ratio`` of the label pixels (DAFormer's label
    downscaling with its 0.75 ratio; shares by adaptive average pooling).

    ``labels`` ``(B, H, W)`` -> ``(B, h, w)`` bool.
    """
    mask = torch.zeros(labels.shape[0], *grid, dtype=torch.bool, device=labels.device)
    for cls in thing_classes:
        share = F.adaptive_avg_pool2d((labels == cls).float().unsqueeze(1), grid)[:, 0]
        mask |= share >= min_ratio
    return mask


def feature_distance(features: Tensor, imagenet_features: Tensor, mask: Tensor) -> Tensor:
    """Thing-class ImageNet feature distance, L_FD (DAFormer Eq. 8; PiXL Eq. 13-14).

    ``d_j = ||f_j - f'_j||_2`` between the model's and the frozen ImageNet backbone's last
    feature maps ``(B, D, h, w)``, averaged over the cells of ``mask`` ``(B, h, w)``; the
    ImageNet features are detached. 0 (attached) when the mask is empty.
    """
    distance = (features.float() - imagenet_features.detach().float()).norm(dim=1)
    weight = mask.to(distance)
    return (distance * weight).sum() / weight.sum().clamp(min=1.0)
