"""Files written safely: atomic JSON and ``.npy`` (temp file + rename) and an advisory lock for one-producer
caches."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _atomic_write(path: Path, mode: str, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temp file in ``path``'s folder, fsync, then rename over ``path``: readers see the
    old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    _atomic_write(path, "w", lambda fh: json.dump(payload, fh, indent=1, sort_keys=True, default=str))


def atomic_save_npy(path: Path, array: Any) -> None:
    """Save a numpy array as ``.npy`` atomically (temp file + rename)."""
    import numpy as np

    _atomic_write(path, "wb", lambda fh: np.save(fh, array))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path``, so parallel jobs wait for one producer (of a cached artifact, of
    a submission) instead of all doing the same work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
