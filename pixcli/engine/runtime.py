"""Everything about devices and processes: CPU/CUDA, AMP, torchrun (DDP), seeds.

A stage calls :func:`setup_runtime` once. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) it joins the process group: NCCL on CUDA, gloo on the CPU. Only the main
rank writes shared artifacts (``runtime.is_main``).
"""

from __future__ import annotations

import os
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pixcli.errors import UserError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp: bool = False  # mixed precision (CUDA only)
    amp_dtype: torch.dtype = torch.bfloat16

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


def setup_runtime(device: str = "auto", amp: bool = True, seed: int = 0) -> Runtime:
    """Pick the device, join torchrun's process group if launched by it, seed every RNG.

    Each rank gets ``seed + rank`` so that data order and augmentation differ per process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    use_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    runtime = Runtime(
        device=dev,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        amp=amp and dev.type == "cuda",
        amp_dtype=torch.bfloat16 if use_bf16 else torch.float16,
    )
    seed_everything(seed + rank)
    return runtime


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def shutdown(runtime: Runtime) -> None:
    """Leave the process group (after a barrier, so no rank exits while others still talk)."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """DistributedDataParallel under torchrun, the model itself otherwise."""
    if not runtime.distributed:
        return model
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
