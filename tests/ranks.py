"""Shared pieces of the multi-process tests (tests/test_distributed.py, tests/test_fsdp.py): the data written once by
the test process, and ranks started on CPU (gloo) with a deadline."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from ptyl import distributed as ddp


def write_digits(path: Path, num_train: int) -> None:
    """The first ``num_train`` sklearn digits (x in [0, 1]), written by the test process: the ranks skip importing
    scikit-learn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:num_train], dtype=torch.float32) / 16.0
    save_file({"x": x, "y": torch.tensor(d.target[:num_train], dtype=torch.long)}, str(path))


def init_rank(rank: int, port: int, world: int, timeout_s: float) -> torch.device:
    """In a rank: one thread, the torchrun environment variables, the CPU process group."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    return ddp.init_from_env(device="cpu", timeout_s=timeout_s)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, root: Path, world: int, timeout_s: float, label: str) -> None:
    """Run ``worker(rank, port, str(root))`` in ``world`` spawned processes; raise if a rank fails or the ranks are not
    done within ``timeout_s`` (then every rank still alive is killed)."""
    ctx = mp.start_processes(worker, args=(_free_port(), str(root)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):  # raises if a rank failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label} ranks did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
