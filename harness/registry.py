"""One generic registry, used for methods, tasks and artifacts.

Names are known without importing anything heavy: each plug-in package keeps an ``INDEX`` dict mapping a name to
where its entry lives. Two forms:

* ``"vpt-deep": "methods.vpt:VPTDeep"``: the registry imports the module, takes the attribute (a class is
  instantiated with no arguments) and gives it the name (``entry.name = name``), so the name is written once;
* ``"vtab-dtd": "tasks.vtab"``: the module registers the entry itself with ``REGISTRY.add(name, entry)`` (for
  entries made in a loop, such as VTAB's 19 tasks).

Looking a name up imports only that module, so ``harness ls`` and name checks stay fast, and adding a plug-in is one
file plus one index line.

Installed packages add entries through a Python entry-point group (``harness.methods``, ``harness.tasks``; the
standard plug-in mechanism, read with :mod:`importlib.metadata` without importing the package): an entry point
``name = "pkg.module:Class"`` is an index line of its own. :meth:`Registry.origin` says which distribution (and
version) gave a name, for the records' provenance. A plug-in name that clashes with a built-in one, or with another
plug-in's, is refused naming both; a plug-in whose module fails to import is one :class:`PluginError` line naming
the distribution, the entry point and the error, raised only when that name is used.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib
import importlib.util
from collections.abc import Iterable
from importlib import metadata
from typing import Generic, TypeVar

from harness.errors import HarnessError, UnknownNameError, did_you_mean

T = TypeVar("T")


class DuplicateNameError(RuntimeError):
    """Two plug-ins claimed the same name: a programming error, so it is loud."""


class IndexMismatchError(RuntimeError):
    """An index line names a module or attribute that does not provide the entry: a programming error."""


class PluginError(HarnessError):
    """An installed plug-in package is broken or clashes with another name: the user's environment, so one clear
    line (naming the distribution and the entry point), not a traceback."""


def entry_points(group: str) -> list[tuple[metadata.EntryPoint, str, str]]:
    """(entry point, distribution name, version) for every entry point of ``group`` in the environment (one copy
    per distribution, the first on ``sys.path``, as importlib.metadata resolves them)."""
    found = []
    for ep in metadata.entry_points(group=group):
        dist = ep.dist
        found.append((ep, (dist.metadata["Name"] if dist else None) or "?", (dist.version if dist else None) or "?"))
    return found


class Registry(Generic[T]):
    def __init__(self, kind: str, *indexes: str, group: str | None = None):
        """``indexes`` are ``"module:ATTR"`` strings naming dicts of name -> registering module; ``group`` the
        entry-point group installed packages add entries through (None: none)."""
        self.kind = kind
        self._indexes = indexes
        self.group = group
        self._index: dict[str, str] | None = None
        self._entries: dict[str, T] = {}
        #: name -> where an installed plug-in's entry came from (distribution, version, entry point)
        self._origins: dict[str, dict[str, str]] = {}

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
            if self.group:
                self._add_entry_points(merged)
            self._index = merged
        return self._index

    def _add_entry_points(self, merged: dict[str, str]) -> None:
        for ep, dist, version in sorted(entry_points(self.group), key=lambda e: (e[0].name, e[1])):
            origin = {"distribution": dist, "version": version, "entry_point": f"{ep.name} = {ep.value}",
                      "group": self.group}
            if ep.name in merged:
                other = self._origins.get(ep.name)
                if other is not None and other["distribution"] == dist:
                    continue  # one distribution seen twice on the path (an editable install and its copy)
                held = (f"plug-in {other['distribution']} {other['version']} ({other['entry_point']})" if other
                        else f"the built-in {merged[ep.name]}")
                raise PluginError(f"{self.kind} '{ep.name}' of plug-in {dist} {version} ({ep.group}: "
                                  f"{ep.name} = {ep.value}) clashes with {held}; rename one of them")
            merged[ep.name] = ep.value
            self._origins[ep.name] = origin

    def origin(self, name: str) -> dict[str, str] | None:
        """Where ``name`` came from when an installed plug-in package gave it: ``{"distribution", "version",
        "entry_point", "group"}``; None for a built-in."""
        self.index
        return dict(self._origins[name]) if name in self._origins else None

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
            loaded = self._import(name, module)
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

    def _import(self, name: str, module: str):
        if name not in self._origins:
            return importlib.import_module(module)
        try:  # a broken plug-in is the user's environment: one line, and only for the name that needs it
            return importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any import-time failure of foreign code
            o = self._origins[name]
            raise PluginError(f"{self.kind} '{name}' of plug-in {o['distribution']} {o['version']} ({o['group']}: "
                              f"{o['entry_point']}) failed to import: {type(err).__name__}: {err}") from None

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
        if name not in self._origins:
            return dict(_class_literals(module, attr)) if attr else {}
        try:
            return dict(_class_literals(module, attr)) if attr else {}
        except Exception:  # noqa: BLE001 - a broken plug-in lists without its facts; using it says why
            return {}



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
