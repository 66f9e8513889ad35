"""Command-line argument checks that run before any work: numbers in range, writable outputs.

Kept free of JAX and the rest of featsim so that argument errors come back at once, with the
option's name and the allowed range in the message (argparse exits with status 2).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

__all__ = [
    "at_least",
    "check_output_file",
    "check_output_folder",
    "fraction",
    "non_negative",
    "positive",
    "seed_list",
]


def at_least(low: int):
    """An argparse ``type`` for integers ``>= low``: ``--bootstrap -5`` fails at once."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


def fraction(text: str) -> float:
    """An argparse ``type`` for a share in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def positive(text: str) -> float:
    """An argparse ``type`` for a number > 0 (learning rates)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative(text: str) -> float:
    """An argparse ``type`` for a number >= 0 (loss weights, learning-rate scales)."""
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed_list(text: str) -> list[int]:
    """An argparse ``type`` for comma-separated distinct seeds >= 0, e.g. ``0,1,2``."""
    parse = at_least(0)
    seeds = [parse(part.strip()) for part in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds repeat: {text!r}")
    return seeds


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def check_output_file(option: str, path: Path | None) -> None:
    """Fails now, not after the computation, when ``path`` cannot be written.

    Tries what the write will do: the folder must exist or be creatable, ``path`` must not be
    a folder, and a file must be creatable beside it (a scratch file, removed at once; this
    also catches read-only places such as ``/proc`` and ``/sys``, for root too).
    """
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder; give a file name")
    _check_writable_folder(option, path, path.parent)


def check_output_folder(option: str, path: Path | None) -> None:
    """Like :func:`check_output_file` for an output folder (created if missing)."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a folder")
    _check_writable_folder(option, path, path)


def _check_writable_folder(option: str, path: Path, folder: Path) -> None:
    existing = folder
    while not existing.exists():  # the nearest existing ancestor must let us create it
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, not a folder")
    try:
        fd, scratch = tempfile.mkstemp(dir=existing, prefix=".featsim-write-check-")
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(scratch)
