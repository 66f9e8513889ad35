"""open_source: folder trees, splits, labels.csv, single files, .npz, tfds/embedded dispatch."""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featsim.data.items import Item, Source
from featsim.data.sources import IMAGE_EXTENSIONS, open_source


def _img(path: Path, value: int = 0, size=(4, 3)) -> Path:
    """A tiny real image; the format follows the suffix (Pillow)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path, format=fmt)
    return path


def _ids(src: Source) -> list[str]:
    return [it.id for it in src.items]


# ---------------------------------------------------------------- folder trees


def test_class_folders(tmp_path):
    for name in ("b.png", "a.PNG", "c.jpeg"):
        _img(tmp_path / "PNEUMONIA" / name)
    _img(tmp_path / "NORMAL" / "z.jpg")
    (tmp_path / "PROVENANCE.md").write_text("x")
    (tmp_path / "SHA256SUMS").write_text("x")
    (tmp_path / "NORMAL" / ".DS_Store").write_bytes(b"\0")
    _img(tmp_path / ".hidden" / "x.png")
    _img(tmp_path / "NORMAL" / ".x.png")

    src = open_source(str(tmp_path))
    assert src.kind == "folder" and src.spec == str(tmp_path)
    assert src.class_names == ("NORMAL", "PNEUMONIA")
    assert _ids(src) == ["NORMAL/z.jpg", "PNEUMONIA/a.PNG", "PNEUMONIA/b.png", "PNEUMONIA/c.jpeg"]
    assert src.labels.tolist() == [0, 1, 1, 1]
    assert src.labels.dtype == np.int64
    assert all(it.group is None and it.array is None for it in src.items)
    assert all(it.path.is_absolute() and it.path.is_file() for it in src.items)
    assert src.items[0].path == tmp_path.absolute() / "NORMAL" / "z.jpg"


def test_pathlike_spec_and_source_passthrough(tmp_path):
    _img(tmp_path / "a" / "x.png")
    src = open_source(tmp_path)
    assert _ids(src) == ["a/x.png"] and src.spec == str(tmp_path)
    assert open_source(src) is src


def test_nested_split_selection(tmp_path):
    root = tmp_path / "chest_xray"
    for split in ("train", "test"):
        for cls, n in (("NORMAL", 2), ("PNEUMONIA", 3)):
            for i in range(n):
                _img(root / split / cls / f"{split}{i}.jpeg")

    test = open_source(f"{root}:test")
    assert test.class_names == ("NORMAL", "PNEUMONIA")
    assert test.labels.tolist() == [0, 0, 1, 1, 1]
    assert _ids(test)[0] == "NORMAL/test0.jpeg"
    assert test.items[0].path == root.absolute() / "test" / "NORMAL" / "test0.jpeg"

    # without a split: the immediate parent folder is still the class
    both = open_source(str(root))
    assert len(both) == 10 and both.class_names == ("NORMAL", "PNEUMONIA")
    assert _ids(both)[0] == "test/NORMAL/test0.jpeg"
    assert all(it.group is None for it in both.items)

    # nested subfolder path after ':'
    normal = open_source(f"{root}:train/NORMAL")
    assert len(normal) == 2 and normal.labels is None

    with pytest.raises(FileNotFoundError, match=r"no subfolder 'val' .*available: test, train"):
        open_source(f"{root}:val")


def test_flat_folder_is_unlabelled(tmp_path):
    for name in ("b.png", "a.bmp", "c.tif", "d.gif", "e.webp", "f.TIFF"):
        _img(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    src = open_source(str(tmp_path))
    assert src.labels is None and src.class_names == ()
    assert _ids(src) == ["a.bmp", "b.png", "c.tif", "d.gif", "e.webp", "f.TIFF"]


def test_dicom_extension_counts_and_extensionless_does_not(tmp_path):
    (tmp_path / "scan.dcm").write_bytes(b"not decoded here")
    (tmp_path / "IM0001").write_bytes(b"\0" * 132 + b"DICM")
    assert _ids(open_source(str(tmp_path))) == ["scan.dcm"]


def test_special_characters_in_names(tmp_path):
    a = _img(tmp_path / "cls" / "p3-89%0.png")
    b = _img(tmp_path / "cls" / "x:1.png")
    src = open_source(str(tmp_path))
    assert _ids(src) == ["cls/p3-89%0.png", "cls/x:1.png"]
    # a spec that is an existing path is a path, even with ':' or '%' in it
    assert _ids(open_source(str(b))) == ["x:1.png"]
    assert _ids(open_source(str(a))) == ["p3-89%0.png"]
    colon_dir = tmp_path / "with:colon"
    _img(colon_dir / "k" / "y.png")
    assert _ids(open_source(str(colon_dir))) == ["k/y.png"]


def test_deterministic_sorted_order(tmp_path):
    names = ["b/2.png", "a/10.png", "a/9.png", "B/1.png", "a/1.png"]
    for n in names:
        _img(tmp_path / n)
    first = _ids(open_source(str(tmp_path)))
    assert first == sorted(names)  # plain string sort of POSIX paths
    assert _ids(open_source(str(tmp_path))) == first


def test_empty_folder_error(tmp_path):
    with pytest.raises(ValueError, match=r"no images in .*\.png.*the folder is empty"):
        open_source(str(tmp_path))


def test_non_image_folder_error(tmp_path):
    for name in ("a.txt", "b.csv", "c"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ValueError, match=r"found 3 files, none with an image extension: a.txt"):
        open_source(str(tmp_path))


def test_mixed_layout_error(tmp_path):
    _img(tmp_path / "top.png")
    _img(tmp_path / "cls" / "a.png")
    _img(tmp_path / "cls" / "b.png")
    with pytest.raises(ValueError, match=r"ambiguous layout.*1 images directly.*2 in subfolders"):
        open_source(str(tmp_path))


def test_custom_extensions(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "b.dcm").write_bytes(b"x")
    assert _ids(open_source(str(tmp_path), extensions=["DCM"])) == ["b.dcm"]
    assert ".dcm" in IMAGE_EXTENSIONS


def test_symlinked_folders_not_followed(tmp_path):
    _img(tmp_path / "data" / "cls" / "a.png")
    try:
        (tmp_path / "data" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    except OSError:
        pytest.skip("symlinks not supported here")
    with pytest.warns(UserWarning, match=r"1 symlinked folder\(s\).*not followed: loop"):
        src = open_source(str(tmp_path / "data"))
    assert _ids(src) == ["cls/a.png"]


def test_missing_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"nor '.*/nope' with subfolder/split 'x'"):
        open_source(f"{tmp_path / 'nope'}:x")
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "nope")
    with pytest.raises(ValueError, match="empty"):
        open_source("")


def test_not_an_image_file(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not a folder, a \.npz file or an image"):
        open_source(str(tmp_path / "a.txt"))


# ---------------------------------------------------------------- labels.csv


def _csv(root: Path, text: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text(text)


def test_labels_csv_indices_and_names(tmp_path):
    # imagenette layout: file,class_index,wnid,name with sparse ImageNet indices
    _img(tmp_path / "val" / "n2" / "b.JPEG")
    _img(tmp_path / "val" / "n1" / "a.JPEG")
    _img(tmp_path / "val" / "n1" / "c.JPEG")
    _csv(
        tmp_path,
        "file,class_index,wnid,name\n"
        "val/n2/b.JPEG,3,n2,tench\n"
        "val/n1/c.JPEG,0,n1,goldfish\n"
        "val/n1/a.JPEG,0,n1,goldfish\n",
    )
    src = open_source(str(tmp_path))
    assert _ids(src) == ["val/n1/a.JPEG", "val/n1/c.JPEG", "val/n2/b.JPEG"]  # sorted, not csv order
    assert src.labels.tolist() == [0, 0, 3]
    assert src.class_names == ("goldfish", "1", "2", "tench")
    assert all(it.group is None for it in src.items)


def test_labels_csv_indices_without_names(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    _csv(tmp_path, "file,label\na.png,2\nb.png,0\n")
    src = open_source(str(tmp_path))
    assert src.labels.tolist() == [2, 0] and src.class_names == ("0", "1", "2")


def test_labels_csv_class_names_and_groups(tmp_path):
    for n in ("x1.png", "x2.png", "y1.png"):
        _img(tmp_path / "img" / n)
    _csv(
        tmp_path,
        "file,class,patient_id\nimg/y1.png,pneumonia,p2\nimg/x1.png,normal,p1\n"
        "img/x2.png,pneumonia,\n",
    )
    src = open_source(str(tmp_path))
    assert src.class_names == ("normal", "pneumonia")
    assert src.labels.tolist() == [0, 1, 1]
    assert [it.group for it in src.items] == ["p1", None, "p2"]


def test_labels_csv_class_name_column_and_group(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    _csv(tmp_path, "file,class_index,class_name,group\na.png,1,cat,g\nb.png,0,dog,h\n")
    src = open_source(str(tmp_path))
    assert src.class_names == ("dog", "cat") and src.labels.tolist() == [1, 0]
    assert [it.group for it in src.items] == ["g", "h"]


def test_labels_csv_resolves_mixed_layout(tmp_path):
    _img(tmp_path / "top.png")
    _img(tmp_path / "sub" / "a.png")
    _csv(tmp_path, "file,label\ntop.png,0\nsub/a.png,1\n")
    assert _ids(open_source(str(tmp_path))) == ["sub/a.png", "top.png"]


def test_labels_csv_missing_file(tmp_path):
    _img(tmp_path / "a.png")
    _csv(tmp_path, "file,label\na.png,0\ngone.png,1\n")
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) listed in .*labels.csv.*gone.png"):
        open_source(str(tmp_path))


def test_labels_csv_unlisted_file_warns(tmp_path):
    for n in ("a.png", "b.png", "c.png"):
        _img(tmp_path / n)
    (tmp_path / "README.md").write_text("not an image, not reported")
    _csv(tmp_path, "file,label\na.png,0\n")
    with pytest.warns(UserWarning, match=r"2 image file\(s\) .*not listed.*: b.png, c.png"):
        src = open_source(str(tmp_path))
    assert _ids(src) == ["a.png"]


def test_labels_csv_no_warning_when_complete(tmp_path):
    _img(tmp_path / "a.png")
    _csv(tmp_path, "file,label\n./a.png,0\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ids(open_source(str(tmp_path))) == ["a.png"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,label\na.png,0\n", "needs a 'file' column"),
        ("file,wnid\na.png,n1\n", "needs a 'file' column and one of label"),
        ("file,label\na.png,0\na.png,0\n", "listed twice"),
        ("file,label\na.png,\n", "empty 'label'"),
        ("file,label\na.png,-1\n", "negative"),
        ("file,label\n../a.png,0\n", "not inside"),
        ("file,label\nnotes.txt,0\n", "no image extension"),
        ("file,class_index,name\na.png,0,x\nb.png,0,y\n", "called both 'x' and 'y'"),
        ("file,label\n", "lists no files"),
    ],
)
def test_labels_csv_malformed(tmp_path, text, match):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("x")
    _csv(tmp_path, text)
    with pytest.raises(ValueError, match=match):
        open_source(str(tmp_path))


# ---------------------------------------------------------------- single files


def test_single_file(tmp_path):
    path = _img(tmp_path / "x.png")
    src = open_source(str(path))
    assert src.kind == "files" and len(src) == 1 and src.labels is None
    assert src.items[0].id == "x.png" and src.items[0].path == path.absolute()

    dcm = tmp_path / "scan.dcm"
    dcm.write_bytes(b"x")
    assert open_source(dcm).items[0].id == "scan.dcm"


# ---------------------------------------------------------------- .npz


def _npz(path: Path, flat_labels: bool, splits=("train", "val", "test"), channels=False):
    arrays = {}
    for k, s in enumerate(splits):
        n = 3 + k
        shape = (n, 5, 6, 3) if channels else (n, 5, 6)
        arrays[f"{s}_images"] = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
        labels = (np.arange(n) % 2).astype(np.uint8)
        arrays[f"{s}_labels"] = labels if flat_labels else labels[:, None]
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("flat_labels", [True, False])
def test_npz_all_splits(tmp_path, flat_labels):
    path = tmp_path / "m.npz"
    arrays = _npz(path, flat_labels)
    src = open_source(str(path))
    assert src.kind == "npz" and len(src) == 3 + 4 + 5
    assert _ids(src)[:4] == ["train/0", "train/1", "train/2", "val/0"]
    assert _ids(src)[-1] == "test/4"
    assert src.class_names == ("0", "1")
    assert src.labels.tolist() == [0, 1, 0, *[0, 1, 0, 1], *[0, 1, 0, 1, 0]]
    item = src.items[4]  # val/1
    assert item.path is None and item.array.shape == (5, 6) and item.array.dtype == np.uint8
    np.testing.assert_array_equal(item.array, arrays["val_images"][1])


def test_npz_split_selection_and_channels(tmp_path):
    path = tmp_path / "m.npz"
    arrays = _npz(path, flat_labels=False, channels=True)
    src = open_source(f"{path}:test")
    assert _ids(src) == [f"test/{i}" for i in range(5)]
    assert src.items[0].array.shape == (5, 6, 3)
    np.testing.assert_array_equal(src.items[3].array, arrays["test_images"][3])


def test_npz_bad_split_lists_available(tmp_path):
    path = tmp_path / "m.npz"
    _npz(path, flat_labels=True, splits=("train", "test"))
    with pytest.raises(ValueError, match=r"no split 'val'; available: train, test"):
        open_source(f"{path}:val")


def test_npz_mismatched_lengths(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, train_images=np.zeros((4, 2, 2), np.uint8), train_labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"m.npz: train_labels has shape \(3,\).*\(4, 2, 2\)"):
        open_source(str(path))


def test_npz_not_medmnist(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(ValueError, match=r"no MedMNIST arrays.*found keys \['x'\]"):
        open_source(str(path))


def test_npz_class_names_key(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(
        path,
        test_images=np.zeros((2, 2, 2), np.uint8),
        test_labels=np.array([[1], [0]]),
        class_names=np.array(["benign", "malignant"]),
    )
    assert open_source(str(path)).class_names == ("benign", "malignant")


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    ("spec", "name", "split"),
    [
        ("tfds:imagenette/320px-v2:validation", "imagenette/320px-v2", "validation"),
        ("tfds:mnist", "mnist", None),
        ("tfds:mnist:train[:10%]", "mnist", "train[:10%]"),
    ],
)
def test_tfds_dispatch(monkeypatch, spec, name, split):
    calls = []
    sentinel = Source(spec, "tfds", ())

    def fake(name, split, *, data_dir=None):
        calls.append((name, split, data_dir))
        return sentinel

    module = types.ModuleType("featsim.data.tfds_source")
    module.load_tfds_source = fake
    monkeypatch.setitem(sys.modules, "featsim.data.tfds_source", module)
    assert open_source(spec, data_dir="/tmp/tfds") is sentinel
    assert calls == [(name, split, "/tmp/tfds")]


def test_embedded_dispatch(monkeypatch):
    import featsim.data.embedded as embedded

    sentinel = Source("embedded:natural", "embedded", (Item("a", array=np.zeros((1, 1))),))
    monkeypatch.setattr(embedded, "embedded_source", lambda name: (name, sentinel))
    assert open_source("embedded:natural") == ("natural", sentinel)


# ---------------------------------------------------------------- real data


def test_real_kermany_test_split(shared_data):
    src = open_source(f"{shared_data}/chest_xray_kermany_224/chest_xray:test")
    assert src.class_names == ("NORMAL", "PNEUMONIA")
    assert np.bincount(src.labels).tolist() == [234, 390]
    assert all(it.id.startswith(("NORMAL/", "PNEUMONIA/")) for it in src.items)


def test_real_imagenette_labels_csv(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every image is listed
        src = open_source(str(shared_data / "imagenette_val_500"))
    assert len(src) == 500
    assert sorted(set(src.labels.tolist())) == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    assert np.all(np.bincount(src.labels)[np.unique(src.labels)] == 50)
    assert src.class_names[0] == "tench"
    assert src.items[0].id.startswith("val/n01440764/")


def test_real_covid_ct_percent_names(shared_data):
    src = open_source(str(shared_data / "covid_ct_ucsd_100"))
    assert len(src) == 100 and src.class_names == ("CT_COVID", "CT_NonCOVID")
    assert np.bincount(src.labels).tolist() == [50, 50]
    assert any("%" in it.id for it in src.items)
    assert all(it.path.is_file() for it in src.items)


def test_real_breastmnist_npz(shared_data):
    path = shared_data / "medmnist" / "breastmnist.npz"
    src = open_source(str(path))
    assert len(src) == 546 + 78 + 156 and src.class_names == ("0", "1")
    assert src.items[-1].id == "test/155" and src.items[0].array.shape == (28, 28)
    test = open_source(f"{path}:test")
    assert np.bincount(test.labels).tolist() == [42, 114]
