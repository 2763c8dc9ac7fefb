"""Run a test's worker on CPU processes joined by a gloo process group (``torch.distributed``).

A worker is a module-level function ``worker(rank) -> dict`` (it is pickled by name for the spawned
processes); :func:`run_on_gloo_ranks` returns the dict each rank returned, in rank order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, worker: Callable[[int], dict], init_file: str, out_dir: str, world: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(worker(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(worker: Callable[[int], dict], tmp_path: Path, world: int = 2) -> list[dict]:
    """``worker(rank)`` on ``world`` processes (gloo, one thread each); what each rank returned."""
    mp.spawn(_rank_main, args=(worker, str(tmp_path / "init"), str(tmp_path), world), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
