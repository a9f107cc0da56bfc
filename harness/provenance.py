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


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def provenance(device: str) -> dict[str, Any]:
    slurm = {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                                        "SLURM_RESTART_COUNT") if k in os.environ}
    return {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "device": device,
        "device_name": device_name(device),
        "hostname": socket.gethostname(),
        "slurm": slurm or None,
    }
