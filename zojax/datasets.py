"""Dataset loaders with one data-directory rule for all of them.

Root folder: ``data_dir`` if given, else ``$ZOJAX_DATA_DIR``, else ``$XDG_CACHE_HOME/zojax``
(default ``~/.cache/zojax``). LIBSVM files live in ``<root>/libsvm/<name>`` and
``<root>/libsvm/<name>.t`` (``.bz2`` copies are read too), IDX files (MNIST, FashionMNIST) in
``<root>/<name>/`` (``.gz`` copies are read too). Nothing is downloaded unless
``download=True`` (LIBSVM only).
"""

import bz2
import gzip
import os
import shutil
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

LIBSVM_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/"


class LibsvmInfo(NamedTuple):
    """Official size of a LIBSVM binary dataset."""

    train_rows: int
    test_rows: int
    num_features: int


# Counts from the LIBSVM site: the a-series splits partition Adult's 32,561 rows (train + test),
# the w1a..w7a splits the 49,749 rows of w8a's train file.
LIBSVM_DATASETS: dict[str, LibsvmInfo] = {
    "a1a": LibsvmInfo(1_605, 30_956, 123),
    "a2a": LibsvmInfo(2_265, 30_296, 123),
    "a3a": LibsvmInfo(3_185, 29_376, 123),
    "a4a": LibsvmInfo(4_781, 27_780, 123),
    "a5a": LibsvmInfo(6_414, 26_147, 123),
    "a6a": LibsvmInfo(11_220, 21_341, 123),
    "a7a": LibsvmInfo(16_100, 16_461, 123),
    "a8a": LibsvmInfo(22_696, 9_865, 123),
    "a9a": LibsvmInfo(32_561, 16_281, 123),
    "w1a": LibsvmInfo(2_477, 47_272, 300),
    "w2a": LibsvmInfo(3_470, 46_279, 300),
    "w3a": LibsvmInfo(4_912, 44_837, 300),
    "w4a": LibsvmInfo(7_366, 42_383, 300),
    "w5a": LibsvmInfo(9_888, 39_861, 300),
    "w6a": LibsvmInfo(17_188, 32_561, 300),
    "w7a": LibsvmInfo(24_692, 25_057, 300),
    "w8a": LibsvmInfo(49_749, 14_951, 300),
}


class LibsvmData(NamedTuple):
    """A dense binary-classification dataset.

    Attributes:
        train_inputs: (N, d) float32 numpy array.
        train_labels: (N,) float32 numpy array, values in {−1, +1}.
        test_inputs: (N_test, d) float32 numpy array.
        test_labels: (N_test,) float32 numpy array, values in {−1, +1}.
        name: dataset name (``"synthetic"`` for :func:`synthetic_libsvm`).
    """

    train_inputs: np.ndarray
    train_labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray
    name: str


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Returns ``data_dir``, else ``$ZOJAX_DATA_DIR``, else ``$XDG_CACHE_HOME/zojax``.

    ``$XDG_CACHE_HOME`` defaults to ``~/.cache``.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("ZOJAX_DATA_DIR"):
        return Path(os.environ["ZOJAX_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "zojax"


def parse_libsvm(path: str | os.PathLike,
                 num_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reads a LIBSVM text file (``label index:value ...``, 1-based indices) into dense arrays.

    Blank lines and ``#`` comments are skipped; a row may have no features. Labels must be
    −1/+1 or 0/1 and map to ±1 (1 → +1; −1 and 0 → −1). A repeated index keeps its last value.
    Files ending in ``.bz2`` are decompressed.

    Args:
        path: the file.
        num_features: number of columns d; a larger index is an error. None: the largest
            index in the file.

    Returns:
        ``(inputs, labels)``: (N, d) float32 and (N,) float32 numpy arrays.

    Raises:
        ValueError: a malformed line or an index out of range, naming the file, the 1-based
            line number and the line's text.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "tiny"
        >>> _ = path.write_text("+1 1:0.5 3:1\\n-1 2:2\\n")
        >>> inputs, labels = parse_libsvm(path, num_features=3)
        >>> inputs.tolist(), labels.tolist()
        ([[0.5, 0.0, 1.0], [0.0, 2.0, 0.0]], [1.0, -1.0])
    """
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="ascii", errors="replace") as file:
        lines = file.read().splitlines()

    labels, counts, indices, values, line_numbers = [], [], [], [], []
    for lineno, raw in enumerate(lines, start=1):
        tokens = raw.partition("#")[0].split()
        if not tokens:
            continue
        try:
            label = float(tokens[0])
            pairs = [token.split(":") for token in tokens[1:]]
            row_indices = [int(index) for index, _ in pairs]
            row_values = [float(value) for _, value in pairs]
        except ValueError:
            raise ValueError(f"{path}:{lineno}: malformed LIBSVM line, expected "
                             f"'label index:value ...': {raw!r}") from None
        if label not in (-1.0, 0.0, 1.0):
            raise ValueError(f"{path}:{lineno}: label {tokens[0]!r} is not -1/+1 or 0/1: {raw!r}")
        labels.append(label)
        counts.append(len(row_indices))
        indices.extend(row_indices)
        values.extend(row_values)
        line_numbers.append(lineno)

    indices = np.asarray(indices, np.int64)
    counts = np.asarray(counts, np.int64)
    width = int(indices.max(initial=0)) if num_features is None else num_features
    bad = (indices < 1) | (indices > width)
    if bad.any():
        first = int(np.argmax(bad))
        lineno = line_numbers[np.searchsorted(np.cumsum(counts), first, side="right")]
        raise ValueError(f"{path}:{lineno}: feature index {indices[first]} outside 1..{width}: "
                         f"{lines[lineno - 1]!r}")
    inputs = np.zeros((len(labels), width), np.float32)
    inputs[np.repeat(np.arange(len(labels)), counts), indices - 1] = values
    return inputs, np.where(np.asarray(labels) == 1.0, 1.0, -1.0).astype(np.float32)


def _find(folder: Path, filename: str) -> Path | None:
    for candidate in (folder / filename, folder / f"{filename}.bz2"):
        if candidate.is_file():
            return candidate
    return None


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as file:
        shutil.copyfileobj(response, file)
    os.replace(partial, target)


def load_libsvm(name: str, data_dir: str | os.PathLike | None = None,
                download: bool = False) -> LibsvmData:
    """Loads a LIBSVM binary dataset (files ``<name>`` and ``<name>.t``) as dense float32 arrays.

    Files are read from ``<root>/libsvm/`` (plain or ``.bz2``), root as in :func:`data_root`.
    For the names in :data:`LIBSVM_DATASETS` the feature count is the official one and the row
    counts are checked; other names get as many features as the largest index in either file.

    Args:
        name: dataset name, e.g. ``"a5a"`` or ``"w5a"``.
        data_dir: root folder holding ``libsvm/``; overrides ``$ZOJAX_DATA_DIR`` and the cache.
        download: fetch missing files from the LIBSVM site into ``<root>/libsvm/``. Never done
            implicitly.

    Returns:
        A :class:`LibsvmData`.

    Raises:
        FileNotFoundError: files missing and ``download=False``; lists the full paths expected.
        ValueError: a malformed file, row counts that differ from the official ones, or
            ``download=True`` for an unknown name.

    Example:
        >>> data = load_libsvm("a7a", data_dir="~/data")  # doctest: +SKIP
        >>> data.train_inputs.shape, data.test_inputs.shape  # doctest: +SKIP
        ((16100, 123), (16461, 123))
    """
    folder = data_root(data_dir) / "libsvm"
    info = LIBSVM_DATASETS.get(name)
    paths = {filename: _find(folder, filename) for filename in (name, f"{name}.t")}
    missing = [filename for filename, path in paths.items() if path is None]
    if missing and download:
        if info is None:
            raise ValueError(f"cannot download unknown LIBSVM dataset {name!r}; "
                             f"known: {', '.join(LIBSVM_DATASETS)}")
        for filename in missing:
            paths[filename] = folder / filename
            _download(LIBSVM_URL + filename, paths[filename])
    elif missing:
        expected = "\n".join(f"  {folder / filename}" for filename in missing)
        raise FileNotFoundError(
            f"LIBSVM dataset {name!r} not found. Put these files (plain text or .bz2) here:\n"
            f"{expected}\n(from {LIBSVM_URL}), or pass download=True to fetch them, or point "
            "data_dir= or $ZOJAX_DATA_DIR at a folder that contains libsvm/."
        )

    num_features = None if info is None else info.num_features
    train_inputs, train_labels = parse_libsvm(paths[name], num_features)
    test_inputs, test_labels = parse_libsvm(paths[f"{name}.t"], num_features)
    if info is None:  # unknown name: pad both splits to the wider one
        width = max(train_inputs.shape[1], test_inputs.shape[1])
        train_inputs = np.pad(train_inputs, ((0, 0), (0, width - train_inputs.shape[1])))
        test_inputs = np.pad(test_inputs, ((0, 0), (0, width - test_inputs.shape[1])))
    else:
        for filename, rows, expected in ((name, len(train_labels), info.train_rows),
                                         (f"{name}.t", len(test_labels), info.test_rows)):
            if rows != expected:
                raise ValueError(
                    f"{paths[filename]}: {rows} rows, but the official {filename} has {expected}:"
                    " the file is truncated or not the LIBSVM one (delete it and load again with"
                    " download=True)."
                )
    return LibsvmData(train_inputs, train_labels, test_inputs, test_labels, name)


# Adult's 14 attributes as one-hot groups of the a-series' 123 binary features.
_ADULT_GROUPS = (5, 8, 5, 16, 5, 7, 14, 6, 5, 2, 2, 2, 5, 41)
# Per series: positive rate, ones per row (None: one-hot groups), noise std / score std.
_SYNTHETIC = {"a": (0.24, None, 0.8), "w": (0.03, 11.65, 0.25)}


def synthetic_libsvm(seed: int = 0, like: str = "a5a") -> LibsvmData:
    """A deterministic stand-in with the shapes, sparsity and class balance of a LIBSVM dataset.

    a-series: binary features in 14 one-hot groups (Adult's attributes, 14 ones per row), about
    24% positive. w-series: independent sparse binary features (about 11.6 ones per row), about
    3% positive. Labels are bᵢ = sign(xᵢᵀw* + εᵢ − t) with a hidden w* ~ N(0, I), Gaussian noise
    ε and the threshold t set by the class balance, so logistic regression reaches about 84%
    test accuracy on the a-series (about 98% on the w-series).

    Args:
        seed: seed of the numpy Generator; the same seed gives the same data.
        like: a name in :data:`LIBSVM_DATASETS` whose row and feature counts are copied.

    Returns:
        A :class:`LibsvmData` named ``"synthetic"``.

    Example:
        >>> data = synthetic_libsvm(seed=0, like="a5a")
        >>> data.train_inputs.shape, data.test_inputs.shape
        ((6414, 123), (26147, 123))
    """
    if like not in LIBSVM_DATASETS:
        raise ValueError(f"unknown LIBSVM dataset {like!r}; known: {', '.join(LIBSVM_DATASETS)}")
    info = LIBSVM_DATASETS[like]
    positive_rate, ones_per_row, noise = _SYNTHETIC[like[0]]
    rng = np.random.default_rng(seed)
    rows = info.train_rows + info.test_rows

    if ones_per_row is None:
        inputs = np.zeros((rows, info.num_features), np.float32)
        starts = np.cumsum((0,) + _ADULT_GROUPS[:-1])
        for start, size in zip(starts, _ADULT_GROUPS, strict=True):  # 14 groups, rows vectorized
            category = rng.choice(size, rows, p=rng.dirichlet(np.ones(size)))
            inputs[np.arange(rows), start + category] = 1.0
    else:
        rates = rng.gamma(0.3, 1.0, info.num_features)
        rates = np.minimum(rates * ones_per_row / rates.sum(), 0.9)
        inputs = (rng.random((rows, info.num_features)) < rates).astype(np.float32)

    scores = inputs @ rng.normal(size=info.num_features)
    scores += noise * scores.std() * rng.normal(size=rows)
    labels = np.where(scores > np.quantile(scores, 1.0 - positive_rate), 1.0, -1.0)
    labels = labels.astype(np.float32)
    split = info.train_rows
    return LibsvmData(inputs[:split], labels[:split], inputs[split:], labels[split:], "synthetic")


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST, FashionMNIST).


IDX_DATASETS = ("mnist", "fashion_mnist")
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def parse_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file (plain or ``.gz``) of ``ndim`` dimensions.

    Raises:
        ValueError: the magic number is not that of unsigned bytes in ``ndim`` dimensions, or
            the file is shorter or longer than its header says (the message names the file).
    """
    path = Path(path)
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    header = 4 + 4 * ndim
    if len(data) < 4 or data[:3] != bytes([0, 0, 0x08]) or data[3] != ndim:
        magic = data[:4].hex() if len(data) >= 4 else "missing"
        raise ValueError(f"{path}: not an IDX file of unsigned bytes in {ndim} dimensions "
                         f"(magic number 0x{magic}, expected 0x000008{ndim:02x}).")
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes).")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise ValueError(f"{path}: the header says {shape} = {size} bytes of data, the file "
                         f"holds {len(data) - header}: truncated or not an IDX file.")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_idx(name: str, data_dir: str | os.PathLike | None = None):
    """MNIST or FashionMNIST from IDX files: ``((x_train, y_train), (x_test, y_test))``.

    Files are read from ``<root>/<name>/`` (root as in :func:`data_root`):
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each plain or ``.gz``. Nothing is downloaded.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        data_dir: root folder holding ``<name>/``; overrides ``$ZOJAX_DATA_DIR`` and the cache.

    Returns:
        Images float32 in [0, 1] of shape (n, rows, cols), labels int32 of shape (n,).

    Raises:
        ValueError: an unknown name; a malformed file (bad magic number, truncated), named; image
            and label counts that differ.
        FileNotFoundError: files missing; lists the full paths expected.

    Example:
        >>> (x, y), (x_test, y_test) = load_idx("mnist")  # doctest: +SKIP
        >>> x.shape, x.dtype, y.dtype  # doctest: +SKIP
        ((60000, 28, 28), dtype('float32'), dtype('int32'))
    """
    if name not in IDX_DATASETS:
        raise ValueError(f"name must be one of {IDX_DATASETS}, got {name!r}.")
    folder = data_root(data_dir) / name
    found = {f: next((c for c in (folder / f, folder / f"{f}.gz") if c.is_file()), None)
             for files in IDX_FILES.values() for f in files}
    missing = [f for f, path in found.items() if path is None]
    if missing:
        expected = "\n".join(f"  {folder / f}[.gz]" for f in missing)
        raise FileNotFoundError(
            f"IDX dataset {name!r} not found. Put these files (plain or gzipped) here:\n"
            f"{expected}\nor point data_dir= or $ZOJAX_DATA_DIR at a folder that contains "
            f"{name}/.")
    splits = []
    for images_file, labels_file in IDX_FILES.values():
        images = parse_idx(found[images_file], 3)
        labels = parse_idx(found[labels_file], 1)
        if len(images) != len(labels):
            raise ValueError(f"{found[images_file]} holds {len(images)} images but "
                             f"{found[labels_file]} {len(labels)} labels.")
        splits.append((images.astype(np.float32) / 255, labels.astype(np.int32)))
    return tuple(splits)
