import numpy as np
import pytest

from featsim.features import load_features


def test_npy_and_npz(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", features=x, labels=np.arange(4))
    np.savez(tmp_path / "c.npz", only=x)
    np.testing.assert_array_equal(load_features(tmp_path / "a.npy"), x)
    np.testing.assert_array_equal(load_features(tmp_path / "b.npz"), x)
    np.testing.assert_array_equal(load_features(tmp_path / "c.npz"), x)
    np.testing.assert_array_equal(load_features(tmp_path / "b.npz", key="features"), x)
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        load_features(tmp_path / "b.npz", key="labels")


def test_errors(tmp_path):
    x = np.zeros((4, 3))
    np.savez(tmp_path / "two.npz", a=x, b=x)
    np.save(tmp_path / "flat.npy", np.zeros(5))
    (tmp_path / "f.txt").write_text("1 2 3")
    with pytest.raises(FileNotFoundError, match=r"missing\.npy"):
        load_features(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match=r"several arrays \['a', 'b'\]"):
        load_features(tmp_path / "two.npz")
    with pytest.raises(ValueError, match="has no array 'c'"):
        load_features(tmp_path / "two.npz", key="c")
    with pytest.raises(ValueError, match=r"flat.npy: features must have shape .* \(5,\)"):
        load_features(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match=r"expected a \.npy or \.npz"):
        load_features(tmp_path / "f.txt")


def test_errors_name_the_file_and_the_fix(tmp_path):
    """A text file named .npy, a folder, a pickle, a truncated archive: each error names it."""
    (tmp_path / "notes.npy").write_text("1 2 3\n4 5 6\n")
    with pytest.raises(ValueError, match=r"notes\.npy is not a \.npy array file.*text"):
        load_features(tmp_path / "notes.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj\.npy.*pickle"):
        load_features(tmp_path / "obj.npy")
    (tmp_path / "feats").mkdir()
    with pytest.raises(ValueError, match=r"feats is a folder"):
        load_features(tmp_path / "feats")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"cut\.npz is not a readable \.npz"):
        load_features(tmp_path / "cut.npz")
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 2)), b=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"--key NAME"):
        load_features(tmp_path / "two.npz")
