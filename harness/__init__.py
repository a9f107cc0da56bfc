"""harness: a benchmark harness for transfer-learning methods on vision backbones.

The engine lives here (registries, sweeps, protocol, training loop, store, tables, CLI). It never names a
particular method or task: those register themselves from the ``methods`` and ``tasks`` packages.
"""

__version__ = "0.1.0"
