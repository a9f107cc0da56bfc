"""What the queue says about submitted jobs: SLURM's state (``squeue``, then ``sacct``), whether a local job's
process is alive, a job's result pickle as a last resort, and the tail of its log.

Records and the queue are the truth; nothing here waits on a job. ``job.result()`` can block for seconds after a
cancel and ``job.state`` can be stale (.ci/SLURM_NOTES.md), so squeue is asked once for every alive job and sacct
for the others; a result pickle is read only when it is newer than the submission (job ids restart on a
reinstalled cluster).
"""

from __future__ import annotations

import getpass
import os
import pickle
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's own default MaxArraySize

#: job states that mean the job is over (SLURM's, plus ENDED: a local process gone without a result)
ENDED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "REVOKED", "ENDED")

_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Failed|Interrupt|Exit)\b\S*: ")


class QueueUnavailable(HarnessError):
    """squeue/scontrol is missing, failed or did not answer."""


def _command(cmd: list[str], timeout: float = 30) -> str:
    """A SLURM client command's stdout; QueueUnavailable with one clear line when it cannot be had."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise QueueUnavailable(f"`{cmd[0]}` not found: is this a SLURM login node?") from None
    except subprocess.TimeoutExpired:
        raise QueueUnavailable(f"`{' '.join(cmd[:2])}` did not answer in {timeout:.0f} s (slurmctld down?)") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise QueueUnavailable(f"`{' '.join(cmd[:2])}` failed: {last}")
    return out.stdout


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it); 1 when arrays are disabled. Raises
    QueueUnavailable when SLURM cannot be asked."""
    text = _command(["scontrol", "show", "config"])
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.M)
    return max(1, int(found.group(1))) if found else DEFAULT_MAX_ARRAY_SIZE


def slurm_states(job_ids: list[str], finished: bool = True) -> tuple[dict[str, str], set[str]]:
    """SLURM state per job id (``123`` or ``123_4``) and the ids still in the queue (alive): squeue first, then
    (``finished``) sacct for the others. Ids neither knows are left out."""
    if not job_ids:
        return {}, set()
    states: dict[str, str] = {}
    for line in _command(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"]).splitlines():
        jid, _, state = line.strip().partition("|")
        if jid:
            states[jid] = state
    alive = {j: states[j] for j in job_ids if j in states}
    missing = [j for j in job_ids if j not in alive] if finished else []
    ended: dict[str, str] = {}
    for start in range(0, len(missing), 200):
        chunk = missing[start:start + 200]
        try:
            text = _command(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(chunk)])
        except QueueUnavailable:  # no accounting: finished jobs are just unknown
            break
        for line in text.splitlines():
            jid, _, state = line.strip().partition("|")
            if jid in chunk:
                ended[jid] = state.split()[0] if state else "UNKNOWN"
    return {**ended, **alive}, set(alive)


def _pid_alive(pid: str) -> bool:
    """Whether a local job's controller process (its job id is its pid) still runs submitit."""
    try:
        return b"submitit" in Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def result_outcome(entry: dict[str, Any]) -> str | None:
    """'COMPLETED' or 'FAILED' from a job's result pickle when it is there and newer than the submission (job ids
    restart on a reinstalled cluster); None otherwise. Read once, never waited for."""
    path = Path(entry.get("result", ""))
    try:
        if path.stat().st_mtime < entry.get("submitted_ts", 0):
            return None
        with open(path, "rb") as fh:
            kind = pickle.load(fh)[0]
    except Exception:  # noqa: BLE001 - missing, partial or foreign pickle: no information
        return None
    return "COMPLETED" if kind == "success" else "FAILED"


@dataclass
class JobView:
    """A ledger entry with what the queue says about its job."""

    entry: dict[str, Any]
    state: str  # SLURM's word (RUNNING, PENDING, FAILED, ...), or LOCAL-RUNNING / ENDED / UNKNOWN
    alive: bool

    @property
    def job_id(self) -> str:
        return self.entry["job_id"]

    @property
    def running(self) -> bool:
        return self.state in ("RUNNING", "COMPLETING", "CONFIGURING", "LOCAL-RUNNING")

    @property
    def ended(self) -> bool:
        return not self.alive and self.state in ENDED_STATES


def job_views(entries: list[dict[str, Any]], finished: bool = True) -> dict[str, JobView]:
    """Queue state of ledger entries, by token (``finished=False``: only whether they are alive, no sacct). Raises
    QueueUnavailable when SLURM entries exist and squeue fails."""
    slurm_ids = [e["job_id"] for e in entries if e["executor"] == "slurm"]
    states, alive = slurm_states(slurm_ids, finished)
    views: dict[str, JobView] = {}
    for e in entries:
        def outcome(entry: dict[str, Any] = e) -> str | None:  # read only when the queue does not know
            return result_outcome(entry) if finished else None

        if e["executor"] == "slurm":
            state = states.get(e["job_id"]) or outcome() or "UNKNOWN"
            if e["job_id"] not in alive and state not in ENDED_STATES:
                # out of squeue but sacct still says RUNNING: accounting lags the end by a few seconds
                state = outcome() or state
            views[e["token"]] = JobView(e, state, e["job_id"] in alive)
        else:
            running = _pid_alive(e["job_id"])
            state = "LOCAL-RUNNING" if running else (outcome() or "ENDED")
            views[e["token"]] = JobView(e, state, running)
    return views


def log_tail(path: str | Path, lines: int = 6) -> list[str]:
    """The last non-empty lines of a log file, from its last exception line on when it has one (it may be large:
    only its end is read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    found = [line for line in text.splitlines() if line.strip()]
    # from the last exception line on ("harness.executors.job.CellFailed: ...", "ValueError: ..."), else the tail
    errors = [i for i, line in enumerate(found) if _EXCEPTION_LINE.match(line)]
    return found[errors[-1]:][:lines] if errors else found[-lines:]
