"""harness: a benchmark harness for transfer-learning methods on vision backbones.

The engine lives here (registries, sweeps, protocol, training loop, store, tables, CLI). It never names a
particular method or task: the ``methods`` and ``tasks`` packages list theirs in their ``INDEX`` (as
``"module:attr"`` strings), and the registries load each on first use.
"""

__version__ = "0.1.0"
