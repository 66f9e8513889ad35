"""Lazy package exports (PEP 562): a name loads its submodule, and JAX with it, on first use.

``featsim.metrics`` and ``featsim.train`` import cheaply (``--help`` and argument errors stay
instant) and still offer their whole API at the top level::

    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the submodule
    (relative to ``package``) that defines it; a loaded name is stored in ``namespace`` so
    later lookups skip ``__getattr__``."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
