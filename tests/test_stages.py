"""warmup and eval as stages: tiny data, a few steps, real files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_warmup

from pixcli.artifacts import finished_manifest, load_checkpoint, read_json
from pixcli.engine.trainer import Interrupted, TrainLoop
from pixcli.errors import UserError
from stages import eval as eval_stage
from stages import warmup


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_warmup_writes_artifacts_and_skips_when_done(tiny_bench: Path, tmp_path: Path):
    out = tmp_path / "w"
    manifest = warmup.run(tiny_warmup(tiny_bench), out)
    assert manifest["complete"] and manifest["results"]["iterations"] == 4
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["step"] == 4 and len(ckpt["classes"]) == 19
    assert "train_state" not in ckpt and "train_state" in load_checkpoint(out / "last.pt")
    assert (out / "best.pt").is_file()
    assert [e["step"] for e in _log(out) if "loss_ce" in e] == [1, 2, 3, 4]
    mtime = (out / "model.pt").stat().st_mtime_ns
    again = warmup.run(tiny_warmup(tiny_bench), out)  # finished: nothing to do
    assert again == read_json(out / "manifest.json")
    assert (out / "model.pt").stat().st_mtime_ns == mtime


def test_interrupted_warmup_resumes_where_it_stopped(
    tiny_bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "w"
    original = TrainLoop._check_finite

    def interrupt_at_step_3(self: TrainLoop, logs: dict) -> None:
        if self.step == 2:  # the third step has run; Ctrl-C arrives
            raise KeyboardInterrupt
        original(self, logs)

    monkeypatch.setattr(TrainLoop, "_check_finite", interrupt_at_step_3)
    with pytest.raises(Interrupted, match="interrupted at step 2"):
        warmup.run(tiny_warmup(tiny_bench), out)
    assert load_checkpoint(out / "last.pt")["step"] == 2
    assert not finished_manifest(out, "warmup")
    monkeypatch.setattr(TrainLoop, "_check_finite", original)
    warmup.run(tiny_warmup(tiny_bench), out)
    steps = [e["step"] for e in _log(out) if "loss_ce" in e]
    assert steps == [1, 2, 3, 4]  # continued at 3, nothing repeated
    assert load_checkpoint(out / "model.pt")["step"] == 4


def test_resume_with_another_config_is_refused(tiny_bench: Path, tmp_path: Path):
    out = tmp_path / "w"
    cfg = tiny_warmup(tiny_bench)
    cfg.loop.iterations = 2
    warmup.run(cfg, out)
    manifest = read_json(out / "manifest.json")  # pretend it was cut off after last.pt
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    other = tiny_warmup(tiny_bench, batch_size=1)
    with pytest.raises(UserError, match=r"other settings \(batch_size: \d+ -> 1\)"):
        warmup.run(other, out)


def test_nan_loss_is_a_clear_error(tiny_bench: Path, tmp_path: Path):
    cfg = tiny_warmup(tiny_bench)
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e30)
    cfg.loop.iterations = 30
    with pytest.raises(UserError, match="became (nan|inf)"):
        warmup.run(cfg, tmp_path / "w")


def test_adversarial_warmup_trains_the_discriminator(tiny_bench: Path, tmp_path: Path):
    cfg = tiny_warmup(tiny_bench, target=f"cityscapes:{tiny_bench / 'target'}", val=None)
    cfg.adversarial.enabled = True
    cfg.adversarial.ndf = 8
    warmup.run(cfg, tmp_path / "w")
    entries = [e for e in _log(tmp_path / "w") if "loss_d" in e]
    assert len(entries) == 4 and all(e["loss_adv"] > 0 for e in entries)
    disc = load_checkpoint(tmp_path / "w" / "last.pt")["train_state"]["modules"]["discriminator"]
    assert any(k.endswith("weight") for k in disc)


def test_adversarial_needs_target(tiny_bench: Path, tmp_path: Path):
    cfg = tiny_warmup(tiny_bench)
    cfg.adversarial.enabled = True
    with pytest.raises(UserError, match="needs --target"):
        warmup.run(cfg, tmp_path / "w")


def test_eval_writes_metrics_and_predictions(tiny_bench: Path, tmp_path: Path):
    cfg = tiny_warmup(tiny_bench)
    cfg.loop.iterations = 1
    warmup.run(cfg, tmp_path / "w")
    ecfg = eval_stage.EvalConfig(
        data=f"cityscapes:{tiny_bench / 'target'}", device="cpu", save_predictions=True
    )
    metrics = eval_stage.run(ecfg, tmp_path / "w" / "model.pt", tmp_path / "e")
    saved = read_json(tmp_path / "e" / "metrics.json")
    assert saved["mIoU"] == pytest.approx(metrics["mIoU"])
    conf = torch.tensor(saved["confusion"])
    assert conf.sum() > 0 and conf.shape == (19, 19)
    assert "mIoU16" in saved and "mIoU13" in saved
    assert len(list((tmp_path / "e" / "predictions").rglob("*.png"))) == 3


def test_eval_refuses_a_checkpoint_for_other_classes(tiny_bench: Path, tmp_path: Path):
    cfg = tiny_warmup(tiny_bench)
    cfg.loop.iterations = 1
    warmup.run(cfg, tmp_path / "w")
    ckpt = load_checkpoint(tmp_path / "w" / "model.pt")
    ckpt["classes"] = ckpt["classes"][:-1] + ["something else"]
    torch.save(ckpt, tmp_path / "other.pt")
    ecfg = eval_stage.EvalConfig(data=f"cityscapes:{tiny_bench / 'target'}", device="cpu")
    with pytest.raises(UserError, match="checkpoint predicts 19 classes"):
        eval_stage.run(ecfg, tmp_path / "other.pt", tmp_path / "e")


def test_eval_rerun_with_other_settings_is_refused(tiny_bench: Path, tmp_path: Path):
    cfg = tiny_warmup(tiny_bench)
    cfg.loop.iterations = 1
    warmup.run(cfg, tmp_path / "w")
    data = f"cityscapes:{tiny_bench / 'target'}"
    eval_stage.run(
        eval_stage.EvalConfig(data=data, device="cpu"), tmp_path / "w" / "model.pt", tmp_path / "e"
    )
    flipped = eval_stage.EvalConfig(data=data, device="cpu")
    flipped.eval.flip = True
    with pytest.raises(UserError, match="other settings"):
        eval_stage.run(flipped, tmp_path / "w" / "model.pt", tmp_path / "e")
    with pytest.raises(UserError, match="missing.pt: file not found"):
        eval_stage.run(flipped, tmp_path / "missing.pt", tmp_path / "e2")
