"""A FIFO memory bank of pixel features with an aligned per-row payload (CPSL Sec. 3.2).

CPSL (Li et al., CVPR 2022, Sec. 3.2 "Online Cluster Assignment") keeps a queue of 65,536
L2-normalised pixel features from previous batches (128 images x 512 pixels) and solves the
Sinkhorn assignment over ``[current samples; queue]``. Each row can carry a payload (its
rectified label, for analysis or a contrastive term); row ``i`` of the payload always belongs
to row ``i`` of the features, also after the queue wraps around. (The published code shifted
its feature queue and its label queue by different amounts, so labels stopped matching
features; the tests here check the alignment after several wrap-arounds.)

Under DDP every rank pushes the rows of all ranks (MoCo's ``concat_all_gather``), so the
queues of all ranks stay identical; :func:`all_gather_rows` does that when
``torch.distributed`` is initialised and is the identity otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pixcli.data.taxonomy import IGNORE_INDEX

Gather = Callable[[Tensor], Tensor]


def _distributed_world() -> int:
    """World size of the initialised process group, 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def all_gather_rows(tensor: Tensor) -> Tensor:
    """Rows of ``tensor`` from every rank, concatenated in rank order (no gradient).

    Ranks may hold different numbers of rows (an image with fewer valid pixels than M): the
    counts are gathered first and every rank's rows are padded to the longest, then trimmed.
    Without an initialised process group (or with one process) ``tensor`` is returned as is.
    """
    world = _distributed_world()
    if world == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c)] for g, c in zip(gathered, counts, strict=True)])


class MemoryBank(nn.Module):
    """FIFO queue of L2-normalised features and an aligned payload (CPSL Sec. 3.2, memory M).

    The queue, its payload, the write pointer and the fill count are buffers, so the bank is
    saved and restored with ``state_dict`` and moves with ``.to(device)``. Rows are kept in
    storage order (not age order); Sinkhorn does not depend on the order.

    Args:
        length: number of rows (CPSL: 65,536).
        dim: feature dimension D.
        payload_shape: shape of one row's payload; ``()`` = one label per row.
        payload_dtype: payload dtype (labels: ``torch.long``).
        gather: applied to features and payload before they are written; default
            :func:`all_gather_rows` (DDP), pass ``None`` to keep rank-local queues.
    """

    features: Tensor
    payload: Tensor
    pointer: Tensor
    size: Tensor

    def __init__(
        self,
        length: int,
        dim: int,
        payload_shape: tuple[int, ...] = (),
        payload_dtype: torch.dtype = torch.long,
        gather: Gather | None = all_gather_rows,
    ) -> None:
        super().__init__()
        if length < 1 or dim < 1:
            raise ValueError(f"memory bank needs length >= 1 and dim >= 1, got {length}, {dim}")
        self.gather = gather
        self.register_buffer("features", torch.zeros(length, dim))
        self.register_buffer(
            "payload", torch.full((length, *payload_shape), IGNORE_INDEX, dtype=payload_dtype)
        )
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("size", torch.zeros((), dtype=torch.long))

    @property
    def length(self) -> int:
        return self.features.shape[0]

    def __len__(self) -> int:
        return int(self.size)

    @torch.no_grad()
    def push(self, features: Tensor, payload: Tensor) -> None:
        """Append rows (after the DDP gather), overwriting the oldest once full.

        ``features`` (``n x D``) are detached and L2-normalised; ``payload`` has ``n`` rows of
        ``payload_shape``. When more rows than ``length`` arrive, only the last ``length`` are
        kept.
        """
        if features.ndim != 2 or features.shape[1] != self.features.shape[1]:
            raise ValueError(f"features {tuple(features.shape)} do not fit the bank")
        if payload.shape != (features.shape[0], *self.payload.shape[1:]):
            raise ValueError(f"payload {tuple(payload.shape)} does not match features")
        features = F.normalize(features.detach().to(self.features), dim=1)
        payload = payload.detach().to(self.payload)
        if self.gather is not None:
            features, payload = self.gather(features), self.gather(payload)
        features, payload = features[-self.length :], payload[-self.length :]
        rows = (int(self.pointer) + torch.arange(features.shape[0])) % self.length
        rows = rows.to(self.features.device)
        self.features.index_copy_(0, rows, features)
        self.payload.index_copy_(0, rows, payload)
        self.pointer.fill_((int(self.pointer) + features.shape[0]) % self.length)
        self.size.fill_(min(int(self.size) + features.shape[0], self.length))

    def get(self) -> tuple[Tensor, Tensor]:
        """Features (``size x D``) and payload of the filled part, row-aligned."""
        filled = int(self.size)
        return self.features[:filled], self.payload[:filled]
