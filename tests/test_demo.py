"""`pixcli demo` end to end with tiny settings: every stage joins the chain."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tiny import TINY_BENCHMARK, tiny_warmup

from pixcli.artifacts import load_checkpoint, read_json
from stages import demo


def test_tiny_demo_chains_every_stage_and_resumes(tmp_path: Path):
    warm = tiny_warmup(tmp_path, val=None)
    warm.loop.iterations = 2
    adapt_cfg = dataclasses.replace(
        demo.demo_adapt(), device="cpu", batch_size=2, num_workers=0, optim=warm.optim,
        loop=dataclasses.replace(warm.loop, iterations=2), augment=warm.augment,
    )  # fmt: skip
    adapt_cfg.cpsl.samples_per_image = 4
    distill_cfg = dataclasses.replace(
        demo.demo_distill(), batch_size=2, num_workers=0, optim=warm.optim,
        loop=adapt_cfg.loop, augment=warm.augment,
    )  # fmt: skip
    cfg = demo.DemoConfig(
        device="cpu", benchmark=TINY_BENCHMARK, warmup=warm, adapt=adapt_cfg,
        methods=["none", "cpsl"], distill=distill_cfg,
    )  # fmt: skip
    summary = demo.run(cfg, tmp_path / "demo")
    assert set(summary["mIoU"]) == {"warmup", "oracle", "none", "cpsl", "cpsl+distill"}
    assert (tmp_path / "demo" / "pseudo" / "pseudo.h5").is_file()
    assert read_json(tmp_path / "demo" / "summary.json")["mIoU"] == summary["mIoU"]
    page = (tmp_path / "demo" / "report.html").read_text()  # the demo ends with its report
    # curves, then 3 val images x (input, ground truth, 5 models)
    assert "eval-cpsl+distill" in page and page.count("data:image/png;base64,") == 1 + 3 * 7
    mtime = (tmp_path / "demo" / "adapt-cpsl" / "model.pt").stat().st_mtime_ns
    again = demo.run(cfg, tmp_path / "demo")  # finished stages are skipped
    assert again["mIoU"] == summary["mIoU"]
    assert (tmp_path / "demo" / "adapt-cpsl" / "model.pt").stat().st_mtime_ns == mtime
    # the distillation student starts from its teacher, the cpsl model (distill_student)
    init = load_checkpoint(tmp_path / "demo" / "distill-cpsl" / "round1" / "student_init.pt")
    cpsl = load_checkpoint(tmp_path / "demo" / "adapt-cpsl" / "model.pt")["state_dict"]
    assert init["meta"]["student_init"] == "teacher"
    assert all(torch.equal(v, init["state_dict"][k]) for k, v in cpsl.items())
