"""featsim.adapt.adapt_batch_stats (the BN-adapted control) and compare_backbones / compare_runs
with it, on El Azhari's small CNN (BatchNorm after its first conv; random weights) and tiny
synthetic images: a few seconds on CPU."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from PIL import Image

from featsim.adapt import NO_BATCHNORM, adapt_batch_stats
from featsim.backbones import get_backbone
from featsim.compare_seeds import compare_runs
from featsim.comparison import PARTS, STATISTICS, compare_backbones
from featsim.data import open_source
from featsim.data.decode import load_rgb
from featsim.data.transforms import Transform
from featsim.features import extract_features
from featsim.metrics import StatOptions

pytestmark = pytest.mark.filterwarnings("ignore::featsim.metrics.FIDRankWarning")
FAST = dict(stats=StatOptions(n_bootstrap=30, n_permutations=20, kid_subset_size=5,
                              kid_subsets=3), batch_size=6,
            progress=False, layer="stage1", cka_layers=["stage1"])


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Bright, low-contrast "natural" images and dark, high-contrast "medical" ones."""
    root = tmp_path_factory.mktemp("domains")
    rng = np.random.default_rng(0)
    for name, (mean, spread) in (("natural", (170, 15)), ("medical", (50, 60))):
        (root / name).mkdir()
        for i in range(6):
            pixels = np.clip(rng.normal(mean, spread, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return open_source(root / "natural"), open_source(root / "medical")


@pytest.fixture(scope="module")
def cnn():
    bb = get_backbone("elazhari_cnn", num_classes=None)
    return dataclasses.replace(bb, variables=bb.init(jax.random.key(0)))


def test_adapted_statistics_are_the_target_batch_statistics(cnn, domains):
    _, medical = domains
    control = adapt_batch_stats(cnn, medical, max_images=None, batch_size=len(medical.items))
    assert control.batchnorm and control.n_images == control.n_available == 6
    assert jax.tree.leaves(control.backbone.variables["params"])[0] is \
        jax.tree.leaves(cnn.variables["params"])[0]  # only batch_stats change
    # One batch of every target image: inference with the adapted statistics reproduces the
    # training-mode (batch-normalised) output on that batch; stage1 is the first BN's output.
    transform = Transform.for_backbone(cnn.preprocessing)
    x = np.stack([transform(load_rgb(it)) for it in medical.items])
    @functools.partial(jax.jit, static_argnums=2)
    def stage1(variables, x, train):
        (_, feats), _ = cnn.module.apply(variables, x, train=train, mutable=["batch_stats"],
                                         rngs={"dropout": jax.random.key(0)})
        return feats["stage1"].mean(axis=(1, 2))

    expected = np.asarray(stage1(cnn.variables, x, True), np.float64)
    got = extract_features(control.backbone, medical, layers=("stage1",), cache=False,
                           progress=False)["stage1"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # float32 convs
    before = np.asarray(stage1(cnn.variables, x, False))
    # The adapted target features move: the initial statistics (0 / 1) are not the target's.
    assert np.abs(got.mean(0) - before.mean(0)).max() > 1e-2


def test_adapt_records_the_cap_and_names_bad_files(cnn, domains, tmp_path):
    natural, _ = domains
    control = adapt_batch_stats(cnn, natural, max_images=5, batch_size=4, seed=3)
    info = control.to_dict()  # 5 = 4 + 1: the last single image joins the batch before it
    assert (info["n_images"], info["n_available"], info["max_images"], info["seed"]) == (
        5, 6, 5, 3)
    assert "5 of 6 images, cap 5, seed 3" in control.describe()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(bad / f"ok{i}.png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        adapt_batch_stats(cnn, bad)
    kept = adapt_batch_stats(cnn, bad, skip_bad=True, batch_size=4)
    assert kept.n_images == 2 and len(kept.skipped) == 1 and "broken.png" in kept.skipped[0]
    no_bn = dataclasses.replace(cnn, variables={"params": cnn.variables["params"]})
    same = adapt_batch_stats(no_bn, natural)
    assert same.backbone is no_bn and not same.batchnorm
    assert NO_BATCHNORM in same.describe()


def test_compare_with_control_and_seed_level(cnn, domains, tmp_path):
    natural, medical = domains
    control = adapt_batch_stats(cnn, medical, max_images=None, batch_size=6)
    runs = []
    for seed in range(3):  # "fine-tuned" stand-ins: the control with perturbed weights
        rng = np.random.default_rng(seed)
        variables = jax.tree.map(np.array, control.backbone.variables)
        leaves = jax.tree_util.tree_leaves(variables["params"])
        for leaf in leaves:
            leaf *= (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        runs.append(dataclasses.replace(cnn, variables=variables))
    r = compare_backbones(cnn, runs[0], natural, medical, control=control, cache_dir=tmp_path,
                          **FAST)
    for name in STATISTICS:
        total, norm, weights = (r.change.parts[p][name] for p in PARTS)
        np.testing.assert_allclose(norm.estimate + weights.estimate, total.estimate,
                                   rtol=1e-12, atol=1e-15)
    out = json.loads(json.dumps(r.to_dict()))
    assert out["control"]["source"] == medical.spec and out["control"]["n_images"] == 6
    assert set(out["parts"]) == set(PARTS)
    assert "pretrained_source_finetuned_target" in out["readings"]
    table = r.to_table()
    assert "BN-adapted" in table and "normalisation part" in table and "weight part" in table
    assert "total = normalisation + weights" in r.verdict
    assert "not evidence for Prop. 5" in r.verdict

    multi = compare_runs(cnn, runs, natural, medical, control=control, cache_dir=tmp_path,
                         labels=["seed 0", "seed 1", "seed 2"], **FAST)
    assert multi.seeds.n_seeds == 3 and "Seed level (3 fine-tuning runs" in multi.verdict
    norm = multi.seeds.changes["normalisation"]["distance"]
    assert norm.low == norm.high == norm.mean  # one control for every seed
    out = json.loads(json.dumps(multi.to_dict()))
    assert len(out["runs"]) == 3 and out["seed_level"]["has_verdict"]
