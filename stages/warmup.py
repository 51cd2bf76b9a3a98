"""``pixcli warmup``: source-only (or target-oracle) training, optionally with output-space
adversarial alignment (AdaptSegNet), the warm-up that CPSL and ProDA start from; with
``--labeled-fraction`` / ``--labeled-list``, on the labelled share of the source that
``pixcli adapt --setting semi`` takes of the same data (written to ``labelled.txt``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pixcli.config import to_dict
from pixcli.data.readers import ReaderConfig, SegDataset, open_dataset
from pixcli.data.splits import labelled_share, share_requested, write_split
from pixcli.data.training_set import SegTrainSet, infinite_loader
from pixcli.data.transforms import AugmentConfig
from pixcli.engine.evaluation import evaluate_dataset
from pixcli.engine.inference import InferenceConfig
from pixcli.engine.optim import OptimConfig, build_optimizer, model_param_groups
from pixcli.engine.runtime import (
    setup_runtime,
    shutdown,
    to_device,
    training_model,
    unwrap,
    wrap_ddp,
)
from pixcli.engine.tracking import VAL_PREVIEWS
from pixcli.engine.trainer import LoopConfig, TrainLoop
from pixcli.errors import UserError
from pixcli.losses.adversarial import (
    discriminator_loss,
    generator_adversarial_loss,
    softmax_map,
)
from pixcli.models import SegmentorConfig, build_segmentor
from pixcli.models.discriminator import OutputDiscriminator
from stages.common import Timer, finish, open_labelled, prepare_out_dir


@dataclass
class AdversarialConfig:
    """Output-space adversarial warm-up (AdaptSegNet; weights as the ProDA authors give)."""

    enabled: bool = False
    weight: float = 0.01  # lambda_adv for the segmentor (ProDA authors, LSGAN)
    lr: float = 1e-4  # discriminator Adam lr (AdaptSegNet)
    ndf: int = 64


@dataclass
class WarmupConfig:
    source: str = ""  # KIND:PATH, labelled
    source_split: str = "train"
    labeled_fraction: float | None = None  # train on a seeded share of the source (as adapt's)
    labeled_list: str | None = None  # or on the images named in this file
    val: str | None = None  # KIND:PATH, labelled; validated every loop.eval_every steps
    val_split: str = "val"
    target: str | None = None  # KIND:PATH, unlabelled target (adversarial only)
    target_split: str = "train"
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # CUDA: bf16, or fp16 with a gradient scaler
    channels_last: bool = True  # CUDA: NHWC memory format
    compile: bool = False  # torch.compile the model (--compile)
    sync_bn: bool = False  # torchrun on CUDA: SyncBatchNorm over the global batch
    batch_size: int = 8  # per process: the global batch is batch_size x processes
    num_workers: int = 2
    model: SegmentorConfig = field(default_factory=SegmentorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)  # [reader]: acdc, darkzurich, folder
    eval: InferenceConfig = field(default_factory=InferenceConfig)


def run(cfg: WarmupConfig, out: Path) -> dict:
    """Train, write ``model.pt`` (+ ``best.pt`` with --val), ``manifest.json``; return it."""
    if not cfg.source:
        raise UserError("--source is required (KIND:PATH of labelled data)")
    if cfg.adversarial.enabled and not cfg.target:
        raise UserError("--adversarial needs --target (KIND:PATH of unlabelled target images)")
    timer = Timer()
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed, cfg.channels_last)
    source = open_labelled(cfg.source, cfg.source_split, "--source", cfg.reader)
    share = share_requested(cfg.labeled_fraction, cfg.labeled_list)
    if share:
        source = labelled_share(source, cfg.labeled_fraction, cfg.labeled_list, cfg.seed)[0]
    val = open_labelled(cfg.val, cfg.val_split, "--val", cfg.reader) if cfg.val else None
    target = (
        open_dataset(cfg.target, cfg.target_split, options=cfg.reader)
        if cfg.adversarial.enabled
        else None
    )
    taxonomy = source.taxonomy
    inputs = {"source": source.fingerprint()}
    if val is not None:
        inputs["val"] = val.fingerprint()
    if target is not None:
        inputs["target"] = target.fingerprint()
    cfg.model.num_classes = taxonomy.num_classes
    done = prepare_out_dir(out, "warmup", inputs, to_dict(cfg))
    if done is not None:
        shutdown(runtime)
        return done
    if share and runtime.is_main:
        write_split(out, source, None)
    if val is not None and val.taxonomy.classes != taxonomy.classes:
        raise UserError(f"--val {cfg.val}: its classes differ from the source's")

    model = to_device(build_segmentor(cfg.model), runtime).train()
    ddp_model = training_model(model, runtime, cfg.sync_bn, cfg.compile)
    optimizer = build_optimizer(model_param_groups(model, cfg.optim), cfg.optim)
    modules: dict[str, torch.nn.Module] = {"model": model}
    optimizers: dict[str, torch.optim.Optimizer] = {"model": optimizer}
    disc = ddp_disc = None
    if cfg.adversarial.enabled:
        disc = to_device(OutputDiscriminator(taxonomy.num_classes, cfg.adversarial.ndf), runtime)
        # its own DDP: the same start on every rank, gradients averaged in its update
        ddp_disc = wrap_ddp(disc, runtime)
        modules["discriminator"] = disc
        optimizers["discriminator"] = torch.optim.Adam(
            [{"params": disc.parameters(), "lr": cfg.adversarial.lr}], betas=(0.9, 0.99)
        )
    scaler = runtime.grad_scaler()
    meta = {
        "stage": "warmup",
        "classes": list(taxonomy.classes),
        "palette": [list(c) for c in taxonomy.palette],
        "config": to_dict(cfg),
        "inputs": inputs,
    }

    def evaluate() -> dict:
        assert val is not None
        return evaluate_dataset(
            unwrap(ddp_model), val, cfg.eval, runtime, show_progress=False, previews=VAL_PREVIEWS
        )

    loop = TrainLoop(
        out, runtime, cfg.loop, cfg.optim, modules, optimizers, meta,
        evaluate=evaluate if val is not None else None, scaler=scaler,
    )  # fmt: skip
    start = loop.resume()

    def stream(ds: SegDataset, salt: int) -> Iterator[dict]:
        """Batches in the global order (the same on every rank, resumed at ``start``), each
        rank its slice; augmentation seeded per rank and by stream position (so a resumed
        run augments as an uninterrupted one)."""
        return infinite_loader(
            SegTrainSet(ds, cfg.augment, seed=cfg.seed + 7919 * runtime.rank + salt),
            cfg.batch_size, seed=cfg.seed + salt, num_workers=cfg.num_workers,
            rank=runtime.rank, world_size=runtime.world_size, start=start,
        )  # fmt: skip

    src_iter = stream(source, 0)
    tgt_iter = stream(target, 1) if target is not None else None

    def step(_: int) -> dict[str, float]:
        batch = next(src_iter)
        image = batch["image"].to(runtime.device, non_blocking=True)
        label = batch["label"].to(runtime.device, non_blocking=True)
        logs: dict[str, float] = {}
        with runtime.autocast():
            logits = _full_size(ddp_model(image).logits, image)
            loss = F.cross_entropy(logits.float(), label, ignore_index=255)
        logs["loss_ce"] = loss.item()
        if disc is not None and tgt_iter is not None:
            t_image = next(tgt_iter)["image"].to(runtime.device, non_blocking=True)
            disc.requires_grad_(False)  # and called without DDP: no gradient for it here
            with runtime.autocast():
                t_logits = _full_size(ddp_model(t_image).logits, t_image)
                adv = generator_adversarial_loss(disc(softmax_map(t_logits)))
            loss = loss + cfg.adversarial.weight * adv
            logs["loss_adv"] = adv.item()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        if disc is not None and ddp_disc is not None:
            disc.requires_grad_(True)
            d_opt = optimizers["discriminator"]
            d_opt.zero_grad(set_to_none=True)
            with runtime.autocast():
                d_loss = discriminator_loss(
                    ddp_disc(softmax_map(logits.detach())),
                    ddp_disc(softmax_map(t_logits.detach())),
                )
            scaler.scale(d_loss).backward()
            scaler.step(d_opt)
            logs["loss_d"] = d_loss.item()
        scaler.update()
        return logs

    result = loop.run(step)
    results = {"iterations": result["step"], "val_last": result["last"], "val_best": result["best"]}
    manifest: dict = {}
    if runtime.is_main:
        manifest = finish(out, "warmup", to_dict(cfg), inputs, results, timer)
    shutdown(runtime)
    return manifest


def _full_size(logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
