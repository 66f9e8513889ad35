"""tfds sources and the chest_xray_kermany builder: prepared from tiny local trees, read offline."""

import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from featsim.data.kermany_tfds import (  # noqa: E402 - after the importorskip
    CLASS_NAMES,
    ChestXrayKermany,
    encode_grayscale,
    prepare_kermany,
)
from featsim.data.tfds_source import load_tfds_source  # noqa: E402

_RNG = np.random.default_rng(0)


def _save(path: Path, mode: str, size: tuple[int, int], fmt: str) -> None:
    h, w = size
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = _RNG.integers(0, 256, (h, w, channels), dtype=np.uint8)
    if mode == "L":
        pixels = pixels[..., 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path, format=fmt)


# split/class/file -> (PIL mode, (h, w), format). Mixed-case suffixes, an RGB original (stored
# converted), PNGs beside JPEGs, a file that is not an image.
_TREE = {
    "train/NORMAL/IM-0001-0001.jpeg": ("L", (12, 10), "JPEG"),
    "train/NORMAL/IM-0002-0001.jpeg": ("L", (9, 13), "JPEG"),
    "train/PNEUMONIA/person1_bacteria_1.jpeg": ("L", (11, 11), "JPEG"),
    "train/PNEUMONIA/person2_virus_3.jpeg": ("RGB", (10, 14), "JPEG"),
    "test/NORMAL/b.jpeg": ("L", (16, 12), "JPEG"),
    "test/NORMAL/C.JPEG": ("L", (8, 8), "JPEG"),
    "test/NORMAL/d.png": ("L", (7, 9), "PNG"),
    "test/PNEUMONIA/person3_virus_4.jpeg": ("RGB", (10, 10), "JPEG"),
    "test/PNEUMONIA/person4_bacteria_5.PNG": ("RGBA", (6, 5), "PNG"),
    "val/NORMAL/NORMAL2-IM-1427-0001.jpeg": ("L", (9, 9), "JPEG"),
    "val/PNEUMONIA/person1946_bacteria_4874.jpeg": ("L", (10, 8), "JPEG"),
}


def _expected_order(split: str) -> list[str]:
    """Sorted by class, then by file name (bytewise: upper case first)."""
    return sorted(
        (k for k in _TREE if k.startswith(split + "/")),
        key=lambda k: (CLASS_NAMES.index(k.split("/")[1]), k.split("/")[2]),
    )


def _gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))[..., None]


@pytest.fixture(scope="module")
def kermany(tmp_path_factory):
    """(manual_dir, data_dir) with the fake tree prepared in array_record format."""
    root = tmp_path_factory.mktemp("kermany")
    manual = root / "manual"
    for rel, (mode, size, fmt) in _TREE.items():
        _save(manual / "chest_xray" / rel, mode, size, fmt)
    (manual / "chest_xray" / "test" / "PNEUMONIA" / ".DS_Store").write_bytes(b"\0\1")
    data_dir = root / "tfds"
    prepare_kermany(manual, data_dir)
    return manual, data_dir


def test_load_test_split(kermany):
    manual, data_dir = kermany
    src = load_tfds_source("chest_xray_kermany", "test", data_dir=data_dir)
    order = _expected_order("test")
    assert src.kind == "tfds"
    assert src.spec == "tfds:chest_xray_kermany:test"
    assert src.class_names == ("NORMAL", "PNEUMONIA")
    assert len(src) == len(order) == 5
    assert [it.id for it in src.items] == [f"test/{i}" for i in range(5)]
    assert [it.label for it in src.items] == [CLASS_NAMES.index(k.split("/")[1]) for k in order]
    np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 1])
    for item, rel in zip(src.items, order, strict=True):
        assert item.path is None
        assert item.array.dtype == np.uint8
        assert item.array.ndim == 3 and item.array.shape[-1] == 1
        np.testing.assert_array_equal(item.array, _gray(manual / "chest_xray" / rel), err_msg=rel)
    assert "chest_xray_kermany/1.0.0" in src.description
    assert "5 images" in src.description


def test_all_splits_in_sorted_order(kermany):
    _, data_dir = kermany
    src = load_tfds_source("chest_xray_kermany", data_dir=data_dir)
    assert src.spec == "tfds:chest_xray_kermany"
    sizes = {s: len(_expected_order(s)) for s in ("test", "train", "val")}
    expected_ids = [f"{s}/{i}" for s in ("test", "train", "val") for i in range(sizes[s])]
    assert [it.id for it in src.items] == expected_ids
    one = load_tfds_source("chest_xray_kermany", "train", data_dir=data_dir)
    for a, b in zip(src.items[sizes["test"] :][: len(one)], one.items, strict=True):
        assert a.content_hash() == b.content_hash()


def test_slices_and_unions(kermany):
    _, data_dir = kermany
    full = load_tfds_source("chest_xray_kermany", "test", data_dir=data_dir)
    head = load_tfds_source("chest_xray_kermany", "test[:2]", data_dir=data_dir)
    assert [it.id for it in head.items] == ["test[:2]/0", "test[:2]/1"]
    for a, b in zip(head.items, full.items[:2], strict=True):
        np.testing.assert_array_equal(a.array, b.array)
    both = load_tfds_source("chest_xray_kermany", "val+test", data_dir=data_dir)
    assert len(both) == len(full) + 2


def test_storage_rule_and_file_names(kermany):
    """Grayscale files are stored byte for byte, others as converted PNG; order is unshuffled."""
    manual, data_dir = kermany
    builder = tfds.builder("chest_xray_kermany", data_dir=data_dir)
    assert builder.info.splits["train"].num_examples == 4
    assert builder.info.splits["val"].num_examples == 2
    records = builder.as_data_source("test", decoders={"image": tfds.decode.SkipDecoding()})
    order = _expected_order("test")
    assert [r["file_name"].decode() for r in records] == order
    for r, rel in zip(records, order, strict=True):
        original = (manual / "chest_xray" / rel).read_bytes()
        if _TREE[rel][0] == "L":
            assert r["image"] == original, rel
        else:
            assert r["image"] != original and r["image"].startswith(b"\x89PNG"), rel
            with Image.open(io.BytesIO(r["image"])) as im:
                assert im.mode == "L"


def test_encode_grayscale_refuses_16_bit(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(path)
    with pytest.raises(ValueError, match="more than 8 bits"):
        encode_grayscale(path)
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.jpeg"):
        encode_grayscale(bad)


def test_undecodable_image_names_the_item():
    from featsim.data.tfds_source import _decode_image

    with pytest.raises(ValueError, match="item test/3: cannot decode"):
        _decode_image(b"\xff\xd8 truncated", 1, "tfds 'x' item test/3")


def test_skipped_files_are_reported(tmp_path, caplog):
    manual = tmp_path / "manual"
    for rel in (
        "train/NORMAL/a.jpeg",
        "train/PNEUMONIA/b.jpeg",
        "test/NORMAL/c.jpeg",
        "test/PNEUMONIA/d.jpeg",
    ):
        _save(manual / rel, "L", (5, 5), "JPEG")  # train/ and test/ directly in manual_dir
    (manual / "test" / "NORMAL" / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="featsim.data.kermany_tfds"):
        prepare_kermany(manual, tmp_path / "tfds")
    assert any(
        "skipped 1" in r.getMessage() and "notes.txt" in r.getMessage() for r in caplog.records
    )
    src = load_tfds_source("chest_xray_kermany", data_dir=tmp_path / "tfds")
    assert [it.id for it in src.items] == ["test/0", "test/1", "train/0", "train/1"]


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_tfds_source("chest_xray_kermany", "test", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "tfds build chest_xray_kermany --imports featsim.data.kermany_tfds" in msg
    assert str(tmp_path / "downloads" / "manual") in msg  # the default manual_dir
    assert "prepare_kermany" in msg
    assert not any(tmp_path.iterdir())  # nothing written, nothing downloaded


def test_unprepared_registered_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tfds build imagenette/320px-v2 --data_dir"):
        load_tfds_source("imagenette/320px-v2", "validation", data_dir=tmp_path)


def test_unknown_split_lists_splits(kermany):
    _, data_dir = kermany
    with pytest.raises(KeyError, match=r"no split 'validation'.*\['test', 'train', 'val'\]"):
        load_tfds_source("chest_xray_kermany", "validation", data_dir=data_dir)
    with pytest.raises(KeyError, match="no split 'dev'"):
        load_tfds_source("chest_xray_kermany", "test+dev[:3]", data_dir=data_dir)


def test_unknown_dataset_and_features(kermany, tmp_path):
    _, data_dir = kermany
    with pytest.raises(KeyError, match=r"close names: \['chest_xray_kermany'\]"):
        load_tfds_source("chest_xray_kermani", data_dir=tmp_path)
    with pytest.raises(KeyError, match=r"no image feature 'img'.*'file_name': Text"):
        load_tfds_source("chest_xray_kermany", "test", data_dir=data_dir, image_key="img")
    with pytest.raises(KeyError, match="no label feature 'target'"):
        load_tfds_source("chest_xray_kermany", "test", data_dir=data_dir, label_key="target")
    src = load_tfds_source("chest_xray_kermany", "val", data_dir=data_dir, label_key=None)
    assert src.labels is None and src.class_names == ()


def test_missing_manual_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="place its\n`chest_xray/` folder"):
        prepare_kermany(tmp_path / "nowhere", tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists()
    manual = tmp_path / "manual" / "chest_xray"
    _save(manual / "train" / "NORMAL" / "a.jpeg", "L", (4, 4), "JPEG")
    _save(manual / "test" / "NORMAL" / "a.jpeg", "L", (4, 4), "JPEG")
    with pytest.raises(FileNotFoundError, match=r"missing class folder .*PNEUMONIA"):
        prepare_kermany(tmp_path / "manual", tmp_path / "tfds")


def test_tfds_builder_api(kermany):
    """tfds users get the registered builder and tfds' own (PIL) decoding agrees with ours."""
    _, data_dir = kermany
    builder = tfds.builder("chest_xray_kermany", data_dir=data_dir)
    assert isinstance(builder, ChestXrayKermany)
    assert builder.info.supervised_keys == ("image", "label")
    ours = load_tfds_source("chest_xray_kermany", "test", data_dir=data_dir)
    theirs = builder.as_data_source("test")
    for item, record in zip(ours.items, theirs, strict=True):
        np.testing.assert_array_equal(item.array, record["image"])
        assert item.label == record["label"]


# Defined without registering: the tests read it back from its files, as an unknown builder.
with tfds.core.registered.skip_registration():

    class FeatsimToyRgb(tfds.core.GeneratorBasedBuilder):
        """An RGB data set with no label, stored grayscale, RGBA and palette files."""

        VERSION = tfds.core.Version("0.1.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({"image": tfds.features.Image()}),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, mode in enumerate(["L", "RGBA", "P", "RGB"]):
                rgb = _RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)
                im = Image.fromarray(rgb).convert(mode)
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                yield i, {"image": buf.getvalue()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("toy")
    FeatsimToyRgb(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_generic_dataset_read_from_files(toy):
    """An unregistered data set is read from its prepared files; images become RGB."""
    builder = tfds.builder("featsim_toy_rgb", data_dir=toy)
    stored = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    src = load_tfds_source("featsim_toy_rgb", "train", data_dir=toy)
    assert src.labels is None and src.class_names == ()
    assert len(src) == 4
    for item, record in zip(src.items, stored, strict=True):
        with Image.open(io.BytesIO(record["image"])) as im:
            expected = np.asarray(im.convert("RGB"))
        assert item.array.shape == (5, 6, 3)
        np.testing.assert_array_equal(item.array, expected)


def test_tfrecord_needs_tensorflow(kermany, tmp_path):
    """Data only tf.data can read gives an ImportError saying so (when TF is absent)."""
    if "tensorflow" in sys.modules or _has_tensorflow():
        pytest.skip("TensorFlow is installed: the tfrecord path is readable")
    _, data_dir = kermany
    copy = tmp_path / "tfds"
    shutil.copytree(data_dir / "chest_xray_kermany", copy / "chest_xray_kermany")
    info = copy / "chest_xray_kermany" / "1.0.0" / "dataset_info.json"
    meta = json.loads(info.read_text())
    meta["fileFormat"] = "tfrecord"
    info.write_text(json.dumps(meta))
    with pytest.raises(ImportError, match=r"stored as tfrecord.*file_format='array_record'"):
        load_tfds_source("chest_xray_kermany", "test", data_dir=copy)


def test_tfrecord_read_with_tensorflow(kermany, tmp_path):
    """With TensorFlow, tfds' default tfrecord format reads back the same items (PIL-decoded)."""
    pytest.importorskip("tensorflow", reason="the tfrecord format needs TensorFlow")
    manual, data_dir = kermany
    prepare_kermany(manual, tmp_path, file_format="tfrecord")
    via_tf = load_tfds_source("chest_xray_kermany", data_dir=tmp_path)
    direct = load_tfds_source("chest_xray_kermany", data_dir=data_dir)
    assert [it.id for it in via_tf.items] == [it.id for it in direct.items]
    assert [it.content_hash() for it in via_tf.items] == [it.content_hash() for it in direct.items]
    np.testing.assert_array_equal(via_tf.labels, direct.labels)


def _has_tensorflow() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def test_import_is_lazy_and_reading_needs_no_tensorflow(kermany):
    _, data_dir = kermany
    code = (
        "import sys\n"
        "import featsim.data.tfds_source as m\n"
        "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported at module import'\n"
        f"src = m.load_tfds_source('chest_xray_kermany', 'test', data_dir={str(data_dir)!r})\n"
        "assert len(src) == 5\n"
        "print('tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", "reading array_record imported TensorFlow"


def test_real_kermany_files(shared_data, tmp_path):
    """Real X-rays: native-size grayscale originals (stored verbatim) and 224 px RGB re-encodes
    (converted), via a small tree of symlinks."""
    native = shared_data / "chest_xray_kermany_native_20" / "train"
    small = shared_data / "chest_xray_kermany_224" / "chest_xray" / "test"
    if not native.is_dir() or not small.is_dir():
        pytest.skip(f"real Kermany folders not found under {shared_data}")
    manual = tmp_path / "manual" / "chest_xray"
    chosen = {}
    for name in CLASS_NAMES:
        for split, folder, n in (("train", native, 3), ("test", small, 4)):
            (manual / split / name).mkdir(parents=True)
            for f in sorted((folder / name).iterdir())[:n]:
                (manual / split / name / f.name).symlink_to(f)
                chosen[f"{split}/{name}/{f.name}"] = f
    builder = prepare_kermany(tmp_path / "manual", tmp_path / "tfds")
    assert builder.info.splits["test"].num_examples == 8
    for split in ("train", "test"):
        src = load_tfds_source("chest_xray_kermany", split, data_dir=tmp_path / "tfds")
        assert [it.label for it in src.items] == [0] * (len(src) // 2) + [1] * (len(src) // 2)
        for item, rel in zip(src.items, _sorted_keys(chosen, split), strict=True):
            np.testing.assert_array_equal(item.array, _gray(chosen[rel]), err_msg=rel)
    raw = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    for r in raw:  # the native originals are mode L: kept byte for byte
        assert r["image"] == chosen[r["file_name"].decode()].read_bytes()


def _sorted_keys(chosen: dict, split: str) -> list[str]:
    return sorted(
        (k for k in chosen if k.startswith(split + "/")),
        key=lambda k: (CLASS_NAMES.index(k.split("/")[1]), k.split("/")[2]),
    )
