"""Several processes, one run: torch.distributed set up from the torchrun environment.

`torchrun --nproc_per_node=N main.py run ...` (and a slurm job that exports the same variables)
starts N copies of the command with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set;
`process_group(device)` joins them (NCCL on CUDA, gloo on CPU; with CUDA each rank takes
cuda:LOCAL_RANK). Without WORLD_SIZE > 1 everything here is a no-op for one process, so the harness
calls these helpers unconditionally.

Rank 0 is the only one that writes anything (run folder, logs, checkpoints, results); the others
train and decode their share and send what rank 0 needs through the object collectives below.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os

import torch
import torch.distributed as dist

from harness.errors import UserError

TIMEOUT = datetime.timedelta(hours=2)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def world_size() -> int:
    """Ranks in the process group; 1 outside one (whatever the environment says: work is only ever
    shared out among processes that can gather it back)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when training on CUDA under torchrun, else `device`."""
    if device.type == "cuda" and _env_int("WORLD_SIZE", 1) > 1:
        local, count = _env_int("LOCAL_RANK", 0), torch.cuda.device_count()
        if local >= count:
            raise UserError(f"LOCAL_RANK {local} but {count} CUDA devices here: start at most {count} processes "
                            "per node (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    return device


@contextlib.contextmanager
def process_group(device: torch.device):
    """Join the other ranks (env://) for the duration of the block, then leave cleanly. One
    process (no WORLD_SIZE, or 1) does nothing. Everyone has passed the barrier before the block
    starts, so what rank 0 writes next cannot race another rank's checks of the same files."""
    if _env_int("WORLD_SIZE", 1) <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A long timeout: the other ranks wait while rank 0 alone fills a cache (main_first) or scores a split.
    dist.init_process_group(backend, init_method="env://", timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    try:
        barrier()
        yield
    finally:
        dist.destroy_process_group()


def describe() -> str | None:
    """'N ranks, backend' under torchrun, None for one process."""
    return f"{world_size()} ranks, {dist.get_backend()}" if dist.is_initialized() else None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first, the others after it (e.g. filling a shared cache once)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def mean_across_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalars (e.g. the loss parts of a batch) averaged over the ranks, the same on every rank."""
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= world_size()
    return dict(zip(keys, stacked.tolist()))


def rank_console_handler() -> logging.Handler:
    """Console logging of a rank other than 0: warnings and errors only, prefixed with the rank
    (rank 0 logs everything, to the console and run.log)."""
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"[rank {rank()}] %(levelname)s %(name)s: %(message)s"))
    return handler
