"""How long a person waits for the commands that train nothing (goal: under 0.5 s for `harness --help` and
`harness ls methods` on a 2-core machine). Prints figures; asserts nothing (timings belong in benchmarks, not
unit tests). Also prints which heavy modules each command imported.

    .venv/bin/python tests/benchmarks/cli_latency.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [
    ["--help"],
    ["ls", "methods"],
    ["ls", "tasks", "vtab-*"],
    ["ls", "suites"],
    ["run", "--help"],
    ["status", "--suite", "demo"],
    ["table", "--suite", "demo"],
]
HEAVY = ("torch", "timm", "peft", "submitit", "sklearn", "pandas", "transformers")
PROBE = ("import sys, runpy; sys.argv = ['harness'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('harness.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"{'command':<32} {'median s':>9} {'min s':>7}  heavy imports")
    for command in COMMANDS:
        times, heavy = [], ""
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *command],
                                 capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            heavy = next((line[6:] for line in out.stderr.splitlines() if line.startswith("HEAVY=")), "?")
        print(f"{'harness ' + ' '.join(command):<32} {statistics.median(times):>9.3f} {min(times):>7.3f}  "
              f"{heavy or '-'}")


if __name__ == "__main__":
    main()
