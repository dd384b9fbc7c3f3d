"""skyfuse.ml.data: CSV load/save, errors a person can act on, split, partition, pooled stats."""
import numpy as np
import pytest

from skyfuse.ml import data as D
from skyfuse.ml.data import DataError, Dataset


def _ids(ds: Dataset) -> np.ndarray:
    """Row ids kept in feature 0 by `_numbered`."""
    return ds.X[:, 0].astype(np.int64)


def _numbered(ds: Dataset) -> Dataset:
    X = ds.X.copy()
    X[:, 0] = np.arange(len(ds))
    return Dataset(X, ds.y, ds.features, ds.classes, ds.target)


@pytest.fixture(scope="module")
def cancer() -> Dataset:
    return D.sample_dataset("breast_cancer")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return D.sample_dataset("digits")


# ------------------------------------------------------------------------------------ datasets


def test_sample_datasets(cancer, digits):
    assert (len(cancer), cancer.n_features, cancer.classes) == (569, 30, [0, 1])
    assert cancer.X.dtype == np.float32 and cancer.y.dtype == np.int64
    assert cancer.features[0] == "mean radius"
    assert (len(digits), digits.n_features, digits.classes) == (1797, 64, list(range(10)))
    assert digits.features[:2] == ["pixel_0_0", "pixel_0_1"] and digits.features[-1] == "pixel_7_7"
    assert cancer.class_counts() == {0: 212, 1: 357}
    with pytest.raises(DataError, match="breast_cancer, digits"):
        D.sample_dataset("iris")


def test_subset_keeps_the_class_list(cancer):
    part = cancer.subset(np.flatnonzero(cancer.y == 1)[:10])
    assert len(part) == 10 and part.classes == [0, 1]
    assert part.class_counts() == {0: 0, 1: 10}
    mask = np.zeros(len(cancer), bool)
    mask[[3, 5]] = True
    assert np.array_equal(cancer.subset(mask).X, cancer.X[[3, 5]])


# ------------------------------------------------------------------------------------------ CSV


def test_csv_round_trip_is_exact(cancer, tmp_path):
    raw = D.to_csv_bytes(cancer)
    assert raw.splitlines()[0].decode().endswith(",diagnosis")
    back = D.load_csv(raw, "diagnosis")
    assert np.array_equal(back.X, cancer.X) and np.array_equal(back.y, cancer.y)
    assert back.features == cancer.features and back.classes == [0, 1] and back.target == "diagnosis"
    path = tmp_path / "cancer.csv"
    path.write_bytes(raw)
    assert np.array_equal(D.load_csv(path, "diagnosis").X, cancer.X)
    assert np.array_equal(D.load_csv(str(path), "diagnosis").y, cancer.y)


def test_csv_round_trip_keeps_float32_precision():
    X = np.array([[1 / 3, 1e-8], [123456.789, -2.5e30]], dtype=np.float32)
    ds = Dataset(X, np.array([0, 1]), ["a", "b"], ["no", "yes"], "label")
    back = D.load_csv(D.to_csv_bytes(ds), "label")
    assert np.array_equal(back.X, X) and back.classes == ["no", "yes"]


def test_string_labels_are_sorted_and_integers_normalised():
    ds = D.load_csv(b"x,kind\n1,pear\n2,apple\n3,fig\n4,apple\n", "kind")
    assert ds.classes == ["apple", "fig", "pear"] and ds.y.tolist() == [2, 0, 1, 0]
    ds = D.load_csv(b"x,label\n1,10\n2,2\n3,2.0\n", "label")
    assert ds.classes == [2, 10] and ds.y.tolist() == [1, 0, 0]  # numeric order, 2.0 == 2


def test_a_shard_with_one_class_encodes_with_the_run_classes():
    shard = D.load_csv(b"a,b,y\n1,2,pear\n3,4,pear\n", "y", classes=["apple", "fig", "pear"])
    assert shard.y.tolist() == [2, 2] and shard.classes == ["apple", "fig", "pear"]
    shard = D.load_csv(b"a,y\n1,1.0\n2,1\n", "y", classes=[0, 1])
    assert shard.y.tolist() == [1, 1]


@pytest.mark.parametrize("raw, target, classes, expected", [
    (b"", "y", None, "empty"),
    (b"  \n\n", "y", None, "empty"),
    (b"a,b,y\n", "y", None, "no data rows"),
    (b"a,b,c\n1,2,3\n", "label", None, r"no target column 'label'; the columns are: 'a', 'b', 'c'"),
    (b"a,city,y\n1,Paris,0\n2,Rome,1\n", "y", None, r"non-numeric feature column 'city' \(e.g. 'Paris'\)"),
    (b"a,b,c,y\n1,x,z,0\n2,y,3,1\n", "y", None, r"non-numeric feature columns 'b' \(e.g. 'x'\), 'c'"),
    (b"a,b,y\n1,,0\n,NA,1\n3,4,\n", "y", None, r"4 missing values in 3 rows \(by column: 'a': 1, 'b': 2, 'y': 1\)"),
    (b"a,y\n1,0\n2,0\n", "y", None, r"only one class \(0\).*at least 2"),
    (b"a,y\n1,0\n2,7\n3,9\n", "y", [0, 1], r"labels not in the run's classes \[0, 1\]: '7', '9'"),
    (b"a,b,y\n1,2,0\n1,0\n", "y", None, "line 3 has 2"),
    (b"a,a,y\n1,2,0\n", "y", None, "duplicate column names"),
])
def test_load_csv_errors_say_what_to_fix(raw, target, classes, expected):
    with pytest.raises(DataError, match=expected):
        D.load_csv(raw, target, classes=classes)


def test_load_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        D.load_csv(tmp_path / "nope.csv", "y")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------- split


def test_split_sizes_stratification_and_disjointness(cancer):
    ds = _numbered(cancer)
    train, val, test = D.split(ds, validation=0.15, test=0.2, seed=3)
    assert (len(test), len(val), len(train)) == (114, 85, 370)
    ids = [set(_ids(p)) for p in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == set(range(len(ds)))
    share = np.mean(ds.y)
    for part in (train, val, test):
        assert abs(part.y.mean() - share) <= 1.0 / len(part) + 1e-9  # stratified to within a row
    again = D.split(ds, validation=0.15, test=0.2, seed=3)
    assert all(np.array_equal(a.X, b.X) for a, b in zip((train, val, test), again, strict=True))
    other = D.split(ds, validation=0.15, test=0.2, seed=4)
    assert not np.array_equal(other[2].X, test.X)


def test_split_rejects_bad_fractions(cancer):
    with pytest.raises(DataError, match="fractions"):
        D.split(cancer, validation=0.6, test=0.5)


# ------------------------------------------------------------------------------------ partition


@pytest.mark.parametrize("method", D.PARTITION_METHODS)
def test_partition_is_disjoint_covering_and_deterministic(cancer, method):
    ds = _numbered(cancer)
    shards = D.partition(ds, 3, method, seed=7)
    assert len(shards) == 3
    ids = [_ids(s) for s in shards]
    together = np.concatenate(ids)
    assert len(together) == len(ds) and set(together) == set(range(len(ds)))
    assert all(len(s) >= D.min_shard_rows(len(ds), 3) for s in shards)
    assert all(s.classes == ds.classes for s in shards)
    again = D.partition(ds, 3, method, seed=7)
    assert all(np.array_equal(a, _ids(b)) for a, b in zip(ids, again, strict=True))
    if method != "kmeans":  # k-means on the same data may find the same clusters for any seed
        other = D.partition(ds, 3, method, seed=8)
        assert any(not np.array_equal(a, _ids(b)) for a, b in zip(ids, other, strict=True))


def test_iid_and_stratified_shard_sizes_and_label_mix(digits):
    iid = D.partition(digits, 4, "iid", seed=0)
    assert sorted(len(s) for s in iid) == [449, 449, 449, 450]
    strat = D.partition(digits, 4, "stratified", seed=0)
    assert max(len(s) for s in strat) - min(len(s) for s in strat) <= 1
    total = np.bincount(digits.y)
    for s in strat:
        counts = np.bincount(s.y, minlength=10)
        assert np.all(np.abs(counts - total / 4) <= 1)  # each shard keeps the label mix


def test_kmeans_shards_follow_the_clusters(cancer):
    shards = D.partition(cancer, 2, "kmeans", seed=0)
    # clusters in standardized feature space separate the two classes far better than chance
    shares = sorted(s.y.mean() for s in shards)
    assert shares[0] < 0.3 and shares[1] > 0.8


def _skew(shards, k) -> float:
    """Mean total-variation distance between each shard's label mix and the overall mix."""
    counts = np.array([np.bincount(s.y, minlength=k) for s in shards], float)
    overall = counts.sum(0) / counts.sum()
    mixes = counts / counts.sum(1, keepdims=True)
    return float(np.mean(0.5 * np.abs(mixes - overall).sum(1)))


def test_label_skew_skews_by_alpha(digits):
    strong = [_skew(D.partition(digits, 3, "label-skew", seed=s, alpha=0.1), 10) for s in range(3)]
    weak = [_skew(D.partition(digits, 3, "label-skew", seed=s, alpha=100.0), 10) for s in range(3)]
    iid = [_skew(D.partition(digits, 3, "iid", seed=s), 10) for s in range(3)]
    assert min(strong) > 0.35, strong
    assert max(weak) < 0.08 and max(iid) < 0.08, (weak, iid)


def test_label_skew_gives_every_shard_the_minimum(cancer, digits):
    for ds, n in ((cancer, 3), (cancer, 5), (digits, 8)):
        minimum = D.min_shard_rows(len(ds), n)
        assert minimum == max(8, int(np.ceil(0.02 * len(ds))))
        for seed in range(5):
            shards = D.partition(ds, n, "label-skew", seed=seed, alpha=0.01)
            assert min(len(s) for s in shards) >= minimum
            assert sum(len(s) for s in shards) == len(ds)


def test_partition_rejects_bad_arguments(cancer):
    with pytest.raises(DataError, match="unknown partition method 'random'"):
        D.partition(cancer, 3, "random")
    with pytest.raises(DataError, match="positive integer"):
        D.partition(cancer, 0, "iid")
    with pytest.raises(DataError, match="cannot make 600 shards from 569 rows"):
        D.partition(cancer, 600, "iid")
    with pytest.raises(DataError, match="alpha"):
        D.partition(cancer, 3, "label-skew", alpha=0)


# ---------------------------------------------------------------------------------- statistics


def test_pooled_stats_equal_the_statistics_of_all_rows(digits):
    shards = D.partition(digits, 4, "label-skew", seed=1, alpha=0.3)
    mean, var = D.pooled_stats([s.summary() for s in shards])
    X = np.concatenate([s.X for s in shards]).astype(np.float64)
    np.testing.assert_allclose(mean, X.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, X.var(0), rtol=1e-9, atol=1e-9)
    m, v, c = shards[0].summary()
    assert c == len(shards[0])
    one_mean, one_var = D.pooled_stats([(m, v, c)])
    np.testing.assert_allclose(one_var, v)
    with pytest.raises(DataError, match="count > 0"):
        D.pooled_stats([])

