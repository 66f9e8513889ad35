"""featsim: how similar are deep features of natural and medical images?"""

from featsim import _xla

_xla.apply_cpu_defaults()  # before JAX starts its backend; see featsim/_xla.py

__version__ = "0.1.0"

__all__ = ["__version__"]
