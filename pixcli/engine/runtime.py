"""Everything about devices and processes: CPU/CUDA, AMP, torchrun (DDP), seeds, the fast
path (channels_last, torch.compile, SyncBatchNorm).

A stage calls :func:`setup_runtime` once. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) it joins the process group: NCCL on CUDA, gloo on the CPU. Only the main
rank writes shared artifacts (``runtime.is_main``). Nothing assumes one machine: ``RANK``
and ``WORLD_SIZE`` are global (seeds, shards, who writes), ``LOCAL_RANK`` only picks the
GPU; the output directory must be on a file system every node sees.

A stage that runs other stages (``distill``) sets the runtime up first: the nested stages
find the process group joined and leave it to the outer one (:func:`shutdown` leaves only
a group its own :func:`setup_runtime` joined).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pixcli.engine.progress import console
from pixcli.errors import UserError

M = TypeVar("M", bound=nn.Module)


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp: bool = False  # mixed precision (CUDA only)
    amp_dtype: torch.dtype = torch.bfloat16
    channels_last: bool = False  # NHWC weights and activations (CUDA only)
    owns_group: bool = False  # this runtime joined the process group, so it leaves it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> AbstractContextManager:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The loss scaler a training step uses: active for fp16 AMP, a pass-through else."""
        fp16 = self.amp and self.device.type == "cuda" and self.amp_dtype == torch.float16
        return torch.amp.GradScaler("cuda", enabled=fp16)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is a GPU; ``cuda`` without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected auto, cpu or cuda")
    return torch.device(name)


def setup_runtime(
    device: str = "auto", amp: bool = True, seed: int = 0, channels_last: bool = True
) -> Runtime:
    """Pick the device, join torchrun's process group if launched by it, seed every RNG.

    Each rank gets ``seed + rank`` so that dropout and augmentation differ per process
    (the data order is global: ``data.training_set.GlobalOrderSampler``). AMP and
    ``channels_last`` apply on CUDA only: bf16 where the GPU has it, else fp16 (the
    training stages then scale the loss with a ``GradScaler``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    runtime = Runtime(
        device=dev,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        amp=amp and dev.type == "cuda",
        amp_dtype=amp_dtype_for(dev),
        channels_last=channels_last and dev.type == "cuda",
        owns_group=owns_group,
    )
    seed_everything(seed + rank)
    return runtime


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """The mixed-precision type on ``device``: bf16 where the GPU has it, else fp16."""
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if use_bf16 else torch.float16


def local_runtime(device: str | torch.device = "auto", amp: bool = True) -> Runtime:
    """A one-process runtime on ``device`` (``auto``, ``cpu``, ``cuda`` or a torch device)
    for library use (``pixcli.load``): unlike :func:`setup_runtime` it joins no process
    group and seeds nothing. AMP and ``channels_last`` apply on CUDA only, as there."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    cuda = dev.type == "cuda"
    return Runtime(device=dev, amp=amp and cuda, amp_dtype=amp_dtype_for(dev), channels_last=cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def shutdown(runtime: Runtime) -> None:
    """Leave the process group (after a barrier, so no rank exits while others still talk)
    if this runtime joined it; a nested stage's runtime only waits at the barrier."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        if runtime.owns_group:
            dist.destroy_process_group()


def to_device(model: M, runtime: Runtime) -> M:
    """``model`` on the runtime's device, in ``channels_last`` memory format when it asks."""
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def sync_batchnorm(model: nn.Module, runtime: Runtime, enabled: bool) -> nn.Module:
    """``model`` with SyncBatchNorm (statistics over the global batch) when ``enabled``,
    under torchrun and on CUDA; converted in place, parameters kept (optimisers stay valid).

    SyncBatchNorm works only on GPUs: under gloo on the CPU BatchNorm stays per process
    (said once on the main rank). timm's converter also handles its BatchNormAct layers.
    """
    if not enabled or not runtime.distributed:
        return model
    if runtime.device.type != "cuda":
        if runtime.is_main:
            console.print("sync_bn: SyncBatchNorm needs CUDA; BatchNorm stays per process")
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, runtime: Runtime) -> nn.Module:
    """DistributedDataParallel under torchrun, the model itself otherwise."""
    if not runtime.distributed:
        return model
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def average_gradients(params: Iterable[nn.Parameter], runtime: Runtime) -> None:
    """Average the gradients of ``params`` over the ranks, as DDP does for the model it
    wraps: for trained parameters outside it (e.g. a method's own head). Call it on every
    rank with the same parameters, after the backward pass and before the optimiser (and
    its loss scaler) looks at them. A parameter with no gradient on any rank keeps none;
    one with a gradient on some ranks only gets the mean with zeros for the others."""
    if not runtime.distributed:
        return
    trained = [p for p in params if p.requires_grad]
    if not trained:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trained]
    has = torch.tensor([float(p.grad is not None) for p in trained], device=trained[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [has])
    dist.all_reduce(flat)
    flat[: -len(trained)] /= runtime.world_size
    offset = 0
    for p, g, any_grad in zip(trained, grads, flat[-len(trained) :].tolist(), strict=True):
        n = g.numel()
        if any_grad > 0:
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype, copy=True)
        offset += n


def compile_model(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when ``enabled`` (compiled on the first call; the wrapper
    shares the parameters, :func:`unwrap` gives the module back)."""
    return torch.compile(model) if enabled else model  # type: ignore[return-value]


def training_model(
    model: nn.Module, runtime: Runtime, sync_bn: bool = False, compile: bool = False
) -> nn.Module:
    """What a training step calls: ``model`` with SyncBatchNorm (``sync_bn``), wrapped in
    DDP under torchrun, then compiled (``compile``; DDP first, as PyTorch recommends, so
    that compiled graphs break at DDP's gradient buckets)."""
    return compile_model(wrap_ddp(sync_batchnorm(model, runtime, sync_bn), runtime), compile)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model
