"""Shared fixtures: a tiny built-in benchmark (see ``tiny.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny import TINY_BENCHMARK

from pixcli.data.benchmark import make_benchmark

# Two threads (the CI machine's cores), unless OMP_NUM_THREADS says otherwise (a busy machine).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    make_benchmark(out, TINY_BENCHMARK)
    return out
