"""Segmentation models: timm backbone (features_only) + decode head + projection head."""

from pixcli.models.backbone import Backbone, create_backbone
from pixcli.models.heads import HEADS, DecodeHead, ProjectionHead
from pixcli.models.segmentor import Segmentor, SegmentorConfig, SegOutput, build_segmentor

__all__ = [
    "HEADS",
    "Backbone",
    "DecodeHead",
    "ProjectionHead",
    "SegOutput",
    "Segmentor",
    "SegmentorConfig",
    "build_segmentor",
    "create_backbone",
]
