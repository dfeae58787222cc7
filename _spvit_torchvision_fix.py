"""Let ``import timm`` work on a CPU-only torch with PyPI's CUDA-built torchvision.

timm imports torchvision at module level. PyPI's torchvision 0.28.0 is built against CUDA; on
the CPU build of torch its C extension does not load, and its import then fails with
``operator torchvision::nms does not exist`` while registering fake kernels for ops that were
never defined. Declaring the two op schemas it registers (``nms``, ``qnms``) before it runs
lets the import finish; only its detection kernels are then missing, which spvit-search never
calls. The schemas are declared only when torchvision's extension really fails to load.

This module is tiny and imports nothing heavy: the ``spvit_search_torchvision_fix.pth`` file
installs :func:`install` at interpreter start, and the check (which imports torch) runs only
when something first imports torchvision — so ``import timm`` works in any order.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

#: True once the schemas had to be declared for torchvision to import.
APPLIED = False
_library = None  # kept alive: dropping the Library object removes its schemas


def _extension_loads(package_dir: str) -> bool:
    import torch

    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, "_C" + suffix)
        if os.path.exists(path):
            try:
                torch.ops.load_library(path)
                return True
            except OSError:
                return False
    return False


def prepare(package_dir: str) -> None:
    """Declare torchvision's op schemas if its C extension in ``package_dir`` cannot load."""
    global APPLIED, _library
    if APPLIED or _extension_loads(package_dir):
        return
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    APPLIED = True


def torchvision_dir() -> str | None:
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


class _Finder(importlib.abc.MetaPathFinder):
    """Runs :func:`prepare` on the first import of torchvision, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            package_dir = torchvision_dir()
            if package_dir is not None:
                prepare(package_dir)
        return None  # the regular finders import it


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
