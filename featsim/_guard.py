"""A clear error when ``featsim`` was imported as a namespace package, not this package.

Running Python from the folder that holds a checkout named ``featsim`` puts that folder on
``sys.path`` first, and ``import featsim`` then finds the checkout itself (which has no
``__init__.py``) as a namespace package; with an editable install the subpackages still load,
and the first use of ``featsim.__version__`` or of JAX's settings fails deep inside. Every
subpackage imports this module first, so the mistake is named where it happens.
"""

from __future__ import annotations

import sys


def check_package() -> None:
    """Raises ImportError when ``sys.modules["featsim"]`` is a namespace package."""
    package = sys.modules.get("featsim")
    if package is None or getattr(package, "__file__", None) is not None:
        return
    where = ", ".join(str(p) for p in getattr(package, "__path__", [])) or "?"
    raise ImportError(
        f"`featsim` was imported as a namespace package from {where}, a folder without "
        "featsim's __init__.py (most likely the git checkout itself: Python looks in the "
        "current folder, or the script's folder, before the installed package). Run from "
        "another folder, e.g. `cd` into the checkout, or rename the checkout folder.")


check_package()
