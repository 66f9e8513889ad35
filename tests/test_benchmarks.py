"""The benchmark scripts run (in their --quick mode) and write JSON: they must not rot.

No timing is asserted here; the measured claims live in the scripts' JSON output.
"""

import json
import os
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
    assert set(data["pmap_finetune_epoch"]) == {"1", "2"}
    assert data["pmap_finetune_epoch"]["2"]["devices"] == 2
    assert data["linear_cached_features"]["steps_per_s"] > 0
    versus = data["featsim_vs_pytorch"]
    assert [(row["batch"], row["augment"]) for row in versus] == [(4, True)]
    for row in versus:
        assert row["featsim_train_img_s"] > 0
        if "torch" not in row:  # torch installed: the reference ran the same steps
            assert row["torch_train_img_s"] > 0 and row["train_ratio"] > 0


def test_paired_coverage_benchmark_quick(tmp_path):
    out = tmp_path / "paired_coverage.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired_coverage.py"), "--quick",
                    "--out", str(out)], check=True, capture_output=True, cwd=ROOT, timeout=600)
    data = json.loads(out.read_text())
    assert data["quick"] is True and set(data["by_n"]) == {"20", "40"}
    for by_n in data["by_n"].values():
        for rule in ("distinct_pairs", "copies_as_pairs"):
            assert 0.0 <= by_n[rule]["ratio"]["coverage"] <= 1.0


def test_gpu_protocol_script_builds_a_command_the_analysis_accepts(tmp_path):
    """benchmarks/gpu_protocol.sh --dry-run prints the full-protocol command; every flag
    in it parses with transfer_vs_scratch's own parser (the script cannot drift from it)."""
    import shlex

    data = tmp_path / "kermany"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    printed = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_protocol.sh"), "--dry-run",
         str(tmp_path / "out")], env={**os.environ, "DATA": str(data), "PYTHON": "true"},
        capture_output=True, text=True, check=True, timeout=60).stdout
    command = shlex.split(next(line for line in printed.splitlines()
                               if "transfer_vs_scratch.py" in line))
    argv = command[command.index(str(ROOT / "analysis" / "transfer_vs_scratch.py")) + 1:]
    sys.path.insert(0, str(ROOT / "analysis"))
    try:
        import transfer_vs_scratch
    finally:
        sys.path.remove(str(ROOT / "analysis"))
    args = transfer_vs_scratch.build_parser().parse_args(argv)
    assert (args.seeds, args.epochs, args.batch_size) == ("0,1,2", 20, 64)
    assert args.data == data and args.resume and args.lr_variant == "efficientnet_lite0"
    missing = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_protocol.sh"), str(tmp_path / "out")],
        env={**os.environ, "DATA": str(tmp_path / "nowhere")}, capture_output=True,
        text=True, timeout=60)
    assert missing.returncode == 2 and "no Kermany split" in missing.stderr
