"""extract_features: values, padding, layers, the content-keyed cache, resume, bad files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from featsim.backbones import Backbone, Preprocessing
from featsim.data.decode import load_rgb
from featsim.data.sources import open_source
from featsim.data.transforms import Transform
from featsim.features import FeatureCache, Features, extract_features, feature_layers
from featsim.features import extract as extract_module

PREP = Preprocessing(input_size=16, resize_size=16, crop="none", scaling="[0,1]")


class Tiny(nn.Module):
    """A backbone-shaped module: (logits, {"stem": map, "pre_logits": vector})."""

    @nn.compact
    def __call__(self, x, *, train=False):
        stem = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        pooled = stem.mean(axis=(1, 2))
        return None, {"stem": stem, "pre_logits": nn.Dense(5)(pooled)}


def tiny_backbone(seed=0) -> Backbone:
    module = Tiny()
    variables = module.init(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)))
    return Backbone(name="tiny", module=module, preprocessing=PREP, variables=variables)


def make_images(folder, n, *, seed=0, classes=("a", "b")):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        cls = classes[i % len(classes)]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(10, 40)), int(rng.integers(10, 40)))
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        path = folder / cls / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def reference_features(backbone, source, layer="pre_logits"):
    """One image at a time, no batching, padding or cache."""
    transform = Transform.for_backbone(backbone.preprocessing)
    rows = []
    for item in open_source(source).items:
        x = transform(load_rgb(item))[None]
        _, feats = backbone.module.apply(backbone.variables, x)
        f = np.asarray(feats[layer], np.float64)
        rows.append(f.mean(axis=(1, 2)) if f.ndim == 4 else f)
    return np.concatenate(rows)


@pytest.fixture
def images(tmp_path):
    make_images(tmp_path / "data", 11)
    return tmp_path / "data"


def extract(backbone, source, cache_dir, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("chunk_batches", 1)
    return extract_features(backbone, source, cache_dir=cache_dir, progress=False, **kw)


def test_values_match_one_image_at_a_time_with_padded_last_batch(images, tmp_path):
    bb = tiny_backbone()
    feats = extract(bb, images, tmp_path / "cache", layers=("pre_logits", "stem"))
    assert isinstance(feats, Features)
    assert len(feats) == 11 and feats.skipped == ()  # 11 = 2 full batches of 4 + 3 padded
    assert feats["pre_logits"].shape == (11, 5) and feats["pre_logits"].dtype == np.float32
    assert feats["stem"].shape == (11, 8)  # spatial map averaged over h, w
    np.testing.assert_allclose(feats["pre_logits"], reference_features(bb, images),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["stem"], reference_features(bb, images, "stem"),
                               rtol=1e-5, atol=1e-6)
    source = open_source(images)
    assert feats.ids == tuple(it.id for it in source.items)
    np.testing.assert_array_equal(feats.labels, source.labels)
    assert feats.class_names == ("a", "b")
    assert feats.manifest["n"] == 11 and feats.manifest["backbone"] == "tiny"
    assert feats.manifest["preprocessing"] == Transform.for_backbone(PREP).to_dict()


def test_flatten_pooling_and_layer_errors(images, tmp_path):
    bb = tiny_backbone()
    flat = extract(bb, images, None, layers=("stem",), pooling="flatten", cache=False)
    assert flat["stem"].shape == (11, 8 * 8 * 8)
    assert sorted(feature_layers(bb)) == ["pre_logits", "stem"]
    with pytest.raises(ValueError, match=r"unknown layers \['stage9'\].*available"):
        extract(bb, images, None, layers=("stage9",), cache=False)
    with pytest.raises(ValueError, match="pooling"):
        extract(bb, images, None, pooling="max", cache=False)
    with pytest.raises(ValueError, match="no variables"):
        extract(dataclasses.replace(bb, variables=None), images, None, cache=False)
    with pytest.raises(KeyError, match="extracted"):
        flat["pre_logits"]


def test_cache_hits_by_content_not_name(images, tmp_path, monkeypatch):
    bb = tiny_backbone()
    cache = tmp_path / "cache"
    first = extract(bb, images, cache)
    chunks = sorted(p.name for p in cache.rglob("*.npz"))
    assert len(chunks) == 3  # 11 images in chunks of 4

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed a cached chunk")

    monkeypatch.setattr(extract_module, "_compute_chunk", no_compute)
    again = extract(bb, images, cache)
    np.testing.assert_array_equal(again["pre_logits"], first["pre_logits"])
    # Renaming every file keeps the content, so the cache still hits.
    renamed = tmp_path / "renamed"
    images.rename(renamed)
    for p in sorted(renamed.rglob("*.png")):
        p.rename(p.with_name("x_" + p.name))
    moved = extract(bb, renamed, cache)
    np.testing.assert_array_equal(moved["pre_logits"], first["pre_logits"])
    assert moved.ids[0].startswith("a/x_")


def test_edited_file_and_other_policy_miss_the_cache(images, tmp_path):
    bb = tiny_backbone()
    cache = tmp_path / "cache"
    extract(bb, images, cache)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(images / "a" / "img000.png")
    extract(bb, images, cache)
    assert len(list(cache.rglob("*.npz"))) == 4  # only the first chunk was recomputed
    extract(bb, images, cache, normalization="paper")
    extract(tiny_backbone(seed=1), images, cache)
    run_dirs = [p for p in cache.iterdir() if p.is_dir()]
    assert len(run_dirs) == 3  # policy and weights are part of the key
    keys = [json.loads((d / "key.json").read_text()) for d in run_dirs]
    assert len({k["weights_sha256"] for k in keys}) == 2
    assert {k["preprocessing"]["normalization"] for k in keys} == {"backbone", "paper"}


def test_killed_run_resumes_bit_identical(images, tmp_path, monkeypatch):
    bb = tiny_backbone()
    uninterrupted = extract(bb, images, tmp_path / "fresh", chunk_batches=1)
    real = extract_module._compute_chunk
    calls = []

    def dies_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like Ctrl-C / a kill between chunks
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_module, "_compute_chunk", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract(bb, images, tmp_path / "resumed", chunk_batches=1)
    assert len(list((tmp_path / "resumed").rglob("*.npz"))) == 2
    assert not list((tmp_path / "resumed").rglob("*.tmp"))  # no half-written chunk
    calls.clear()
    monkeypatch.setattr(extract_module, "_compute_chunk",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = extract(bb, images, tmp_path / "resumed", chunk_batches=1)
    assert len(calls) == 1  # only the missing chunk
    np.testing.assert_array_equal(resumed["pre_logits"], uninterrupted["pre_logits"])


def test_corrupt_cache_chunk_is_recomputed_with_a_warning(images, tmp_path):
    bb = tiny_backbone()
    cache = tmp_path / "cache"
    first = extract(bb, images, cache)
    victim = sorted(cache.rglob("*.npz"))[0]
    victim.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="unreadable feature cache chunk"):
        again = extract(bb, images, cache)
    np.testing.assert_array_equal(again["pre_logits"], first["pre_logits"])


def test_bad_file_is_named_or_skipped_and_listed(images, tmp_path):
    bb = tiny_backbone()
    bad = images / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match=r"broken\.png"):
        extract(bb, images, tmp_path / "cache")
    feats = extract(bb, images, tmp_path / "cache", skip_bad=True)
    assert len(feats) == 11 and len(feats.skipped) == 1
    assert feats.skipped[0].id == "b/broken.png" and "broken.png" in feats.skipped[0].name
    assert feats.manifest["skipped"] == 1 and "b/broken.png" not in feats.ids
    good = extract(bb, images, tmp_path / "cache2", skip_bad=True, cache=False)
    np.testing.assert_array_equal(good["pre_logits"], feats["pre_logits"])
    # The cached chunk remembers the bad file: without skip_bad it is still an error.
    with pytest.raises(ValueError, match=r"broken\.png"):
        extract(bb, images, tmp_path / "cache")


def test_all_bad_and_empty_sources(tmp_path):
    bb = tiny_backbone()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="all 1 images"):
        extract(bb, tmp_path / "bad", None, skip_bad=True, cache=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        extract(bb, tmp_path / "empty", None, cache=False)


def test_save_and_load_roundtrip(images, tmp_path):
    from featsim.features import load_features

    feats = extract(tiny_backbone(), images, None, cache=False)
    path = feats.save(tmp_path / "out" / "f.npz")
    np.testing.assert_array_equal(load_features(path), feats["pre_logits"])
    with np.load(path) as z:
        manifest = json.loads(str(z["manifest"]))
        assert list(z["ids"]) == list(feats.ids)
    assert manifest["layers"] == ["pre_logits"]
    with pytest.raises(ValueError, match=r"\.npz"):
        feats.save(tmp_path / "f.npy")


def test_cache_key_covers_every_field(tmp_path):
    base = {"backbone": "a", "weights_sha256": "0", "layers": ["x"]}
    keys = {FeatureCache(tmp_path, dict(base, **{k: v})).key
            for k, v in [("backbone", "b"), ("weights_sha256", "1"), ("layers", ["y"])]}
    assert len(keys | {FeatureCache(tmp_path, base).key}) == 4


def test_two_devices_match_one(images, tmp_path):
    """Sharded over 2 forced CPU devices (odd batch rounded up) equals the 1-device result."""
    one = extract(tiny_backbone(), images, None, cache=False)
    np.save(tmp_path / "one.npy", one["pre_logits"])
    script = textwrap.dedent(f"""
        import numpy as np, jax
        assert jax.local_device_count() == 2, jax.devices()
        sys_path = {str(os.path.dirname(__file__))!r}
        import sys; sys.path.insert(0, sys_path)
        from test_extract import tiny_backbone
        from featsim.features import extract_features
        f = extract_features(tiny_backbone(), {str(images)!r}, batch_size=3, cache=False,
                             progress=False)
        assert f.manifest["batch_size"] == 4 and f.manifest["devices"] == "cpux2", f.manifest
        np.testing.assert_allclose(f["pre_logits"], np.load({str(tmp_path / "one.npy")!r}),
                                   rtol=1e-5, atol=1e-6)
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_ignored_files_and_small_images_are_reported_not_silent(tmp_path):
    """A .txt beside the images is listed, a 1 x 1 image is counted and warned about, and
    both facts survive a cache hit (the original sizes are cached with the features)."""
    folder = tmp_path / "imgs"
    make_images(folder, 4, classes=("a",))
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(folder / "a" / "dot.png")
    (folder / "a" / "notes.txt").write_text("not an image")
    (folder / "README").write_text("nor this")
    bb = tiny_backbone()
    for attempt in ("cold", "cached"):
        small_warning = r"1 of 5 images have a side below .*a/dot\.png \(1x1\)"
        with pytest.warns(UserWarning, match=small_warning):
            feats = extract(bb, str(folder), tmp_path / "cache")
        source = feats.manifest["source"]
        assert source["ignored_files"] == 2, attempt
        assert source["ignored_examples"] == ["README", "a/notes.txt"], attempt
        small = feats.manifest["small_images"]
        assert small["count"] == 1 and small["examples"] == ["a/dot.png (1x1)"], attempt
        assert len(feats) == 5  # still used: reported, not dropped
