"""`pixcli distill`: the KD loss, the distill plug-in, round chaining, resume and errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from tiny import tiny_warmup
from typer.testing import CliRunner

from pixcli.artifacts import (
    file_fingerprint,
    finished_manifest,
    load_checkpoint,
    read_json,
    save_checkpoint,
)
from pixcli.cli import app
from pixcli.data.readers import open_dataset
from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.data.training_set import geometry_to_tensor
from pixcli.data.transforms import CropGeometry
from pixcli.engine.self_training import SelfTrainingStep
from pixcli.engine.trainer import Interrupted
from pixcli.errors import UserError
from pixcli.losses.distillation import KDConfig, confident_labels, distillation_kl
from pixcli.methods import METHODS, MethodSetup, StepContext
from pixcli.models import SegOutput
from pixcli.pseudo_labels import PseudoLabelFile
from stages import distill, warmup

# ----------------------------------------------------------------------------- the loss


def test_kd_by_hand_on_one_pixel():
    student = torch.zeros(1, 2, 1, 1)  # p_S = (1/2, 1/2)
    teacher = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)  # the 0 term must count as 0
    assert distillation_kl(student, teacher).item() == pytest.approx(math.log(2))


def test_kd_equals_torch_kl_on_log_probabilities():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 3, 4, generator=gen)
    teacher = torch.randn(2, 5, 3, 4, generator=gen).softmax(1)
    log_q = student.log_softmax(1)
    by_hand = (teacher * (teacher.log() - log_q)).sum(1).mean()
    torch_kl = F.kl_div(log_q, teacher, reduction="sum") / (2 * 3 * 4)
    ours = distillation_kl(student, teacher)
    assert torch.isclose(ours, by_hand) and torch.isclose(ours, torch_kl)
    # the published code's call (probabilities where log-probabilities belong) is another thing
    published = F.kl_div(student.softmax(1), teacher, reduction="sum") / teacher.numel()
    assert not torch.isclose(ours, published, rtol=0.1)


def test_kd_is_zero_for_identical_outputs_and_positive_otherwise():
    logits = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    assert distillation_kl(logits, logits.softmax(1)).abs().item() < 1e-6
    assert distillation_kl(logits, logits.flip(1).softmax(1)).item() > 1e-3


def test_kd_gradient_reaches_only_the_student():
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(1, 3, 2, 2, generator=gen, requires_grad=True)
    teacher_logits = torch.randn(1, 3, 2, 2, generator=gen, requires_grad=True)
    distillation_kl(student, teacher_logits.softmax(1)).backward()
    assert teacher_logits.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_kd_counts_only_valid_pixels():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(1, 3, 1, 2, generator=gen)
    teacher = torch.randn(1, 3, 1, 2, generator=gen).softmax(1)
    valid = torch.tensor([[[True, False]]])
    first = distillation_kl(student[..., :1], teacher[..., :1])
    assert torch.isclose(distillation_kl(student, teacher, valid), first)
    assert distillation_kl(student, teacher, torch.zeros_like(valid)).item() == 0.0


def test_confident_labels_ignore_pixels_below_the_threshold():
    probs = torch.tensor(
        [[0.96, 0.04], [0.06, 0.94], [0.95, 0.05], [0.0, 0.0]]  # kept, below, at, padding
    ).T.reshape(1, 2, 1, 4)
    labels = confident_labels(probs, 0.95)
    assert labels.tolist() == [[[0, IGNORE_INDEX, 0, IGNORE_INDEX]]]
    assert confident_labels(probs, 0.0).tolist() == [[[0, 1, 0, IGNORE_INDEX]]]


def test_kd_config_refuses_bad_values():
    with pytest.raises(UserError, match="distill.threshold"):
        KDConfig(threshold=1.0)
    with pytest.raises(UserError, match="distill.weight"):
        KDConfig(weight=-1.0)


# ----------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def teacher(tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    cfg = tiny_warmup(tiny_bench, val=None)
    cfg.loop.iterations = 3
    warmup.run(cfg, out)
    return out / "model.pt"


def _cfg(bench: Path, **changes: object) -> distill.DistillConfig:
    base = tiny_warmup(bench)
    cfg = distill.DistillConfig(
        source=f"gta5:{bench / 'source'}",
        target=f"cityscapes:{bench / 'target'}",
        val=f"cityscapes:{bench / 'target'}",
        student_init="scratch",
        device="cpu",
        batch_size=2,
        num_workers=0,
        optim=base.optim,
        loop=dataclasses.replace(base.loop, iterations=2, checkpoint_every=1),
        augment=base.augment,
    )
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def two_rounds(
    tiny_bench: Path, teacher: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("distill") / "d"
    return out, distill.run(_cfg(tiny_bench), teacher, out)


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rounds_chain_teacher_to_student(two_rounds: tuple[Path, dict], teacher: Path):
    out, manifest = two_rounds
    r1, r2 = (read_json(out / f"round{r}" / "manifest.json") for r in (1, 2))
    assert r1["stage"] == r2["stage"] == distill.ROUND_STAGE
    assert r1["results"]["teacher"] == str(teacher)
    student1 = out / "round1" / "train" / "best.pt"  # --val given: the best student
    assert r2["results"]["teacher"] == r1["results"]["student"] == str(student1)
    assert r2["inputs"]["teacher"] == file_fingerprint(student1)
    # round 2's pseudo labels were made by round 1's student, flip-averaged, thresholded
    header = PseudoLabelFile(out / "round2" / "pseudo" / "pseudo.h5").header
    assert header.checkpoint == file_fingerprint(student1)
    settings = json.loads(header.settings)
    assert settings["ignore_below"] == 0.95 and settings["inference"]["flip"] is True
    # teacher mIoU of round 2 = student mIoU of round 1; both measured on --val
    assert r2["results"]["teacher_mIoU"] == r1["results"]["student_mIoU"] is not None
    assert r1["results"]["teacher_mIoU"] is not None
    # the final model is round 2's student; the top-level manifest lists both rounds
    assert (out / "model.pt").read_bytes() == (out / "round2/train/best.pt").read_bytes()
    assert [r["round"] for r in manifest["results"]["rounds"]] == [1, 2]
    assert manifest["results"]["student_mIoU"] == r2["results"]["student_mIoU"]


def test_student_is_fresh_and_trained_with_kd_and_source_ce(
    two_rounds: tuple[Path, dict], teacher: Path
):
    out, _ = two_rounds
    init = load_checkpoint(out / "round1" / "student_init.pt")
    assert init["meta"]["student_init"] == "scratch"
    taught = load_checkpoint(teacher)["state_dict"]
    key = next(k for k, v in taught.items() if v.dim() == 4)
    assert not torch.equal(init["state_dict"][key], taught[key])  # not the teacher's weights
    steps = [e for e in _log(out / "round1" / "train" / "train_log.jsonl") if "kd" in e]
    assert len(steps) == 2
    assert all(e["kd"] > 0 and "ce_labelled" in e and "ce_unlabelled" in e for e in steps)
    config = read_json(out / "round1" / "train" / "manifest.json")["config"]
    assert config["method"] == "distill" and config["self_training"]["classmix"] is False


def test_finished_run_is_not_redone(tiny_bench: Path, teacher: Path, two_rounds):
    out, manifest = two_rounds
    stamp = (out / "round1" / "train" / "model.pt").stat().st_mtime_ns
    assert distill.run(_cfg(tiny_bench), teacher, out) == manifest
    assert (out / "round1" / "train" / "model.pt").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="other settings"):
        distill.run(_cfg(tiny_bench, rounds=3), teacher, out)


def test_distill_plugin_labels_and_kd_term(tiny_bench: Path, two_rounds):
    out, _ = two_rounds
    target = open_dataset(f"cityscapes:{tiny_bench / 'target'}", "train")
    pseudo = out / "round1" / "pseudo" / "pseudo.h5"
    setup = MethodSetup(num_classes=19, feature_dim=16, device=torch.device("cpu"),
                        unlabelled=target, pseudo=pseudo)  # fmt: skip
    method = METHODS["distill"](setup, KDConfig(weight=0.5))  # threshold 0.95
    grid = np.full((19, 1, 2), 0.01 / 18, dtype=np.float32)  # the teacher: 2 label cells
    grid[3, 0, 0], grid[5, 0, 1] = 0.99, 0.6  # left cell sure of class 3, right one unsure
    grid[4, 0, 1] = 1 - 0.6 - 17 * 0.01 / 18
    method.soft_labels.file.soft = lambda i: grid  # what pseudo.h5 holds for every image
    probs = method.soft_labels.file.soft_crop(1, (32, 64))  # the whole image, bilinear
    ctx = StepContext(
        step=0, labelled_image=torch.zeros(1, 3, 32, 64), labelled_label=torch.zeros(1, 32, 64),
        unlabelled_image=torch.zeros(1, 3, 32, 64), unlabelled_index=torch.tensor([1]),
        unlabelled_geometry=geometry_to_tensor(CropGeometry((32, 64), 0, 0, (32, 64), False))[None],
    )  # fmt: skip
    labels, weights = method.target_labels(ctx)
    assert torch.all(weights == 1)
    assert torch.all(labels[0, :, :16] == 3) and torch.all(labels[0, :, -16:] == IGNORE_INDEX)
    assert torch.equal(labels[0] == IGNORE_INDEX, probs.max(0).values < 0.95)
    student = torch.randn(1, 19, 32, 64, generator=torch.Generator().manual_seed(0))
    ctx.student_unlabelled = SegOutput(logits=student, features=torch.zeros(1, 16, 32, 64))
    ctx.mix_mask = torch.zeros(1, 1, 32, 64)
    ctx.mix_mask[..., 48:] = 1  # the right quarter shows the labelled image: no KD there
    kd = method.losses(ctx)["kd"]  # on every target pixel, confident or not
    expected = 0.5 * distillation_kl(student[..., :48], probs[None, :, :, :48])
    assert torch.isclose(kd, expected)


def test_interrupted_round_resumes_without_redoing_round_one(
    tiny_bench: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "d"
    cfg = _cfg(tiny_bench, val=None)  # without --val: the last student is the next teacher
    calls: list[int] = []
    original = SelfTrainingStep.__call__

    def step(self: SelfTrainingStep, t: int) -> dict[str, float]:
        calls.append(t)
        if len(calls) == 4:  # round 1 took two steps; stop round 2 in its second step
            raise KeyboardInterrupt
        return original(self, t)

    monkeypatch.setattr(SelfTrainingStep, "__call__", step)
    with pytest.raises(Interrupted):
        distill.run(cfg, teacher, out)
    assert (out / "round1" / "manifest.json").is_file()
    assert not finished_manifest(out / "round2", "distill-round")
    assert load_checkpoint(out / "round2" / "train" / "last.pt")["step"] == 1
    stamp = (out / "round1" / "train" / "model.pt").stat().st_mtime_ns

    calls.clear()

    def counted(self: SelfTrainingStep, t: int) -> dict[str, float]:
        calls.append(t)
        return original(self, t)

    monkeypatch.setattr(SelfTrainingStep, "__call__", counted)
    manifest = distill.run(cfg, teacher, out)
    assert calls == [1]  # only round 2's last step ran again
    assert (out / "round1" / "train" / "model.pt").stat().st_mtime_ns == stamp
    r1 = manifest["results"]["rounds"][0]
    assert r1["student"] == str(out / "round1" / "train" / "model.pt")
    assert r1["teacher_mIoU"] is None  # nothing to measure without --val
    assert [e["step"] for e in _log(out / "round2" / "train" / "train_log.jsonl")] == [1, 2]


# ----------------------------------------------------------------------------- students


def test_student_init_variants(teacher: Path, tmp_path: Path):
    ckpt = load_checkpoint(teacher)
    scratch = distill.build_student("scratch", ckpt, seed=5)
    assert scratch["classes"] == ckpt["classes"] and not scratch["model_config"]["pretrained"]
    again = distill.build_student("scratch", ckpt, seed=5)["state_dict"]
    assert all(torch.equal(v, again[k]) for k, v in scratch["state_dict"].items())
    copied = distill.build_student(f"checkpoint:{teacher}", ckpt, seed=5)["state_dict"]
    assert all(torch.equal(v, copied[k]) for k, v in ckpt["state_dict"].items())
    torch.manual_seed(123)  # not the seed the weights-file check compares with
    saved = timm.create_model("test_resnet").state_dict()
    torch.save(saved, tmp_path / "backbone.pth")
    student = distill.build_student(f"weights:{tmp_path / 'backbone.pth'}", ckpt, seed=5)
    body = {
        k.removeprefix("backbone.body."): v
        for k, v in student["state_dict"].items()
        if k.startswith("backbone.body.") and v.dim() == 4
    }
    assert body and all(torch.equal(v, saved[k]) for k, v in body.items())


def test_student_init_teacher_starts_each_round_from_its_teacher(
    tiny_bench: Path, teacher: Path, tmp_path: Path
):
    ckpt = load_checkpoint(teacher)
    same = distill.build_student("teacher", ckpt, seed=5)
    assert same["model_config"] == ckpt["model_config"]
    assert all(torch.equal(v, same["state_dict"][k]) for k, v in ckpt["state_dict"].items())
    out = tmp_path / "d"
    cfg = _cfg(tiny_bench, student_init="teacher", val=None)
    cfg.loop.iterations = 1
    distill.run(cfg, teacher, out)
    for r, round_teacher in ((1, teacher), (2, out / "round1" / "train" / "model.pt")):
        init = load_checkpoint(out / f"round{r}" / "student_init.pt")
        expected = load_checkpoint(round_teacher)["state_dict"]
        assert init["meta"]["student_init"] == "teacher"
        assert all(torch.equal(v, init["state_dict"][k]) for k, v in expected.items())
    trained = load_checkpoint(out / "round1" / "train" / "model.pt")["state_dict"]
    assert any(not torch.equal(v, trained[k]) for k, v in ckpt["state_dict"].items())


def _other_classes(teacher: Path, path: Path) -> Path:
    ckpt = load_checkpoint(teacher)
    ckpt["classes"] = list(reversed(ckpt["classes"]))
    save_checkpoint(path, ckpt)
    return path


@pytest.mark.parametrize(
    ("changes", "teacher_name", "message"),
    [
        ({}, "missing.pt", "--teacher .*missing.pt: checkpoint not found"),
        ({}, "other.pt", "--teacher .*other.pt: checkpoint predicts 19 classes"),
        ({"student_init": "magic"}, None, "--student-init 'magic': expected pretrained"),
        ({"student_init": "weights:/no/file.pth"}, None, "/no/file.pth: file not found"),
        ({"student_init": "checkpoint:OTHER"}, None, "--student-init .*other.pt: checkpoint"),
        ({"rounds": 0}, None, "--rounds 0"),
        ({"source": ""}, None, "--source is required"),
    ],
)
def test_bad_input_is_one_user_error(
    tiny_bench: Path, teacher: Path, tmp_path: Path, changes, teacher_name, message
):
    other = _other_classes(teacher, tmp_path / "other.pt")
    if changes.get("student_init") == "checkpoint:OTHER":
        changes = {"student_init": f"checkpoint:{other}"}
    chosen = tmp_path / teacher_name if teacher_name else teacher
    with pytest.raises(UserError, match=message):
        distill.run(_cfg(tiny_bench, **changes), chosen, tmp_path / "d")
    assert not finished_manifest(tmp_path / "d" / "round1", "distill-round")


def test_cli_runs_a_round_and_reports_errors_in_one_line(
    tiny_bench: Path, teacher: Path, tmp_path: Path
):
    runner = CliRunner()
    common = [
        "--source", f"gta5:{tiny_bench / 'source'}", "--target",
        f"cityscapes:{tiny_bench / 'target'}", "--device", "cpu",
    ]  # fmt: skip
    bad = runner.invoke(app, ["distill", "--teacher", str(tmp_path / "none.pt"), *common])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "--teacher" in bad.output
    result = runner.invoke(
        app, ["distill", "--teacher", str(teacher), *common, "--rounds", "1",
              "--student-init", f"checkpoint:{teacher}", "--threshold", "0.5",
              "--iterations", "1", "--batch-size", "2", "--out", str(tmp_path / "d"),
              "--set", "num_workers=0", "--set", "augment.crop_size=[32, 32]"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # the pseudo labels are the teacher's by design: no "made by another checkpoint" warning
    assert "was made by checkpoint" not in result.output
    manifest = read_json(tmp_path / "d" / "manifest.json")
    assert manifest["config"]["distill"]["threshold"] == 0.5
    assert manifest["results"]["rounds"][0]["iterations"] == 1
    header = PseudoLabelFile(tmp_path / "d" / "round1" / "pseudo" / "pseudo.h5").header
    assert json.loads(header.settings)["ignore_below"] == 0.5
