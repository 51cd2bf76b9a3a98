"""Segmentor = timm backbone + decode head (+ projection head): shapes, weights, training."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pixcli.errors import UserError
from pixcli.models import HEADS, SegmentorConfig, SegOutput, build_segmentor
from pixcli.models.norm_statistics import frozen_norm_statistics, target_norm_statistics

TINY_BACKBONES = ["test_resnet", "pvt_v2_b0", "test_mambaout"]  # CNN, MiT-B0, NHWC output
SIZES = [(64, 64), (64, 96)]


def tiny_config(**overrides: Any) -> SegmentorConfig:
    """A small model on timm's ``test_resnet`` (0.4M parameters)."""
    fields = {"backbone": "test_resnet", "num_classes": 5, "feature_dim": 32, "proj_dim": 16}
    return SegmentorConfig(**(fields | overrides))


def expected_stride(head: str) -> int:
    """DeepLabV2 predicts at the backbone's stride (32 undilated); the fusion decoders at 4."""
    return 32 if head == "deeplabv2" else 4


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


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_resnet_output_stride(output_stride: int) -> None:
    model = build_segmentor(tiny_config(output_stride=output_stride, proj_dim=None))
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


def test_head_kwargs_reach_the_head() -> None:
    def branches(**head_kwargs: object) -> int:
        model = build_segmentor(tiny_config(head="deeplabv3plus", head_kwargs=head_kwargs))
        return len(model.decoder.aspp.branches)

    assert branches() == 5  # 1x1, three atrous, image pooling
    assert branches(image_pool=False) == 4
    hyper = build_segmentor(tiny_config(head="hypercolumn", head_kwargs={"max_stride": 8}))
    assert len(hyper.decoder.in_indices) == 2  # strides 4 and 8 of test_resnet's 4..32
    restored = SegmentorConfig.from_dict(hyper.config.to_dict())
    assert restored.head_kwargs == {"max_stride": 8}


def test_hypercolumn_stage_dim_projects_each_stage_before_the_fusion() -> None:
    plain = build_segmentor(tiny_config(head="hypercolumn"))
    projected = build_segmentor(tiny_config(head="hypercolumn", head_kwargs={"stage_dim": 8}))
    stages = len(projected.decoder.in_indices)
    # the fusion's 3x3 conv takes stage_dim channels per stage, not the backbone's widths
    assert projected.decoder.fuse[0].in_channels == 8 * stages
    widths = [plain.backbone.channels[i] for i in plain.decoder.in_indices]
    assert plain.decoder.fuse[0].in_channels == sum(widths)
    x = torch.randn(2, 3, 64, 64)
    assert projected(x).logits.shape == plain(x).logits.shape
    # stage_dim = 0 adds no parameters: checkpoints made before the option load unchanged
    assert not any(k.startswith("decoder.project") for k in plain.state_dict())
    message = r"model.head_kwargs.stage_dim must be >= 0 \(0: no projection\), got -1"
    with pytest.raises(UserError, match=message):
        build_segmentor(tiny_config(head="hypercolumn", head_kwargs={"stage_dim": -1}))


def test_nhwc_backbone_features_become_nchw() -> None:
    """timm's MambaOut and Swin return NHWC feature maps; the heads get NCHW."""
    model = build_segmentor(tiny_config(backbone="test_mambaout", head="deeplabv2"))
    assert model.backbone.nhwc
    assert model(torch.randn(1, 3, 64, 96)).logits.shape == (1, 5, 2, 3)


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
        (
            {"head": "deeplabv3plus", "head_kwargs": {"pool": False}},
            "head 'deeplabv3plus' takes no option pool in head_kwargs (it takes: aspp_dim, "
            "low_level_dim, image_pool)",
        ),
        ({"head": "deeplabv2", "head_kwargs": {"max_stride": 16}}, "takes no option max_stride"),
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
    ("source", "message"),
    [
        ("convnext_atto", "does not fit backbone"),  # no key in common: timm would load nothing
        ("resnet18", "cannot load weights file"),  # same keys, other shapes
    ],
)
def test_weights_file_of_another_model_is_user_error(
    tmp_path: Path, source: str, message: str
) -> None:
    path = tmp_path / f"{source}.pth"
    torch.save(timm.create_model(source).state_dict(), path)
    with pytest.raises(UserError, match=f"{message}.*test_resnet"):
        build_segmentor(tiny_config(weights_file=str(path)))


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
        UserError,
        match="backbone 'test_resnet'.*weights_file",  # offline: names the fix
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


@pytest.mark.parametrize(
    "head", ["deeplabv3plus", pytest.param("daformer", marks=pytest.mark.slow)]
)  # stride 4: 8x8 logits; daformer's dilated depthwise backward is slow on the CPU
def test_learns_tiny_data(head: str) -> None:
    """Overfits two 32x32 images (left half class 0, right half class 1)."""
    torch.manual_seed(0)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 1
    images = 0.2 * torch.randn(2, 3, 32, 32) + labels[:, None].float()
    model = build_segmentor(tiny_config(head=head, num_classes=2))
    optimizer = torch.optim.AdamW(model.param_groups(lr=3e-3, head_lr_mult=1.0))
    for _ in range(30):
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


@pytest.mark.parametrize("momentum", [0.1, None])
def test_frozen_norm_statistics_normalises_by_batch_but_keeps_running_statistics(
    momentum: float | None,
) -> None:
    bn = torch.nn.BatchNorm2d(3, momentum=momentum).train()
    x = 2.0 + 3.0 * torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    bn(x)  # running statistics away from their initial values
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked
    count = count.clone()
    y = x.flip(0) * 0.5 - 1.0
    with frozen_norm_statistics(torch.nn.Sequential(bn)):
        out = bn(y)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, count) and bn.momentum == momentum
    by_batch = (y - y.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        y.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps
    )
    assert torch.allclose(out, by_batch, atol=1e-5)  # still the batch's statistics
    bn(y)  # outside the block the running statistics move again
    assert not torch.allclose(bn.running_mean, mean)


def test_target_norm_statistics_normalises_an_eval_model_by_its_batch() -> None:
    bn = torch.nn.BatchNorm2d(3)
    model = torch.nn.Sequential(bn, torch.nn.Dropout(0.5)).eval()
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(4.0)
    y = 1.0 + 2.0 * torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    with target_norm_statistics(model):
        out = model(y)
        assert not model[1].training  # dropout stays off
    by_batch = (y - y.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        y.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps
    )
    assert torch.allclose(out, by_batch, atol=1e-5)
    assert torch.equal(bn.running_mean, torch.full((3,), 5.0)) and not bn.training
    expected = (y - 5.0) / torch.sqrt(torch.tensor(4.0 + bn.eps))
    assert torch.allclose(model(y), expected, atol=1e-5)  # the running statistics again
