"""Multi-process training: starting the processes, joining and leaving their process group.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) each process joins the group with
:func:`init_distributed_from_env`; with ``workers > 1`` :func:`run_distributed` starts the
processes itself (spawned, DDP over gloo on 127.0.0.1) and forwards SIGINT/SIGTERM to them,
so that they stop at the same step and save. Gloo on CPU, NCCL on GPUs. Inside the group the
:class:`~onebit.train.Trainer` wraps the model in DistributedDataParallel and splits each batch.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import socket

import torch
import torch.distributed as dist

from onebit.heap import keep_freed_memory
from onebit.train.config import TrainConfig
from onebit.train.trainer import Interrupted, Trainer

__all__ = ["init_distributed_from_env", "end_distributed", "run_distributed"]


def init_distributed_from_env() -> bool:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``); gloo on CPU, NCCL with GPUs. Returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return True


def end_distributed(completed: bool) -> None:
    """Leave the process group. After a completed run the ranks first meet at a barrier, so they
    tear gloo down together: a rank that leaves while its peer is still finishing can abort the
    peer's connection threads ("terminate called without an active exception")."""
    if completed:
        dist.barrier()
    # A DistributedDataParallel wrapper (or any tensor a collective saw) keeps the group alive;
    # the last reference must go now, so that destroying the group joins gloo's threads while
    # the interpreter runs. A group left to interpreter shutdown has its threads release
    # Python tensors during finalization, which aborts the process.
    gc.collect()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, config_dict: dict, resume_dir: str | None) -> None:
    """One spawned process: join the group, train (or resume), evaluate, leave the group."""
    keep_freed_memory()  # a spawned interpreter: as the onebit command does in its own process
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    init_distributed_from_env()
    done, trainer = False, None
    try:
        config = TrainConfig.from_dict(config_dict)
        trainer = Trainer.from_run(resume_dir) if resume_dir else Trainer.from_config(config)
        try:
            trainer.fit()
        except Interrupted:
            pass
        if rank == 0:
            metrics = trainer.evaluate_metrics()
            trainer.console.print(f"test accuracy: {metrics['accuracy']:.4f}", highlight=False)
        else:
            trainer.evaluate_metrics()
        done = True
    finally:
        trainer = None  # its DDP wrapper holds the process group (see end_distributed)
        end_distributed(done)


def run_distributed(config: TrainConfig, workers: int, resume_dir: str | None = None) -> int:
    """Train with ``workers`` processes started here (DDP over gloo on 127.0.0.1).

    SIGTERM/SIGINT to this process are forwarded to the workers, which stop at the same step
    and save. Returns 0 on success, the signal's conventional status when stopped.
    """
    import torch.multiprocessing as mp

    config.validate()
    ctx = mp.start_processes(
        _worker,
        args=(workers, _free_port(), dataclasses.asdict(config), resume_dir),
        nprocs=workers,
        join=False,
        start_method="spawn",
    )
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not ctx.join(timeout=0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        return 130 if received[0] == signal.SIGINT else 0
    return 0
