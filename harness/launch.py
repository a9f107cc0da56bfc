"""``--devices N`` on one machine: the harness starts the N processes of a data-parallel command itself, the
torchrun way (each gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` in its environment and runs the same command line; :func:`harness.distributed.start` reads them).

Rank 0's output is the command's output; the other ranks' goes to a log file each (named when a rank fails). The
launcher waits for rank 0, gives the others a moment to end by themselves and then stops them, and returns rank
0's exit status (1 when rank 0 was killed or another rank failed on its own). Stopping the launcher (Ctrl-C,
SIGTERM) stops every rank.

What can be refused before any process starts is (:func:`preflight`): more processes than this machine has GPUs
(or CPU cores, with no GPU), more than one node without SLURM, a global batch smaller than the number of
processes, and a backend this torch build lacks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.distributed import SINGLE, World, check_backend, start
from harness.errors import HarnessError

#: seconds the other ranks get to end by themselves once rank 0 has ended
GRACE_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def preflight(devices: int, nodes: int, device: str, batch_sizes: dict[str, int], *, slurm: bool = False) -> None:
    """Refuse, in one line each, what a data-parallel command could not do, before anything starts:
    ``devices`` processes per node on ``nodes`` nodes, on ``device`` (``cuda`` or ``cpu``), with the global
    batches ``batch_sizes`` (setting name -> size). ``slurm``: the processes are SLURM tasks (the GPUs are the
    allocation's, checked by SLURM), else this machine's."""
    if devices < 1:
        raise HarnessError(f"--devices: expected 1 or more processes per node, got {devices}")
    if nodes < 1:
        raise HarnessError(f"--nodes: expected 1 or more, got {nodes}")
    if nodes > 1 and not slurm:
        raise HarnessError(f"--nodes {nodes}: several nodes need SLURM (harness run: add --executor slurm; or run "
                           f"the command as the tasks of `srun --nodes {nodes} --ntasks-per-node {devices}`); "
                           "without it the harness starts processes on this machine only")
    check_backend(device)
    if slurm:
        pass  # the GPUs and CPUs are the allocation's: SLURM refuses what the partition cannot give
    elif str(device).startswith("cuda"):
        import torch

        have = torch.cuda.device_count()
        if devices > have:
            raise HarnessError(f"--devices {devices}: this machine has {have} GPU(s) visible "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    else:
        from harness.train import usable_cpus

        have = usable_cpus()
        if devices > have:
            raise HarnessError(f"--devices {devices}: no GPU here, and this process may use {have} CPU core(s); "
                               "on CPUs each process (gloo) needs a core of its own")
    world = devices * nodes
    for name, size in batch_sizes.items():
        if size < world:
            raise HarnessError(f"{name} {size} is smaller than the {world} processes asked for: each process "
                               "needs at least one image of every global batch")


def start_or_launch(argv: list[str], devices: int, nodes: int, device: str,
                    batch_sizes: dict[str, int]) -> World | int:
    """In a rank of a data-parallel command: its :class:`~harness.distributed.World` (process group started).
    Otherwise, with ``devices`` x ``nodes`` > 1: check (:func:`preflight`), start the ranks running ``argv`` and
    return the exit status to end with. Else the one-process world. A command run as the ``devices`` x ``nodes``
    tasks of an ``srun`` step is already its ranks: each reads its rank from SLURM."""
    step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if devices * nodes > 1 and step_tasks == devices * nodes and "RANK" not in os.environ:
        os.environ["HARNESS_SLURM_DDP"] = "1"  # this command is one task of an srun step: its ranks are SLURM's
    world = start(device)
    if world.distributed:
        import atexit

        from harness.distributed import stop

        atexit.register(stop, world)
        return world
    if devices * nodes <= 1 and devices >= 1 and nodes >= 1:
        return SINGLE
    preflight(devices, nodes, device, batch_sizes)
    return launch(argv, devices)


def launch(argv: list[str], processes: int) -> int:
    """Run ``harness <argv>`` as ``processes`` ranks on this machine; return rank 0's exit status."""
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="harness-ranks-"))
    procs: list[subprocess.Popen] = []
    files: list[Any] = []

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for rank in range(processes):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
                   "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            out = None
            if rank > 0:
                out = open(logs / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
                files.append(out)
            procs.append(subprocess.Popen([sys.executable, "-m", "harness.cli", *argv], env=env, stdout=out,
                                          stderr=subprocess.STDOUT if out else None))
        code = procs[0].wait()
        deadline = time.monotonic() + GRACE_S
        for proc in procs[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(procs)
        for f in files:
            f.close()
    others = {rank: proc.returncode for rank, proc in enumerate(procs) if rank > 0}
    if code < 0:
        print(f"harness: error: rank 0 of {processes} was ended by signal {-code}; finished trials are "
              "recorded, rerun the same command to resume", file=sys.stderr)
        return 1
    failed = {r: c for r, c in others.items() if c not in (0, None) and c >= 0 and c != code}
    if code == 0 and failed:
        rank = min(failed)
        tail = (logs / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()[-3:]
        print(f"harness: error: rank {rank} ended with status {failed[rank]} (log {logs / f'rank{rank}.log'}): "
              + " | ".join(tail), file=sys.stderr)
        return 1
    if code == 0 and not failed:
        import shutil

        shutil.rmtree(logs, ignore_errors=True)
    return code


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)
