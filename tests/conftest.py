"""Shared fixtures: a tiny built-in benchmark (see ``tiny.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny import TINY_BENCHMARK, tiny_warmup

from pixcli.data.benchmark import make_benchmark
from stages import warmup

# Two threads (the CI machine's cores), unless OMP_NUM_THREADS says otherwise (a busy machine).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    make_benchmark(out, TINY_BENCHMARK)
    return out


@pytest.fixture(scope="session")
def warm(tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model warmed up for 2 steps on the tiny benchmark's source (read-only)."""
    out = tmp_path_factory.mktemp("warm")
    cfg = tiny_warmup(tiny_bench)
    cfg.loop.iterations = 2
    warmup.run(cfg, out)
    return out / "model.pt"
