"""``pixcli distill``: rounds of self-distillation into a fresh student (CPSL Sec. 4.2,
"CPSL+distill", following ProDA Sec. 3.4: two rounds, +5.1 mIoU on GTA5 -> Cityscapes).

Round ``r`` (its teacher: ``--teacher`` for round 1, the student of round ``r - 1`` after),
in ``OUT/round{r}/``:

1. ``pseudo/pseudo.h5``: ``stages.pseudolabel`` with the teacher, flip-averaged (ProDA's
   ``generate_pseudo_label.py --flip``), hard labels ignored below ``distill.threshold``;
2. ``student_init.pt``: the student as ``student_init`` says (``pretrained``: timm's weights
   for the teacher's architecture; ``scratch``; ``weights:FILE``: a local backbone weights
   file, e.g. a self-supervised one as ProDA's SimCLRv2 ResNet-101; ``checkpoint:FILE``: the
   weights and architecture of a pixcli checkpoint with the same classes; ``teacher``: the
   round's teacher itself, weights and all: the student continues from its teacher, as a
   fine-tuning on the teacher's labels; pixcli's option for when there is no pretrained
   backbone to start a fresh student from, as on the CPU demo);
3. ``train/``: ``stages.adapt --method distill`` from that student (source cross-entropy,
   cross-entropy on the confident hard labels and KL to the teacher's soft labels on the
   strong view; ``pixcli.methods.distill``). Resumes from its ``last.pt``;
4. ``eval-teacher/`` (round 1) and ``eval-student/``: ``stages.eval`` on ``--val``;
5. ``manifest.json``: teacher, student, their mIoU on ``--val``, the pseudo labels' mIoU
   (when the target has labels) and the share of confident label cells.

The round's student is ``train/best.pt`` (best on ``--val``) or, without ``--val``,
``train/model.pt`` (the last). A finished round (its manifest) is skipped on rerun; the last
round's student is copied to ``OUT/model.pt``; ``OUT/manifest.json`` and a table summarise
the rounds.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pixcli.artifacts import (
    atomic_write,
    check_classes,
    file_fingerprint,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_manifest,
)
from pixcli.config import to_dict
from pixcli.data.readers import ReaderConfig, SegDataset
from pixcli.data.transforms import AugmentConfig
from pixcli.engine.inference import InferenceConfig
from pixcli.engine.optim import OptimConfig
from pixcli.engine.progress import console
from pixcli.engine.runtime import setup_runtime, shutdown
from pixcli.engine.self_training import SelfTrainingConfig
from pixcli.engine.trainer import LoopConfig
from pixcli.errors import UserError
from pixcli.losses.distillation import KDConfig
from pixcli.models import SegmentorConfig, build_segmentor
from pixcli.predictor import InferenceChoice
from pixcli.pseudo_labels import PseudoLabelFile
from pixcli.reporting import comparison_table, distill_table, print_table
from stages import adapt, pseudolabel
from stages import eval as eval_stage
from stages.common import Timer, finish, open_data, open_labelled, prepare_out_dir

ROUND_STAGE = "distill-round"
INIT_KINDS = ("pretrained", "scratch", "teacher", "weights", "checkpoint")


@dataclass
class DistillConfig:
    source: str = ""  # KIND:PATH, labelled: the source cross-entropy (ProDA keeps it)
    source_split: str = "train"
    target: str = ""  # KIND:PATH, the target images (their labels, if any, are not trained on)
    target_split: str = "train"
    val: str | None = None  # KIND:PATH, labelled: picks each round's best student, mIoU
    val_split: str = "val"
    rounds: int = 2  # CPSL Sec. 4.2: "two more knowledge distillation rounds" (ProDA)
    # pretrained | scratch | weights:FILE | checkpoint:FILE. ProDA/CPSL: a self-supervised
    # (SimCLRv2) backbone, i.e. weights:FILE; timm's ImageNet weights are the default here.
    student_init: str = "pretrained"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True  # CUDA: NHWC memory format
    compile: bool = False  # torch.compile each round's student (--compile)
    sync_bn: bool = False  # torchrun on CUDA: SyncBatchNorm in the student
    batch_size: int = 4  # ProDA --bs 4; per process under torchrun
    num_workers: int = 2
    distill: KDConfig = field(default_factory=KDConfig)  # beta 1, threshold 0.95 (ProDA)
    # The teacher's pseudo labels: flip-averaged (ProDA generate_pseudo_label.py --flip).
    pseudo_inference: InferenceConfig = field(default_factory=lambda: InferenceConfig(flip=True))
    pseudo_output_stride: int | None = None  # grid of pseudo.h5; None = the model's own
    # ProDA stage 2/3 (--finetune --lr 6e-4): SGD, lr 6e-4, heads 10x, wd 2e-4, poly 0.9.
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=6e-4, head_lr_mult=10.0, weight_decay=2e-4)
    )
    loop: LoopConfig = field(default_factory=LoopConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # ProDA distils on a strong view without mixing: ClassMix off.
    self_training: SelfTrainingConfig = field(
        default_factory=lambda: SelfTrainingConfig(classmix=False)
    )
    eval: InferenceConfig = field(default_factory=InferenceConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)  # [reader]: acdc, darkzurich, folder


def run(cfg: DistillConfig, teacher: Path, out: Path) -> dict:
    """Distil ``teacher`` for ``cfg.rounds`` rounds into ``out``; see the module docstring."""
    _check(cfg)
    timer = Timer()
    source = open_labelled(cfg.source, cfg.source_split, "--source", cfg.reader)
    target = open_data(cfg.target, cfg.target_split, "--target", reader=cfg.reader)
    val = open_labelled(cfg.val, cfg.val_split, "--val", cfg.reader) if cfg.val else None
    _check_teacher(teacher, target, source)
    inputs = {
        "teacher": file_fingerprint(teacher),
        "source": source.fingerprint(),
        "target": target.fingerprint(),
    }
    if val is not None:
        inputs["val"] = val.fingerprint()
    init_file = _parse_init(cfg.student_init)[1]
    if init_file is not None:
        inputs["student_init"] = file_fingerprint(init_file)
    # Joined here, so the rounds' stages leave the process group (torchrun) to this one.
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    done = prepare_out_dir(out, "distill", inputs, to_dict(cfg), [teacher])
    if done is not None:
        shutdown(runtime)
        return done

    rounds: list[dict] = []
    current = teacher
    for r in range(1, cfg.rounds + 1):
        previous = rounds[-1] if rounds else None
        rounds.append(_round(cfg, r, current, out / f"round{r}", inputs, previous))
        current = Path(rounds[-1]["student"])
    results = {
        "rounds": rounds,
        "teacher_mIoU": rounds[0]["teacher_mIoU"],
        "student_mIoU": rounds[-1]["student_mIoU"],
        "model.pt": f"the student of round {cfg.rounds} ({Path(current).name} of its train/)",
    }
    manifest: dict = {}
    if runtime.is_main:
        atomic_write(out / "model.pt", lambda tmp: shutil.copyfile(current, tmp))
        _print_summary(rounds)
        paths = {"teacher": teacher}
        manifest = finish(out, "distill", to_dict(cfg), inputs, results, timer, paths)
    shutdown(runtime)
    return manifest


def _check(cfg: DistillConfig) -> None:
    if not cfg.source:
        raise UserError("--source is required (KIND:PATH of labelled source data)")
    if not cfg.target:
        raise UserError("--target is required (KIND:PATH of the target images)")
    if cfg.rounds < 1:
        raise UserError(f"--rounds {cfg.rounds}: must be at least 1")
    _parse_init(cfg.student_init)


def _parse_init(spec: str) -> tuple[str, Path | None]:
    """``student_init`` as (kind, file or None); a malformed one is a user error."""
    kind, sep, path = spec.partition(":")
    needs_file = kind in ("weights", "checkpoint")
    if kind not in INIT_KINDS or needs_file != bool(sep and path):
        raise UserError(
            f"--student-init {spec!r}: expected pretrained, scratch, teacher, weights:FILE "
            "or checkpoint:FILE"
        )
    if needs_file and not Path(path).is_file():
        raise UserError(f"--student-init {spec}: file not found")
    return kind, Path(path) if needs_file else None


def _check_teacher(path: Path, target: SegDataset, source: SegDataset) -> None:
    """Refuse a teacher checkpoint that is missing, unreadable or made for other classes."""
    try:
        ckpt = load_checkpoint(path)
        check_classes(path, ckpt, target.taxonomy.classes)
        check_classes(path, ckpt, source.taxonomy.classes)
    except UserError as exc:
        raise UserError(f"--teacher {exc}") from None


# ----------------------------------------------------------------------------- one round


def _round_config(cfg: DistillConfig) -> dict:
    """What a round's content depends on: the configuration without the round count."""
    data = to_dict(cfg)
    data.pop("rounds")
    return data


def _round(
    cfg: DistillConfig, r: int, teacher: Path, rdir: Path, data: dict, previous: dict | None
) -> dict:
    """Run (or skip, when finished) round ``r``; returns its manifest's results. ``data``:
    the fingerprints of the run's inputs (the round's teacher replaces the run's)."""
    timer = Timer()
    inputs = {**data, "teacher": file_fingerprint(teacher)}
    done = prepare_out_dir(rdir, ROUND_STAGE, inputs, _round_config(cfg))
    if done is not None:
        return done["results"]
    console.rule(f"[bold]distill round {r} of {cfg.rounds}")
    seed = cfg.seed + r - 1
    pcfg = pseudolabel.PseudolabelConfig(
        target=cfg.target, split=cfg.target_split, output_stride=cfg.pseudo_output_stride,
        ignore_below=cfg.distill.threshold, num_workers=cfg.num_workers, seed=seed,
        device=cfg.device, amp=cfg.amp, inference=InferenceChoice.of(cfg.pseudo_inference),
        reader=cfg.reader,
    )  # fmt: skip
    pseudo_manifest = pseudolabel.run(pcfg, teacher, rdir / "pseudo")
    pseudo = rdir / "pseudo" / pseudolabel.FILE
    init = rdir / "student_init.pt"
    _write_student_init(cfg, teacher, init, seed)
    trained = adapt.run(_adapt_config(cfg, pseudo, seed), init, rdir / "train")
    student = rdir / "train" / ("best.pt" if cfg.val else "model.pt")
    teacher_metrics = previous["student_metrics"] if previous else None
    student_metrics = None
    if cfg.val:
        if previous is None:
            teacher_metrics = str(_evaluate(cfg, teacher, rdir / "eval-teacher"))
        student_metrics = str(_evaluate(cfg, student, rdir / "eval-student"))
    quality = pseudo_manifest.get("results", {}).get("quality", {})
    results = {
        "round": r,
        "teacher": str(teacher),
        "student": str(student),
        "teacher_mIoU": _miou(teacher_metrics),
        "student_mIoU": _miou(student_metrics),
        "pseudo_mIoU": quality.get("mIoU"),
        "pseudo_confident": _confident_share(pseudo),
        "iterations": trained.get("results", {}).get("iterations"),
        "teacher_metrics": teacher_metrics,
        "student_metrics": student_metrics,
    }
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    if runtime.is_main:
        write_manifest(rdir, ROUND_STAGE, _round_config(cfg), inputs, results, timer.seconds())
    runtime.barrier()
    return results


def _adapt_config(cfg: DistillConfig, pseudo: Path, seed: int) -> adapt.AdaptConfig:
    return adapt.AdaptConfig(
        method="distill", setting="uda", source=cfg.source, source_split=cfg.source_split,
        target=cfg.target, target_split=cfg.target_split, val=cfg.val, val_split=cfg.val_split,
        pseudo=str(pseudo), eval_model="student", seed=seed, device=cfg.device, amp=cfg.amp,
        batch_size=cfg.batch_size, num_workers=cfg.num_workers, optim=cfg.optim, loop=cfg.loop,
        augment=cfg.augment, self_training=cfg.self_training, eval=cfg.eval,
        distill=cfg.distill, channels_last=cfg.channels_last, compile=cfg.compile,
        sync_bn=cfg.sync_bn, reader=cfg.reader,
    )  # fmt: skip


def build_student(spec: str, teacher: dict, seed: int) -> dict:
    """The initial student as a checkpoint dict, for the classes of ``teacher`` (a loaded
    checkpoint): its architecture with timm's weights (``pretrained``), random
    (``scratch``) or a local backbone file (``weights:FILE``), decode heads random (seeded);
    or another checkpoint's architecture and weights (``checkpoint:FILE``), or the
    teacher's (``teacher``)."""
    kind, path = _parse_init(spec)
    if kind == "teacher":
        config, state = teacher["model_config"], teacher["state_dict"]
    elif kind == "checkpoint":
        assert path is not None
        try:
            other = load_checkpoint(path)
            check_classes(path, other, teacher["classes"])
        except UserError as exc:
            raise UserError(f"--student-init {exc}") from None
        config, state = other["model_config"], other["state_dict"]
    else:
        model_cfg = dataclasses.replace(
            SegmentorConfig.from_dict(teacher["model_config"]),
            pretrained=kind == "pretrained",
            weights_file=str(path) if kind == "weights" else None,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = build_segmentor(model_cfg).state_dict()
        config = model_cfg.to_dict()
    return {
        "model_config": config,
        "classes": list(teacher["classes"]),
        "palette": teacher.get("palette", []),
        "state_dict": state,
        "step": 0,
        "meta": {"stage": "distill", "student_init": spec},
    }


def _write_student_init(cfg: DistillConfig, teacher: Path, path: Path, seed: int) -> None:
    """``student_init.pt``, written once by the main process; refused when an earlier run
    wrote it with another ``student_init``."""
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    if path.is_file():
        made = load_checkpoint(path).get("meta", {}).get("student_init")
        if made != cfg.student_init:
            raise UserError(
                f"{path}: a student initialised with --student-init {made}, not "
                f"{cfg.student_init}; use another --out or delete {path.parent}"
            )
    elif runtime.is_main:
        save_checkpoint(path, build_student(cfg.student_init, load_checkpoint(teacher), seed))
    runtime.barrier()


def _evaluate(cfg: DistillConfig, model: Path, out: Path) -> Path:
    """``stages.eval`` of ``model`` on ``--val``; returns its ``metrics.json``."""
    assert cfg.val is not None
    ecfg = eval_stage.EvalConfig(
        data=cfg.val, split=cfg.val_split, seed=cfg.seed, device=cfg.device, amp=cfg.amp,
        eval=InferenceChoice.of(cfg.eval), reader=cfg.reader,
    )  # fmt: skip
    eval_stage.run(ecfg, model, out)
    return out / "metrics.json"


def _miou(metrics: str | None) -> float | None:
    return read_json(Path(metrics))["mIoU"] if metrics else None


def _confident_share(pseudo: Path) -> float:
    """Share of the label cells whose hard label survived the threshold."""
    with PseudoLabelFile(pseudo) as labels:
        cells = int(labels.grid_sizes.prod(axis=1).sum())
        return round(float(labels.class_counts.sum()) / max(cells, 1), 4)


def _print_summary(rounds: list[dict]) -> None:
    print_table(distill_table(rounds, "distill: rounds"))
    if rounds[0]["teacher_metrics"] is None:
        return
    rows = [("teacher", read_json(Path(rounds[0]["teacher_metrics"])))]
    rows += [(f"round {x['round']}", read_json(Path(x["student_metrics"]))) for x in rounds]
    classes = list(rows[0][1]["per_class"].keys())
    print_table(comparison_table(rows, classes, "distill: val IoU per model"))
