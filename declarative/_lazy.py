"""Lazy package attributes (PEP 562): names load on first use, so importing a
package imports none of its heavy modules (``import declarative.canon`` stays free
of torch, ``import declarative`` of CVXPY)."""

from __future__ import annotations

from importlib import import_module


def lazy_getattr(package: str, exports: dict, namespace: dict):
    """A module ``__getattr__`` that imports ``exports[name]`` (a relative module name)
    on first access and caches the value in ``namespace`` (the package's globals)."""

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module, package), name)
        namespace[name] = value
        return value

    return __getattr__
