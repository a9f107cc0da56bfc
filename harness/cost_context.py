"""Cost compared like with like: how a trial ran, as far as its speed and memory depend on it (device model, CPU
threads and instruction set, executor, whether earlier trials shared its process), and whether two cells' cost
measurements compare at all. The nightly comparison (:mod:`harness.regress`) flags a throughput or memory change
only where these say both sides ran alike; otherwise the report says once why not."""

from __future__ import annotations

import json
from typing import Any

#: peak-memory changes smaller than this are ignored (both exact measures repeat to the byte; this leaves an
#: allocator's rounding of a slightly different batch out)
MEMORY_FLOOR = 2**20
#: peak-memory kinds measured the same way whatever ran before (``cpu_rss_delta``, older records', is not)
EXACT_MEMORY_KINDS = ("cuda_max_allocated", "cpu_tensor_peak")
#: what must match for throughput to be compared (:func:`cost_context`)
CONTEXT_KEYS = ("device", "threads", "isa", "executor", "shared_process")

def cost_context(record: dict[str, Any]) -> dict[str, Any]:
    """How a record's trial ran, as far as its speed depends on it: the device model (:func:`harness.provenance.
    device_identity`), on the CPU the threads and instruction set, the executor, and whether other trials ran in
    its process before it. Records made before records said so have None there."""
    provenance = record.get("provenance") or {}
    identity = provenance.get("device_identity") or {}
    execution = provenance.get("execution") or {}
    return {"device": identity.get("model"), "threads": identity.get("threads"), "isa": identity.get("isa"),
            "executor": execution.get("executor"), "shared_process": execution.get("shared_process")}


def cell_context(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One context for a cell's records: each key's value where they agree, ``mixed (a, b)`` where not; the cell
    shared a process when any of its trials did (a cell's second seed runs after its first in every executor)."""
    contexts = [cost_context(r) for r in records]
    if not contexts:
        return None
    merged: dict[str, Any] = {}
    for key in CONTEXT_KEYS:
        values = {json.dumps(c[key]) for c in contexts}
        if key == "shared_process" and None not in (c[key] for c in contexts):
            merged[key] = any(c[key] for c in contexts)
        elif len(values) == 1:
            merged[key] = contexts[0][key]
        else:
            merged[key] = "mixed (" + ", ".join(sorted(values)) + ")"
    return merged


def describe_context(context: dict[str, Any], keys: tuple[str, ...] = CONTEXT_KEYS) -> str:
    """``Intel(R) Xeon(R) ..., 2 threads, AVX512, inline, after other trials in its process`` (only ``keys``)."""
    parts = []
    for key in keys:
        value = context.get(key)
        if key == "threads" and isinstance(value, int):
            parts.append(f"{value} thread{'s' if value != 1 else ''}")
        elif key == "shared_process" and isinstance(value, bool):
            parts.append("after other trials in its process" if value else "each trial in a fresh process")
        elif key == "executor" and value is not None:
            parts.append(f"{value} executor")
        elif value is not None:
            parts.append(str(value))
    return ", ".join(parts) or "unknown"


def throughput_not_compared(base: dict[str, Any], cur: dict[str, Any]) -> str | None:
    """Why the two sides' throughputs do not compare (None when they do)."""
    ours, theirs = cur.get("context") or {}, base.get("context") or {}
    if theirs.get("device") is None:
        return "the baseline's records do not name their device and executor (frozen before records did)"
    if ours.get("device") is None:
        return "this run's records do not name their device and executor"
    differ = tuple(k for k in CONTEXT_KEYS if ours.get(k) != theirs.get(k))
    if differ:
        return f"baseline on {describe_context(theirs, differ)}; this run on {describe_context(ours, differ)}"
    return None


def memory_not_compared(base: dict[str, Any], cur: dict[str, Any]) -> str | None:
    """Why the two sides' peak memories do not compare (None when they do)."""
    theirs, ours = base.get("memory_kind"), cur.get("memory_kind")
    if theirs != ours:
        return f"measured differently: baseline {theirs}, this run {ours}"
    if ours not in EXACT_MEMORY_KINDS:
        return f"{ours} depends on what ran before in the process"
    theirs_on, ours_on = (base.get("context") or {}).get("device"), (cur.get("context") or {}).get("device")
    if theirs_on is None or theirs_on != ours_on:
        return f"baseline on {theirs_on or 'an unnamed device'}, this run on {ours_on or 'an unnamed device'}"
    return None


def cost_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per cost measure (throughput, memory): on how many compared cells it was compared, and on how many not, by
    reason: the report's header says it once instead of a note per cell."""
    summary: dict[str, dict[str, Any]] = {}
    for measure in ("throughput", "memory"):
        compared, reasons = 0, {}
        for row in rows:
            if "cost_not_compared" not in row:
                continue  # no baseline cell or no record tonight: nothing to compare at all
            why = row["cost_not_compared"].get(measure)
            if why is None:
                compared += 1
            else:
                reasons[why] = reasons.get(why, 0) + 1
        summary[measure] = {"compared": compared, "not_compared": reasons}
    return summary
