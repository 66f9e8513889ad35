"""The files a training or pretraining run keeps in its workdir: JSON written atomically, the
per-epoch history (JSON and CSV) and the resumable checkpoint. One implementation for
:mod:`featsim.train.loop` and :mod:`featsim.train.pretrain`."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from flax import serialization

from featsim import parallel

__all__ = ["load_checkpoint", "save_checkpoint", "save_json", "write_history"]


def save_json(path: Path, value) -> None:
    """Writes ``value`` as indented JSON via a temporary file and ``os.replace``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def write_history(workdir: Path, history: list[dict]) -> None:
    """``history.json`` and ``history.csv`` (one row per epoch, the union of the keys)."""
    save_json(workdir / "history.json", history)
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(workdir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def save_checkpoint(path: Path, state, epoch: int, history, best=None) -> None:
    """The (unreplicated) train state after ``epoch`` epochs, the history so far and the
    best-epoch record (None when the run keeps none), written atomically."""
    payload = {"state": serialization.to_state_dict(parallel.unreplicate(state)),
               "epoch": epoch, "history": json.dumps(history), "best": json.dumps(best)}
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(payload))
    os.replace(tmp, path)


def load_checkpoint(path: Path, state):
    """``(state, epoch, history, best)`` from :func:`save_checkpoint`'s file; ``state`` is the
    template the stored values are restored into."""
    payload = serialization.msgpack_restore(path.read_bytes())
    restored = serialization.from_state_dict(state, payload["state"])
    return (restored, int(payload["epoch"]), json.loads(payload["history"]),
            json.loads(payload.get("best", "null")))
