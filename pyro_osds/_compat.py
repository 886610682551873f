# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Deprecated names of the 0.1 development layout, kept working with a ``FutureWarning`` that names
the new home: module paths (``pyro_osds.integrate`` is now :mod:`pyro_osds.ops.integrate`), served by
an import hook, and top-level names of the package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

import torch

from .util import warn

__all__ = ["MOVED_MODULES", "install", "moved_attribute"]

#: old module -> (new modules, old name -> new name, names without a new home)
MOVED_MODULES: dict[str, tuple[tuple[str, ...], dict, dict]] = {
    "pyro_osds.reference": (("pyro_osds.ops.reference",), {}, {}),
    "pyro_osds.nets": (("pyro_osds.ops.nets",), {}, {}),
    "pyro_osds.integrate": (("pyro_osds.ops.integrate", "pyro_osds.ops.jacobian"), {}, {}),
    "pyro_osds.divergence": (("pyro_osds.ops.jacobian",), {}, {"slogdet": torch.linalg.slogdet}),
    "pyro_osds.losses": (("pyro_osds.ops.losses",), {}, {}),
    "pyro_osds.precondition": (("pyro_osds.ops.precondition",), {}, {}),
    "pyro_osds.estimators": (("pyro_osds.ops.estimators",), {}, {}),
    "pyro_osds.consistency": (("pyro_osds.ops.consistency", "pyro_osds.sampler"), {}, {}),
    "pyro_osds.potential": (("pyro_osds.model", "pyro_osds.target"), {"SiteInfo": "Site"}, {}),
}


def _forwarding_getattr(old: str, new: tuple[str, ...], renamed: dict, extras: dict):
    modules = [importlib.import_module(name) for name in new]

    def __getattr__(name: str):
        if name in extras:
            return extras[name]
        target = renamed.get(name, name)
        for module in modules:
            if hasattr(module, target):
                return getattr(module, target)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {', '.join(new)})")

    return __getattr__


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths and serves each as a module that forwards to its new home."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        new, renamed, extras = MOVED_MODULES[module.__name__]
        warn(f"`{module.__name__}` is deprecated; import from `{new[0]}` instead.", FutureWarning)
        module.__doc__ = f"Deprecated: moved to :mod:`{new[0]}`."
        module.__getattr__ = _forwarding_getattr(module.__name__, new, renamed, extras)


def install() -> None:
    """Adds the finder of the old module paths to ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())


def moved_attribute(package: str, name: str, moved: dict[str, str]):
    """The value of deprecated top-level name ``name`` of ``package`` (``moved``: name -> new module),
    with a ``FutureWarning``."""
    if name not in moved:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warn(f"`{package}.{name}` is deprecated; import it from `{moved[name]}`.", FutureWarning)
    return getattr(importlib.import_module(moved[name]), name)
