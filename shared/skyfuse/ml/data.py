"""Tabular datasets for skyfuse: load/save CSV, split, partition into shards, sample datasets.

numpy and scikit-learn only (no TensorFlow). Every function takes plain data and returns plain
data; the only I/O is reading the path handed to `load_csv`.

A `Dataset` holds float32 features `X` (n x d), int64 class indices `y` (0..k-1) and the run's
class list `classes` (original labels, sorted). Shards keep the full class list even when they
hold rows of only some classes, so class index i means the same label in every cloud.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from numpy.typing import ArrayLike

from skyfuse.errors import InvalidInput

PARTITION_METHODS = ("iid", "stratified", "kmeans", "label-skew")
SAMPLE_DATASETS = ("breast_cancer", "digits")
MISSING = frozenset({"", "na", "nan", "null", "none", "n/a", "?"})
Label = int | str  # an original class label: integer-looking labels are ints, others strings


class DataError(InvalidInput):
    """Data that cannot be used as given; the message says what is wrong and where."""


@dataclass(eq=False)
class Dataset:
    X: np.ndarray  # float32, n x d
    y: np.ndarray  # int64 class indices into `classes`
    features: list[str]
    classes: list[Label]  # original labels, sorted
    target: str = "target"
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.X = np.ascontiguousarray(self.X, dtype=np.float32)
        self.y = np.ascontiguousarray(self.y, dtype=np.int64)
        if self.X.ndim != 2:
            raise DataError(f"X must be 2-D (rows x features), got shape {self.X.shape}")
        if self.y.shape != (self.X.shape[0],):
            raise DataError(f"y must hold one label per row: X has {self.X.shape[0]} rows, y has shape {self.y.shape}")
        if len(self.features) != self.X.shape[1]:
            raise DataError(f"{len(self.features)} feature names for {self.X.shape[1]} feature columns")
        self.features = list(self.features)
        self.classes = list(self.classes)
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= len(self.classes)):
            raise DataError(f"class index out of range 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: ArrayLike) -> Dataset:
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        return Dataset(self.X[idx], self.y[idx], list(self.features), list(self.classes), self.target, self.name)

    def class_counts(self) -> dict[Label, int]:
        """Rows per class label, every class of the run included (0 for absent ones)."""
        counts = np.bincount(self.y, minlength=len(self.classes))  # y < len(classes): one count per class
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def summary(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(mean, variance, count) of the features: what a shard shares for `pooled_stats`."""
        return summarize(self.X)


# ----------------------------------------------------------------------------------------- CSV


def _label_key(value: object) -> str:
    """Canonical text of a label so "1", "1.0" and 1 match; other text is kept as is (stripped)."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value).strip()
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        return text
    if math.isfinite(f) and f.is_integer():
        return str(int(f))
    return text


def _parse_label(text: str) -> Label:
    key = _label_key(text)
    try:
        return int(key)
    except ValueError:
        return key


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _short(items: Sequence[object], limit: int = 8) -> str:
    texts = [str(i) for i in items]
    shown = ", ".join(repr(t) for t in texts[:limit])
    return shown + (f", ... ({len(texts) - limit} more)" if len(texts) > limit else "")


def load_csv(source: str | Path | bytes, target: str, classes: Sequence[Label] | None = None) -> Dataset:
    """Read a CSV with a header row: every column but `target` is a numeric feature.

    `source` is a path (str or Path) or the file's bytes. `classes` is the run's class list: give
    it when loading a shard, so a shard holding only some classes still encodes labels the same
    way as every other shard; without it the classes are the sorted distinct labels (at least 2).
    Labels that look like integers ("1", "1.0") become ints, others stay strings.
    """
    where = "the CSV data"
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
    else:
        path = Path(source)
        where = str(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{where}: no such file") from None
        except IsADirectoryError:
            raise DataError(f"{where}: is a directory, not a CSV file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e}); save the file as UTF-8 CSV") from None
    if not text.strip():
        raise DataError(f"{where}: the file is empty; it needs a header row and at least one data row")

    rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    if not body:
        raise DataError(f"{where}: has a header but no data rows")
    if any(not h for h in header):
        raise DataError(f"{where}: the header has an empty column name (column {header.index('') + 1})")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{where}: duplicate column names in the header: {_short(dupes)}")
    if target not in header:
        raise DataError(f"{where}: no target column {target!r}; the columns are: {_short(header, 50)}")
    bad_len = [(i + 2, len(r)) for i, r in enumerate(body) if len(r) != len(header)]
    if bad_len:
        line, n = bad_len[0]
        raise DataError(f"{where}: {_plural(len(bad_len), 'row')} with a wrong number of cells "
                        f"(first: line {line} has {n}, the header has {len(header)})")

    t = header.index(target)
    features = [h for i, h in enumerate(header) if i != t]
    if not features:
        raise DataError(f"{where}: only the target column {target!r}; there are no feature columns")
    cells = np.array(body, dtype=object)
    cells = np.vectorize(lambda s: s.strip(), otypes=[object])(cells)

    missing = np.vectorize(lambda s: s.lower() in MISSING, otypes=[bool])(cells)
    if missing.any():
        cols = [header[j] for j in np.flatnonzero(missing.any(axis=0))]
        per_col = {header[j]: int(missing[:, j].sum()) for j in np.flatnonzero(missing.any(axis=0))}
        detail = ", ".join(f"{c!r}: {per_col[c]}" for c in cols[:8]) + (", ..." if len(cols) > 8 else "")
        raise DataError(f"{where}: {_plural(int(missing.sum()), 'missing value')} in "
                        f"{_plural(int(missing.any(axis=1).sum()), 'row')} (by column: {detail}); "
                        "fill them in or drop those rows")

    X = np.empty((len(body), len(features)), dtype=np.float64)
    non_numeric = []
    for out_j, j in enumerate(i for i in range(len(header)) if i != t):
        try:
            X[:, out_j] = [float(v) for v in cells[:, j]]
        except ValueError:
            example = next(v for v in cells[:, j] if not _is_float(v))
            non_numeric.append(f"{header[j]!r} (e.g. {example!r})")
            continue
    if non_numeric:
        raise DataError(f"{where}: non-numeric feature {'column' if len(non_numeric) == 1 else 'columns'} "
                        f"{', '.join(non_numeric)}; every column but the target {target!r} must hold numbers "
                        "(encode categories as numbers or drop the column)")
    if not np.isfinite(X).all():
        cols = [features[j] for j in np.flatnonzero(~np.isfinite(X).all(axis=0))]
        raise DataError(f"{where}: infinite values in {_short(cols)}")
    if np.abs(X).max(initial=0.0) > np.finfo(np.float32).max:
        raise DataError(f"{where}: values too large for float32")

    labels = [_parse_label(v) for v in cells[:, t]]
    run_classes: list[Label]
    if classes is None:
        run_classes = sorted(set(labels), key=_sort_key(labels))
        if len(run_classes) < 2:
            raise DataError(f"{where}: the target {target!r} has only one class ({run_classes[0]!r}); "
                            "a classifier needs at least 2 (pass the run's `classes` when loading a shard)")
    else:
        run_classes = list(classes)
        if len(run_classes) < 2:
            raise DataError(f"`classes` must list at least 2 labels, got {run_classes!r}")
    index: dict[str, int] = {}
    for i, c in enumerate(run_classes):
        key = _label_key(c)
        if key in index:
            raise DataError(f"`classes` lists the label {c!r} twice")
        index[key] = i
    unknown = sorted({str(v) for v in cells[:, t] if _label_key(v) not in index})
    if unknown:
        raise DataError(f"{where}: {target!r} has labels not in the run's classes {run_classes!r}: "
                        f"{_short(unknown)}")
    y = np.array([index[_label_key(v)] for v in cells[:, t]], dtype=np.int64)
    return Dataset(X.astype(np.float32), y, features, run_classes, target)


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _sort_key(labels: Sequence[Label]) -> Callable[[Label], Label]:
    if all(isinstance(v, int) for v in labels):
        return lambda v: v
    return lambda v: str(v)


def to_csv_bytes(ds: Dataset) -> bytes:
    """The dataset as CSV (features, then the target column with the original labels).

    Floats are written with 9 significant digits, enough to read back the same float32.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*ds.features, ds.target])
    labels = [str(c) for c in ds.classes]
    for row, label in zip(ds.X, ds.y, strict=True):  # one label per row (checked by Dataset)
        w.writerow([*(f"{v:.9g}" for v in row.tolist()), labels[label]])
    return buf.getvalue().encode("utf-8")


# ------------------------------------------------------------------------------- split, partition


def _stratify_ok(y: np.ndarray, n_test: int, n_train: int) -> bool:
    counts = np.bincount(y)
    present = int((counts > 0).sum())
    return counts[counts > 0].min() >= 2 and n_test >= present and n_train >= present


def _split_indices(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, test) indices, stratified by y when every class has 2+ rows, random otherwise."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if n_test <= 0:
        return idx, idx[:0]
    strat = y if _stratify_ok(y, n_test, len(y) - n_test) else None
    rest, test = train_test_split(idx, test_size=n_test, random_state=seed, stratify=strat)
    return np.sort(rest), np.sort(test)


def split(ds: Dataset, validation: float = 0.15, test: float = 0.2, seed: int = 0
          ) -> tuple[Dataset, Dataset, Dataset]:
    """Stratified (train, validation, test); the fractions are of the whole dataset."""
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise DataError(f"validation ({validation}) and test ({test}) must be fractions in [0, 1) summing below 1")
    n = len(ds)
    n_test = int(round(test * n))
    n_val = int(round(validation * n))
    if n - n_test - n_val < 1:
        raise DataError(f"{n} rows are too few for validation={validation} and test={test}")
    rest, test_idx = _split_indices(ds.y, n_test, seed)
    tr, va = _split_indices(ds.y[rest], n_val, seed + 1)
    return ds.subset(rest[tr]), ds.subset(rest[va]), ds.subset(test_idx)


def min_shard_rows(n_rows: int, n_shards: int) -> int:
    """The fewest rows `partition` leaves in a shard: max(8, 2% of rows), capped by an even split."""
    return min(max(8, int(math.ceil(0.02 * n_rows))), n_rows // n_shards)


def partition(ds: Dataset, n: int, method: str, seed: int = 0, alpha: float = 0.5) -> list[Dataset]:
    """Split `ds` into `n` disjoint shards that together hold every row.

    - `iid`: a random, equal-sized split.
    - `stratified`: equal-sized shards that each keep the dataset's label mix.
    - `kmeans`: k-means (n clusters) on standardized features; each cluster one shard.
    - `label-skew`: for each class, Dirichlet(alpha) proportions over the shards (small alpha =
      strong skew).
    `kmeans` and `label-skew` then give every shard at least `min_shard_rows` rows by moving rows
    from the largest shard. Deterministic for a seed. Shard rows keep the dataset's order.
    """
    if method not in PARTITION_METHODS:
        raise DataError(f"unknown partition method {method!r}; choose one of {', '.join(PARTITION_METHODS)}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"the number of shards must be a positive integer, got {n!r}")
    if n > len(ds):
        raise DataError(f"cannot make {n} shards from {len(ds)} rows")
    rng = np.random.default_rng(seed)
    rows = len(ds)
    assign = np.empty(rows, dtype=np.int64)

    if method == "iid":
        for s, part in enumerate(np.array_split(rng.permutation(rows), n)):
            assign[part] = s
    elif method == "stratified":
        order = np.concatenate([rng.permutation(np.flatnonzero(ds.y == c)) for c in range(ds.n_classes)])
        assign[order] = np.arange(rows) % n
    elif method == "kmeans":
        from sklearn.cluster import KMeans

        Z = _standardize(ds.X)
        km = KMeans(n_clusters=n, random_state=seed, n_init=10).fit(Z)
        assign[:] = km.labels_
        _ensure_min(assign, n, min_shard_rows(rows, n), rng, Z=Z, centers=km.cluster_centers_)
    else:
        if not alpha > 0:
            raise DataError(f"alpha must be > 0, got {alpha}")
        for c in range(ds.n_classes):
            members = rng.permutation(np.flatnonzero(ds.y == c))
            if not len(members):
                continue
            p = rng.dirichlet(np.full(n, float(alpha)))
            cuts = np.round(np.cumsum(p)[:-1] * len(members)).astype(int)
            for s, part in enumerate(np.split(members, cuts)):
                assign[part] = s
        _ensure_min(assign, n, min_shard_rows(rows, n), rng)
    return [ds.subset(np.flatnonzero(assign == s)) for s in range(n)]


def _standardize(X: np.ndarray) -> np.ndarray:
    X = X.astype(np.float64)
    sd = X.std(axis=0)
    standardized: np.ndarray = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return standardized


def _ensure_min(assign: np.ndarray, n: int, minimum: int, rng: np.random.Generator,
                Z: np.ndarray | None = None, centers: np.ndarray | None = None) -> None:
    """Move rows from the largest shard into each shard below `minimum` (in place). With cluster
    centers, the moved rows are those of the largest shard closest to the small shard's center."""
    for s in range(n):
        while (need := minimum - int((assign == s).sum())) > 0:
            sizes = np.bincount(assign, minlength=n)
            donor = int(np.argmax(sizes))
            take = min(need, int(sizes[donor]) - minimum)
            if take <= 0:
                return  # cannot happen with minimum <= rows // n; defensive
            pool = np.flatnonzero(assign == donor)
            if Z is not None and centers is not None:
                d = ((Z[pool] - centers[s]) ** 2).sum(axis=1)
                moved = pool[np.argsort(d, kind="stable")[:take]]
            else:
                moved = rng.choice(pool, size=take, replace=False)
            assign[moved] = s


# ------------------------------------------------------------------------------ statistics, samples


def summarize(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, population variance, count) per feature, in float64."""
    X = np.asarray(X, dtype=np.float64)
    if len(X) == 0:
        return np.zeros(X.shape[1]), np.zeros(X.shape[1]), 0
    return X.mean(axis=0), X.var(axis=0), int(len(X))


def pooled_stats(stats: Sequence[tuple[ArrayLike, ArrayLike, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Exact pooled (mean, population variance) from per-shard (mean, variance, count) summaries:
    the statistics of all rows together, without moving a row."""
    summaries = [(np.asarray(m, np.float64), np.asarray(v, np.float64), int(c)) for m, v, c in stats]
    summaries = [s for s in summaries if s[2] > 0]
    if not summaries:
        raise DataError("pooled_stats needs at least one summary with count > 0")
    total = sum(c for _, _, c in summaries)
    mean = cast(np.ndarray, sum(m * c for m, _, c in summaries) / total)  # a sum of arrays: never the start 0
    # E[x^2] per shard = var + mean^2; pooled var = sum c (var + (mean_i - mean)^2) / total
    var = sum(c * (v + (m - mean) ** 2) for m, v, c in summaries) / total
    return mean, np.maximum(var, 0.0)


def sample_dataset(name: str) -> Dataset:
    """A small dataset that ships with scikit-learn (nothing is downloaded): `breast_cancer`
    (569 rows, 30 features, 2 classes) or `digits` (1797 rows, 64 features, 10 classes)."""
    from sklearn import datasets

    if name == "breast_cancer":
        b = datasets.load_breast_cancer()
        target = "diagnosis"  # 0 = malignant, 1 = benign
    elif name == "digits":
        b = datasets.load_digits()
        target = "digit"
    else:
        raise DataError(f"unknown sample dataset {name!r}; choose one of {', '.join(SAMPLE_DATASETS)}")
    k = int(b.target.max()) + 1
    return Dataset(b.data.astype(np.float32), b.target.astype(np.int64), [str(f) for f in b.feature_names],
                   list(range(k)), target, name)
