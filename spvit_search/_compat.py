"""Import torchvision safely before timm (see ``_spvit_torchvision_fix`` for the why).

The installed ``.pth`` hook normally did this already at the first torchvision import; this
covers running from a source tree without the hook. The schemas are declared only when
torchvision's own C extension fails to load.
"""

from __future__ import annotations

import sys

import _spvit_torchvision_fix as _fix

if "torchvision" not in sys.modules:
    _dir = _fix.torchvision_dir()
    if _dir is not None:
        _fix.prepare(_dir)

import torchvision  # noqa: F401


def torchvision_fix_applied() -> bool:
    """True when torchvision's ops failed to load and their schemas were declared for it."""
    return _fix.APPLIED
