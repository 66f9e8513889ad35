"""``RunDir``: the one owner of a training run's folder.

Every writer (:func:`featsim.train.train_and_evaluate`, the cached-feature linear path,
:func:`featsim.train.pretrain`) and every reader (``featsim compare``, the analysis scripts,
the notebooks) names a run's files through this module, so the layout lives in one place::

    RUN/config.json          the TrainConfig (or PretrainConfig) as JSON
    RUN/history.json         one row per epoch; history.csv holds the same rows
    RUN/checkpoint.msgpack   the resumable train state (flax msgpack, written atomically)
    RUN/model.msgpack        the final variables, with metadata (backbone, num_classes, ...)
    RUN/best_model.msgpack   the best-validation-loss variables (early stopping only)
    RUN/metrics.json         the final model's test metrics (its presence marks a finished run)
    RUN/analysis_run.json    what an analysis script recorded about the run (data, label)
    RUN/encoder.msgpack      ``featsim pretrain``'s encoder; autoencoder.msgpack its whole model
    ROOT/summary.json        :func:`featsim.train.run_seeds`' mean and std over ROOT/seed_<s>/

JSON files are written atomically (a temporary file, then ``os.replace``). ``metrics.json``
and ``history.json`` keep Python's ``NaN`` tokens for undefined metrics (an AUC on one class),
as they always have; the analysis record is strict JSON (:func:`featsim.jsonfile.write_json`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from flax import serialization

from featsim.backbones.convert import check_variables
from featsim.backbones.registry import ENCODER_FILENAME, Backbone, get_backbone, list_backbones
from featsim.backbones.weights import load_variables, save_variables
from featsim.jsonfile import write_json

__all__ = [
    "MODEL_FILENAME",
    "RunDir",
    "load_model",
    "model_metadata",
]

CONFIG_FILENAME = "config.json"
HISTORY_FILENAME = "history.json"
HISTORY_CSV_FILENAME = "history.csv"
METRICS_FILENAME = "metrics.json"
MODEL_FILENAME = "model.msgpack"
BEST_MODEL_FILENAME = "best_model.msgpack"
CHECKPOINT_FILENAME = "checkpoint.msgpack"
RECORD_FILENAME = "analysis_run.json"
SUMMARY_FILENAME = "summary.json"
AUTOENCODER_FILENAME = "autoencoder.msgpack"

# Records that may name a run's training data, in order: the analysis scripts' record, then
# the trainer's own files (key paths into each).
_SOURCE_RECORDS = ((RECORD_FILENAME, ("data", "train", "spec")),
                   (CONFIG_FILENAME, ("train",)),
                   (METRICS_FILENAME, ("train",)),
                   (METRICS_FILENAME, ("config", "train")))


def _write_json(path: Path, value) -> None:
    """Indented JSON via a temporary file and ``os.replace``; NaN stays a ``NaN`` token."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent} ({what})")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _number(text: str):
    """A history.csv cell: int, float, NaN for an empty cell, else the text itself."""
    if text == "":
        return math.nan
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def model_metadata(config, num_classes: int | None, *, bn_stats: str | None = None) -> dict:
    """The metadata the trainer stores with ``model.msgpack``: what
    :func:`load_model` needs (``backbone``, ``num_classes``) and the run's provenance
    (``strategy``, the whole ``config`` as JSON, how the BatchNorm statistics were made)."""
    metadata = {"backbone": config.backbone, "num_classes": str(num_classes),
                "strategy": config.strategy, "config": config.to_json()}
    if bn_stats is not None:
        metadata["batch_stats"] = bn_stats
    return metadata


def _writer(method):
    """A RunDir method that writes: skipped (None, or the path it would write) when the
    RunDir does not write."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.writes:
            return method(self, *args, **kwargs)
        return self.best_model_file if kwargs.get("best") else (
            self.model_file if method.__name__ == "save_model" else None)

    return call


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths and records of one run folder (nothing is read or created on construction).

    Example::

        run = RunDir("runs/finetune/seed_0")
        config, history, metrics = run.read_config(), run.read_history(), run.read_metrics()
        backbone = run.load_model()             # a Backbone with the trained variables
        runs = RunDir.find("runs")              # every finished run below a root
    """

    path: Path
    #: False in processes 1.. of a distributed run: every write is skipped (process 0 writes).
    writes: bool = True

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    # Paths ----------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILENAME

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY_FILENAME

    @property
    def history_csv_file(self) -> Path:
        return self.path / HISTORY_CSV_FILENAME

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILENAME

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILENAME

    @property
    def best_model_file(self) -> Path:
        return self.path / BEST_MODEL_FILENAME

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT_FILENAME

    @property
    def record_file(self) -> Path:
        return self.path / RECORD_FILENAME

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILENAME

    @property
    def encoder_file(self) -> Path:
        return self.path / ENCODER_FILENAME

    @property
    def autoencoder_file(self) -> Path:
        return self.path / AUTOENCODER_FILENAME

    @property
    def has_model(self) -> bool:
        return self.model_file.is_file()

    @property
    def is_finished(self) -> bool:
        """The final model and its metrics are both written (the trainer writes
        ``metrics.json`` last)."""
        return self.has_model and self.metrics_file.is_file()

    @property
    def has_history(self) -> bool:
        return self.history_file.is_file() or self.history_csv_file.is_file()

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # Records --------------------------------------------------------------------------------
    @_writer
    def write_config(self, config) -> None:
        """``config.json`` from a config's ``to_json()`` (TrainConfig, PretrainConfig)."""
        self.config_file.write_text(config.to_json() + "\n")

    def read_config(self) -> dict:
        """``config.json`` as a dict (``TrainConfig.from_dict`` turns it back into a config)."""
        return _read_json(self.config_file, "the trainer writes the run's config there")

    @_writer
    def write_history(self, rows: list[dict]) -> None:
        """``history.json`` and ``history.csv`` (one row per epoch, the union of the keys)."""
        _write_json(self.history_file, rows)
        keys = list(dict.fromkeys(k for row in rows for k in row))
        tmp = self.history_csv_file.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.history_csv_file)

    def read_history(self) -> list[dict]:
        """The per-epoch rows: ``history.json``, else ``history.csv`` (numbers parsed, an empty
        cell as NaN)."""
        if self.history_file.is_file():
            return _read_json(self.history_file, "per-epoch history")
        if not self.history_csv_file.is_file():
            raise FileNotFoundError(f"no {HISTORY_FILENAME} or {HISTORY_CSV_FILENAME} in "
                                    f"{self.path}")
        with open(self.history_csv_file, newline="") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]

    @_writer
    def write_metrics(self, metrics: Mapping) -> None:
        _write_json(self.metrics_file, dict(metrics))

    def read_metrics(self) -> dict:
        return _read_json(self.metrics_file, "written when the run finished")

    @_writer
    def clear_metrics(self) -> None:
        """Removes ``metrics.json``: the run no longer counts as finished until it is rewritten."""
        self.metrics_file.unlink(missing_ok=True)

    @_writer
    def write_summary(self, summary: Mapping) -> None:
        _write_json(self.summary_file, dict(summary))

    @_writer
    def write_record(self, record: Mapping) -> None:
        """``analysis_run.json``: what an analysis script knows about the run (strict JSON)."""
        write_json(self.record_file, record)

    def read_record(self) -> dict:
        """``analysis_run.json``, or ``{}`` when the run has none."""
        if not self.record_file.is_file():
            return {}
        return _read_json(self.record_file, "analysis record")

    def training_source(self) -> str | None:
        """The training split the run's records name (e.g. ``"chest_xray:train"``), or None."""
        for name, keys in _SOURCE_RECORDS:
            try:
                value = json.loads((self.path / name).read_text())
                for key in keys:
                    value = value[key]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(value, str) and value:
                return value
        return None

    def copy_records(self, target: str | os.PathLike) -> RunDir:
        """Copies ``history.csv``, ``metrics.json`` and ``config.json`` (those present) into
        ``target`` (created), e.g. to keep a run's curves beside an analysis' results."""
        out = RunDir(target).create()
        for name in (HISTORY_CSV_FILENAME, METRICS_FILENAME, CONFIG_FILENAME):
            if (self.path / name).is_file():
                (out.path / name).write_bytes((self.path / name).read_bytes())
        return out

    # Models and checkpoints ----------------------------------------------------------------
    @_writer
    def save_model(self, variables, metadata: Mapping[str, str], *, best: bool = False) -> Path:
        """``model.msgpack`` (or ``best_model.msgpack``) with ``metadata``
        (:func:`model_metadata` for a classifier)."""
        return save_variables(self.best_model_file if best else self.model_file, variables,
                              metadata=metadata)

    def load_variables(self, *, best: bool = False, with_metadata: bool = False):
        """The saved variables (numpy), optionally with their metadata."""
        file = self.best_model_file if best else self.model_file
        if not file.is_file():
            raise FileNotFoundError(f"no {file.name} in {self.path} (the trainer writes the "
                                    "final model there)")
        return load_variables(file, with_metadata=with_metadata)

    def load_model(self, *, backbone: str | None = None) -> Backbone:
        """The trained backbone of ``model.msgpack`` (:func:`load_model`)."""
        return load_model(self.path, backbone=backbone)

    @_writer
    def save_checkpoint(self, state, epoch: int, history: list[dict], best=None) -> None:
        """The host (unreplicated) train state after ``epoch`` epochs, the history so far and
        the best-epoch record (None when the run keeps none), written atomically."""
        payload = {"state": serialization.to_state_dict(state), "epoch": epoch,
                   "history": json.dumps(history), "best": json.dumps(best)}
        tmp = self.checkpoint_file.with_suffix(".tmp")
        tmp.write_bytes(serialization.msgpack_serialize(payload))
        os.replace(tmp, self.checkpoint_file)

    def load_checkpoint(self, state):
        """``(state, epoch, history, best)`` from :meth:`save_checkpoint`'s file; ``state`` is
        the host template the stored values are restored into."""
        payload = serialization.msgpack_restore(self.checkpoint_file.read_bytes())
        restored = serialization.from_state_dict(state, payload["state"])
        return (restored, int(payload["epoch"]), json.loads(payload["history"]),
                json.loads(payload.get("best", "null")))

    # Finding runs ---------------------------------------------------------------------------
    @classmethod
    def find(cls, root: str | os.PathLike | None, *, finished: bool = True) -> list[RunDir]:
        """Every run folder at or below ``root`` holding ``model.msgpack`` (and, with
        ``finished``, ``metrics.json``), sorted by path; [] for a missing root."""
        if root is None or not Path(root).is_dir():
            return []
        runs = (cls(p.parent) for p in Path(root).rglob(MODEL_FILENAME))
        return sorted((r for r in runs if r.is_finished or not finished),
                      key=lambda r: r.path)

    @classmethod
    def find_histories(cls, root: str | os.PathLike | None) -> list[RunDir]:
        """Every folder at or below ``root`` holding a history (``history.json`` or
        ``history.csv``, e.g. copies kept by :meth:`copy_records`), sorted by path."""
        if root is None or not Path(root).is_dir():
            return []
        folders = {p.parent for name in (HISTORY_FILENAME, HISTORY_CSV_FILENAME)
                   for p in Path(root).rglob(name)}
        return [cls(p) for p in sorted(folders)]


def load_model(path: str | os.PathLike, *, backbone: str | None = None) -> Backbone:
    """A trained backbone from the trainer's output.

    The trainer writes ``RUN/model.msgpack`` with
    ``save_variables(path, variables, metadata=model_metadata(config, K))`` where
    ``variables`` are the full Flax variables of ``get_backbone(NAME, num_classes=K)``.

    Args:
        path: the run directory (its ``model.msgpack`` is read) or a ``.msgpack`` file.
        backbone: the registry name the caller expects (``featsim compare --backbone``); a
            checkpoint of another backbone is an error.

    Returns:
        A :class:`~featsim.backbones.Backbone` built with the checkpoint's ``num_classes``,
        with ``variables`` (numpy arrays) and ``weights_file`` set; ``weights.description``
        names the checkpoint and its training strategy (it enters feature manifests).

    Raises:
        FileNotFoundError: no such file, or a directory without ``model.msgpack``.
        ValueError: not a featsim variables file, metadata without ``backbone`` or
            ``num_classes``, an unregistered or unexpected backbone name, or variables that
            do not match the module (every message names the file).
    """
    path = Path(path)
    if path.is_dir():
        file = RunDir(path).model_file
        if not file.is_file():
            others = sorted(p.name for p in path.glob("*.msgpack"))
            raise FileNotFoundError(
                f"no {MODEL_FILENAME} in {path} (the trainer writes the final fine-tuned "
                f"variables there); .msgpack files found: {others or 'none'}. Pass the run "
                "directory or a .msgpack file"
            )
        path = file
    elif not path.is_file():
        raise FileNotFoundError(f"no fine-tuned run directory or checkpoint at {path}")
    variables, metadata = load_variables(path, with_metadata=True)
    missing = [k for k in ("backbone", "num_classes") if not metadata.get(k)]
    if missing:
        raise ValueError(
            f"{path}: metadata lacks {missing} (found keys {sorted(metadata)}); a fine-tuned "
            "checkpoint needs metadata={'backbone': NAME, 'num_classes': str(K), ...} "
            "(featsim.backbones.save_variables)"
        )
    name = metadata["backbone"]
    if backbone is not None and name != backbone:
        raise ValueError(
            f"{path} holds a fine-tuned {name!r}, but --backbone/backbone= is {backbone!r}"
        )
    if name not in list_backbones():
        raise ValueError(
            f"{path}: metadata names backbone {name!r}, which is not registered; registered "
            f"backbones: {', '.join(list_backbones())}"
        )
    num_classes = _parse_num_classes(metadata["num_classes"], path)
    built = get_backbone(name, num_classes=num_classes)
    try:
        check_variables(variables, built.abstract_variables())
    except ValueError as err:
        raise ValueError(
            f"{path}: {err}\n(checked against get_backbone({name!r}, "
            f"num_classes={num_classes}) from the file's metadata)"
        ) from None
    weights = built.weights
    if weights is not None:
        strategy = metadata.get("strategy", "unknown strategy")
        weights = dataclasses.replace(
            weights, description=f"fine-tuned {name} ({strategy}) from {path}")
    return dataclasses.replace(built, variables=variables, weights_file=path, weights=weights)


def _parse_num_classes(value: str, path: Path) -> int | None:
    if value.strip().lower() in ("none", "0"):
        return None
    try:
        k = int(value)
    except ValueError:
        raise ValueError(
            f"{path}: metadata num_classes must be an integer string, got {value!r}"
        ) from None
    if k < 0:
        raise ValueError(f"{path}: metadata num_classes must be >= 0, got {k}")
    return k
