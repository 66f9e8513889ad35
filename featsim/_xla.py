"""XLA:CPU defaults that featsim sets before JAX starts its backend (opt-out, measured).

Two flags, each measured on jaxlib 0.10 (2 cores):

On jaxlib 0.10, XLA:CPU routes convolution graphs through YNNPACK fusions that made a jit
ResNet50 forward pass 1.4x slower than with only the ``dot`` and ``reduce`` fusion types
enabled (batch 32 at 224 on 2 cores: 9.4 -> 13.7 images/s; benchmarks/extraction.py), while
disabling YNNPACK entirely halves the speed of the blockwise distance kernel. featsim therefore
appends ``--xla_cpu_experimental_ynn_fusion_type=dot,reduce``.

XLA:CPU's concurrency-optimised scheduler orders independent operations so that they can run
at once, which keeps many full-size temporaries alive together: the ``kh * kw`` per-tap
reductions of a depthwise kernel gradient ran 3.4x slower that way than one after the other
(``[16, 112, 112, 32]``, 3x3: 175 -> 55 ms) and the EfficientNet-Lite0 training step 1.9x
slower (batch 16 at 224: 4.0 -> 7.5 images/s; ``benchmarks/training.py``). featsim
therefore appends ``--xla_cpu_enable_concurrency_optimized_scheduler=false``.

Each flag is appended when featsim is imported, unless

* ``FEATSIM_XLA_DEFAULTS=0`` is set,
* ``XLA_FLAGS`` already sets that flag (the user's choice wins, e.g.
  ``--xla_cpu_enable_concurrency_optimized_scheduler=true`` keeps XLA's default), or
* the installed jaxlib is not a 0.10 release (the flags are experimental: an XLA that does
  not know one would refuse to start).

XLA reads ``XLA_FLAGS`` when the first computation creates the backend, so this only takes
effect if featsim is imported before anything has run on JAX. It changes which kernels run,
not what they compute (the equivalence tests run with it).
"""

from __future__ import annotations

import importlib.metadata
import os

#: ``(flag name, value)`` in the order they are appended.
DEFAULTS = (
    ("xla_cpu_experimental_ynn_fusion_type", "dot,reduce"),
    ("xla_cpu_enable_concurrency_optimized_scheduler", "false"),
)
_TESTED_JAXLIB = ("0.10.",)


def apply_cpu_defaults() -> list[str]:
    """Appends featsim's XLA:CPU flags to ``XLA_FLAGS`` where allowed; returns those it
    appended (empty when none)."""
    if os.environ.get("FEATSIM_XLA_DEFAULTS", "1") == "0":
        return []
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return []
    if not version.startswith(_TESTED_JAXLIB):
        return []
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in DEFAULTS if name not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added
