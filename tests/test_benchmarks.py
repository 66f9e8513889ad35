"""The benchmark scripts run (in their --quick mode) and write JSON: they must not rot.

No timing is asserted here; the measured claims live in the scripts' JSON output.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_benchmark_quick(tmp_path):
    out = tmp_path / "metrics.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "metrics.py"), "--quick",
                    "--skip-scale", "--out", str(out)], check=True, capture_output=True,
                   cwd=ROOT, timeout=600)
    data = json.loads(out.read_text())
    assert data["quick"] is True
    dist = data["average_distance"]
    assert dist["relative_error_vs_float64_reference"] < 1e-6
    assert data["frechet_distance"]["relative_difference"] < 1e-9
    assert data["minibatch_cka"]["peak_rss_mib"] > 0


def test_pipeline_benchmark_quick(tmp_path):
    out = tmp_path / "pipeline.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline.py"), "--quick",
                    "--out", str(out)], check=True, capture_output=True, cwd=ROOT, timeout=600)
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["n_images_distance"] == 128
    for key in ("bare_forward_img_s", "decode_transform_img_s", "extract_cold_img_s",
                "distance_cold_img_s", "cached_speedup", "pipeline_over_bare_forward"):
        assert data[key] > 0, key


def test_training_benchmark_quick(tmp_path):
    out = tmp_path / "training.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training.py"), "--quick",
                    "--out", str(out)], check=True, capture_output=True, cwd=ROOT, timeout=900)
    data = json.loads(out.read_text())
    assert set(data["pmap_finetune_step"]) == {"1", "2"}
    assert data["pmap_finetune_step"]["2"]["devices"] == 2
    assert data["linear_cached_features"]["steps_per_s"] > 0


def test_paired_coverage_benchmark_quick(tmp_path):
    out = tmp_path / "paired_coverage.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired_coverage.py"), "--quick",
                    "--out", str(out)], check=True, capture_output=True, cwd=ROOT, timeout=600)
    data = json.loads(out.read_text())
    assert data["quick"] is True and set(data["by_n"]) == {"20", "40"}
    for by_n in data["by_n"].values():
        for rule in ("distinct_pairs", "copies_as_pairs"):
            assert 0.0 <= by_n[rule]["ratio"]["coverage"] <= 1.0
