"""Segmentor = timm backbone + decode head (+ projection head): shapes, strides, weights, training."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import Format
from torch import nn

from pixcli.errors import UserError
from pixcli.models import (
    HEADS,
    Backbone,
    Segmentor,
    SegmentorConfig,
    SegOutput,
    build_segmentor,
)

TINY_BACKBONES = ["resnet10t", "pvt_v2_b0"]  # a CNN and a transformer (MiT-B0)
SIZES = [(64, 64), (64, 96)]


def tiny_config(**overrides: object) -> SegmentorConfig:
    fields = {"backbone": "resnet10t", "num_classes": 5, "feature_dim": 32, "proj_dim": 16}
    fields |= overrides
    return SegmentorConfig(**fields)  # type: ignore[arg-type]


def expected_stride(head: str, output_stride: int | None = None) -> int:
    """DeepLabV2 predicts at the backbone's stride; the fusion decoders at stride 4."""
    return (output_stride or 32) if head == "deeplabv2" else 4


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("backbone", TINY_BACKBONES)
def test_output_shapes_and_stride(backbone: str, head: str) -> None:
    model = build_segmentor(tiny_config(backbone=backbone, head=head))
    stride = expected_stride(head)
    assert model.output_stride == stride
    for h, w in SIZES:
        out = model(torch.randn(2, 3, h, w))
        assert isinstance(out, SegOutput)
        assert out.logits.shape == (2, 5, h // stride, w // stride)
        assert out.features.shape == (2, 32, h // stride, w // stride)
        assert out.proj is not None and out.proj.shape == (2, 16, h // stride, w // stride)
        norms = out.proj.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


@pytest.mark.parametrize(("head", "output_stride"), [("deeplabv2", 8), ("deeplabv2", 16)])
def test_dilated_resnet_output_stride(head: str, output_stride: int) -> None:
    model = build_segmentor(tiny_config(head=head, output_stride=output_stride, proj_dim=None))
    assert model.output_stride == output_stride
    out = model(torch.randn(1, 3, 64, 96))
    assert out.logits.shape[-2:] == (64 // output_stride, 96 // output_stride)
    assert out.proj is None and model.projector is None


def test_deeplabv3plus_aspp_dilations_follow_backbone_stride() -> None:
    def dilations(output_stride: int) -> list[int]:
        model = build_segmentor(tiny_config(head="deeplabv3plus", output_stride=output_stride))
        convs = [m for m in model.decoder.aspp.modules() if isinstance(m, torch.nn.Conv2d)]
        return [c.dilation[0] for c in convs if c.kernel_size == (3, 3)]

    assert dilations(16) == [6, 12, 18]
    assert dilations(8) == [12, 24, 36]


class NHWCFeatures(nn.Module):
    """Stands in for a timm features_only model returning NHWC maps (Swin, MambaOut)."""

    output_fmt = Format.NHWC
    feature_info = SimpleNamespace(channels=lambda: [8, 16], reduction=lambda: [4, 8])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        return [torch.randn(b, h // 4, w // 4, 8), torch.randn(b, h // 8, w // 8, 16)]


def test_nhwc_backbone_features_become_nchw() -> None:
    model = Segmentor(tiny_config(head="daformer"), Backbone(NHWCFeatures()))
    out = model(torch.randn(1, 3, 64, 96))
    assert out.logits.shape == (1, 5, 16, 24)


@pytest.mark.parametrize("head", list(HEADS))
def test_gradients_reach_backbone_and_heads(head: str) -> None:
    model = build_segmentor(tiny_config(head=head))
    out = model(torch.randn(2, 3, 64, 64))
    assert out.proj is not None
    (out.logits.square().mean() + out.proj[:, 0].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    for part in (model.backbone, model.decoder, model.classifier, model.projector):
        assert any(p.grad.abs().sum() > 0 for p in part.parameters())


def test_config_round_trip_gives_same_architecture() -> None:
    cfg = tiny_config(head="daformer", output_stride=16, dropout=0.2)
    data = json.loads(json.dumps(cfg.to_dict()))
    again = SegmentorConfig.from_dict(data)
    assert again == cfg
    shapes = {k: v.shape for k, v in build_segmentor(cfg).state_dict().items()}
    assert shapes == {k: v.shape for k, v in build_segmentor(again).state_dict().items()}


def test_state_dict_loads_into_model_built_without_weights(tmp_path: Path) -> None:
    """Loading a checkpoint needs neither the weights file nor internet."""
    cfg = tiny_config(weights_file=str(tmp_path / "gone.pth"), pretrained=True)
    source = build_segmentor(tiny_config())
    build_segmentor(cfg, load_weights=False).load_state_dict(source.state_dict())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"head": "unet"}, "unknown head 'unet'"),
        ({"num_classes": 0}, "num_classes"),
        ({"output_stride": 4}, "output_stride"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_config_is_user_error(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        tiny_config(**overrides)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(UserError, match="unknown option.*decoder"):
        SegmentorConfig.from_dict({"backbone": "resnet18", "decoder": "x"})


def _segformer_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm pvt_v2 keys to SegFormer/DAFormer ``mit_b*.pth`` names (timm maps them back)."""
    renames = [
        (r"^patch_embed\.", "patch_embed1."),
        (r"^stages\.(\d)\.downsample", lambda m: f"patch_embed{int(m[1]) + 1}"),
        (r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m[1]) + 1}."),
        (r"^stages\.(\d)\.norm", lambda m: f"norm{int(m[1]) + 1}"),
        (r"mlp\.dwconv\.", "mlp.dwconv.dwconv."),
    ]
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@pytest.mark.parametrize(
    ("backbone", "filename", "param", "feature_param"),
    [
        ("resnet18", "resnet18.pth", "layer2.0.conv1.weight", "layer2.0.conv1.weight"),
        ("resnet18", "resnet18.safetensors", "layer2.0.conv1.weight", "layer2.0.conv1.weight"),
        # timm's features_only wrapper flattens pvt_v2's stages: stages.1 -> stages_1
        (
            "pvt_v2_b0",
            "mit_b0.pth",
            "stages.1.blocks.0.attn.q.weight",
            "stages_1.blocks.0.attn.q.weight",
        ),
    ],
)
def test_weights_file_is_loaded(
    tmp_path: Path, backbone: str, filename: str, param: str, feature_param: str
) -> None:
    saved = timm.create_model(backbone).state_dict()
    path = tmp_path / filename
    if path.suffix == ".safetensors":
        save_file(saved, path)
    elif filename.startswith("mit"):
        torch.save({"state_dict": _segformer_keys(saved)}, path)
    else:
        torch.save(saved, path)
    model = build_segmentor(tiny_config(backbone=backbone, weights_file=str(path)))
    loaded = dict(model.backbone.body.named_parameters())
    assert torch.equal(loaded[feature_param], saved[param])


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        ("mobilenetv3_small_050", "does not fit backbone"),  # no key matches: timm loads nothing
        ("resnet10t", "cannot load weights file"),  # same keys, other shapes
    ],
)
def test_weights_file_of_another_model_is_user_error(
    tmp_path: Path, backbone: str, message: str
) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(UserError, match=f"{message}.*{backbone}"):
        build_segmentor(tiny_config(backbone=backbone, weights_file=str(path)))


def test_unreadable_weights_file_is_user_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot load weights file .*notes.pth"):
        build_segmentor(tiny_config(weights_file=str(path)))


def test_missing_weights_file_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="mit_b5.pth does not exist"):
        build_segmentor(tiny_config(weights_file=str(tmp_path / "mit_b5.pth")))


def test_unknown_backbone_is_user_error() -> None:
    with pytest.raises(UserError, match=r"unknown backbone 'resnet_18'.*resnet18.*list_models"):
        build_segmentor(tiny_config(backbone="resnet_18"))


def test_unsupported_output_stride_is_user_error() -> None:
    with pytest.raises(UserError, match="does not support output_stride=8"):
        build_segmentor(tiny_config(backbone="pvt_v2_b0", output_stride=8))


def test_failed_pretrained_download_is_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(
        UserError, match="pretrained weights for backbone 'resnet10t'.*weights_file"
    ):
        build_segmentor(tiny_config(pretrained=True))


@pytest.mark.parametrize("head", list(HEADS))
def test_param_groups_cover_every_parameter_once(head: str) -> None:
    model = build_segmentor(tiny_config(head=head))
    groups = model.param_groups(lr=0.01, head_lr_mult=10.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    backbone, heads = groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert backbone["lr"] == 0.01 and heads["lr"] == pytest.approx(0.1)
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # the optimizer accepts the groups


def test_learns_tiny_data() -> None:
    """Overfits two 32x32 images (left half class 0, right half class 1)."""
    torch.manual_seed(0)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 1
    images = 0.2 * torch.randn(2, 3, 32, 32) + labels[:, None].float()
    model = build_segmentor(tiny_config(head="daformer", num_classes=2))
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-3, head_lr_mult=1.0))
    for _ in range(20):
        logits = F.interpolate(model(images).logits, size=(32, 32), mode="bilinear")
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = F.interpolate(model(images).logits, size=(32, 32), mode="bilinear")
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95
