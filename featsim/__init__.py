"""featsim: how similar are deep features of natural and medical images?"""

__version__ = "0.1.0"

__all__ = ["__version__"]
