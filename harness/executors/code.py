"""Code identity of a job: what it was submitted with, and the check it makes when it starts.

A submission records the git commit and a fingerprint of the ``harness/``, ``methods/`` and ``tasks/`` sources
(uncommitted edits included). A job compares them when it starts and, with ``code_check: refuse`` (the default),
stops before running any trial when the code changed in between (``harness status`` shows why; ``harness run``
resubmits on the current code). ``warn`` runs anyway and says so in the log; each record's provenance still names
the code that ran it.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.sweep import REPO_ROOT

CODE_DIRS = ("harness", "methods", "tasks")


def code_fingerprint(root: Path = REPO_ROOT) -> str:
    """sha256 over the harness/methods/tasks Python sources (paths and bytes): catches uncommitted edits too."""
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def code_identity() -> dict[str, Any]:
    """``{"commit", "dirty", "fingerprint"}`` of the code in this checkout now."""
    from harness.provenance import git_state

    return {**git_state(), "fingerprint": code_fingerprint()}


def check_code(submitted: dict[str, Any], mode: str) -> None:
    """Compare the code a job was submitted with to the code it is about to run: raise (``refuse``) or warn on
    stderr (``warn``) when the sources differ."""
    now = code_identity()
    if now["fingerprint"] == submitted.get("fingerprint"):
        return
    message = (f"the code changed since submission (submitted: commit {str(submitted.get('commit'))[:12]}"
               f"{' dirty' if submitted.get('dirty') else ''}, sources {submitted.get('fingerprint')}; now: commit "
               f"{str(now.get('commit'))[:12]}{' dirty' if now.get('dirty') else ''}, sources {now['fingerprint']})")
    if mode == "warn":
        print(f"[harness] warning: {message}; running anyway (code_check: warn)", file=sys.stderr, flush=True)
        return
    raise HarnessError(f"{message}; refusing to run (code_check: refuse). Resubmit with `harness run`, "
                       "or set executor.code_check: warn")
