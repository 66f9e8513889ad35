"""similarity_report composes the metrics: every field equals the library function's value."""

import json

import numpy as np
import pytest

from featsim import metrics
from featsim.cli import main
from featsim.metrics import StatOptions
from featsim.report import similarity_report


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(120, 10)).astype(np.float32),
            (rng.normal(size=(90, 10)) * 1.2 + 0.3).astype(np.float32))


def test_fields_equal_library_values(sets):
    x, y = sets
    r = similarity_report(x, y, stats=StatOptions(n_bootstrap=20, n_permutations=20,
                                                  kid_subset_size=50, kid_subsets=10, seed=3))
    s = metrics.distance_summary(x, y)
    assert r.distance == s.between and r.energy_distance == s.energy and r.ratio == s.ratio
    assert r.distance_source == metrics.within_distance(x)
    assert r.distance_cosine == metrics.average_distance(x, y, metric="cosine")
    assert r.fid == metrics.fid(x, y)
    k = metrics.kid(x, y, subset_size=50, num_subsets=10, seed=3)
    assert (r.kid, r.kid_std) == (k.mean, k.std)
    assert r.energy_distance_unbiased == pytest.approx(
        2 * s.between - s.within_x - s.within_y, rel=1e-12)
    est = metrics.resampled_intervals(x, y, n_resamples=20, seed=3, method="basic")
    assert (r.ci["distance"].low, r.ci["distance"].high) == (est["distance"].low,
                                                             est["distance"].high)
    assert set(r.ci) == {"distance", "distance_source", "distance_target", "ratio",
                         "energy_distance", "energy_coefficient", "distance_cosine", "fid",
                         "kid"}
    assert r.ci["fid"].method == "jackknife-t" and r.ci["fid"].centre == est["fid"].centre
    assert r.fid_infinity == metrics.fid_infinity(x, y, seed=3).value
    assert 0 < r.energy_pvalue <= 1
    d = r.to_dict()
    assert d["distance_ci"] == [est["distance"].low, est["distance"].high]
    assert d["ci"]["fid"]["note"] == r.ci["fid"].note
    json.dumps(d)  # JSON-ready
    table = r.to_table()
    assert "FID" in table and "basic" in table and "FID_infinity" in table


def test_every_interval_contains_its_estimate_or_says_why():
    # Tiny sets (the demo's 3 vs 6 rows gave FID 71.6 [-56.0, 106.1] before): a biased FID
    # and V-statistic energy fall outside their population intervals, and must say so.
    rng = np.random.default_rng(1)
    for n, m, d in ((3, 6, 16), (40, 30, 64), (120, 90, 10)):
        x, y = rng.normal(size=(n, d)), rng.normal(0.3, 1.1, size=(m, d))
        r = similarity_report(x, y, stats=StatOptions(
            n_bootstrap=50, kid_subset_size=min(n, m), kid_subsets=5, seed=0))
        table = r.to_table()
        for name, ci in r.ci.items():
            value = getattr(r, name)
            assert ci.low >= 0.0, (n, name)  # nonnegative population quantities
            if not ci.low <= value <= ci.high:
                assert ci.note, (n, name, value, ci)
                assert f"{name}: " in table
        if min(n, m) <= d:
            assert "not calibrated" in r.ci["fid"].note


def test_small_sample_facts_are_reported_not_warned(recwarn):
    """n <= d for FID and a KID subset larger than a set: each run states it in the table and
    JSON; nothing is printed as a warning (every real run used to print two)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 32)), rng.normal(size=(9, 32))
    r = similarity_report(x, y)  # default kid_subset_size 1000
    assert not [w for w in recwarn.list if issubclass(w.category, UserWarning)], [
        str(w.message) for w in recwarn.list]
    assert r.kid_subset_size == 9 and r.kid_subset_size_requested == 1000
    facts = r.to_dict()["facts"]
    assert len(facts) == 2 and "n <= d" in facts[0] and "KID subsets of 9" in facts[1]
    assert all(f"note: {fact}" in r.to_table() for fact in facts)
    big = similarity_report(rng.normal(size=(40, 4)), rng.normal(size=(50, 4)),
                            stats=StatOptions(kid_subset_size=40))
    assert big.facts == ()


def test_no_bootstrap_means_no_intervals(sets):
    x, y = sets
    r = similarity_report(x, y, stats=StatOptions(kid_subset_size=50, kid_subsets=5))
    assert r.ci == {} and r.energy_pvalue is None
    assert "bootstrap" not in r.to_table()


def test_cli_metrics_writes_json(tmp_path, sets, capsys):
    x, y = sets
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "y.npz", features=y)
    out = tmp_path / "r" / "out.json"
    rc = main(["metrics", "--source", str(tmp_path / "x.npy"), "--target",
               str(tmp_path / "y.npz"), "--kid-subset-size", "50", "--kid-subsets", "5",
               "--bootstrap", "10", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["n_source"] == 120 and data["n_target"] == 90
    assert data["distance"] == pytest.approx(metrics.average_distance(x, y), rel=1e-12)
    assert data["source"].endswith("x.npy")
    assert "D(source, target)" in capsys.readouterr().out


def test_cli_errors_exit_nonzero(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((5, 3)))
    np.save(tmp_path / "y.npy", np.zeros((5, 4)))
    rc = main(["metrics", "--source", str(tmp_path / "x.npy"), "--target",
               str(tmp_path / "missing.npy")])
    assert rc == 2 and "missing.npy" in capsys.readouterr().err
    rc = main(["metrics", "--source", str(tmp_path / "x.npy"), "--target",
               str(tmp_path / "y.npy")])
    assert rc == 2 and "x.shape[1] == 3 while y.shape[1] == 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
