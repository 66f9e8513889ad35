"""XLA:CPU defaults that featsim sets before JAX starts its backend (opt-out, measured).

On jaxlib 0.10, XLA:CPU routes convolution graphs through YNNPACK fusions that made a jit
ResNet50 forward pass 1.4x slower than with only the ``dot`` and ``reduce`` fusion types
enabled (batch 32 at 224 on 2 cores: 9.4 -> 13.7 images/s; benchmarks/extraction.py), while
disabling YNNPACK entirely halves the speed of the blockwise distance kernel. featsim therefore
appends ``--xla_cpu_experimental_ynn_fusion_type=dot,reduce`` to ``XLA_FLAGS`` when it is
imported, unless

* ``FEATSIM_XLA_DEFAULTS=0`` is set,
* ``XLA_FLAGS`` already chooses YNN fusion types, or
* the installed jaxlib is not a 0.10 release (the flag is experimental: an XLA that does not
  know it would refuse to start).

XLA reads ``XLA_FLAGS`` when the first computation creates the backend, so this only takes
effect if featsim is imported before anything has run on JAX. It changes which kernels run,
not what they compute (the equivalence tests run with it).
"""

from __future__ import annotations

import importlib.metadata
import os

_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
_TESTED_JAXLIB = ("0.10.",)


def apply_cpu_defaults() -> bool:
    """Adds featsim's XLA:CPU flag to ``XLA_FLAGS`` when allowed; returns whether it did."""
    if os.environ.get("FEATSIM_XLA_DEFAULTS", "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return False
    if not version.startswith(_TESTED_JAXLIB):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}".strip()
    return True
