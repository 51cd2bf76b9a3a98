"""Several processes (torchrun, DDP) and the fast path: the global data order, resume,
SyncBatchNorm, channels_last, torch.compile; 2-process gloo runs against one process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_png
from no_batchnorm_cli import build_without_batchnorm, without_batchnorm
from tiny import random_checkpoint, tiny_warmup
from typer.testing import CliRunner

from pixcli.artifacts import load_checkpoint, read_json
from pixcli.cli import app
from pixcli.config import load_config
from pixcli.data.readers import open_dataset
from pixcli.data.training_set import GlobalOrderSampler, SegTrainSet, infinite_loader
from pixcli.data.transforms import AugmentConfig
from pixcli.engine import runtime as rt
from pixcli.engine import trainer
from pixcli.engine.embedding import TsneConfig
from pixcli.engine.optim import lr_factor
from pixcli.engine.runtime import Runtime, setup_runtime, to_device, unwrap
from pixcli.engine.trainer import Interrupted
from pixcli.models import SegmentorConfig, build_segmentor
from stages import adapt, distill, embed_report, warmup
from stages import eval as eval_stage

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
NO_AUGMENT = AugmentConfig(crop_size=None, scale_range=(1.0, 1.0), flip=False)


def _take(sampler: GlobalOrderSampler, count: int) -> list[int]:
    it = iter(sampler)
    return [next(it) for _ in range(count)]


# ------------------------------------------------------------------- the global data order


@pytest.mark.parametrize(("size", "world"), [(10, 2), (7, 2), (9, 3), (3, 2)])
def test_ranks_split_each_one_process_batch_between_them(size: int, world: int):
    """Rank r's k-th batch of b is rows r*b..(r+1)*b of one process's k-th batch of N*b,
    over several epochs (3 images: smaller than a global batch of 4, repeated)."""
    b, steps = 2, 12
    one = np.array(_take(GlobalOrderSampler(size, b * world, seed=5), steps * b * world))
    one = one.reshape(steps, world, b)
    for r in range(world):
        mine = _take(GlobalOrderSampler(size, b, seed=5, rank=r, world_size=world), steps * b)
        assert mine == one[:, r].reshape(-1).tolist()


def test_each_epoch_is_a_new_permutation_without_repeats():
    sampler = GlobalOrderSampler(10, 2, seed=1, world_size=2)  # global batch 4: 2 per epoch
    epochs = [sampler.epoch_order(e) for e in range(3)]
    assert all(len(o) == 8 and len(set(o.tolist())) == 8 for o in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    other_seed = GlobalOrderSampler(10, 2, seed=2, world_size=2).epoch_order(0)
    assert not np.array_equal(epochs[0], other_seed)
    assert GlobalOrderSampler(10, 4, shuffle=False).epoch_order(0).tolist() == list(range(8))


def test_start_continues_the_order_where_it_stopped():
    for rank in (0, 1):
        full = _take(GlobalOrderSampler(7, 2, seed=3, rank=rank, world_size=2), 2 * 9)
        resumed = _take(GlobalOrderSampler(7, 2, seed=3, rank=rank, world_size=2, start=5), 8)
        assert resumed == full[2 * 5 :]


def test_loader_batches_of_two_ranks_make_the_one_process_batch(tmp_path: Path):
    ds = SegTrainSet(open_dataset(f"folder:{_folder(tmp_path, 6)}"), NO_AUGMENT)
    one = infinite_loader(ds, 4, seed=9)
    ranks = [infinite_loader(ds, 2, seed=9, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(4):  # two epochs of one global batch each
        batch = next(one)
        parts = [next(it) for it in ranks]
        assert torch.equal(torch.cat([p["index"] for p in parts]), batch["index"])
        assert torch.equal(torch.cat([p["image"] for p in parts]), batch["image"])


# ------------------------------------------------------------------------------- resume


def test_resumed_warmup_ends_with_the_weights_of_an_uninterrupted_one(
    tiny_bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The data order continues at the step it stopped (and dropout's RNG with it): without
    random augmentation, an interrupted and resumed run equals a straight one exactly."""
    cfg = tiny_warmup(tiny_bench, val=None, augment=NO_AUGMENT)
    warmup.run(cfg, tmp_path / "straight")

    def interrupt_before_step_3(step: int, *args: object) -> float:
        if step == 2:  # Ctrl-C between steps 2 and 3
            raise KeyboardInterrupt
        return lr_factor(step, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "lr_factor", interrupt_before_step_3)
    with pytest.raises(Interrupted):
        warmup.run(cfg, tmp_path / "resumed")
    monkeypatch.setattr(trainer, "lr_factor", lr_factor)
    warmup.run(cfg, tmp_path / "resumed")
    straight = load_checkpoint(tmp_path / "straight" / "model.pt")["state_dict"]
    resumed = load_checkpoint(tmp_path / "resumed" / "model.pt")["state_dict"]
    first = load_checkpoint(tmp_path / "resumed" / "last.pt")  # rewritten at the end
    assert first["step"] == 4
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


# ------------------------------------------------------------ SyncBatchNorm, channels_last


def _runtime(device: str, world_size: int, **kw: object) -> Runtime:
    return Runtime(device=torch.device(device), world_size=world_size, **kw)  # type: ignore[arg-type]


def test_sync_batchnorm_only_on_cuda_under_torchrun():
    def kinds(runtime: Runtime, enabled: bool) -> set[str]:
        model = build_segmentor(SegmentorConfig(backbone="test_resnet", feature_dim=8))
        converted = rt.sync_batchnorm(model, runtime, enabled)
        assert converted is model  # in place: optimisers built before stay valid
        return {type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__}

    assert kinds(_runtime("cuda", 2), True) == {"SyncBatchNorm"}  # converting needs no GPU
    assert kinds(_runtime("cuda", 2), False) == {"BatchNorm2d"}
    assert kinds(_runtime("cuda", 1), True) == {"BatchNorm2d"}  # one process: nothing to sync
    assert kinds(_runtime("cpu", 2), True) == {"BatchNorm2d"}  # gloo: SyncBatchNorm can't run


def test_channels_last_only_when_the_runtime_asks():
    assert not setup_runtime("cpu", channels_last=True).channels_last  # CUDA only
    model = build_segmentor(SegmentorConfig(backbone="test_resnet", feature_dim=8))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    to_device(model, _runtime("cpu", 1))
    assert conv.weight.is_contiguous()
    to_device(model, _runtime("cpu", 1, channels_last=True))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()


def test_unwrap_sees_through_ddp_and_compile(tmp_path: Path):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = torch.nn.Linear(2, 2)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap(ddp) is model and unwrap(_FakeCompiled(ddp)) is model
        assert unwrap(model) is model
    finally:
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- --compile


class _FakeCompiled(torch.nn.Module):
    """What ``torch.compile`` returns, without compiling: ``_orig_mod`` and its calls."""

    calls: list[_FakeCompiled] = []

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = module
        self.forwards = 0
        _FakeCompiled.calls.append(self)

    def forward(self, *args: object, **kwargs: object) -> object:
        self.forwards += 1
        return self._orig_mod(*args, **kwargs)


@pytest.fixture
def fake_compile(monkeypatch: pytest.MonkeyPatch) -> list[_FakeCompiled]:
    _FakeCompiled.calls = []
    monkeypatch.setattr(torch, "compile", _FakeCompiled)
    return _FakeCompiled.calls


def test_compile_wraps_the_trained_model_in_warmup(
    tiny_bench: Path, tmp_path: Path, fake_compile: list[_FakeCompiled]
):
    cfg = tiny_warmup(tiny_bench, val=None)
    cfg.loop.iterations = 2
    warmup.run(cfg, tmp_path / "plain")
    assert fake_compile == []
    warmup.run(dataclasses.replace(cfg, compile=True), tmp_path / "compiled")
    assert len(fake_compile) == 1 and fake_compile[0].forwards == 2  # every step through it
    assert isinstance(unwrap(fake_compile[0]), type(build_segmentor(cfg.model)))
    saved = load_checkpoint(tmp_path / "compiled" / "model.pt")["state_dict"]
    assert not any(k.startswith("_orig_mod") for k in saved)  # the plain model's names


def test_compile_wraps_the_student_in_adapt(
    tiny_bench: Path, tmp_path: Path, fake_compile: list[_FakeCompiled]
):
    model = SegmentorConfig(backbone="test_resnet", feature_dim=16)
    ckpt = random_checkpoint(tmp_path / "init.pt", model)
    base = tiny_warmup(tiny_bench)
    cfg = adapt.AdaptConfig(
        source=f"gta5:{tiny_bench / 'source'}", target=f"cityscapes:{tiny_bench / 'target'}",
        device="cpu", batch_size=2, num_workers=0, optim=base.optim, augment=base.augment,
        loop=dataclasses.replace(base.loop, iterations=2), compile=True,
    )  # fmt: skip
    adapt.run(cfg, ckpt, tmp_path / "a")
    # the labelled and the mixed forward pass of each step
    assert len(fake_compile) == 1 and fake_compile[0].forwards == 4
    assert load_checkpoint(tmp_path / "a" / "model.pt")["step"] == 2


@pytest.mark.parametrize(
    ("command", "stage", "args"),
    [
        ("warmup", warmup, ["--source", "gta5:/x"]),
        ("adapt", adapt, ["--checkpoint", "m.pt"]),
        ("distill", distill, ["--teacher", "m.pt"]),
    ],
)
def test_compile_option_sets_the_config(
    command: str, stage: object, args: list[str], monkeypatch: pytest.MonkeyPatch
):
    seen: list[object] = []
    monkeypatch.setattr(stage, "run", lambda cfg, *rest: seen.append(cfg))
    for flag, expected in (([], False), (["--compile"], True)):
        result = CliRunner().invoke(app, [command, *args, *flag])
        assert result.exit_code == 0, result.output
        assert seen[-1].compile is expected  # type: ignore[attr-defined]
    assert distill._adapt_config(  # distill passes it on to each round's training
        distill.DistillConfig(compile=True, sync_bn=True), Path("p.h5"), 0
    ).compile


def test_resume_accepts_another_compile_setting(
    tiny_bench: Path, tmp_path: Path, fake_compile: list[_FakeCompiled]
):
    cfg = tiny_warmup(tiny_bench, val=None)
    cfg.loop.iterations = 2
    warmup.run(cfg, tmp_path)
    (tmp_path / "manifest.json").unlink()  # cut off after the last checkpoint
    longer = dataclasses.replace(cfg, compile=True)
    longer.loop = dataclasses.replace(cfg.loop, iterations=3)
    warmup.run(longer, tmp_path)  # resumes instead of refusing another configuration
    assert load_checkpoint(tmp_path / "model.pt")["step"] == 3
    assert len(fake_compile) == 1 and fake_compile[0].forwards == 1  # only step 3 ran


# ------------------------------------------------------------- 2 processes against one


def _folder(root: Path, n: int, size: tuple[int, int] = (16, 16), seed: int = 0) -> Path:
    """A folder dataset whose labels have no ignored pixels: every process's loss is a
    mean over the same number of pixels, so the mean of the processes' means is the mean."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_png(root / "images" / "train" / f"img_{i}.png", rng.integers(0, 256, (*size, 3)))
        write_png(root / "labels" / "train" / f"img_{i}.png", rng.integers(0, 3, size))
    return root


CONFIG = """\
device = "cpu"
num_workers = 0
[model]
backbone = "test_resnet"
feature_dim = 16
dropout = 0.0
[optim]
lr = 0.05
head_lr_mult = 1.0
weight_decay = 0.0
[loop]
iterations = 3
log_every = 1
checkpoint_every = 1000
[augment]
scale_range = [1.0, 1.0]
flip = false
"""


def _torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", *args]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one_with_the_same_global_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """3 steps of adversarial ``warmup`` (SGD for the model, Adam for the discriminator, a
    labelled and an unlabelled stream): 2 gloo processes x batch 2 against 1 process x
    batch 4, same seed, no random augmentation, no dropout, no BatchNorm (its per-process
    batch statistics would differ; SyncBatchNorm needs CUDA). The data order is shared, DDP
    averages the gradients; what is left is float32 summation order (partial sums per
    process, then the all-reduce), at most about 1e-7 relative per step: we allow 1e-6
    absolute after 3 steps (measured: about 1e-8). One process with batch 2 (other images
    per step) differs by more than 100 times that."""
    source = _folder(tmp_path / "src", 10, (32, 32))
    target = _folder(tmp_path / "tgt", 6, (32, 32), seed=1)
    toml = tmp_path / "cfg.toml"
    toml.write_text(CONFIG + "crop_size = [32, 32]\n[adversarial]\nndf = 8\n")
    data = {"source": f"folder:{source}", "target": f"folder:{target}"}
    _torchrun("tests/no_batchnorm_cli.py", "warmup", "--config", str(toml), "--adversarial",
              "--source", data["source"], "--target", data["target"], "--batch-size", "2",
              "--out", str(tmp_path / "two"))  # fmt: skip
    monkeypatch.setattr(warmup, "build_segmentor", build_without_batchnorm)
    for batch, out in ((4, "one"), (2, "small")):
        over = {**data, "batch_size": batch, "adversarial.enabled": True}
        warmup.run(load_config(warmup.WarmupConfig, toml, over), tmp_path / out)

    def weights(run: str) -> dict[str, torch.Tensor]:
        modules = load_checkpoint(tmp_path / run / "last.pt")["train_state"]["modules"]
        return {f"{m}.{k}": v for m in modules for k, v in modules[m].items()}

    two, one, small = weights("two"), weights("one"), weights("small")
    assert two.keys() == one.keys() and not any("running" in k for k in one)
    assert any(k.startswith("discriminator.") for k in one)
    model_cfg = dataclasses.replace(load_config(warmup.WarmupConfig, toml).model, num_classes=3)
    start = without_batchnorm(build_segmentor(model_cfg)).state_dict()
    moved = max((one[f"model.{k}"] - v).abs().max().item() for k, v in start.items())
    gap = max((two[k] - one[k]).abs().max().item() for k in one)
    other = max((small[k] - one[k]).abs().max().item() for k in one)
    assert gap < 1e-6, gap  # an unsynchronised discriminator: about 3e-4
    assert moved > 1e-2 and other > 1e-4, (moved, other)  # the comparison can fail


@pytest.mark.slow
def test_two_processes_evaluate_to_the_same_metrics_as_one(tiny_bench: Path, tmp_path: Path):
    """3 val images on 2 ranks (2 + 1): confusion matrices summed across ranks."""
    ckpt = random_checkpoint(tmp_path / "m.pt", SegmentorConfig(backbone="test_resnet",
                                                                feature_dim=16))  # fmt: skip
    data = f"cityscapes:{tiny_bench / 'target'}"
    _torchrun("-m", "pixcli", "eval", "--checkpoint", str(ckpt), "--data", data, "--device",
              "cpu", "--out", str(tmp_path / "two"), "--save-predictions")  # fmt: skip
    cfg = eval_stage.EvalConfig(data=data, device="cpu", save_predictions=True)
    one = eval_stage.run(cfg, ckpt, tmp_path / "one")
    assert read_json(tmp_path / "two" / "metrics.json") == one
    assert one["confusion"] and sum(map(sum, one["confusion"])) > 0
    names = sorted(p.name for p in (tmp_path / "one" / "predictions").rglob("*.png"))
    assert len(names) == 3
    assert sorted(p.name for p in (tmp_path / "two" / "predictions").rglob("*.png")) == names


@pytest.mark.slow
def test_two_processes_write_the_embed_report_of_one(tiny_bench: Path, tmp_path: Path):
    """The main rank computes and writes the report alone; rank 1 leaves at once, and the
    run ends cleanly with the report of one process."""
    model = SegmentorConfig(backbone="test_resnet", feature_dim=8)
    ckpt = random_checkpoint(tmp_path / "m" / "model.pt", model)
    data = f"cityscapes:{tiny_bench / 'target'}"
    _torchrun("-m", "pixcli", "embed-report", "--checkpoint", str(ckpt), "--data", data,
              "--device", "cpu", "--per-class", "4", "--set", "tsne.max_iter=250", "--set",
              "tsne.perplexity=5", "--out", str(tmp_path / "two"))  # fmt: skip
    tsne = TsneConfig(perplexity=5, max_iter=250)
    cfg = embed_report.EmbedReportConfig(data=data, per_class=4, device="cpu", tsne=tsne)
    one = embed_report.run(cfg, [ckpt], tmp_path / "one")
    assert read_json(tmp_path / "two" / "report.json") == one
    assert one["checkpoints"][0]["points"] > 0
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files


@pytest.mark.slow
def test_distill_runs_its_rounds_under_torchrun(tiny_bench: Path, tmp_path: Path):
    """distill runs pseudolabel, adapt and eval inside one process group: they must not
    leave it (joining a new group after leaving one fails under torchrun)."""
    cfg = tiny_warmup(tiny_bench, val=None)
    cfg.loop.iterations = 1
    warmup.run(cfg, tmp_path / "w")
    _torchrun("-m", "pixcli", "distill", "--teacher", str(tmp_path / "w" / "model.pt"),
              "--source", f"gta5:{tiny_bench / 'source'}", "--target",
              f"cityscapes:{tiny_bench / 'target'}", "--val", f"cityscapes:{tiny_bench / 'target'}",
              "--rounds", "2", "--iterations", "2", "--batch-size", "2", "--student-init",
              "scratch", "--device", "cpu", "--set", "augment.crop_size=[32, 32]", "--set",
              "num_workers=0", "--out", str(tmp_path / "d"))  # fmt: skip
    manifest = read_json(tmp_path / "d" / "manifest.json")
    assert [r["iterations"] for r in manifest["results"]["rounds"]] == [2, 2]
    assert (tmp_path / "d" / "model.pt").is_file()


def _average_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", f"file://{init_file}", rank=rank, world_size=2)
    a, b, c = (torch.nn.Parameter(torch.zeros(2, 3)) for _ in range(3))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    a.grad = torch.full((2, 3), rank + 1.0)  # 1 and 2: mean 1.5
    if rank == 1:
        b.grad = torch.full((2, 3), 4.0)  # on one rank only: mean with zeros, 2
    frozen.grad = torch.full((2,), 7.0 + rank)  # not trained: left alone
    rt.average_gradients([a, b, c, frozen], Runtime(device=CPU, rank=rank, world_size=2))
    torch.save([a.grad, b.grad, c.grad, frozen.grad], f"{out_dir}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_average_gradients_over_two_gloo_processes(tmp_path: Path):
    torch.multiprocessing.spawn(
        _average_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    for rank in (0, 1):
        a, b, c, frozen = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(a, torch.full((2, 3), 1.5)) and torch.equal(b, torch.full((2, 3), 2.0))
        assert c is None and torch.equal(frozen, torch.full((2,), 7.0 + rank))
    rt.average_gradients([torch.nn.Parameter(torch.ones(1))], _runtime("cpu", 1))  # no group


SIGNAL_STEPS = 8  # the run's length; rank 0 signals itself during step 3


def _sigterm_worker(rank: int, init_file: str, out_dir: str) -> None:
    """A 2-rank TrainLoop whose steps average gradients (a collective, as DDP's); only
    rank 0 gets SIGTERM, in the middle of its third step. Writes what each rank ended with."""
    import signal
    from datetime import timedelta

    from pixcli.engine.optim import OptimConfig

    torch.distributed.init_process_group(
        "gloo", f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=20)
    )
    runtime = Runtime(device=CPU, rank=rank, world_size=2)
    (Path(out_dir) / "run").mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = build_segmentor(SegmentorConfig(backbone="test_resnet", feature_dim=8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = trainer.TrainLoop(
        Path(out_dir) / "run", runtime, trainer.LoopConfig(SIGNAL_STEPS, 1, 0, 0),
        OptimConfig(lr=0.1), {"model": model}, {"model": optimizer},
        {"classes": [str(c) for c in range(19)], "config": {}},
    )  # fmt: skip

    def step(index: int) -> dict[str, float]:
        loss = sum((p.float() ** 2).mean() for p in model.parameters())
        optimizer.zero_grad()
        loss.backward()
        if rank == 0 and index == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # lands inside the step
        rt.average_gradients(model.parameters(), runtime)
        optimizer.step()
        return {"loss": loss.item()}

    try:
        loop.run(step)
        outcome = {"stopped": False, "step": loop.step}
    except Interrupted as exc:
        outcome = {"stopped": True, "step": loop.step, "terminated": exc.terminated}
    torch.save({**outcome, "weights": unwrap(model).state_dict()}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sigterm_to_rank_0_only_stops_every_rank_after_the_same_step(tmp_path: Path):
    context = torch.multiprocessing.spawn(
        _sigterm_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False
    )
    deadline = time.monotonic() + 60
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # one rank ended
        if time.monotonic() >= deadline:  # a rank left waiting in a collective: a hang
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not stop together")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for outcome in ranks:
        assert outcome["stopped"] and outcome["terminated"] and outcome["step"] == 3
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["step"] == 3 and not (tmp_path / "run" / "model.pt").exists()
    for name, value in last["state_dict"].items():  # rank 0 saved the weights of step 3
        for outcome in ranks:
            assert torch.equal(value, outcome["weights"][name]), name
