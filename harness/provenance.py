"""Where a record came from: code version, packages, machine, scheduler job."""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("harness", "torch", "torchvision", "timm", "peft", "numpy", "scikit-learn", "submitit")


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """The commit of the harness checkout and whether it has uncommitted changes (None outside a checkout)."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model string (``/proc/cpuinfo``'s "model name"; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def device_identity(device: str) -> dict[str, Any]:
    """What decides a trial's speed besides the code: the device's model and, on the CPU, the threads torch uses
    and the instruction set its kernels were picked for (an AVX2-only machine runs other kernels than an AVX-512
    one). ``harness regress`` compares throughput only between records of one identity."""
    import torch

    if device.startswith("cuda"):
        return {"kind": "cuda", "model": device_name(device)}
    return {"kind": "cpu", "model": cpu_model(), "threads": torch.get_num_threads(),
            "isa": torch.backends.cpu.get_cpu_capability()}


#: trials this process has run so far (:func:`next_trial_in_process`)
_trials_in_process = 0


def next_trial_in_process() -> int:
    """0 for the first trial this process runs, 1 for the next, ...: a trial after others shares their process
    (warm caches, grown memory), one at 0 started fresh."""
    global _trials_in_process
    index = _trials_in_process
    _trials_in_process += 1
    return index


def execution(trial_in_process: int) -> dict[str, Any]:
    """How a trial was run: the executor (submitit says which in the jobs it starts; otherwise the trial ran in
    the command's own process) and whether other trials ran in its process before it."""
    return {"executor": os.environ.get("SUBMITIT_EXECUTOR") or "inline", "trial_in_process": trial_in_process,
            "shared_process": trial_in_process > 0}


def provenance(device: str, trial_in_process: int | None = None,
               plugins: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """``plugins``: the installed plug-in packages that gave what ran (role -> distribution, version, entry point;
    ``harness.registry.Registry.origin``), so a record names the third-party code besides the harness's commit."""
    slurm = {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                                        "SLURM_RESTART_COUNT") if k in os.environ}
    return {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "device": device,
        "device_name": device_name(device),
        "device_identity": device_identity(device),
        "execution": execution(trial_in_process) if trial_in_process is not None else None,
        "hostname": socket.gethostname(),
        "slurm": slurm or None,
        "plugins": plugins,
    }
