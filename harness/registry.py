"""One generic registry, used for methods, tasks and artifacts.

Names are known without importing anything heavy: each plug-in package keeps an ``INDEX`` dict mapping a name to
where its entry lives. Two forms:

* ``"vpt-deep": "methods.vpt:VPTDeep"``: the registry imports the module, takes the attribute (a class is
  instantiated with no arguments) and gives it the name (``entry.name = name``), so the name is written once;
* ``"vtab-dtd": "tasks.vtab"``: the module registers the entry itself with ``REGISTRY.add(name, entry)`` (for
  entries made in a loop, such as VTAB's 19 tasks).

Looking a name up imports only that module, so ``harness ls`` and name checks stay fast, and adding a plug-in is one
file plus one index line.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib
import importlib.util
from collections.abc import Iterable
from typing import Generic, TypeVar

from harness.errors import HarnessError, UnknownNameError, did_you_mean

T = TypeVar("T")


class DuplicateNameError(RuntimeError):
    """Two plug-ins claimed the same name: a programming error, so it is loud."""


class IndexMismatchError(RuntimeError):
    """An index line names a module or attribute that does not provide the entry: a programming error."""


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
            target = self.index.get(name)
            if target is None:
                raise UnknownNameError(self.kind, name, self.names())
            module, _, attr = target.partition(":")
            loaded = importlib.import_module(module)
            if attr:
                if not hasattr(loaded, attr):
                    raise IndexMismatchError(f"{self.kind} '{name}' is indexed as {target}, but {module} has no {attr}")
                entry = getattr(loaded, attr)
                entry = entry() if isinstance(entry, type) else entry
                if hasattr(entry, "name") and not callable(getattr(entry, "name")):
                    entry.name = name
                self.add(name, entry)
            elif name not in self._entries:
                raise IndexMismatchError(f"{module} is indexed for {self.kind} '{name}' but did not register it")
        return self._entries[name]

    def add(self, name: str, entry: T) -> T:
        if self._indexes and name not in self.index:
            raise IndexMismatchError(f"{self.kind} '{name}' is registered but not in the index ({', '.join(self._indexes)})")
        if name in self._entries:
            raise DuplicateNameError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def static(self, name: str) -> dict[str, object]:
        """The literal class attributes of a ``"module:Class"`` entry (e.g. a method's family, optimizer and
        description), read from its source without importing it, so listing stays free of torch. Attributes
        inherited from classes of the same module count; anything not a plain literal is left out."""
        if name in self._entries:  # already loaded (or added without an index line): ask the entry itself
            entry = self._entries[name]
            return {k: getattr(entry, k) for k in dir(entry)
                    if not k.startswith("_") and not callable(getattr(entry, k))}
        target = self.index.get(name)
        if target is None:
            raise UnknownNameError(self.kind, name, self.names())
        module, _, attr = target.partition(":")
        return dict(_class_literals(module, attr)) if attr else {}



@functools.lru_cache(maxsize=None)
def _module_classes(module: str) -> dict[str, ast.ClassDef]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return {}
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _class_literals(module: str, name: str) -> tuple[tuple[str, object], ...]:
    classes = _module_classes(module)
    node = classes.get(name)
    if node is None:
        return ()
    values: dict[str, object] = {}
    for base in node.bases:  # bases first, so the class's own values win
        if isinstance(base, ast.Name) and base.id in classes:
            values.update(_class_literals(module, base.id))
    for stmt in node.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        value = getattr(stmt, "value", None)
        for target in targets:
            if isinstance(target, ast.Name) and value is not None:
                try:
                    values[target.id] = ast.literal_eval(value)
                except (ValueError, SyntaxError, TypeError):
                    continue
    return tuple(values.items())
