"""featsim.data.subsets and featsim.data.digest on a small labelled folder."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from featsim.data import open_source
from featsim.data.digest import content_sha256, source_digest
from featsim.data.subsets import balanced_subset, proportional_subset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Class a: 12 images, class b: 4 images (3 : 1)."""
    root = tmp_path_factory.mktemp("labelled")
    for name, count in (("a", 12), ("b", 4)):
        (root / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((4, 4, 3), 10 * i, np.uint8)).save(root / name / f"{i}.png")
    return open_source(root)


def _counts(source):
    labels = [it.label for it in source.items]
    return labels.count(0), labels.count(1)


def test_balanced_and_proportional_subsets(folder):
    b = balanced_subset(folder, 6, seed=1)
    assert _counts(b) == (3, 3) and "quick subset: 6 of 16" in b.spec
    assert [it.id for it in b.items] == sorted((it.id for it in b.items),
                                               key=[i.id for i in folder.items].index)
    assert [it.id for it in balanced_subset(folder, 6, seed=1).items] == [it.id for it in b.items]
    assert _counts(balanced_subset(folder, 10)) == (6, 4)  # b runs out: the rest from a
    p = proportional_subset(folder, 8, seed=0)
    assert _counts(p) == (6, 2) and "stratified subset: 8 of 16, seed 0" in p.spec
    assert balanced_subset(folder, 100) is folder
    with pytest.raises(ValueError, match="subset size must be an integer >= 1, got 0"):
        balanced_subset(folder, 0)


def test_a_recorded_subset_spec_reopens_the_same_images(folder):
    """A run records its training split's spec; reopening it gives the same images (the
    BN-adapted control of featsim compare is built from it)."""
    for subset in (proportional_subset(folder, 8, seed=3), balanced_subset(folder, 6, seed=2)):
        again = open_source(subset.spec)
        assert [it.id for it in again.items] == [it.id for it in subset.items]
        assert again.spec == subset.spec
    with pytest.raises(ValueError, match=r"drawn from 17 items.*now has 16"):
        open_source(f"{folder.spec} [stratified subset: 8 of 17, seed 0]")
    with pytest.raises(ValueError, match="records no seed"):
        open_source(f"{folder.spec} [quick subset: 6 of 16]")


def test_source_digest_is_the_features_content_hash(folder):
    d = source_digest(folder)
    hashes = [hashlib.sha256(it.read_bytes()).hexdigest() for it in folder.items]
    assert d["content_sha256"] == hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    assert d["content_sha256"] == content_sha256(hashes)
    assert d["n_items"] == 16 and d["class_counts"] == {"a": 12, "b": 4}
