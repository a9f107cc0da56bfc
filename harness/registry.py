"""One generic registry, used for methods, tasks and artifacts.

Names are known without importing anything heavy: each plug-in package keeps an ``INDEX`` dict mapping a name to
the module that registers it (``"vpt-deep": "methods.vpt"``). Looking a name up imports only that module, whose
``@REGISTRY.register(name)`` decorator (or ``REGISTRY.add``) fills in the entry. So ``harness ls`` and name checks
stay fast, and adding a plug-in is one file plus one index line.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from harness.errors import HarnessError, UnknownNameError, did_you_mean

T = TypeVar("T")


class DuplicateNameError(RuntimeError):
    """Two plug-ins claimed the same name: a programming error, so it is loud."""


class Registry(Generic[T]):
    def __init__(self, kind: str, *indexes: str):
        """``indexes`` are ``"module:ATTR"`` strings naming dicts of name -> registering module."""
        self.kind = kind
        self._indexes = indexes
        self._index: dict[str, str] | None = None
        self._entries: dict[str, T] = {}

    # -- names -------------------------------------------------------------------------------------------------
    @property
    def index(self) -> dict[str, str]:
        if self._index is None:
            merged: dict[str, str] = {}
            for spec in self._indexes:
                module, attr = spec.split(":")
                for name, target in getattr(importlib.import_module(module), attr).items():
                    if name in merged:
                        raise DuplicateNameError(f"{self.kind} '{name}' is indexed twice ({merged[name]}, {target})")
                    merged[name] = target
            self._index = merged
        return self._index

    def names(self) -> list[str]:
        return sorted(set(self.index) | set(self._entries))

    def __contains__(self, name: str) -> bool:
        return name in self.index or name in self._entries

    def match(self, patterns: str | Iterable[str]) -> list[str]:
        """Names matching comma-separated or listed fnmatch patterns, in registry order, without duplicates.

        A pattern that matches nothing is an error with a did-you-mean list, so a typo never silently drops work.
        """
        if isinstance(patterns, str):
            patterns = [p for p in patterns.split(",")]
        names = self.names()
        picked: list[str] = []
        for raw in patterns:
            pattern = raw.strip()
            if not pattern:
                continue
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                if any(ch in pattern for ch in "*?["):
                    raise HarnessError(f"no {self.kind} matches '{pattern}'{did_you_mean(pattern, names)}")
                raise UnknownNameError(self.kind, pattern, names)
            picked += [h for h in hits if h not in picked]
        return picked

    # -- entries -----------------------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        if name not in self._entries:
            module = self.index.get(name)
            if module is None:
                raise UnknownNameError(self.kind, name, self.names())
            importlib.import_module(module)
            if name not in self._entries:
                raise DuplicateNameError(f"{module} is indexed for {self.kind} '{name}' but did not register it")
        return self._entries[name]

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise DuplicateNameError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator. On a class, registers an instance made with no arguments; on anything else, the object."""

        def decorate(obj):
            self.add(name, obj() if isinstance(obj, type) else obj)
            return obj

        return decorate

    def load_all(self) -> dict[str, T]:
        for name in self.names():
            self.get(name)
        return dict(sorted(self._entries.items()))
