"""User-facing errors: the CLI prints these as one clear message and exits 2, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HarnessError(Exception):
    """Bad input from the user (a name, a file, a flag). The message says what, where and what was expected."""

    exit_code = 2


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' did you mean: a, b?' for close matches of ``name`` among ``choices``, or '' when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    if not close:  # short or prefix-like typos ("vpt") still deserve a hint
        close = [c for c in choices if c.startswith(name) or name in c][:n]
    return f"; did you mean: {', '.join(close)}?" if close else ""


class UnknownNameError(HarnessError):
    def __init__(self, kind: str, name: str, choices: Iterable[str]):
        super().__init__(f"unknown {kind} '{name}'{did_you_mean(name, choices)}")
        self.kind, self.name = kind, name
