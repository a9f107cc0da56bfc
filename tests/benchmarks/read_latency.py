"""How long the commands that only read records take over many records (issue 23's targets on a 2-core machine:
`table` and `status` under 1 s and within 0.5 s of `harness --help`; `plot` under 2 s). Prints figures and the heavy
modules each command imported; asserts nothing (timings belong in benchmarks, not unit tests).

    .venv/bin/python tests/benchmarks/read_latency.py [--records 10000] [--repeats 3] [--results DIR]

The records are synthetic but shaped as `harness run` writes them (search trials, the winner's finals, a curve
per epoch, provenance): the demo suite's current plan complete (108 records) plus whole plans made under other
``--epochs`` overrides (a night of smoke runs) until ``--records`` is reached. They are written once into
``--results`` (default: a folder under the system's temp dir, reused while it holds the same count). The first
status after records arrive builds each cell folder's settings index (harness.store.Store.settings_index): that
cold run is timed once, apart.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

HEAVY = ("torch", "timm", "peft", "sklearn", "pandas", "matplotlib", "scipy")
PROBE = ("import sys, runpy; sys.argv = ['harness'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('harness.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\n")


def record_of(spec, value: float, epochs: int) -> dict:
    curve = [{"epoch": e + 1, "loss": round(2.0 / (e + 1), 4), "lr": 0.1, "eval": round(value * (e + 1) / epochs, 3)}
             for e in range(epochs)]
    return {"spec": spec, "status": "ok", "metrics": {"eval": value, "train_loss": 0.3}, "curve": curve,
            "params": {"trainable": 1000, "head": 10, "total": 5000},
            "cost": {"forward_flops": 2e9, "train_images_per_s": 100.0, "peak_memory_bytes": 2**27},
            "provenance": {"git": {"commit": "0" * 40, "dirty": False}, "packages": {"torch": "2.x", "timm": "1.x"},
                           "python": "3.11", "device": "cpu", "hostname": "bench", "slurm": None}}


def write_records(results: Path, total: int) -> int:
    """The demo suite's plan complete under the suite's own settings, then under --epochs 1, 2, ... until
    ``total`` records exist. Returns how many were written."""
    from harness.store import Store
    from harness.sweep import load_suite
    from records import complete_plan

    store, written, epochs = Store(results), 0, None
    while written < total:
        suite = load_suite("demo", epochs=epochs)
        budget = int(suite.raw["train"]["epochs"])
        written += complete_plan(store, suite, lambda spec, value: record_of(spec, value, budget), seed=written)
        epochs = 1 if epochs is None else epochs + 1
    return written


def timed(command: list[str], env: dict, repeats: int) -> tuple[float, float, str]:
    times, heavy = [], "?"
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *command], capture_output=True,
                             text=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        heavy = next((line[6:] for line in out.stderr.splitlines() if line.startswith("HEAVY=")), "?")
    return statistics.median(times), min(times), heavy


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    results = args.results or Path(tempfile.gettempdir()) / f"harness-read-latency-{args.records}"
    marker = results / ".records"
    if not marker.exists():
        t0 = time.perf_counter()
        n = write_records(results, args.records)
        marker.write_text(str(n))
        print(f"wrote {n} records into {results} in {time.perf_counter() - t0:.1f} s")
    print(f"{marker.read_text()} records under {results}; median of {args.repeats} (the machine may be shared)")
    env = dict(os.environ, HARNESS_RESULTS=str(results), COLUMNS="200")
    # as an installed harness runs: with its bytecode cached (a sandbox's PYTHONDONTWRITEBYTECODE=1 alone costs
    # ~0.15 s of compiling the harness's sources on every command)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    commands = [["--help"], ["table", "--suite", "demo"], ["status", "--suite", "demo"],
                ["table", "--suite", "demo", "--format", "latex"],
                ["plot", "--suite", "demo", "--out", str(results / "figures")],
                ["ls", "methods"]]
    print(f"{'command':<40} {'median s':>9} {'min s':>7}  heavy imports")
    # records written through the store are indexed as they are written; records copied in from elsewhere are not
    # (the first read then builds the indexes)
    first, _, heavy = timed(["status", "--suite", "demo"], env, 1)
    print(f"{'harness status (first read after writes)':<40} {first:>9.3f} {first:>7.3f}  {heavy or '-'}")
    for index in results.rglob(".settings-index"):
        index.unlink()
    first, _, heavy = timed(["status", "--suite", "demo"], env, 1)
    print(f"{'harness status (cold: no index at all)':<40} {first:>9.3f} {first:>7.3f}  {heavy or '-'}")
    for command in commands:
        median, low, heavy = timed(command, env, args.repeats)
        shown = " ".join(c if not c.startswith(str(results)) else "<results>/figures" for c in command)
        print(f"{'harness ' + shown:<40} {median:>9.3f} {low:>7.3f}  {heavy or '-'}")


if __name__ == "__main__":
    main()
