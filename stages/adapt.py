"""``pixcli adapt``: self-training from a warmed-up checkpoint, with a method plugged in.

Settings: ``uda`` (labelled source + unlabelled target), ``semi`` (a labelled part of the
target + the rest unlabelled; ``--labeled-fraction`` or ``--labeled-list``), ``supervised``
(labelled data only; with ``--labeled-fraction`` / ``--labeled-list``, the share of
``--source`` that ``semi`` would label: its labelled-only baseline). The unlabelled step is
DACS's (``pixcli.engine.self_training``) or, by default for ``semi``, UniMatch's
(``pixcli.engine.semi_step``; ``self_training.consistency`` chooses). Writes ``model.pt`` (the
last student), ``best.pt`` (best on ``--val``), ``last.pt`` (resumable), ``train_log.jsonl``,
``manifest.json``, and with a labelled share ``labelled.txt`` (+ ``unlabelled.txt`` for
``semi``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from pixcli.artifacts import file_fingerprint
from pixcli.config import load_config, to_dict
from pixcli.data.rare_class import RareClassSampler, class_pixel_counts
from pixcli.data.readers import ReaderConfig, SegDataset, open_dataset
from pixcli.data.splits import labelled_share, share_requested, write_split
from pixcli.data.training_set import SegTrainSet, infinite_loader
from pixcli.data.transforms import AugmentConfig
from pixcli.engine.evaluation import evaluate_dataset
from pixcli.engine.inference import InferenceConfig
from pixcli.engine.optim import OptimConfig, build_optimizer, model_param_groups
from pixcli.engine.pseudo_quality import PseudoLabelMonitor
from pixcli.engine.runtime import setup_runtime, shutdown, training_model, unwrap
from pixcli.engine.self_training import SelfTrainingConfig, SelfTrainingStep
from pixcli.engine.semi_step import UniMatchConfig, UniMatchStep
from pixcli.engine.tracking import VAL_PREVIEWS
from pixcli.engine.trainer import LoopConfig, TrainLoop
from pixcli.errors import UserError
from pixcli.losses.cpsl import CPSLConfig
from pixcli.losses.distillation import KDConfig
from pixcli.losses.ipixmatch import IPixMatchConfig
from pixcli.losses.pgpc import PGPCConfig
from pixcli.losses.pixl import PiXLConfig
from pixcli.methods import METHODS, Method, MethodSetup
from stages.common import Timer, finish, load_model_for, open_labelled, prepare_out_dir

SETTINGS = ("uda", "semi", "supervised")
CONSISTENCY = ("auto", "dacs", "unimatch")


@dataclass
class AdaptConfig:
    method: str = "none"  # none | cpsl | pgpc | pixl | ipixmatch
    setting: str = "uda"  # uda | semi | supervised
    source: str | None = None  # KIND:PATH, labelled (uda, supervised)
    source_split: str = "train"
    target: str | None = None  # KIND:PATH (uda: unlabelled; semi: partly labelled)
    target_split: str = "train"
    val: str | None = None
    val_split: str = "val"
    pseudo: str | None = None  # pseudo.h5 (cpsl)
    labeled_fraction: float | None = None  # labelled share of the target (semi) or source
    labeled_list: str | None = None  # or a file with one labelled image name per line
    eval_model: str = "student"  # which network val and model.pt use: student | teacher
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True  # CUDA: NHWC memory format
    compile: bool = False  # torch.compile the student (--compile)
    sync_bn: bool = False  # torchrun on CUDA: SyncBatchNorm in the student
    batch_size: int = 4  # per process and stream
    num_workers: int = 2
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    unimatch: UniMatchConfig = field(default_factory=UniMatchConfig)  # the semi step's settings
    eval: InferenceConfig = field(default_factory=InferenceConfig)
    cpsl: CPSLConfig = field(default_factory=CPSLConfig)  # [cpsl] section, --method cpsl
    ipixmatch: IPixMatchConfig = field(default_factory=IPixMatchConfig)  # --method ipixmatch
    distill: KDConfig = field(default_factory=KDConfig)  # [distill], --method distill
    pgpc: PGPCConfig = field(default_factory=PGPCConfig)  # [pgpc] section, --method pgpc
    pixl: PiXLConfig = field(default_factory=PiXLConfig)  # [pixl] section, --method pixl
    reader: ReaderConfig = field(default_factory=ReaderConfig)  # [reader]: acdc, darkzurich, folder


# Each method's bare defaults: its paper's GPU recipe (optimiser, schedule, teacher, rare-class
# sampling, iterations). A TOML file and --set go on top (examples/demo_adapt.toml is the CPU
# recipe). DAFormer's thing-class feature distance stays off: it needs ImageNet weights.
_DAFORMER_OPTIM = OptimConfig(  # DAFormer / PGPC Sec. 4.1 / PiXL Sec. 4.3
    name="adamw", lr=6e-5, head_lr_mult=10.0, weight_decay=0.01, poly_power=1.0,
    warmup_iters=1500,
)  # fmt: skip
_DAFORMER_TEACHER = SelfTrainingConfig(ema_momentum=0.999, ema_ramp=True, rare_class_sampling=True)
PAPER_RECIPES: dict[str, dict] = {
    "none": {"optim": _DAFORMER_OPTIM, "iterations": 40_000, "self_training": _DAFORMER_TEACHER},
    "pgpc": {"optim": _DAFORMER_OPTIM, "iterations": 60_000, "self_training": _DAFORMER_TEACHER},
    "pixl": {"optim": _DAFORMER_OPTIM, "iterations": 60_000, "self_training": _DAFORMER_TEACHER},
    # CPSL Sec. 4.1: SGD momentum 0.9, lr 1e-4 (f_SL 5e-4: CPSLConfig.head_lr), weight decay
    # 2e-4, poly 0.9; momentum networks at a constant 0.999 (no ramp). Iterations: not given.
    "cpsl": {
        "optim": OptimConfig(name="sgd", lr=1e-4, head_lr_mult=10.0, weight_decay=2e-4),
        "self_training": SelfTrainingConfig(ema_momentum=0.999, ema_ramp=False),
    },
}


def paper_recipe(method: str) -> AdaptConfig:
    """``AdaptConfig`` with ``method``'s paper recipe as its defaults (``PAPER_RECIPES``; the
    loop's own defaults for a method without one, e.g. ipixmatch: see its example TOML)."""
    recipe = PAPER_RECIPES.get(method, {})
    cfg = AdaptConfig(method=method)
    if "optim" in recipe:
        cfg.optim = copy.deepcopy(recipe["optim"])
    if "self_training" in recipe:
        cfg.self_training = copy.deepcopy(recipe["self_training"])
    if "iterations" in recipe:
        cfg.loop.iterations = recipe["iterations"]
    return cfg


def load_adapt_config(file: Path | None, overrides: dict) -> AdaptConfig:
    """The run's settings: the chosen method's paper recipe (``paper_recipe``), updated by the
    TOML ``file`` and then by the command line's dotted ``overrides``."""
    method = load_config(AdaptConfig, file, overrides).method
    return load_config(AdaptConfig, file, overrides, base=paper_recipe(method))


def _streams(cfg: AdaptConfig) -> tuple[SegDataset, SegDataset | None]:
    """The labelled and unlabelled datasets of the setting."""
    if cfg.setting not in SETTINGS:
        raise UserError(f"--setting {cfg.setting}: expected one of {', '.join(SETTINGS)}")
    if cfg.setting == "semi":
        if not cfg.target:
            raise UserError("--setting semi needs --target (the partly labelled data)")
        if not share_requested(cfg.labeled_fraction, cfg.labeled_list):
            raise UserError("--setting semi needs --labeled-fraction F or --labeled-list FILE")
        target = open_dataset(cfg.target, cfg.target_split, options=cfg.reader)
        labelled, unlabelled = labelled_share(
            target, cfg.labeled_fraction, cfg.labeled_list, cfg.seed
        )
        if not labelled.has_labels:
            raise UserError(f"--target {cfg.target}: the labelled part has no label files")
        if unlabelled is None:
            raise UserError("--setting semi: every image is labelled; use --setting supervised")
        return labelled, unlabelled
    if not cfg.source:
        raise UserError(f"--setting {cfg.setting} needs --source (KIND:PATH of labelled data)")
    source = open_labelled(cfg.source, cfg.source_split, "--source", cfg.reader)
    if cfg.setting == "supervised":
        if not share_requested(cfg.labeled_fraction, cfg.labeled_list):
            return source, None
        # the labelled-only baseline of a semi run: the same split of the same images
        return labelled_share(source, cfg.labeled_fraction, cfg.labeled_list, cfg.seed)[0], None
    if share_requested(cfg.labeled_fraction, cfg.labeled_list):
        raise UserError("--labeled-fraction / --labeled-list: for --setting semi or supervised")
    if not cfg.target:
        raise UserError("--setting uda needs --target (KIND:PATH of unlabelled target data)")
    return source, open_dataset(cfg.target, cfg.target_split, options=cfg.reader)


def consistency(cfg: AdaptConfig, method_cls: type[Method] = Method) -> str:
    """The unlabelled step: ``self_training.consistency``, where ``auto`` is UniMatch's for
    ``--setting semi`` and DACS's otherwise, among the steps the method works with
    (``Method.steps``), or the method's ``paper_step`` (PiXL: DACS's in every setting)."""
    name = cfg.self_training.consistency
    if name not in CONSISTENCY:
        raise UserError(
            f"self_training.consistency {name!r}: expected one of {', '.join(CONSISTENCY)}"
        )
    if name == "auto":
        if method_cls.paper_step is not None:
            return method_cls.paper_step
        name = "unimatch" if cfg.setting == "semi" else "dacs"
        return name if name in method_cls.steps else method_cls.steps[0]
    if name not in method_cls.steps:
        raise UserError(
            f"--method {cfg.method} works with self_training.consistency "
            f"{' or '.join(method_cls.steps)}, not {name!r}"
        )
    return name


def run(cfg: AdaptConfig, checkpoint: Path, out: Path) -> dict:
    """Adapt the model in ``checkpoint``; see the module docstring."""
    if cfg.method not in METHODS:
        raise UserError(f"--method {cfg.method}: expected one of {', '.join(METHODS)}")
    method_cls = METHODS[cfg.method]
    step_kind = consistency(cfg, method_cls)
    if method_cls.needs_pseudo_file and not cfg.pseudo:
        raise UserError(f"--method {cfg.method} needs --pseudo pseudo.h5 (pixcli pseudolabel)")
    timer = Timer()
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed, cfg.channels_last)
    labelled, unlabelled = _streams(cfg)
    val = open_labelled(cfg.val, cfg.val_split, "--val", cfg.reader) if cfg.val else None
    inputs = {"checkpoint": file_fingerprint(checkpoint), "labelled": labelled.fingerprint()}
    if unlabelled is not None:
        inputs["unlabelled"] = unlabelled.fingerprint()
    if cfg.pseudo:
        inputs["pseudo"] = file_fingerprint(Path(cfg.pseudo))
    student, ckpt = load_model_for(checkpoint, labelled, runtime)
    input_files = [checkpoint, *([Path(cfg.pseudo)] if cfg.pseudo else [])]
    done = prepare_out_dir(out, "adapt", inputs, to_dict(cfg), input_files)
    if done is not None:
        shutdown(runtime)
        return done
    if runtime.is_main and share_requested(cfg.labeled_fraction, cfg.labeled_list):
        write_split(out, labelled, unlabelled)

    setup = MethodSetup(
        num_classes=student.config.num_classes,
        feature_dim=student.config.feature_dim,
        device=runtime.device,
        unlabelled=unlabelled,
        pseudo=Path(cfg.pseudo) if cfg.pseudo else None,
        total_steps=cfg.loop.iterations,
        checkpoint_fingerprint=inputs["checkpoint"],
        target_fingerprint=open_dataset(
            cfg.target, cfg.target_split, options=cfg.reader
        ).fingerprint()
        if cfg.pseudo and cfg.target
        else None,
    )
    method_cfg = getattr(cfg, cfg.method, None)  # the method's own section, if it has one
    method = method_cls(setup, method_cfg) if method_cfg is not None else method_cls(setup)
    method.to(runtime.device)
    method.prepare_student(student)  # before the teacher copy and DDP (e.g. a projection head)
    student.train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    ddp_student = training_model(student, runtime, cfg.sync_bn, cfg.compile)
    groups = model_param_groups(student, cfg.optim)
    method_params = [p for p in method.parameters() if p.requires_grad]
    if method_params:
        groups.append({"params": method_params, "lr": cfg.optim.lr * method.head_lr_mult})
    optimizer = build_optimizer(groups, cfg.optim)
    scaler = runtime.grad_scaler()
    meta = {
        "stage": "adapt",
        "classes": list(ckpt["classes"]),
        "palette": ckpt.get("palette", []),
        "config": to_dict(cfg),
        "inputs": inputs,
    }
    eval_net = (lambda: teacher) if cfg.eval_model == "teacher" else (lambda: unwrap(ddp_student))

    def evaluate() -> dict:
        assert val is not None
        return evaluate_dataset(
            eval_net(), val, cfg.eval, runtime, show_progress=False, previews=VAL_PREVIEWS
        )

    modules = {"model": student, "teacher": teacher, "method": method}
    loop = TrainLoop(
        out, runtime, cfg.loop, cfg.optim, modules, {"model": optimizer}, meta,
        evaluate=evaluate if val is not None else None, scaler=scaler,
        export="teacher" if cfg.eval_model == "teacher" else "model",
    )  # fmt: skip
    start = loop.resume()

    def stream(ds: SegDataset, salt: int, sampler: object = None) -> object:
        seed = cfg.seed + 1000 * runtime.rank + salt  # augmentation: + stream position
        return infinite_loader(
            SegTrainSet(ds, cfg.augment, seed=seed), cfg.batch_size, seed=cfg.seed + salt,
            num_workers=cfg.num_workers, rank=runtime.rank, world_size=runtime.world_size,
            start=start, sampler=sampler,
        )  # fmt: skip

    st = cfg.self_training
    rcs = None
    if st.rare_class_sampling:  # DAFormer Eq. 6-7 on the labelled stream
        rcs = RareClassSampler(
            class_pixel_counts(labelled, student.config.num_classes), cfg.batch_size,
            st.rcs_temperature, st.rcs_min_pixels, cfg.seed, runtime.rank,
            runtime.world_size, start,
        )  # fmt: skip

    args = (
        cfg.self_training, runtime, ddp_student, teacher, method, optimizer, scaler,
        stream(labelled, 0, rcs), stream(unlabelled, 1) if unlabelled is not None else None,
    )  # fmt: skip
    if step_kind == "unimatch":
        step = UniMatchStep(cfg.unimatch, *args, seed=cfg.seed + start)  # type: ignore[arg-type]
    else:
        step = SelfTrainingStep(*args, seed=cfg.seed + start)  # type: ignore[arg-type]
    if unlabelled is not None and unlabelled.has_labels:  # a benchmark or an oracle study
        semi = step_kind == "unimatch"
        threshold = cfg.unimatch.confidence_threshold if semi else st.confidence_threshold
        classes, window = unlabelled.taxonomy.classes, cfg.loop.log_every
        step.monitor = PseudoLabelMonitor(classes, threshold, window=window)
        step.teacher_monitor = PseudoLabelMonitor(
            classes, threshold, window=window, prefix="pl_teacher"
        )
    result = loop.run(step)
    results = {
        "method": cfg.method,
        "setting": cfg.setting,
        "consistency": step_kind,
        "iterations": result["step"],
        "val_last": result["last"],
        "val_best": result["best"],
        "model.pt": f"the last {cfg.eval_model}; best.pt: best on --val",
    }
    manifest: dict = {}
    if runtime.is_main:
        paths = {"checkpoint": checkpoint, **({"pseudo": Path(cfg.pseudo)} if cfg.pseudo else {})}
        manifest = finish(out, "adapt", meta["config"], inputs, results, timer, paths)
    shutdown(runtime)
    return manifest
