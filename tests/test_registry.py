"""The generic registry: lazy index, duplicates, did-you-mean, wildcards."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from harness.api import METHODS, TASKS
from harness.errors import HarnessError, UnknownNameError
from harness.registry import DuplicateNameError, IndexMismatchError, Registry


@pytest.fixture
def toy_registry(monkeypatch):
    index = types.ModuleType("toy_index")
    index.INDEX = {"alpha": "toy_plugins", "alpine": "toy_plugins", "beta": "toy_plugins", "ghost": "toy_plugins"}
    registry: Registry = Registry("widget", "toy_index:INDEX")
    plugins = types.ModuleType("toy_plugins")
    plugins.loaded = 0

    def load():  # what importing the plug-in module does: register its entries
        plugins.loaded += 1
        registry.add("alpha", "A")
        registry.add("alpine", "AL")
        registry.add("beta", "B")

    monkeypatch.setitem(sys.modules, "toy_index", index)
    real_import = __import__("importlib").import_module

    def fake_import(name, *a, **k):
        if name == "toy_plugins":
            if "toy_plugins" not in sys.modules:
                sys.modules["toy_plugins"] = plugins
                load()
            return plugins
        return real_import(name, *a, **k)

    monkeypatch.setattr("harness.registry.importlib.import_module", fake_import)
    yield registry, plugins
    sys.modules.pop("toy_plugins", None)


def test_names_come_from_the_index_without_importing(toy_registry):
    registry, plugins = toy_registry
    assert registry.names() == ["alpha", "alpine", "beta", "ghost"]
    assert plugins.loaded == 0


def test_get_imports_lazily_once(toy_registry):
    registry, plugins = toy_registry
    assert registry.get("beta") == "B"
    assert registry.get("alpha") == "A"
    assert plugins.loaded == 1


def test_indexed_name_that_never_registers_is_loud(toy_registry):
    registry, _ = toy_registry
    with pytest.raises(IndexMismatchError, match="did not register"):
        registry.get("ghost")


def test_registering_a_name_missing_from_the_index_is_loud(toy_registry):
    registry, _ = toy_registry
    with pytest.raises(IndexMismatchError, match="not in the index"):
        registry.add("gamma", "G")


def test_a_method_name_is_written_once_in_the_index():
    """``"name": "module:Class"``: the registry instantiates the class and names it; the class has no name."""
    import methods

    for name, target in methods.INDEX.items():
        assert ":" in target, f"{name}: index entries are module:Class"
        module, cls = target.split(":")
        assert "name" not in vars(getattr(__import__(module, fromlist=[cls]), cls)), f"{cls} writes its name again"
        assert METHODS.get(name).name == name


def test_listing_method_facts_reads_source_without_importing_torch():
    code = ("import sys; from harness.api import METHODS; s = METHODS.static('toast-early'); "
            "print(s['family'], s['optimizer'], s['needs'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "top-down sgd ('toast-pretuned',) False"


def test_duplicate_registration_is_rejected(toy_registry):
    registry, _ = toy_registry
    registry.get("alpha")
    with pytest.raises(DuplicateNameError, match="registered twice"):
        registry.add("alpha", "again")


def test_unknown_name_suggests_close_ones(toy_registry):
    registry, _ = toy_registry
    with pytest.raises(UnknownNameError) as err:
        registry.get("alpah")
    assert str(err.value) == "unknown widget 'alpah'; did you mean: alpha?"


def test_wildcards_and_comma_lists_keep_order_without_duplicates(toy_registry):
    registry, _ = toy_registry
    assert registry.match("al*") == ["alpha", "alpine"]
    assert registry.match("beta,al*,alpha") == ["beta", "alpha", "alpine"]
    with pytest.raises(HarnessError, match="no widget matches 'zz\\*'"):
        registry.match("zz*")
    with pytest.raises(UnknownNameError):
        registry.match("alpha,betta")


def test_real_registries_resolve_their_index():
    assert "linear" in METHODS.names() and "demo-digits" in TASKS.names()
    assert METHODS.get("linear").name == "linear"
    assert TASKS.get("demo-digits").num_classes == 10
    with pytest.raises(UnknownNameError, match="did you mean: linear"):
        METHODS.get("linar")


def test_listing_names_does_not_import_torch():
    code = ("import sys; from harness.api import METHODS, TASKS; METHODS.names(); TASKS.names(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_static_method_facts_equal_the_loaded_methods():
    """`harness ls methods` shows facts read from source; they must be the ones the methods really have."""
    for name in METHODS.names():
        facts, method = METHODS.static(name), METHODS.get(name)
        assert facts.get("family") == method.family and facts.get("description") == method.description
        assert facts.get("optimizer", "sgd") == method.optimizer and tuple(facts.get("needs", ())) == method.needs
        assert facts.get("version", 1) == method.version
