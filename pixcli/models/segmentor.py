"""The segmentation model: timm backbone + decode head + classifier (+ projection head)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixcli.errors import UserError
from pixcli.models.backbone import OUTPUT_STRIDES, Backbone, create_backbone
from pixcli.models.heads import HEADS, ProjectionHead, head_options
from pixcli.models.vit import ViTBackbone


@dataclass
class SegmentorConfig:
    """Architecture of a :class:`Segmentor`; plain data, stored in checkpoints.

    Attributes:
        backbone: any timm model name (``pvt_v2_b5`` is MiT-B5, DAFormer's encoder; plain
            ViTs such as ``vit_small_patch14_dinov2`` get a 4-level pyramid, see
            :mod:`pixcli.models.vit`), or ``hf-hub:ORG/REPO``.
        head: a key of :data:`pixcli.models.HEADS`.
        num_classes: number of classes of the classifier.
        pretrained: load timm's registry weights into the backbone.
        weights_file: local backbone weights (SegFormer ``mit_b*.pth``, timm ``.pth`` or
            ``.safetensors``); takes precedence over ``pretrained``.
        output_stride: passed to timm when set (8 or 16 dilate ResNets; None = model's own).
        backbone_kwargs: more ``timm.create_model`` arguments (``drop_path_rate = 0.1``;
            ``depth``/``embed_dim``/``num_heads`` for a smaller model of a family).
        head_kwargs: more arguments of the head (``image_pool = false`` for DeepLabV3+,
            ``max_stride = 16`` or ``stage_dim = 64`` for hypercolumns; see
            :mod:`pixcli.models.heads`).
        feature_dim: channels D of the decoder pixel features.
        proj_dim: size of the projection head (PGPC/PiXL: 256); None = no projection head.
        dropout: channel dropout before the classifier.
    """

    backbone: str = "resnet18"
    head: str = "deeplabv2"
    num_classes: int = 19
    pretrained: bool = False
    weights_file: str | None = None
    output_stride: int | None = None
    backbone_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    head_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    feature_dim: int = 256
    proj_dim: int | None = None
    dropout: float = 0.1

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise UserError(f"model config: {problem}")

    def _problem(self) -> str | None:
        if self.head not in HEADS:
            return f"unknown head '{self.head}' (choose from {', '.join(HEADS)})"
        accepted = head_options(self.head)
        unknown = sorted(set(self.head_kwargs) - set(accepted))
        if unknown:
            return (
                f"head '{self.head}' takes no option {', '.join(unknown)} in head_kwargs "
                f"(it takes: {', '.join(accepted) or 'none'})"
            )
        if self.num_classes < 1:
            return f"num_classes must be >= 1, got {self.num_classes}"
        if self.output_stride is not None and self.output_stride not in OUTPUT_STRIDES:
            return (
                f"output_stride must be one of {OUTPUT_STRIDES} or unset, got {self.output_stride}"
            )
        if self.feature_dim < 1:
            return f"feature_dim must be >= 1, got {self.feature_dim}"
        if self.proj_dim is not None and self.proj_dim < 1:
            return f"proj_dim must be >= 1 or unset, got {self.proj_dim}"
        if not 0.0 <= self.dropout < 1.0:
            return f"dropout must be in [0, 1), got {self.dropout}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for checkpoints and manifests)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentorConfig:
        """Inverse of :meth:`to_dict`; missing keys take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"model config: unknown option(s) {', '.join(unknown)}")
        return cls(**d)


@dataclass
class SegOutput:
    """What a :class:`Segmentor` returns; all maps at ``Segmentor.output_stride``.

    Attributes:
        logits: ``B x num_classes x h x w`` class scores, not upsampled.
        features: ``B x feature_dim x h x w`` decoder pixel features (classifier input).
        proj: ``B x proj_dim x h x w`` L2-normalised projections, or None without a
            projection head.
    """

    logits: Tensor
    features: Tensor
    proj: Tensor | None = None


# A pytree node, so DDP (find_unused_parameters) and torch.export see the tensors inside.
torch.export.register_dataclass(SegOutput, serialized_type_name="pixcli.models.SegOutput")


class Segmentor(nn.Module):
    """Backbone -> decode head -> features -> {classifier -> logits, projection -> proj}.

    Attributes:
        config: the architecture.
        output_stride: stride of ``logits`` wrt the input.
        backbone, decoder, classifier, projector: the parts (``projector`` may be None).
    """

    def __init__(self, config: SegmentorConfig, backbone: Backbone | ViTBackbone) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.decoder = HEADS[config.head](
            backbone.channels, backbone.reductions, config.feature_dim, **config.head_kwargs
        )
        self.classifier = nn.Sequential(
            nn.Dropout2d(config.dropout),
            nn.Conv2d(config.feature_dim, config.num_classes, 1),
        )
        nn.init.normal_(self.classifier[1].weight, std=0.01)
        nn.init.zeros_(self.classifier[1].bias)
        self.projector = (
            ProjectionHead(config.feature_dim, config.proj_dim) if config.proj_dim else None
        )
        self.output_stride: int = self.decoder.output_stride

    def forward(self, x: Tensor, feature_dropout: float = 0.0) -> SegOutput:
        """``feature_dropout`` > 0 perturbs the features: channel dropout at that rate on every
        backbone stage before the decode head, in train and eval mode alike (UniMatch's
        feature perturbation, ``nn.Dropout2d(0.5)`` on the encoder features)."""
        feats = self.backbone(x)
        if feature_dropout > 0:
            feats = [F.dropout2d(f, feature_dropout) for f in feats]
        features = self.decoder(feats)
        proj = self.projector(features) if self.projector is not None else None
        return SegOutput(logits=self.classifier(features), features=features, proj=proj)

    def param_groups(
        self,
        lr: float,
        head_lr_mult: float = 10.0,
        layer_decay: float = 1.0,
        freeze_backbone: bool = False,
    ) -> list[dict[str, Any]]:
        """Optimizer groups: backbone at ``lr``, every head at ``lr * head_lr_mult``.

        The 10x head learning rate is the papers' convention (DeepLab/ProDA/CPSL for SGD,
        DAFormer/PGPC/PiXL for AdamW). Each group carries ``name`` and ``lr_mult`` for
        schedulers. A ViT's pyramid neck is new and trains with the heads.

        Args:
            layer_decay: < 1 gives a ViT's layer ``i`` of ``n`` (:meth:`ViTBackbone.layer_id`:
                embeddings 0, block ``j`` ``j + 1``, final norm ``n - 1``) the lr
                ``lr * layer_decay ** (n - 1 - i)``, one group ``backbone.layer{i}`` each
                (BEiT; UniMatch V2 / VFM-UDA fine-tune DINOv2 so). ViT backbones only.
            freeze_backbone: the pretrained backbone gets ``requires_grad=False`` and no
                group (only the heads and a ViT's neck train).
        """
        if not 0.0 < layer_decay <= 1.0:
            raise UserError(f"optim.layer_decay must be in (0, 1], got {layer_decay}")
        backbone = self.backbone
        vit = isinstance(backbone, ViTBackbone)
        pretrained = backbone.body if vit else backbone
        in_backbone = {id(p) for p in pretrained.parameters()}
        heads = [p for p in self.parameters() if id(p) not in in_backbone]
        head_lr = lr * head_lr_mult
        head_group = {"name": "heads", "params": heads, "lr": head_lr, "lr_mult": head_lr_mult}
        if freeze_backbone:
            pretrained.requires_grad_(False)
            return [head_group]
        if layer_decay == 1.0:
            params = list(pretrained.parameters())
            return [{"name": "backbone", "params": params, "lr": lr, "lr_mult": 1.0}, head_group]
        if not vit:
            raise UserError(
                f"optim.layer_decay={layer_decay}: layer-wise lr decay needs a ViT backbone "
                f"(vit_*), not '{self.config.backbone}'; leave it at 1"
            )
        layers: dict[int, list[nn.Parameter]] = {}
        for name, param in pretrained.named_parameters():
            layers.setdefault(backbone.layer_id(name), []).append(param)
        groups = []
        for i in sorted(layers):
            mult = layer_decay ** (backbone.num_layers - 1 - i)
            name = f"backbone.layer{i}"
            groups.append({"name": name, "params": layers[i], "lr": lr * mult, "lr_mult": mult})
        return [*groups, head_group]


def build_segmentor(cfg: SegmentorConfig, *, load_weights: bool = True) -> Segmentor:
    """Create the :class:`Segmentor` described by ``cfg``.

    Args:
        cfg: the architecture.
        load_weights: False skips ``pretrained``/``weights_file`` (random backbone); use it
            when a checkpoint's state_dict is loaded next, so a checkpoint made elsewhere
            needs neither internet nor the original weights file.
    """
    backbone = create_backbone(
        cfg.backbone,
        pretrained=cfg.pretrained and load_weights,
        weights_file=cfg.weights_file if load_weights else None,
        output_stride=cfg.output_stride,
        kwargs=cfg.backbone_kwargs,
    )
    return Segmentor(cfg, backbone)


def add_projection_head(model: Segmentor, proj_dim: int, seed: int = 0) -> None:
    """Give ``model`` a new projection head of ``proj_dim`` unless it has one of that size.

    For methods whose pixel contrast trains a projection head in the adaptation stage (PGPC),
    starting from a checkpoint made without one. The head is part of the model, so DDP
    synchronises its gradients, the EMA teacher copied from the model has it too, and the
    model's ``config.proj_dim`` (stored in ``model.pt``) says so. Its initial weights depend
    only on ``seed`` (the same on every rank), not on the global random state.
    """
    if model.projector is not None:
        if model.config.proj_dim != proj_dim:
            raise UserError(
                f"the model already has a projection head of {model.config.proj_dim} "
                f"dimensions, not {proj_dim}"
            )
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ProjectionHead(model.config.feature_dim, proj_dim)
    model.projector = head.to(next(model.classifier.parameters()).device)
    model.config = dataclasses.replace(model.config, proj_dim=proj_dim)
