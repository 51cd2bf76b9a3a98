"""ViT foundation-model backbones (DINOv2, DINOv3 families, random weights, tiny configs):
the pyramid at any size, layer-wise lr decay by hand, the frozen backbone, weights from a
file, the fast offline error, alias suggestions, and every stage at two crop sizes that are
not multiples of the patch size."""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import pytest
import torch
from tiny import tiny_warmup
from typer.testing import CliRunner

from pixcli.artifacts import load_checkpoint
from pixcli.cli import app
from pixcli.data.transforms import AugmentConfig
from pixcli.engine.optim import OptimConfig, model_param_groups
from pixcli.errors import UserError
from pixcli.models import HEADS, SegmentorConfig, build_segmentor, create_backbone
from pixcli.models.backbone import suggestions
from pixcli.models.vit import ViTBackbone, pyramid_blocks, vit_architecture
from stages import adapt, pseudolabel, warmup

# A DINOv2-family and a DINOv3-family model, shrunk through timm's kwargs: 4 blocks, width 32.
TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2}
DINOV2 = "vit_small_patch14_reg4_dinov2"  # patch 14, 4 registers, absolute position embeddings
DINOV3 = "vit_small_patch16_dinov3"  # patch 16, RoPE (timm's eva family)


def _tiny(name: str, head: str = "daformer", **kw: object) -> SegmentorConfig:
    return SegmentorConfig(
        backbone=name, head=head, feature_dim=16, backbone_kwargs=dict(TINY), **kw
    )


# ------------------------------------------------------------------------------ the pyramid


@pytest.mark.parametrize("name", [DINOV2, DINOV3])
@pytest.mark.parametrize("size", [(30, 30), (26, 38), (33, 64)])
def test_pyramid_has_strides_4_to_32_at_any_size(name: str, size: tuple[int, int]) -> None:
    backbone = create_backbone(name, kwargs=TINY)
    assert isinstance(backbone, ViTBackbone)
    assert backbone.channels == [8, 16, 32, 32] and backbone.reductions == [4, 8, 16, 32]
    feats = backbone(torch.randn(2, 3, *size))
    for f, c, s in zip(feats, backbone.channels, backbone.reductions, strict=True):
        assert f.shape == (2, c, math.ceil(size[0] / s), math.ceil(size[1] / s))


def test_levels_come_from_the_quarters_of_the_depth() -> None:
    assert pyramid_blocks(12) == [2, 5, 8, 11] and pyramid_blocks(24) == [5, 11, 17, 23]
    assert pyramid_blocks(4) == [0, 1, 2, 3]
    assert vit_architecture("hf-hub:timm/vit_small_patch14_dinov2.lvd142m") == (
        "vit_small_patch14_dinov2"
    )
    assert vit_architecture("vit_base_patch16_dinov3.lvd1689m") == "vit_base_patch16_dinov3"
    assert vit_architecture("resnet50") is None and vit_architecture("nonsense") is None


@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_and_the_projection_work_on_a_vit(head: str) -> None:
    model = build_segmentor(_tiny(DINOV2, head=head, proj_dim=8))
    out = model(torch.randn(1, 3, 30, 44), feature_dropout=0.5)
    stride = model.output_stride
    assert out.logits.shape == (1, 19, math.ceil(30 / stride), math.ceil(44 / stride))
    assert out.proj is not None and out.proj.shape[1] == 8
    out.logits.mean().backward()
    assert model.backbone.body.blocks[0].attn.qkv.weight.grad is not None


# ------------------------------------------------------------------------------ optimiser


def test_layer_decay_gives_each_block_its_hand_computed_lr() -> None:
    model = build_segmentor(_tiny(DINOV2))
    cfg = OptimConfig(lr=1.0, head_lr_mult=10.0, layer_decay=0.5)
    groups = {g["name"]: g for g in model_param_groups(model, cfg)}
    # 4 blocks -> 6 layer ids: embeddings 0, blocks 1-4, final norm 5; lr = 0.5 ** (5 - id)
    expected = {
        "backbone.layer0": 0.03125, "backbone.layer1": 0.0625, "backbone.layer2": 0.125,
        "backbone.layer3": 0.25, "backbone.layer4": 0.5, "backbone.layer5": 1.0, "heads": 10.0,
    }  # fmt: skip
    assert {name: g["lr"] for name, g in groups.items()} == expected
    body = model.backbone.body

    def ids(params: list) -> set[int]:
        return {id(p) for p in params}

    assert ids(groups["backbone.layer0"]["params"]) == ids(
        [body.cls_token, body.reg_token, body.pos_embed, *body.patch_embed.parameters()]
    )
    assert ids(groups["backbone.layer3"]["params"]) == ids(body.blocks[2].parameters())
    assert ids(groups["backbone.layer5"]["params"]) == ids(body.norm.parameters())
    assert ids(model.backbone.levels.parameters()) <= ids(groups["heads"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_default_optim_keeps_two_groups_and_decay_needs_a_vit() -> None:
    model = build_segmentor(_tiny(DINOV3))
    groups = model_param_groups(model, OptimConfig(lr=0.1))
    assert [g["name"] for g in groups] == ["backbone", "heads"]
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(1.0)]
    cnn = build_segmentor(SegmentorConfig(backbone="test_resnet", feature_dim=16))
    with pytest.raises(UserError, match="layer-wise lr decay needs a ViT backbone"):
        model_param_groups(cnn, OptimConfig(layer_decay=0.9))
    with pytest.raises(UserError, match=r"layer_decay must be in \(0, 1\]"):
        model_param_groups(model, OptimConfig(layer_decay=0.0))


def test_frozen_backbone_trains_only_the_neck_and_heads() -> None:
    model = build_segmentor(_tiny(DINOV2))
    groups = model_param_groups(model, OptimConfig(lr=0.1, freeze_backbone=True))
    assert [g["name"] for g in groups] == ["heads"]
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(groups, lr=0.1)
    model(torch.randn(2, 3, 30, 30)).logits.square().mean().backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("backbone.body.") for k in changed)
    assert any(k.startswith("backbone.levels.") for k in changed)
    assert any(k.startswith("decoder.") for k in changed)


# ------------------------------------------------------------------------------ weights


def test_weights_file_fills_the_vit(tmp_path: Path) -> None:
    torch.manual_seed(5)
    source = create_backbone(DINOV2, kwargs=TINY).body.state_dict()
    torch.save(source, tmp_path / "dinov2_tiny.pth")
    loaded = create_backbone(DINOV2, weights_file=tmp_path / "dinov2_tiny.pth", kwargs=TINY)
    for key, value in loaded.body.state_dict().items():
        assert torch.equal(value, source[key]), key


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_offline_pretrained_fails_fast_with_one_line(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Hub (a refused connection, or a server that never answers), no cache: one line in
    < 5 s, not a minute of retries."""
    from huggingface_hub import constants

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # connections are queued, never answered
        port = silent.getsockname()[1] if server == "silent" else 9
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
        start = time.monotonic()
        with pytest.raises(UserError) as err:
            create_backbone("vit_small_patch14_dinov2", pretrained=True)
        assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "\n" not in msg and "--weights-file FILE (model.weights_file)" in msg
    assert "vit_small_patch14_dinov2.lvd142m/resolve/main/model.safetensors" in msg


def test_hf_hub_offline_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        create_backbone("hf-hub:timm/vit_small_patch16_dinov3.lvd1689m")


# ------------------------------------------------------------------------------ names


def test_unknown_names_suggest_the_fields_aliases() -> None:
    assert suggestions("segformer_b0")[0].startswith("pvt_v2_b0 (")
    assert suggestions("mit_b5")[0].startswith("pvt_v2_b5 (")
    assert suggestions("dinov2_vits14")[0].startswith("vit_small_patch14_dinov2 (")
    assert suggestions("dinov2_vitl14_reg")[0].startswith("vit_large_patch14_reg4_dinov2 (")
    assert suggestions("dinov3_vitb16")[0].startswith("vit_base_patch16_dinov3 (")
    assert suggestions("dinov3_vith16plus")[0].startswith("vit_huge_plus_patch16_dinov3 (")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["model.backbone=segformer_b0"], "did you mean pvt_v2_b0"),
        (["model.backbone=dinov2_vits14"], "did you mean vit_small_patch14_dinov2"),
        ([f"model.backbone={DINOV2}", "model.output_stride=16"], "is a ViT"),
        (["model.backbone_kwargs=4"], "must be a table"),
    ],
)
def test_cli_bad_backbone_is_one_line_and_exit_2(
    tiny_bench: Path, tmp_path: Path, sets: list[str], message: str
) -> None:
    args = ["warmup", "--source", f"gta5:{tiny_bench / 'source'}", "--device", "cpu"]
    args += ["--out", str(tmp_path / "w")]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ stages


def _log(out: Path) -> list[dict]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "ce_labelled" in e or "loss_ce" in e]


def _adapt(bench: Path, crop: tuple[int, int], **kw: object) -> adapt.AdaptConfig:
    cfg = adapt.AdaptConfig(
        source=f"gta5:{bench / 'source'}", target=f"cityscapes:{bench / 'target'}",
        device="cpu", batch_size=2, num_workers=0,
        optim=OptimConfig(lr=1e-3, head_lr_mult=10.0, layer_decay=0.8),
        augment=AugmentConfig(crop_size=crop, scale_range=(1.0, 1.0)),
    )  # fmt: skip
    cfg.loop.iterations, cfg.loop.log_every, cfg.loop.eval_every = 2, 1, 0
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _every_stage(bench: Path, out: Path, name: str, head: str, crop: tuple[int, int]) -> None:
    """warmup, pseudolabel, adapt cpsl / pgpc / pixl and --setting semi, 2 steps each."""
    cfg = tiny_warmup(bench, model=_tiny(name, head=head), val=None)
    cfg.augment = AugmentConfig(crop_size=crop, scale_range=(1.0, 1.0))
    cfg.optim = OptimConfig(name="adamw", lr=1e-3, head_lr_mult=10.0, layer_decay=0.9)
    cfg.loop.iterations = 2
    warmup.run(cfg, out / "warmup")
    ckpt = out / "warmup" / "model.pt"
    first = load_checkpoint(ckpt)
    assert first["step"] == 2 and first["model_config"]["backbone_kwargs"] == TINY
    assert len(_log(out / "warmup")) == 2

    target = f"cityscapes:{bench / 'target'}"
    pcfg = pseudolabel.PseudolabelConfig(target=target, device="cpu", num_workers=0)
    pseudolabel.run(pcfg, ckpt, out / "pseudo")
    pseudo = out / "pseudo" / pseudolabel.FILE

    runs = {
        "cpsl": _adapt(bench, crop, method="cpsl", pseudo=str(pseudo)),
        "pgpc": _adapt(bench, crop, method="pgpc"),
        "pixl": _adapt(bench, crop, method="pixl"),
        "semi": _adapt(bench, crop, method="none", setting="semi", labeled_fraction=0.5),
    }
    runs["cpsl"].cpsl.samples_per_image, runs["cpsl"].cpsl.memory_length = 4, 8
    runs["pgpc"].pgpc.warmup_iterations = 1  # the contrast runs at step 2
    runs["pixl"].pixl.entropy_crop_start = 1
    runs["semi"].unimatch.confidence_threshold = 0.0
    expected_term = {"cpsl": "sl", "pgpc": "contrast", "pixl": "dpa", "semi": "ce_fp"}
    for method, acfg in runs.items():
        manifest = adapt.run(acfg, ckpt, out / method)
        assert manifest["complete"] and manifest["results"]["iterations"] == 2, method
        steps = _log(out / method)
        assert len(steps) == 2 and all(math.isfinite(e["ce_labelled"]) for e in steps)
        assert any(k.startswith(expected_term[method]) for k in steps[-1]), (method, steps[-1])


@pytest.mark.parametrize(
    ("name", "head", "crop"),
    [
        (DINOV2, "daformer", (30, 30)),
        (DINOV3, "deeplabv3plus", (26, 38)),
        pytest.param(DINOV2, "deeplabv2", (26, 38), marks=pytest.mark.slow),
        pytest.param(DINOV3, "daformer", (30, 30), marks=pytest.mark.slow),
    ],
)
def test_vit_runs_every_stage(
    tiny_bench: Path, tmp_path: Path, name: str, head: str, crop: tuple[int, int]
) -> None:
    _every_stage(tiny_bench, tmp_path, name, head, crop)
