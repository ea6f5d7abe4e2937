"""Import stand-ins for packages that ComfyUI's modules import at load time but that the benchmarked code path never
calls, so that the native side of a benchmark runs where they are not installed (the lent GPU machines have no
PyAV and no torchsde, and reach no package registry).

``comfy_api`` imports PyAV for its video types and ``comfy.k_diffusion.sampling`` imports torchsde for the SDE
samplers' Brownian noise; Euler sampling uses neither. A stand-in module answers every attribute with a placeholder
class; instantiating or calling one raises ``RuntimeError`` naming the package, so a stand-in can never compute
anything silently. Only packages that fail to import are stood in for; installed ones are used as they are.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types


class _Placeholder:
    """Base of a stand-in's attributes: a class (it can be subclassed, annotated, isinstance-checked) that raises
    when instantiated."""

    package = "?"

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{self.package} is not installed: this code path needs it (only an import stand-in is "
                           "there, see benchmarks/import_standins.py)")


class StandInModule(types.ModuleType):
    """A module whose every missing public attribute is a new placeholder class named after it."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (_Placeholder,), {"package": self.__name__.split(".")[0]})
        setattr(self, name, placeholder)
        return placeholder


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the stood-in packages and their submodules (``av.container``) before any other finder."""

    def __init__(self, packages: set[str]) -> None:
        self.packages = packages

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec:
        if fullname.split(".")[0] not in self.packages:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return StandInModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # a package: its submodules come from this finder too


def install_standins(packages: tuple[str, ...]) -> list[str]:
    """Stand in for each of ``packages`` that cannot be imported here; returns those stood in for (in order)."""
    missing = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.meta_path.insert(0, _StandInFinder(set(missing)))
    return missing
